"""How a tracker sees forward passes: one global forward hook and a recorder per tracked layer.

A :class:`LayerRecorder` owns everything one layer records: its adapter (how
outputs become samples), its padding mask rule and its accumulators per mode.
Recorders are not stored on the user's modules. One forward hook registered
with :func:`torch.nn.modules.module.register_module_forward_hook` looks the
calling module up by identity and hands the output to its recorders. So a
tracked model stays a plain model: ``copy.deepcopy`` (EMA copies,
``AveragedModel``, best-model snapshots) gives a copy that feeds nothing,
``pickle`` / ``torch.save`` and ``torch.jit.script`` see no hook of delve's
(except the two below).

A model whose ``forward`` takes an ``attention_mask`` or ``labels`` (Hugging
Face models) gets one forward pre-hook of its own, :class:`KeywordHook`, that
reads the padding masks and the labels from the call's keyword arguments. It pickles and deep-copies to :class:`InertHook`,
which does nothing. So does :class:`FastPathGuard`, the do-nothing hook that
keeps :class:`torch.nn.TransformerEncoderLayer`'s fused eval path from skipping
the tracked layers inside it.

Forward passes that are not ordinary are skipped and counted, never recorded
and never held against the layer: the recomputation of
``torch.utils.checkpoint`` during backward (the layer was recorded in the
forward), ``torch.jit.trace``, and ``torch.func`` transforms (``vmap``,
``grad``, ``jacrev``). A layer is given up only after
:data:`MAX_CONSECUTIVE_FAILURES` failing ordinary forwards in a row.

An output spread over ranks (a ``DTensor`` of tensor parallelism) first becomes
this rank's rows with every feature (:func:`delve.sharding.local_output`); a
layer whose layout cannot be told is left out at once, with a warning.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

from delve.adapters import AdapterOptions, LayerAdapter, first_tensor
from delve.classes import ClassMoments
from delve.covariance import TorchCovarianceMatrix, as_rows, num_samples
from delve.sharding import ShardingError, local_output

#: A layer whose recording fails on this many ordinary forward passes in a row is given up.
MAX_CONSECUTIVE_FAILURES = 3

#: Keyword arguments of a model's forward that :class:`KeywordHook` reads as padding masks.
MASK_KEYWORDS = ("attention_mask", "decoder_attention_mask")

#: All keyword arguments :class:`KeywordHook` reads (the masks and ``labels``).
HOOK_KEYWORDS = MASK_KEYWORDS + ("labels",)


@dataclass
class RecordingContext:
    """What all recorders of one tracker share: switches, per-epoch limits and the current padding masks.

    Attributes
    ----------
    options : AdapterOptions
        How outputs become samples.
    log_interval : int
        Record one forward pass in every ``log_interval`` of each layer and mode.
    max_samples : int or None
        Rows per layer and mode after which recording stops until the next reset.
    record : bool
        Whether the recorders record at all (``tracker.stop()`` / ``resume()``).
    mask_padding : bool
        Whether token rows outside the attention mask are left out.
    masks : dict
        ``'attention_mask'`` / ``'decoder_attention_mask'`` of the model's
        current forward pass (set by :class:`KeywordHook`).
    manual_mask : torch.Tensor or None
        A mask given by hand (``tracker.padding_mask(mask)``); it wins over the model's.
    labels : torch.Tensor or None
        The ``labels`` keyword of the model's current forward pass (1-D).
    manual_labels : torch.Tensor or None
        Labels given by hand (``tracker.set_labels(y)``); they win over the model's.
    """

    options: AdapterOptions
    log_interval: int = 1
    max_samples: Optional[int] = None
    record: bool = True
    mask_padding: bool = True
    masks: Dict[str, Optional[torch.Tensor]] = field(default_factory=dict)
    manual_mask: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    manual_labels: Optional[torch.Tensor] = None

    def current_labels(self) -> Optional[torch.Tensor]:
        """Labels of the current batch: given by hand (``tracker.set_labels``), else the model call's ``labels``."""
        return self.manual_labels if self.manual_labels is not None else self.labels


@dataclass
class ModeState:
    """What one layer accumulated in one mode (train or eval) since the last reset."""

    accumulator: TorchCovarianceMatrix
    calls: int = 0
    rows: int = 0


#: Name parts of cross-attention modules in Hugging Face models (BART/Whisper, T5, BERT decoders).
CROSS_ATTENTION_PARTS = frozenset({"encoder_attn", "EncDecAttention", "crossattention", "cross_attn"})

#: Name parts of the key and value projections, which read the encoder's positions in cross-attention.
KEY_VALUE_PARTS = frozenset({"k", "v", "k_proj", "v_proj", "key", "value"})


def padding_mask_key(layer_name: str) -> str:
    """Which keyword's mask covers the positions of a layer's output, from its name.

    A decoder's layers (a name part ``decoder``) run over the decoder's
    positions (``decoder_attention_mask``), except the key and value
    projections of its cross-attention, which read the encoder's positions;
    every other layer uses ``attention_mask``.

    Examples
    --------
    >>> padding_mask_key("decoder-block-0-layer-0-SelfAttention-q")
    'decoder_attention_mask'
    >>> padding_mask_key("decoder-block-0-layer-1-EncDecAttention-k")
    'attention_mask'
    """
    parts = set(layer_name.split("-"))
    cross_key_value = bool(parts & CROSS_ATTENTION_PARTS) and layer_name.split("-")[-1] in KEY_VALUE_PARTS
    return "decoder_attention_mask" if "decoder" in parts and not cross_key_value else "attention_mask"


def _is_special_forward() -> bool:
    """Whether this forward pass is a checkpoint recomputation, a trace, or inside a torch.func transform."""
    return (
        torch._C._current_graph_task_id() != -1
        or torch.jit.is_tracing()
        or torch._C._functorch.peek_interpreter_stack() is not None
    )


class LayerRecorder:
    """Turn one layer's outputs into samples and accumulate them, per mode.

    Parameters
    ----------
    name : str
        The layer's name in every output.
    module : torch.nn.Module
        The layer.
    adapter : LayerAdapter
        How its outputs become samples.
    context : RecordingContext
        Shared with the tracker's other recorders.
    accumulators : dict
        Mode (``'train'``, ``'eval'``) to an empty accumulator.
    classes : dict, optional
        Mode to empty per-class sums, when class-conditional statistics are asked for.
    """

    def __init__(
        self,
        name: str,
        module: nn.Module,
        adapter: LayerAdapter,
        context: RecordingContext,
        accumulators: Dict[str, TorchCovarianceMatrix],
        classes: Optional[Dict[str, ClassMoments]] = None,
    ) -> None:
        self.name = name
        #: Per-class sums per mode, for class-conditional statistics (``None`` when none is asked for).
        self.classes = classes
        self.module = module
        self.adapter = adapter
        self.context = context
        self.modes = {mode: ModeState(accumulator) for mode, accumulator in accumulators.items()}
        self.mask_key = padding_mask_key(name)
        self.active = True
        #: Forward passes skipped because they were no ordinary ones (see the module docstring).
        self.skipped_calls = 0
        #: Failing forward passes, and how many of them came in a row.
        self.failures = 0
        self.consecutive_failures = 0
        #: Rows of the latest recorded forward pass (before masking and ``max_samples``), for the summary.
        self.rows_per_forward: Optional[int] = None
        self.warned_skipped_batches = 0
        #: Device mesh whose ranks split this layer's rows between them (tensor parallelism, see delve.sharding).
        self.row_mesh: Any = None

    def __call__(self, module: nn.Module, output: Any) -> None:
        """Hot path: record one forward pass's output (no host-device synchronisation)."""
        context = self.context
        if not (self.active and context.record):
            return
        if _is_special_forward():
            self.skipped_calls += 1
            return
        state = self.modes["train" if module.training else "eval"]
        call = state.calls
        state.calls += 1
        if call % context.log_interval:
            return
        max_samples = context.max_samples
        if max_samples is not None and state.rows >= max_samples:
            return
        try:
            with torch.no_grad():
                self._record(module, output, state, max_samples)
        except ShardingError as error:
            self.active = False
            warnings.warn(f"delve leaves out layer {self.name!r}: {error}", RuntimeWarning, stacklevel=3)
        except Exception as error:  # a tracking failure must never stop training
            self._failed(error)
        else:
            self.consecutive_failures = 0

    def _record(self, module: nn.Module, output: Any, state: ModeState, max_samples: Optional[int]) -> None:
        head = first_tensor(output)
        if isinstance(head, torch.Tensor) and head.numel() == 0:
            return
        mask = self._mask()
        # A DTensor output (tensor parallelism) becomes this rank's rows with every feature; the ranks
        # of its mesh count the rows of the whole output, so that they all take the same decisions.
        local = local_output(module, output, mask, self.adapter)
        if local is not None:
            output, mask = local.output, local.mask
            self.row_mesh = None if local.group_rows is None else local.mesh
        samples, row_mask = self._samples(module, output, mask)
        if samples is None:
            return
        count = num_samples(samples)
        rows = count if local is None else local.rows(count)
        if rows == 0:
            return
        self.rows_per_forward = rows
        labelled = count
        if max_samples is not None and state.rows + rows > max_samples:
            keep = max_samples - state.rows
            kept = keep if local is None else local.share(keep, count)
            samples = as_rows(samples)[:kept]
            row_mask = None if row_mask is None else row_mask[:kept]
            rows = keep
        state.accumulator.update(samples, row_mask=row_mask)
        state.rows += rows
        if self.classes is not None:
            labels = self.context.current_labels()
            # Only layers with one sample per input: as many rows as labels (before max_samples cut them).
            if labels is not None and row_mask is None and samples.ndim == 2 and labels.shape[0] == labelled:
                self.classes["train" if module.training else "eval"].update(samples, labels[: samples.shape[0]])

    def _samples(
        self, module: nn.Module, output: Any, mask: Optional[torch.Tensor]
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The samples of one output, and the mask of its rows when padding is left out."""
        options = self.context.options
        if mask is not None:
            tokens = self.adapter.tokens(module, output, options)
            if tokens is not None and tuple(tokens.shape[:2]) == tuple(mask.shape):
                return tokens.reshape(-1, tokens.shape[-1]), mask.reshape(-1).to(tokens.device)
        return self.adapter.samples(module, output, options), None

    def _mask(self) -> Optional[torch.Tensor]:
        context = self.context
        if not context.mask_padding:
            return None
        if context.manual_mask is not None:
            return context.manual_mask
        return context.masks.get(self.mask_key)

    def reset(self, accumulators: bool = True) -> None:
        """Restart the per-epoch counters (``log_interval``, ``max_samples``), and forget the samples if asked."""
        for mode, state in self.modes.items():
            state.calls = state.rows = 0
            if accumulators:
                state.accumulator.reset()
                if self.classes is not None:
                    self.classes[mode].reset()

    def state_dict(self) -> Dict[str, Dict[str, Any]]:
        """Per mode the accumulator's state, the per-epoch counters and the per-class sums (if any)."""
        return {
            mode: {
                "accumulator": state.accumulator.state_dict(),
                "calls": state.calls,
                "rows": state.rows,
                **({} if self.classes is None else {"classes": self.classes[mode].state_dict()}),
            }
            for mode, state in self.modes.items()
        }

    def load_state_dict(self, saved: Dict[str, Dict[str, Any]]) -> None:
        """Go on from what :meth:`state_dict` returned."""
        for mode, saved_mode in saved.items():
            state = self.modes[mode]
            state.accumulator.load_state_dict(saved_mode["accumulator"])
            state.calls = saved_mode["calls"]
            state.rows = saved_mode["rows"]
            if self.classes is not None and "classes" in saved_mode:
                self.classes[mode].load_state_dict(saved_mode["classes"])

    def _failed(self, error: BaseException) -> None:
        self.failures += 1
        self.consecutive_failures += 1
        if self.consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
            self.active = False
            warnings.warn(
                f"delve stopped tracking layer {self.name!r} after {self.consecutive_failures} failing forward "
                f"passes in a row: {type(error).__name__}: {error}",
                RuntimeWarning,
                stacklevel=4,
            )
        elif self.failures == 1:
            warnings.warn(
                f"delve skipped a forward pass of layer {self.name!r} ({type(error).__name__}: {error}); the "
                f"layer is given up after {MAX_CONSECUTIVE_FAILURES} failures in a row",
                RuntimeWarning,
                stacklevel=4,
            )


class InertHook:
    """What a hook of delve becomes in a copy or an unpickled model: a forward (pre-)hook that does nothing."""

    def __call__(self, *args: Any) -> None:
        return None


class KeywordHook:
    """Forward pre-hook (with keyword arguments) of a model root: keeps its padding masks and labels."""

    __name__ = "delve_keyword_hook"

    def __init__(self, context: RecordingContext) -> None:
        self.context = context

    def __call__(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        context = self.context
        for keyword in MASK_KEYWORDS:
            value = kwargs.get(keyword)
            context.masks[keyword] = value if isinstance(value, torch.Tensor) and value.ndim == 2 else None
        labels = kwargs.get("labels")
        context.labels = labels if isinstance(labels, torch.Tensor) and labels.ndim == 1 else None
        return None

    def __reduce__(self) -> Tuple[type, Tuple[()]]:
        return InertHook, ()

    def __deepcopy__(self, memo: Dict[int, Any]) -> InertHook:
        return InertHook()


class FastPathGuard(InertHook):
    """A forward hook that does nothing but exist: it keeps fused fast paths from skipping tracked layers.

    In eval mode :class:`torch.nn.TransformerEncoderLayer` computes attention and
    feed-forward in one fused kernel, without calling its submodules, unless a
    hook is attached to one of them. A tracked layer inside one gets this guard
    so that its eval outputs are seen (as they were with per-module hooks).
    """

    __name__ = "delve_fast_path_guard"

    def __reduce__(self) -> Tuple[type, Tuple[()]]:
        return InertHook, ()

    def __deepcopy__(self, memo: Dict[int, Any]) -> InertHook:
        return InertHook()


def fast_path_owners(roots: Iterable[nn.Module], tracked: Iterable[nn.Module]) -> List[nn.Module]:
    """Modules under ``roots`` whose fused fast path would skip one of the ``tracked`` layers."""
    tracked_ids = {id(module) for module in tracked}
    owners = []
    for root in roots:
        for module in root.modules():
            if isinstance(module, nn.TransformerEncoderLayer) and any(
                id(sub) in tracked_ids for sub in module.modules() if sub is not module
            ):
                owners.append(module)
    return owners


def takes_hook_keywords(module: nn.Module) -> bool:
    """Whether ``module.forward`` has an ``attention_mask`` or ``labels`` parameter (the Hugging Face convention)."""
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return any(keyword in parameters for keyword in HOOK_KEYWORDS)


# Recorders of every open tracker, by the identity of the module they watch.
_RECORDERS: Dict[int, Tuple[LayerRecorder, ...]] = {}
_GLOBAL_HANDLE: List[torch.utils.hooks.RemovableHandle] = []


def _dispatch(module: nn.Module, inputs: Any, output: Any) -> None:
    recorders = _RECORDERS.get(id(module))
    if recorders is not None:
        for recorder in recorders:
            if recorder.module is module:
                recorder(module, output)


_COMPILE_WARNING = r"Using `torch.compile\(module\)` when there are global hooks"


def _ignore_compile_warning() -> None:
    """Filter out torch.compile's warning about global hooks (once: every change of the filters resets
    Python's once-per-location memory of all warnings).

    ``torch.compile(module)`` warns at every call while any global hook exists,
    because global hooks also fire for the ``OptimizedModule`` wrapper. delve's
    hook ignores that wrapper (it is no tracked module), so the warning says
    nothing about delve's numbers.
    """
    if not any(action == "ignore" and getattr(message, "pattern", None) == _COMPILE_WARNING
               for action, message, *_ in warnings.filters):
        warnings.filterwarnings("ignore", message=_COMPILE_WARNING, category=UserWarning)


class HookHandle:
    """Removes the recorders and mask hooks of one tracker; idempotent, like :class:`~torch.utils.hooks.RemovableHandle`.

    Parameters
    ----------
    recorders : iterable of LayerRecorder
        Attached now, detached by :meth:`remove`.
    mask_roots : iterable of torch.nn.Module
        Models that get a :class:`KeywordHook` (those whose forward takes
        ``attention_mask`` or ``labels``).
    context : RecordingContext
        Given to the mask hooks.
    guarded : iterable of torch.nn.Module
        Modules that get a :class:`FastPathGuard` (see :func:`fast_path_owners`).
    """

    def __init__(
        self,
        recorders: Iterable[LayerRecorder],
        mask_roots: Iterable[nn.Module],
        context: RecordingContext,
        guarded: Iterable[nn.Module] = (),
    ) -> None:
        self.recorders: List[LayerRecorder] = []
        self._module_handles = [
            root.register_forward_pre_hook(KeywordHook(context), with_kwargs=True) for root in mask_roots
        ]
        self._module_handles += [module.register_forward_hook(FastPathGuard()) for module in guarded]
        for recorder in recorders:
            self.add(recorder)

    def add(self, recorder: LayerRecorder) -> None:
        """Attach one more recorder."""
        key = id(recorder.module)
        _RECORDERS[key] = _RECORDERS.get(key, ()) + (recorder,)
        self.recorders.append(recorder)
        if not _GLOBAL_HANDLE:
            _GLOBAL_HANDLE.append(module_hooks.register_module_forward_hook(_dispatch))
        _ignore_compile_warning()

    def discard(self, recorder: LayerRecorder) -> None:
        """Detach one recorder (nothing if it is not attached)."""
        if recorder not in self.recorders:
            return
        self.recorders.remove(recorder)
        key = id(recorder.module)
        remaining = tuple(other for other in _RECORDERS.get(key, ()) if other is not recorder)
        if remaining:
            _RECORDERS[key] = remaining
        else:
            _RECORDERS.pop(key, None)
        if not _RECORDERS and _GLOBAL_HANDLE:
            _GLOBAL_HANDLE.pop().remove()

    def remove(self) -> None:
        """Detach every recorder and remove the mask hooks; calling it again does nothing."""
        for recorder in list(self.recorders):
            self.discard(recorder)
        for handle in self._module_handles:
            handle.remove()
        self._module_handles = []


def attached_recorders(module: nn.Module) -> Tuple[LayerRecorder, ...]:
    """Recorders of open trackers that watch ``module`` (empty when none does)."""
    return tuple(recorder for recorder in _RECORDERS.get(id(module), ()) if recorder.module is module)


__all__: List[str] = [
    "FastPathGuard",
    "HookHandle",
    "InertHook",
    "LayerRecorder",
    "KeywordHook",
    "ModeState",
    "RecordingContext",
    "attached_recorders",
    "fast_path_owners",
    "padding_mask_key",
    "takes_hook_keywords",
]
