"""The attributes and methods delve 0.1.50's tracker exposed, served by the new design.

:class:`TrackerCompat` is a base class of :class:`~delve.SaturationTracker`; it
holds nothing of its own and only reads (or extends) the tracker's recorders, so
that scripts written for 0.1.50 keep running unchanged.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Union

from torch import nn

from delve.layers import find_layers
from delve.writers import build_writer
from delve.writers.base import MODES, STATMAP, AbstractWriter

if TYPE_CHECKING:
    from delve.covariance import TorchCovarianceMatrix
    from delve.hooks import LayerRecorder


class TrackerCompat:
    """delve 0.1.50's tracker surface: ``logs``, ``seen_samples``, ``interval`` and the layer helpers."""

    _recorders: "OrderedDict[str, LayerRecorder]"
    layers: "OrderedDict[str, nn.Module]"
    log_interval: int
    options: Any
    include_conv: bool
    _add_layer: Callable[[str, nn.Module], None]

    #: Counted nothing in delve 0.1.50 either; kept so that scripts reading it still run.
    global_steps = 0

    @property
    def logs(self) -> Dict[str, "OrderedDict[str, TorchCovarianceMatrix]"]:
        """The accumulators, as 0.1.50 exposed them: ``logs['train-covariance-matrix'][layer]``."""
        return {
            f"{mode}-{STATMAP['cov']}": OrderedDict(
                (name, recorder.modes[mode].accumulator) for name, recorder in self._recorders.items()
            )
            for mode in MODES
        }

    @property
    def seen_samples(self) -> Dict[str, Dict[str, int]]:
        """Rows recorded this epoch per mode and layer: ``seen_samples['train'][layer]``."""
        return {
            mode: {name: recorder.modes[mode].rows for name, recorder in self._recorders.items()} for mode in MODES
        }

    @property
    def interval(self) -> int:
        """``log_interval``, under its 0.1.50 name."""
        return self.log_interval

    @property
    def interpolation_strategy(self) -> Optional[str]:
        """The ``interpolation_strategy`` the tracker was created with."""
        return self.options.interpolation_strategy

    @property
    def interpolation_downsampling(self) -> int:
        """The ``interpolation_downsampling`` the tracker was created with."""
        return self.options.interpolation_downsampling

    def get_layer_from_submodule(
        self, submodule: nn.Module, layers: Dict[str, nn.Module], name_prefix: str = ""
    ) -> Dict[str, nn.Module]:
        """Add the supported layers under ``submodule`` to ``layers`` (names prefixed by ``name_prefix``)."""
        for name, layer in find_layers(submodule, include_conv=self.include_conv).items():
            layers[f"{name_prefix}-{name}" if name_prefix else name] = layer
        return layers

    def get_layers_recursive(self, modules: Union[nn.Module, List[nn.Module]]) -> Dict[str, nn.Module]:
        """The supported layers under ``modules``, named as the tracker names them."""
        return dict(find_layers(modules, include_conv=self.include_conv))

    def register_forward_hooks(self, layer: nn.Module, stats: Optional[List[str]] = None) -> None:
        """Track one more layer (a no-op for a layer tracked already).

        ``stats`` is ignored: every tracked layer gets the tracker's ``stats``.
        The new layer is named ``Module-<i>-<Type>``.
        """
        if any(recorder.module is layer for recorder in self._recorders.values()):
            return
        self._add_layer(f"Module-{len(self._recorders)}-{type(layer).__name__}", layer)

    def _get_writer(self, save_to: Any, writers_args: Mapping[str, Any]) -> AbstractWriter:
        """Build a writer from a key, an instance or a list (0.1.50's name for :func:`delve.writers.build_writer`)."""
        return build_writer(save_to, writers_args)
