"""The tracker: wiring from recorders to statistics and writers.

:class:`SaturationTracker` chooses the layers, gives each a
:class:`~delve.hooks.LayerRecorder`, reads the recorders' accumulators on
:meth:`~SaturationTracker.add_saturations`, asks :mod:`delve.statistics` for the
values and hands them to the writers. It never gets called back by the hooks.
"""
from __future__ import annotations

import contextlib
import functools
import numbers
import os
import warnings
import weakref
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from delve import distributed, metrics, statistics
from delve.adapters import AdapterOptions, check_layer_memory
from delve.classes import ClassMoments
from delve.compat import TrackerCompat
from delve.covariance import TorchCovarianceMatrix, resolve_sample_rows
from delve.hooks import HookHandle, LayerRecorder, RecordingContext, fast_path_owners, takes_hook_keywords
from delve.layers import BlockTypes, ModuleSpec, block_matcher, choose_layers, layer_adapter, unwrap
from delve.results import StatisticsComputer
from delve.summary import tracking_summary
from delve.validation import check_device, check_integer, check_names, check_path
from delve.writers import SaveTo, check_save_to
from delve.writers.runs import open_writers
from delve.writers.base import MODES, STATMAP, AbstractWriter

_STATE_VERSION = 1

#: Statistic keys accepted by ``stats`` when delve is imported (see :func:`delve.register_statistic`).
SUPPORTED_STATS = tuple(STATMAP)

_LayerFilter = Callable[[Dict[str, nn.Module]], Dict[str, nn.Module]]


def _keep_all_layers(layers: Dict[str, nn.Module]) -> Dict[str, nn.Module]:
    return layers


class SaturationTracker(TrackerCompat):
    """Record the saturation and other statistics of every supported layer during training.

    A global forward hook feeds each layer's outputs into a running covariance
    per mode (train or eval, decided by the layer's ``training`` flag). Each
    call of :meth:`add_saturations` computes the statistics from everything
    seen since the previous call, hands them to the writers (one row / epoch),
    and resets.

    Parameters
    ----------
    savefile : str or os.PathLike
        Path of the run: the CSV is ``savefile + '.csv'``, plots and npy files
        go into the folder ``savefile``. A fresh run (``initial_epoch=0``) moves
        the outputs of an earlier run in the same place to ``savefile +
        '.previous'`` (replacing an older backup there) and says so.
    save_to : str, AbstractWriter or list of them
        Writer key (``'csv'``, ``'print'``, and the other keys of
        :data:`delve.writers.WRITERS`), a writer instance, or a list of either.
    modules : torch.nn.Module or list of torch.nn.Module
        A model, a single layer, or a list of layers and models. Supported
        layers: Linear, Hugging Face's Conv1D, Conv1d/2d/3d,
        ConvTranspose1d/2d/3d, RNN, LSTM, GRU, their cells, MultiheadAttention,
        and any type registered with :func:`delve.register_adapter`.
    layer_filter : callable
        Takes the dict of layer name to module and returns it with unwanted
        layers removed. Default: keep all.
    writer_args : dict, optional
        Keyword arguments for writers built from keys.
    log_interval : int
        Record one forward pass in every ``log_interval`` of each layer and mode.
    max_samples : int, optional
        Stop recording a layer in a mode after this many samples per epoch.
    stats : str or list of str
        Statistics to compute, keys of :func:`delve.statistics.statistic_keys`:
        ``lsat`` (saturation), ``idim`` (intrinsic dimensionality), ``cov``
        (covariance matrix), ``det`` (determinant), ``trc`` (trace), ``dtrc``
        (sum of eigenvalues), ``embed`` (a sample of outputs projected on the
        top two eigenvectors), ``samples`` (the number of samples behind the
        statistics), and any registered with :func:`delve.register_statistic`.
    layerwise_sat : bool
        Write the per-layer statistics.
    reset_covariance : bool
        Start each epoch's covariance afresh (default); ``False`` accumulates
        over the whole run.
    average_sat : bool
        Also write the mean saturation over layers per mode
        (``average-train-sat``, ``average-eval-sat``).
    ignore_layer_names : str or list of str
        Layer names not to track.
    include_conv : bool
        ``False`` leaves convolutions out.
    conv_method : str
        How a convolution's output becomes samples: ``channelwise`` (every
        spatial position a sample, the default), ``mean``, ``max``, ``median``
        (global pooling per channel), ``flatten`` (one sample per image).
    timeseries_method : str
        ``last_timestep`` (default) or ``timestepwise`` (every time step a sample).
    sat_threshold : float
        Share of the variance the kept eigendirections explain, in (0, 1].
    nosave : bool
        Compute statistics but write nothing.
    verbose : bool
        Print :meth:`summary` at construction and each layer's values at every
        :meth:`add_saturations`.
    device : str or torch.device, optional
        Where the covariances live; ``None`` (default) keeps them beside the
        activations. A CUDA device on a machine without CUDA falls back to that.
    initial_epoch : int
        Continue an earlier run at this epoch; the writers keep what was
        written before it.
    interpolation_strategy : str, optional
        A mode of :func:`torch.nn.functional.interpolate`; feature maps larger
        than ``interpolation_downsampling`` are resized before recording.
    interpolation_downsampling : int
        Target resolution of that resizing.
    sample_rows : None, bool or int
        Rows of each batch a layer records, drawn uniformly at random without
        replacement and weighted so that the mean and second moment stay
        unbiased (the covariance up to a term of order 1/rows kept). ``None``
        (default) records every row: exact statistics. ``True`` keeps rows
        in proportion to the layer's width, ``max(32, 2 d)`` per batch for
        ``d`` features, so that the estimate's error does not grow with the
        width (its size on the benchmark's models is in the README's cost
        table); an int ``m >= 2`` keeps ``m`` rows.
    memory_budget : int, optional
        Most bytes one layer's covariance may take per mode (about ``12 d^2``
        for ``d`` features). A layer found inside a model that is above it is
        left out with one warning that lists such layers (GPT-2's 50257-wide
        ``lm_head``); a layer given itself in ``modules`` is refused with a
        ValueError. A ``flatten`` convolution, whose width shows only at its
        first batch, is given up then with a warning. Default 1 GiB; ``None``
        means no limit.
    blocks : type, str or list of them, optional
        Module types (or class names such as ``'GPT2Block'``) whose whole
        output is tracked too, under the block's name: the residual stream /
        "hidden states" of a transformer, the output of a ResNet stage. The
        output must be a tensor or a tuple starting with one.
    mask_padding : bool
        Leave padding out of the statistics (default). When a tracked model is
        called with an ``attention_mask`` keyword of shape ``(batch, seq)``, the
        outputs of token-shaped layers keep only the positions where the mask
        is set; :meth:`padding_mask` passes a mask by hand.
    num_classes : int, optional
        Number of classes, needed by the class-conditional statistics ``nc1``
        and ``cdnv``: labels handed over with :meth:`set_labels` (or the
        ``labels`` keyword of a Hugging Face model call) feed per-class sums of
        every layer with one sample per input.
    process_group : ProcessGroup or DeviceMesh, optional
        Under ``torch.distributed``, the ranks whose statistics are merged
        (its rank 0 writes): ``None`` (default) for every rank, a
        ``ProcessGroup``, or a ``DeviceMesh`` (all of its ranks: pass the whole
        data x tensor mesh). Name it when not every rank tracks this model
        (one tracker per pipeline stage); data-, tensor- and sequence-parallel
        ranks need nothing (see the "Distributed training" page of the docs).

    Examples
    --------
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> with SaturationTracker("runs/doc", save_to="csv", modules=model, nosave=True) as tracker:
    ...     _ = model(torch.randn(32, 4))
    ...     results = tracker.add_saturations()
    >>> sorted(results)
    ['train-saturation_0', 'train-saturation_2']
    """

    def __init__(
        self,
        savefile: str,
        save_to: SaveTo,
        modules: ModuleSpec,
        layer_filter: _LayerFilter = _keep_all_layers,
        writer_args: Optional[Dict[str, Any]] = None,
        log_interval: int = 1,
        max_samples: Optional[int] = None,
        stats: Sequence[str] = ("lsat",),
        layerwise_sat: bool = True,
        reset_covariance: bool = True,
        average_sat: bool = False,
        ignore_layer_names: Union[str, Sequence[str]] = (),
        include_conv: bool = True,
        conv_method: str = "channelwise",
        timeseries_method: str = "last_timestep",
        sat_threshold: float = 0.99,
        nosave: bool = False,
        verbose: bool = False,
        device: Union[str, torch.device, None] = None,
        initial_epoch: int = 0,
        interpolation_strategy: Optional[str] = None,
        interpolation_downsampling: int = 32,
        sample_rows: Union[None, bool, int] = None,
        memory_budget: Optional[int] = 2**30,
        blocks: BlockTypes = None,
        mask_padding: bool = True,
        num_classes: Optional[int] = None,
        process_group: Any = None,
    ) -> None:
        self._closed = True  # until construction succeeds
        # Nothing is written with nosave=True, so an empty savefile is harmless there (callbacks probe with it).
        self.savefile = os.fspath(savefile) if nosave and savefile == "" else check_path("savefile", savefile)
        check_save_to(save_to)
        self.stats = statistics.normalize_keys(stats)
        self.threshold = metrics.check_share("sat_threshold", sat_threshold)
        self.log_interval = check_integer("log_interval", log_interval, 1)
        self.max_samples = check_integer("max_samples", max_samples, 1, optional=True)
        self.initial_epoch = check_integer("initial_epoch", initial_epoch, 0)
        self.num_classes = check_integer("num_classes", num_classes, 2, optional=True)
        wants_classes = [key for key in self.stats if key in statistics.CLASS_STATISTICS]
        if wants_classes and self.num_classes is None:
            raise ValueError(
                f"stats {wants_classes} need the labels: pass num_classes (the number of classes) and hand "
                "each batch's labels to tracker.set_labels(labels) before its forward pass"
            )
        self.memory_budget = check_integer("memory_budget", memory_budget, 1, optional=True)
        if isinstance(sample_rows, numbers.Integral) and not isinstance(sample_rows, bool):
            sample_rows = int(sample_rows)
        self.sample_rows = resolve_sample_rows(sample_rows)
        if modules is None:
            raise ValueError("modules must be a torch.nn.Module or a list of them, got None")
        if not callable(layer_filter):
            raise ValueError(f"layer_filter must be a function from dict of layers to dict, got {layer_filter!r}")
        if writer_args is not None and not isinstance(writer_args, Mapping):
            raise ValueError(f"writer_args must be None or a dict of writer keyword arguments, got {writer_args!r}")
        self.options = AdapterOptions(
            conv_method=conv_method,
            timeseries_method=timeseries_method,
            interpolation_strategy=interpolation_strategy,
            interpolation_downsampling=check_integer("interpolation_downsampling", interpolation_downsampling, 1),
        )
        self.layerwise_sat = layerwise_sat
        self.reset_covariance = reset_covariance
        self.average_sat = average_sat
        self.include_conv = include_conv
        self.conv_method = conv_method
        self.timeseries_method = timeseries_method
        self.ignore_layer_names = check_names("ignore_layer_names", ignore_layer_names)
        self.nosave = nosave
        self.verbose = verbose
        self.device = check_device(device)
        self.process_group = distributed.resolve_group(process_group)
        self.epoch = self.initial_epoch
        self.last_results: Dict[str, Any] = {}
        self._last_results_epoch = self.epoch
        self._context = RecordingContext(
            options=self.options,
            log_interval=self.log_interval,
            max_samples=self.max_samples,
            mask_padding=bool(mask_padding),
        )
        self._is_block = block_matcher(blocks)
        self.layers, self.skipped_layers = choose_layers(
            modules, layer_filter, self.ignore_layer_names, include_conv, blocks, self.options, self.memory_budget
        )
        self._recorders: "OrderedDict[str, LayerRecorder]" = OrderedDict(
            (name, self._new_recorder(name, layer, index)) for index, (name, layer) in enumerate(self.layers.items())
        )
        self._epoch_dirty = False
        self._statistics = StatisticsComputer(
            self.stats, self.threshold, layerwise_sat, average_sat, self.process_group
        )

        writes_files = distributed.is_main_process(self.process_group)
        # Under torch.distributed only rank 0 writes; the other ranks get a writer that drops everything.
        self.writer: AbstractWriter = (
            open_writers(save_to, writer_args, self.savefile, self.initial_epoch, self.nosave)
            if writes_files
            else distributed.NullWriter(**dict(writer_args or {}, savepath=self.savefile))
        )
        roots = [unwrap(entry) for entry in ([modules] if isinstance(modules, nn.Module) else modules)]
        self._handle = HookHandle(
            self._recorders.values(),
            [root for root in roots if takes_hook_keywords(root)],
            self._context,
            guarded=fast_path_owners(roots, self.layers.values()),
        )
        self._finalizer = weakref.finalize(self, self._handle.remove)
        self._closed = False
        if verbose and writes_files:
            print(self.summary())

    # ------------------------------------------------------------ set-up
    def _new_recorder(self, name: str, layer: nn.Module, index: int) -> LayerRecorder:
        accumulators = {
            mode: TorchCovarianceMatrix(
                device=self.device,
                save_data="embed" in self.stats,
                sample_rows=self.sample_rows,
                seed=index,
                memory_budget=self.memory_budget,
                name=name,
            )
            for mode in MODES
        }
        classes = None
        if any(key in statistics.CLASS_STATISTICS for key in self.stats):
            classes = {mode: ClassMoments(self.num_classes) for mode in MODES}
        return LayerRecorder(name, layer, layer_adapter(layer, self._is_block), self._context, accumulators, classes)

    def _add_layer(self, name: str, layer: nn.Module) -> None:
        """Track one more layer, given by the user (so its memory budget is enforced with an error)."""
        check_layer_memory(name, layer, self.options, self.memory_budget)
        recorder = self._new_recorder(name, layer, len(self._recorders))
        self.layers[name] = layer
        self._recorders[name] = recorder
        self._handle.add(recorder)

    # ------------------------------------------------------------- recording
    def is_recording(self) -> bool:
        """Whether the hooks currently record outputs."""
        return self._context.record

    @property
    def record(self) -> bool:
        """Whether the hooks record (as in delve 0.1.50); see :meth:`stop` and :meth:`resume`."""
        return self._context.record

    @record.setter
    def record(self, value: bool) -> None:
        self._context.record = bool(value)

    def stop(self) -> None:
        """Pause recording; what was recorded so far is kept."""
        self._context.record = False

    def resume(self) -> None:
        """Resume recording after :meth:`stop`."""
        self._context.record = True

    @contextlib.contextmanager
    def padding_mask(self, mask: torch.Tensor) -> Iterator[None]:
        """Leave out padding positions in the forward passes run inside this block.

        For training loops that do not pass ``attention_mask`` to the model:
        outputs of token-shaped layers of shape ``(batch, seq, features)`` keep
        only the positions where ``mask`` (``(batch, seq)``, bool or 0/1) is set.

        Parameters
        ----------
        mask : torch.Tensor
            The mask of the batch.
        """
        if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
            raise ValueError(f"mask must be a (batch, seq) tensor, got {mask!r}")
        previous, self._context.manual_mask = self._context.manual_mask, mask
        try:
            yield
        finally:
            self._context.manual_mask = previous

    def set_labels(self, labels: Optional[torch.Tensor]) -> None:
        """Hand over the labels of the next batch(es), for the class-conditional statistics.

        Call it before the forward pass of each batch (``None`` forgets them).
        Layers with one sample per input (a Linear on vectors, a pooled
        convolution) then add their samples to per-class sums; Hugging Face
        models called with a ``labels`` keyword need no call.

        Parameters
        ----------
        labels : torch.Tensor or None
            One integer class per input, shape ``(batch,)``; values outside
            ``[0, num_classes)`` (an ignore index) are left out.
        """
        if labels is not None and not (isinstance(labels, torch.Tensor) and labels.ndim == 1):
            raise ValueError(f"labels must be a 1-D tensor of class indices (one per input), got {labels!r}")
        self._context.manual_labels = labels

    # ------------------------------------------------------------ statistics
    def compute(self) -> Dict[str, Any]:
        """Statistics of everything recorded since the last reset, without writing or resetting.

        Under ``torch.distributed`` this is a collective call (every rank must make
        it) and the statistics are those of the data of all ranks.

        Returns
        -------
        dict
            Output name (``'{mode}-{statistic}_{layer}'``) to value. A mode in
            which no layer saw any data is left out; a layer without data in a
            mode that has data gets NaN (0 for ``samples``).
        """
        return self._statistics.compute(self._recorders)

    def reset(self) -> None:
        """Forget every recorded sample and restart the per-epoch counters."""
        self._reset(accumulators=True)

    def _reset(self, accumulators: bool) -> None:
        """Restart the per-epoch counters (``log_interval``, ``max_samples``), and the samples if asked."""
        for recorder in self._recorders.values():
            recorder.reset(accumulators)

    def _check_open(self, action: str) -> None:
        if self._closed:
            raise RuntimeError(f"{action} called on a closed SaturationTracker")

    def add_saturations(self, save: bool = True) -> Dict[str, Any]:
        """Compute the statistics of this epoch, send them to the writers and (by default) save.

        Parameters
        ----------
        save : bool
            Also call :meth:`save`, which closes the epoch (one CSV row).

        Returns
        -------
        dict
            The values handed to the writers (also kept in ``last_results``).
        """
        self._check_open("add_saturations()")
        results = self.compute()
        self.writer = distributed.writer_for_rank(self.writer, self.process_group)
        self._statistics.warn_skipped_batches(self._recorders, self.epoch, cumulative=not self.reset_covariance)
        if not self.nosave and results:
            self.writer.add_scalars("", results, global_step=self.epoch)
        if self.verbose and distributed.is_main_process(self.process_group):
            self._print_saturations(results)
        self.last_results = results
        self._last_results_epoch = self.epoch
        self._epoch_dirty = True
        self._reset(accumulators=self.reset_covariance)
        if save:
            self.save()
        return results

    def tidy_results(self) -> Any:
        """``last_results`` as a long :class:`pandas.DataFrame`: columns epoch, mode, statistic, layer, value.

        One row per number (arrays such as ``cov`` are left out), as
        :func:`delve.analysis.tidy_frame` builds it from a written run.

        Examples
        --------
        >>> model = nn.Sequential(nn.Linear(4, 3))
        >>> with SaturationTracker("runs/doc_tidy", save_to="csv", modules=model, nosave=True) as tracker:
        ...     _ = model(torch.randn(16, 4))
        ...     _ = tracker.add_saturations()
        ...     tracker.tidy_results()[["epoch", "mode", "statistic", "layer", "value"]]
           epoch   mode   statistic layer  value
        0      0  train  saturation     0    1.0
        """
        import pandas as pd

        from delve.analysis import tidy_frame

        return tidy_frame(pd.DataFrame([self.last_results], index=[self._last_results_epoch]))

    def _print_saturations(self, results: Mapping[str, Any]) -> None:
        lines = [f"delve epoch {self.epoch}:"]
        for key, value in results.items():
            if np.ndim(value) == 0:
                lines.append(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
        print("\n".join(lines))

    def summary(self, as_frame: bool = False) -> Any:
        """What is tracked: per layer its type, features, how outputs become rows, and statistics memory.

        Parameters
        ----------
        as_frame : bool
            Return a :class:`pandas.DataFrame` instead of text.

        Returns
        -------
        str or pandas.DataFrame
            A table with a total line (text), like torchinfo's; layers left out
            by ``memory_budget`` are listed below it.
        """
        return tracking_summary(self._recorders.values(), self.options, self.skipped_layers, as_frame=as_frame)

    # ---------------------------------------------------------------- output
    def add_scalar(self, name: str, value: Any, **kwargs: Any) -> None:
        """Log a user value (accuracy, loss...) in the current epoch's row."""
        self._check_open("add_scalar()")
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy() if value.numel() > 1 else value.item()
        self._epoch_dirty = True
        if not self.nosave:
            kwargs.setdefault("global_step", self.epoch)
            self.writer.add_scalar(name, value, **kwargs)

    def add_scalars(self, prefix: str, value_dict: Mapping[str, Any], **kwargs: Any) -> None:
        """Log several user values, named ``prefix + name``."""
        for name, value in value_dict.items():
            self.add_scalar(prefix + name, value, **kwargs)

    def save(self) -> None:
        """Persist the current epoch in every writer and start the next one.

        Nothing happens when nothing was logged since the last save (a second
        ``save()`` after ``add_saturations()``, as 0.1.50's examples do, opens no
        empty row). A failing save (full disk, a folder removed mid-run) never
        stops training: it warns, and the writers keep the values in memory for
        the next save.
        """
        self._check_open("save()")
        if not self._epoch_dirty:
            return
        if not self.nosave:
            try:
                self.writer.save()
            except OSError as error:
                warnings.warn(
                    f"delve could not save epoch {self.epoch} ({type(error).__name__}: {error}); the values "
                    "stay in memory and are written at the next save",
                    RuntimeWarning,
                    stacklevel=2,
                )
        self._epoch_dirty = False
        self.epoch += 1

    def state_dict(self) -> Dict[str, Any]:
        """Everything recorded so far, to resume mid-epoch from a checkpoint.

        Returns
        -------
        dict
            A ``version`` key, the epoch, whether recording is on, and per layer
            and mode the accumulator state (with the row sampler's state) and
            the per-epoch counters. Saved rows of the ``embed`` statistic are
            not included.
        """
        return {
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "record": self.record,
            "layers": {name: recorder.state_dict() for name, recorder in self._recorders.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, so the statistics go on where they were.

        Raises
        ------
        ValueError
            If the state comes from another version or tracks other layers.
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported SaturationTracker state version {state.get('version')!r}")
        saved, tracked = set(state["layers"]), set(self._recorders)
        if saved != tracked:
            raise ValueError(
                f"state tracks other layers: missing {sorted(tracked - saved)}, unexpected {sorted(saved - tracked)}"
            )
        self.epoch = state["epoch"]
        self.record = state["record"]
        for name, saved in state["layers"].items():
            self._recorders[name].load_state_dict(saved)

    def close(self) -> None:
        """Remove every hook and close the writers; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()
        self.writer.close()

    def __enter__(self) -> "SaturationTracker":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        # Writer-specific add_* methods (add_histogram of TensorBoard, say), as in 0.1.50.
        if name.startswith("add_") and "writer" in self.__dict__:
            return getattr(self.__dict__["writer"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"SaturationTracker(savefile={self.savefile!r}, layers={list(self.layers)})"


class CheckLayerSat(SaturationTracker):
    """Deprecated name of :class:`SaturationTracker`; warns and behaves identically."""

    @functools.wraps(SaturationTracker.__init__)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        warnings.warn(
            "CheckLayerSat is deprecated; use delve.SaturationTracker (same arguments)",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(*args, **kwargs)

