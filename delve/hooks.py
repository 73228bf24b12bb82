"""Forward hooks of a :class:`~delve.tracker.SaturationTracker` and what each layer has recorded.

A hook holds its tracker weakly, so that a model never keeps a tracker alive;
the tracker removes every hook through :func:`remove_handles` on ``close()``,
on exit of its ``with`` block, or when it is garbage collected.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict

import torch
from torch import nn

from delve.adapters import Adapter
from delve.covariance import TorchCovarianceMatrix, as_rows

if TYPE_CHECKING:
    from delve.tracker import SaturationTracker


@dataclass
class ModeState:
    """What one layer accumulated in one mode (train or eval) since the last reset."""

    accumulator: TorchCovarianceMatrix
    calls: int = 0
    rows: int = 0


@dataclass
class LayerState:
    """How one layer's outputs become samples, and its accumulators per mode."""

    adapter: Adapter
    modes: Dict[str, ModeState] = field(default_factory=dict)
    warned_nonfinite: bool = False


class RecordingHook:
    """Forward hook of one layer; holds the tracker weakly so that the model never keeps it alive."""

    __slots__ = ("_tracker", "layer_name")

    def __init__(self, tracker: "SaturationTracker", layer_name: str) -> None:
        self._tracker = weakref.ref(tracker)
        self.layer_name = layer_name

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        tracker = self._tracker()
        if tracker is not None:
            tracker._record(self.layer_name, module, output)


def remove_handles(handles: Dict[str, torch.utils.hooks.RemovableHandle]) -> None:
    """Remove every hook in ``handles`` and empty it."""
    for handle in handles.values():
        handle.remove()
    handles.clear()


def take_samples(samples: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` rows of an adapter's samples, as an ``(count, d)`` matrix."""
    return as_rows(samples)[:count]
