"""The tracker: wiring from forward hooks to accumulators, statistics and writers."""
from __future__ import annotations

import os
import warnings
import weakref
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from delve import distributed, metrics
from delve.adapters import AdapterOptions, check_layer_memory, find_adapter
from delve.covariance import TorchCovarianceMatrix, num_samples, resolve_sample_rows
from delve.hooks import LayerState, ModeState, RecordingHook, remove_handles, take_samples
from delve.layers import ModuleSpec, find_layers
from delve.writers import SaveTo, build_writer, check_save_to
from delve.writers.base import MODES, STATMAP, AbstractWriter

_STATE_VERSION = 1

#: Statistic keys accepted by ``stats``; their output names are in :data:`delve.writers.STATMAP`.
SUPPORTED_STATS = tuple(STATMAP)

_EIGENVALUE_STATS = {"lsat", "idim", "dtrc"}
_LayerFilter = Callable[[Dict[str, nn.Module]], Dict[str, nn.Module]]


def _keep_all_layers(layers: Dict[str, nn.Module]) -> Dict[str, nn.Module]:
    return layers


def _normalize_stats(stats: Union[str, Iterable[str]]) -> List[str]:
    """Validate ``stats``; ``'lsat_eval'``-style keys of 0.1.50 mean their base key."""
    requested = [stats] if isinstance(stats, str) else list(stats)
    normalized: List[str] = []
    for stat in requested:
        base = stat
        if isinstance(stat, str) and stat not in STATMAP and stat.rsplit("_", 1)[-1] in MODES:
            base = stat.rsplit("_", 1)[0]
        if base not in STATMAP:
            raise ValueError(
                f"stats contains {stat!r}, which is not a statistic; choose from "
                f"{', '.join(map(repr, SUPPORTED_STATS))}"
            )
        if base not in normalized:
            normalized.append(base)
    return normalized


def _resolve_device(device: Union[str, torch.device, None]) -> Optional[torch.device]:
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device={device!r} is not a torch device: {error}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(
            f"device={device!r} but CUDA is not available; delve keeps its statistics on the "
            "device of the activations instead",
            stacklevel=3,
        )
        return None
    return resolved


class SaturationTracker:
    """Record the saturation and other statistics of every supported layer during training.

    Forward hooks feed each layer's outputs into a running covariance per mode
    (train or eval, decided by the layer's ``training`` flag). Each call of
    :meth:`add_saturations` computes the statistics from everything seen since
    the previous call, hands them to the writers (one row / epoch), and resets.

    Parameters
    ----------
    savefile : str
        Path of the run: the CSV is ``savefile + '.csv'``, plots and npy files
        go into the folder ``savefile``.
    save_to : str, AbstractWriter or list of them
        Writer key (``'csv'``, ``'print'``, and the other keys of
        :data:`delve.writers.WRITERS`), a writer instance, or a list of either.
    modules : torch.nn.Module or list of torch.nn.Module
        A model, a single layer, or a list of layers and models. Supported
        layers: Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, RNN, LSTM, GRU,
        their cells, MultiheadAttention, and any type registered with
        :func:`delve.register_adapter`.
    layer_filter : callable
        Takes the dict of layer name to module and returns it with unwanted
        layers removed. Default: keep all.
    writer_args : dict, optional
        Keyword arguments for writers built from keys.
    log_interval : int
        Record one forward pass in every ``log_interval`` of each layer and mode.
    max_samples : int, optional
        Stop recording a layer in a mode after this many samples per epoch.
    stats : list of str
        Statistics to compute: ``lsat`` (saturation), ``idim`` (intrinsic
        dimensionality), ``cov`` (covariance matrix), ``det`` (determinant),
        ``trc`` (trace), ``dtrc`` (sum of eigenvalues), ``embed`` (a sample of
        outputs projected on the top two eigenvectors).
    layerwise_sat : bool
        Write the per-layer statistics.
    reset_covariance : bool
        Start each epoch's covariance afresh (default); ``False`` accumulates
        over the whole run.
    average_sat : bool
        Also write the mean saturation over layers per mode
        (``average-train-sat``, ``average-eval-sat``).
    ignore_layer_names : list of str
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
        Print each layer's saturation at every :meth:`add_saturations`.
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
        (default) records every row: exact statistics. ``True`` keeps
        :data:`delve.covariance.DEFAULT_SAMPLE_ROWS` rows per batch, which
        brings most models within a few percent of untracked training (see
        ``benchmarks/overhead.py``); an int ``m >= 2`` keeps ``m`` rows.
    memory_budget : int, optional
        Most bytes one layer's covariance may take per mode (about ``16 d^2``
        for ``d`` features). A layer above it is refused with a ValueError that
        names it, at construction when its width is known (for ``flatten``, at
        its first batch: the layer is then disabled with a warning). Default
        1 GiB; ``None`` means no limit.

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
        ignore_layer_names: Sequence[str] = (),
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
    ) -> None:
        self._handles: Dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._closed = False
        self.stats = _normalize_stats(stats)
        metrics.check_share("sat_threshold", sat_threshold)
        if isinstance(log_interval, bool) or not isinstance(log_interval, int) or log_interval < 1:
            raise ValueError(f"log_interval must be an int >= 1, got {log_interval!r}")
        if max_samples is not None and (
            isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
        ):
            raise ValueError(f"max_samples must be None or an int >= 1, got {max_samples!r}")
        if isinstance(initial_epoch, bool) or not isinstance(initial_epoch, int) or initial_epoch < 0:
            raise ValueError(f"initial_epoch must be an int >= 0, got {initial_epoch!r}")
        if memory_budget is not None and (
            isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1
        ):
            raise ValueError(f"memory_budget must be None or an int >= 1 (bytes), got {memory_budget!r}")
        self.sample_rows = resolve_sample_rows(sample_rows)
        self.memory_budget = memory_budget
        check_save_to(save_to)
        self.options = AdapterOptions(
            conv_method=conv_method,
            timeseries_method=timeseries_method,
            interpolation_strategy=interpolation_strategy,
            interpolation_downsampling=interpolation_downsampling,
        )
        self.savefile = savefile
        self.threshold = float(sat_threshold)
        self.log_interval = log_interval
        self.max_samples = max_samples
        self.layerwise_sat = layerwise_sat
        self.reset_covariance = reset_covariance
        self.average_sat = average_sat
        self.include_conv = include_conv
        self.conv_method = conv_method
        self.timeseries_method = timeseries_method
        self.ignore_layer_names = list(ignore_layer_names)
        self.nosave = nosave
        self.verbose = verbose
        self.device = _resolve_device(device)
        self.initial_epoch = initial_epoch
        self.epoch = initial_epoch
        self.record = True
        self.last_results: Dict[str, Any] = {}

        layers = layer_filter(find_layers(modules, include_conv=include_conv))
        self.layers: "OrderedDict[str, nn.Module]" = OrderedDict(
            (name, layer) for name, layer in layers.items() if name not in self.ignore_layer_names
        )
        if not self.layers:
            raise ValueError(
                "modules contains no layer delve can track (after include_conv, layer_filter and "
                "ignore_layer_names); supported are Linear, Conv/ConvTranspose 1d-3d, RNN/LSTM/GRU "
                "and their cells, MultiheadAttention, and types added with delve.register_adapter"
            )
        self._layer_states: Dict[str, LayerState] = {}
        for index, (name, layer) in enumerate(self.layers.items()):
            check_layer_memory(name, layer, self.options, memory_budget)
            self._layer_states[name] = LayerState(
                adapter=find_adapter(layer),
                modes={mode: ModeState(self._new_accumulator(name, index)) for mode in MODES},
            )

        writer_args = dict(writer_args or {})
        writer_args.setdefault("savepath", savefile)
        # Under torch.distributed only rank 0 writes; the other ranks get a writer that drops everything.
        writes_files = distributed.is_main_process()
        if not nosave and writes_files:
            folder = os.path.abspath(savefile)
            os.makedirs(folder, exist_ok=True)
        self.writer: AbstractWriter = (
            build_writer(save_to, writer_args) if writes_files else distributed.NullWriter(**writer_args)
        )
        if initial_epoch != 0 and not nosave:
            self.writer.resume_from_saved_state(initial_epoch)

        self._finalizer = weakref.finalize(self, remove_handles, self._handles)
        for name, layer in self.layers.items():
            self._handles[name] = layer.register_forward_hook(RecordingHook(self, name))

    # ------------------------------------------------------------- recording
    def _new_accumulator(self, name: str, index: int) -> TorchCovarianceMatrix:
        return TorchCovarianceMatrix(
            device=self.device,
            save_data="embed" in self.stats,
            sample_rows=self.sample_rows,
            seed=index,
            memory_budget=self.memory_budget,
            name=name,
        )

    def _record(self, name: str, module: nn.Module, output: Any) -> None:
        """Hot path: turn one forward pass's output into samples and accumulate them."""
        if not self.record:
            return
        layer_state = self._layer_states[name]
        state = layer_state.modes["train" if module.training else "eval"]
        call = state.calls
        state.calls += 1
        if call % self.log_interval:
            return
        if self.max_samples is not None and state.rows >= self.max_samples:
            return
        try:
            with torch.no_grad():
                samples = layer_state.adapter(module, output, self.options)
                if samples is None:
                    return
                count = num_samples(samples)
                if self.max_samples is not None and state.rows + count > self.max_samples:
                    samples = take_samples(samples, self.max_samples - state.rows)
                    count = samples.shape[0]
                state.accumulator.update(samples)
                state.rows += count
        except Exception as error:  # a tracking failure must never stop training
            self._disable_layer(name, error)

    def _disable_layer(self, name: str, error: BaseException) -> None:
        handle = self._handles.pop(name, None)
        if handle is not None:
            handle.remove()
        warnings.warn(
            f"delve stopped tracking layer {name!r}: {type(error).__name__}: {error}",
            RuntimeWarning,
            stacklevel=2,
        )

    def is_recording(self) -> bool:
        """Whether the hooks currently record outputs."""
        return self.record

    def stop(self) -> None:
        """Pause recording; what was recorded so far is kept."""
        self.record = False

    def resume(self) -> None:
        """Resume recording after :meth:`stop`."""
        self.record = True

    # ------------------------------------------------------------ statistics
    def _mode_has_data(self, mode: str, accumulators: Mapping[Tuple[str, str], TorchCovarianceMatrix]) -> bool:
        return any(accumulators[(name, mode)].count > 0 for name in self._layer_states)

    def _synced_accumulators(self) -> Dict[Tuple[str, str], TorchCovarianceMatrix]:
        """``(layer, mode)`` to accumulator, merged over all ranks under torch.distributed (local ones untouched)."""
        local = {
            (name, mode): layer_state.modes[mode].accumulator
            for name, layer_state in self._layer_states.items()
            for mode in MODES
        }
        return distributed.sync_accumulators(local)

    def _layer_stats(
        self, mode: str, name: str, accumulator: TorchCovarianceMatrix
    ) -> Tuple[Dict[str, Any], float]:
        """Every requested statistic of one layer in one mode, and its saturation (NaN without data)."""
        keys = {stat: f"{mode}-{STATMAP[stat]}_{name}" for stat in self.stats}
        values: Dict[str, Any] = {}
        if accumulator.count == 0:
            for stat in self.stats:
                if stat not in ("cov", "embed"):
                    values[keys[stat]] = float("nan")
            return values, float("nan")
        cov = accumulator.compute()
        need_eigenvalues = bool(_EIGENVALUE_STATS & set(self.stats)) or self.average_sat
        eigvals = metrics.eigenvalues(cov) if need_eigenvalues else None
        saturation = metrics.saturation_from_eigenvalues(eigvals, self.threshold) if need_eigenvalues else np.nan
        for stat in self.stats:
            if stat == "lsat":
                values[keys[stat]] = saturation
            elif stat == "idim":
                values[keys[stat]] = metrics.intrinsic_dimensionality_from_eigenvalues(eigvals, self.threshold)
            elif stat == "dtrc":
                values[keys[stat]] = metrics.diagonal_trace_from_eigenvalues(eigvals)
            elif stat == "trc":
                values[keys[stat]] = metrics.compute_cov_trace(cov)
            elif stat == "det":
                values[keys[stat]] = metrics.compute_cov_determinant(cov)
            elif stat == "cov":
                values[keys[stat]] = cov.cpu().numpy()
            elif stat == "embed":
                values[keys[stat]] = self._embed(cov, accumulator)
        return values, saturation

    @staticmethod
    def _embed(cov: torch.Tensor, accumulator: TorchCovarianceMatrix) -> np.ndarray:
        samples = accumulator.saved_samples
        _, vectors = torch.linalg.eigh(cov)
        top = vectors[:, -2:].flip(1)
        centered = samples.to(torch.float64) - accumulator.mean.to(samples.device)
        return (centered @ top.to(samples.device)).cpu().numpy()

    def _warn_nonfinite(self) -> None:
        for name, layer_state in self._layer_states.items():
            if layer_state.warned_nonfinite:
                continue
            skipped = sum(state.accumulator.num_skipped_batches for state in layer_state.modes.values())
            if skipped:
                layer_state.warned_nonfinite = True
                warnings.warn(
                    f"delve skipped {skipped} batch(es) of layer {name!r} because they held NaN or Inf; "
                    "the statistics use the finite batches only",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def compute(self) -> Dict[str, Any]:
        """Statistics of everything recorded since the last reset, without writing or resetting.

        Under ``torch.distributed`` this is a collective call (every rank must make
        it) and the statistics are those of the data of all ranks.

        Returns
        -------
        dict
            Output name (``'{mode}-{statistic}_{layer}'``) to value. A mode in
            which no layer saw any data is left out; a layer without data in a
            mode that has data gets NaN.
        """
        results: Dict[str, Any] = {}
        accumulators = self._synced_accumulators()
        for mode in MODES:
            if not self._mode_has_data(mode, accumulators):
                continue
            saturations = []
            for name in self._layer_states:
                accumulator = accumulators[(name, mode)]
                values, saturation = self._layer_stats(mode, name, accumulator)
                if self.layerwise_sat:
                    results.update(values)
                saturations.append(saturation)
            if self.average_sat:
                finite = [value for value in saturations if not np.isnan(value)]
                results[f"average-{mode}-sat"] = float(np.mean(finite)) if finite else float("nan")
        return results

    def reset(self) -> None:
        """Forget every recorded sample and restart the per-epoch counters."""
        self._reset(accumulators=True)

    def _reset(self, accumulators: bool) -> None:
        """Restart the per-epoch counters (``log_interval``, ``max_samples``), and the samples if asked."""
        for layer_state in self._layer_states.values():
            for state in layer_state.modes.values():
                if accumulators:
                    state.accumulator.reset()
                state.calls = state.rows = 0

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
        if self._closed:
            raise RuntimeError("add_saturations() called on a closed SaturationTracker")
        results = self.compute()
        self.writer = distributed.writer_for_rank(self.writer)
        self._warn_nonfinite()
        if not self.nosave and results:
            self.writer.add_scalars("", results, global_step=self.epoch)
        if self.verbose and distributed.is_main_process():
            self._print_saturations(results)
        self.last_results = results
        self._reset(accumulators=self.reset_covariance)
        if save:
            self.save()
        return results

    def _print_saturations(self, results: Mapping[str, Any]) -> None:
        lines = [f"delve epoch {self.epoch}:"]
        for key, value in results.items():
            if np.ndim(value) == 0:
                lines.append(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
        print("\n".join(lines))

    # ---------------------------------------------------------------- output
    def add_scalar(self, name: str, value: Any, **kwargs: Any) -> None:
        """Log a user value (accuracy, loss...) in the current epoch's row."""
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy() if value.numel() > 1 else value.item()
        if not self.nosave:
            kwargs.setdefault("global_step", self.epoch)
            self.writer.add_scalar(name, value, **kwargs)

    def add_scalars(self, prefix: str, value_dict: Mapping[str, Any], **kwargs: Any) -> None:
        """Log several user values, named ``prefix + name``."""
        for name, value in value_dict.items():
            self.add_scalar(prefix + name, value, **kwargs)

    def save(self) -> None:
        """Persist the current epoch in every writer and start the next one.

        A failing save (full disk, a folder removed mid-run) never stops training:
        it warns, and the writers keep the values in memory for the next save.
        """
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
        self.epoch += 1

    def state_dict(self) -> Dict[str, Any]:
        """Everything recorded so far, to resume mid-epoch from a checkpoint.

        Returns
        -------
        dict
            A ``version`` key, the epoch, whether recording is on, and per layer
            and mode the accumulator state and the per-epoch counters. Saved rows
            of the ``embed`` statistic are not included.
        """
        return {
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "record": self.record,
            "layers": {
                name: {
                    mode: {"accumulator": state.accumulator.state_dict(), "calls": state.calls, "rows": state.rows}
                    for mode, state in layer_state.modes.items()
                }
                for name, layer_state in self._layer_states.items()
            },
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
        saved, tracked = set(state["layers"]), set(self._layer_states)
        if saved != tracked:
            raise ValueError(
                f"state tracks other layers: missing {sorted(tracked - saved)}, unexpected {sorted(saved - tracked)}"
            )
        self.epoch = state["epoch"]
        self.record = state["record"]
        for name, modes in state["layers"].items():
            for mode, saved_mode in modes.items():
                target = self._layer_states[name].modes[mode]
                target.accumulator.load_state_dict(saved_mode["accumulator"])
                target.calls = saved_mode["calls"]
                target.rows = saved_mode["rows"]

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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        warnings.warn(
            "CheckLayerSat is deprecated; use delve.SaturationTracker (same arguments)",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(*args, **kwargs)
