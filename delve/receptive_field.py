"""Receptive fields of a CNN's layers, and the layers that are unproductive at an input size.

Following "Should You Go Deeper? Optimizing Convolutional Neural Network
Architectures without Training" (Richter et al., arXiv 2106.12307), every
tensor carries, per spatial axis, a receptive field ``r`` (how many input
pixels one of its positions sees) and a jump ``j`` (how many input pixels lie
between two neighbouring positions). The input has ``r = j = 1``; a layer with
kernel ``k``, stride ``s`` and dilation ``d`` (effective kernel
``d * (k - 1) + 1``) gives

.. math::

    r_l = r_{l-1} + (k_l - 1)\\, j_{l-1}, \\qquad j_l = j_{l-1}\\, s_l .

A transposed convolution with stride ``s`` divides the jump by ``s`` and adds
``ceil(k / s) - 1`` input positions; a nearest (linear, cubic) resize adds
none (one, three). Adaptive pooling, reductions over a spatial axis and
reshapes that merge spatial axes make the receptive field global (``inf``).
Every other operation (activations, normalization, ``x + identity``,
concatenation) passes on the largest receptive field of its inputs, so a
residual block's output sees as much as its widest branch.

The model is traced, not described by hand: one forward pass of a zero input
runs under a :class:`torch.overrides.TorchFunctionMode` that tags every tensor
with its ``(r, j)``, and forward pre-hooks read the tags at the layers the
tracker records (named as in :func:`delve.layers.find_layers`).

A layer is *unproductive* when every input to it already has a receptive
field at least the input size and its own exceeds it, along every spatial
axis: it cannot integrate any new spatial context. Layers whose every input is
already global (a classifier head after global pooling or flattening) are
never called unproductive; the rule is about layers with a spatial extent.
"""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from delve.layers import find_layers, unwrap

InputSize = Union[int, Sequence[int]]
Axes = Tuple[float, ...]

_REDUCTIONS = {
    "mean", "sum", "amax", "amin", "max", "min", "std", "var", "median", "logsumexp", "norm", "prod",
    "nanmean", "nansum", "std_mean", "var_mean", "argmax", "argmin", "softmax", "log_softmax",
}
_RESHAPES = {"view", "reshape", "flatten", "permute", "transpose", "movedim", "swapaxes", "unflatten", "t"}
_INTERPOLATION_SPAN = {"nearest": 0, "nearest-exact": 0, "area": 0, "bicubic": 3}


@dataclass(frozen=True)
class _Field:
    """Receptive field and jump of one tensor, per spatial axis."""

    r: Axes
    j: Axes

    @property
    def is_global(self) -> bool:
        return all(math.isinf(value) for value in self.r)

    @staticmethod
    def widest(fields: Sequence["_Field"]) -> "_Field":
        return _Field(
            tuple(max(values) for values in zip(*(f.r for f in fields))),
            tuple(max(values) for values in zip(*(f.j for f in fields))),
        )


@dataclass(frozen=True)
class LayerReceptiveField:
    """What the trace found for one tracked layer.

    Attributes
    ----------
    name : str
        The layer's name in the tracker's outputs.
    receptive_field : tuple of float
        Receptive field of the layer's output per spatial axis (``inf``: global).
    input_receptive_field : tuple of float
        Smallest receptive field among the layer's inputs, per spatial axis.
    jump : tuple of float
        Distance in input pixels between neighbouring output positions.
    unproductive : bool
        Whether the layer is unproductive at the traced input size.
    """

    name: str
    receptive_field: Axes
    input_receptive_field: Axes
    jump: Axes
    unproductive: bool


def _argument(args: Sequence[Any], kwargs: Dict[str, Any], index: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _per_axis(value: Any, axes: int) -> Tuple[float, ...]:
    if isinstance(value, (tuple, list)):
        values = tuple(float(v) for v in value)
        return values if len(values) == axes else (max(values),) * axes
    return (float(value),) * axes


class _Tracer(TorchFunctionMode):
    """Tag every tensor produced during a forward pass with its :class:`_Field`."""

    def __init__(self, axes: int) -> None:
        super().__init__()
        self.axes = axes
        self.fields: Dict[int, _Field] = {}
        self._alive: List[torch.Tensor] = []

    def tag(self, tensor: torch.Tensor, field: _Field) -> None:
        self.fields[id(tensor)] = field
        self._alive.append(tensor)

    def field_of(self, tensor: Any) -> Optional[_Field]:
        return self.fields.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [f for f in (self.field_of(t) for t in tree_flatten((args, kwargs))[0]) if f is not None]
        result = func(*args, **kwargs)
        if inputs:
            field = self._propagate(getattr(func, "__name__", ""), args, kwargs, inputs, result)
            for tensor in tree_flatten(result)[0]:
                if isinstance(tensor, torch.Tensor):
                    self.tag(tensor, field)
        return result

    def _global(self) -> _Field:
        return _Field((math.inf,) * self.axes, (math.inf,) * self.axes)

    def _window(self, source: _Field, kernel: Any, stride: Any, dilation: Any = 1) -> _Field:
        k = _per_axis(kernel, self.axes)
        s = _per_axis(stride if stride not in (None, ()) else kernel, self.axes)
        d = _per_axis(dilation, self.axes)
        effective = [dd * (kk - 1) + 1 for kk, dd in zip(k, d)]
        r = tuple(rr + (ke - 1) * jj for rr, ke, jj in zip(source.r, effective, source.j))
        return _Field(r, tuple(jj * ss for jj, ss in zip(source.j, s)))

    def _propagate(
        self, name: str, args: Sequence[Any], kwargs: Dict[str, Any], inputs: List[_Field], result: Any
    ) -> _Field:
        source = self.field_of(args[0]) if args else None
        base = name.rstrip("_")
        if source is None or source.is_global:
            return _Field.widest(inputs)
        if base in ("conv1d", "conv2d", "conv3d"):
            weight = _argument(args, kwargs, 1, "weight", None)
            return self._window(
                source, tuple(weight.shape[2:]), _argument(args, kwargs, 3, "stride", 1),
                _argument(args, kwargs, 5, "dilation", 1),
            )
        if base.startswith("conv_transpose"):
            weight = _argument(args, kwargs, 1, "weight", None)
            k = _per_axis(tuple(weight.shape[2:]), self.axes)
            s = _per_axis(_argument(args, kwargs, 3, "stride", 1), self.axes)
            d = _per_axis(_argument(args, kwargs, 7, "dilation", 1), self.axes)
            spans = [math.ceil((dd * (kk - 1) + 1) / ss) - 1 for kk, ss, dd in zip(k, s, d)]
            r = tuple(rr + span * jj for rr, span, jj in zip(source.r, spans, source.j))
            return _Field(r, tuple(jj / ss for jj, ss in zip(source.j, s)))
        if base.startswith(("max_pool", "avg_pool")) and base[-2:] in ("1d", "2d", "3d"):
            dilation = _argument(args, kwargs, 4, "dilation", 1) if base.startswith("max") else 1
            kernel, stride = _argument(args, kwargs, 1, "kernel_size", 1), _argument(args, kwargs, 2, "stride", None)
            return self._window(source, kernel, stride, dilation)
        if base.startswith("lp_pool"):
            kernel, stride = _argument(args, kwargs, 2, "kernel_size", 1), _argument(args, kwargs, 3, "stride", None)
            return self._window(source, kernel, stride)
        if base.startswith(("adaptive_avg_pool", "adaptive_max_pool")):
            return self._global()
        if base == "interpolate":
            return self._resize(source, args[0], result, _argument(args, kwargs, 3, "mode", "nearest"))
        if base in _REDUCTIONS:
            return self._reduce(source, args, kwargs, result)
        if base in _RESHAPES and isinstance(result, torch.Tensor):
            before, after = tuple(args[0].shape[-self.axes:]), tuple(result.shape[-self.axes:])
            if result.ndim < self.axes or before != after:
                return self._global()
        return _Field.widest(inputs)

    def _resize(self, source: _Field, tensor: torch.Tensor, result: torch.Tensor, mode: str) -> _Field:
        span = _INTERPOLATION_SPAN.get(mode, 1)
        scale = [o / i for i, o in zip(tensor.shape[-self.axes:], result.shape[-self.axes:])]
        return _Field(
            tuple(rr + span * jj for rr, jj in zip(source.r, source.j)),
            tuple(jj / sc for jj, sc in zip(source.j, scale)),
        )

    def _reduce(self, source: _Field, args: Sequence[Any], kwargs: Dict[str, Any], result: Any) -> _Field:
        tensor = args[0]
        dim = _argument(args, kwargs, 1, "dim", None)
        if isinstance(dim, torch.Tensor):  # torch.max(a, b) is elementwise
            return _Field.widest([source, self.field_of(dim) or source])
        if dim is None:
            return self._global() if not isinstance(result, torch.Tensor) or result.ndim < tensor.ndim else source
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        spatial = set(range(tensor.ndim - self.axes, tensor.ndim))
        if any(int(d) % tensor.ndim in spatial for d in dims if isinstance(d, int)):
            return self._global()
        return source


def _normalize_input_size(model: nn.Module, input_size: InputSize) -> Tuple[int, Tuple[int, ...]]:
    """``(channels, spatial)`` from an int (square 2-D image) or ``(C, *spatial)``."""
    if isinstance(input_size, bool) or not isinstance(input_size, (int, tuple, list, torch.Size)):
        raise ValueError(f"input_size must be an int or a tuple (channels, *spatial), got {input_size!r}")
    if isinstance(input_size, int):
        conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
        if conv is None or len(conv.kernel_size) != 2:
            raise ValueError(
                "input_size as an int means a square 2-D image whose channels come from the first Conv2d; "
                "give input_size=(channels, *spatial) for this model"
            )
        return conv.in_channels, (input_size, input_size)
    sizes = tuple(input_size)
    if len(sizes) < 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):
        raise ValueError(f"input_size must be an int or (channels, *spatial) of positive ints, got {input_size!r}")
    return sizes[0], sizes[1:]


def spatial_input_size(model: nn.Module, input_size: InputSize) -> Tuple[int, ...]:
    """The spatial extents of ``input_size`` (validated as in :func:`trace_receptive_fields`).

    Examples
    --------
    >>> spatial_input_size(nn.Conv2d(3, 8, 3), 32)
    (32, 32)
    """
    return _normalize_input_size(unwrap(model), input_size)[1]


def trace_receptive_fields(model: nn.Module, input_size: InputSize) -> "OrderedDict[str, LayerReceptiveField]":
    """Receptive field, input receptive field, jump and productivity of every tracked layer.

    Parameters
    ----------
    model : torch.nn.Module
        The network. It runs once on a zero input of batch size 1, in eval mode
        and without gradients; its training flags are restored afterwards.
    input_size : int or tuple of int
        ``(channels, *spatial)`` such as ``(3, 32, 32)``, or an int for a
        square 2-D image whose channel count is the first Conv2d's.

    Returns
    -------
    OrderedDict
        Layer name (as in the tracker) to :class:`LayerReceptiveField`, in the
        order the layers ran. Layers that did not run are left out.

    Raises
    ------
    ValueError
        If ``input_size`` is malformed.
    """
    root = unwrap(model)
    channels, spatial = _normalize_input_size(root, input_size)
    layers = find_layers(root)
    reference = next(iter(root.parameters()), None)
    dummy = torch.zeros(
        (1, channels, *spatial),
        dtype=reference.dtype if reference is not None and reference.is_floating_point() else torch.float32,
        device=reference.device if reference is not None else None,
    )
    tracer = _Tracer(len(spatial))
    inputs_seen: Dict[str, _Field] = {}
    outputs_seen: Dict[str, _Field] = {}

    def recorder(name: str):
        def pre_hook(module: nn.Module, inputs: Any) -> None:
            fields = [f for f in (tracer.field_of(t) for t in tree_flatten(inputs)[0]) if f is not None]
            if fields and name not in inputs_seen:
                inputs_seen[name] = _Field(tuple(min(v) for v in zip(*(f.r for f in fields))), fields[0].j)

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            fields = [f for f in (tracer.field_of(t) for t in tree_flatten(output)[0]) if f is not None]
            if fields and name in inputs_seen and name not in outputs_seen:
                outputs_seen[name] = _Field.widest(fields)

        return pre_hook, hook

    flags = {module: module.training for module in root.modules()}
    handles = []
    try:
        for name, layer in layers.items():
            pre_hook, hook = recorder(name)
            handles.append(layer.register_forward_pre_hook(pre_hook))
            handles.append(layer.register_forward_hook(hook))
        root.eval()
        tracer.tag(dummy, _Field((1.0,) * len(spatial), (1.0,) * len(spatial)))
        with torch.no_grad(), tracer:
            try:
                root(dummy)
            except RuntimeError as error:
                raise ValueError(
                    f"the model cannot run on an input of input_size={input_size!r} (too small, or the wrong "
                    f"number of channels?): {error}"
                ) from error
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags.items():
            module.training = flag
    result: "OrderedDict[str, LayerReceptiveField]" = OrderedDict()
    for name, output in outputs_seen.items():
        lowest = inputs_seen[name]
        unproductive = (
            not lowest.is_global
            and all(r >= size for r, size in zip(lowest.r, spatial))
            and all(r > size for r, size in zip(output.r, spatial))
        )
        result[name] = LayerReceptiveField(name, output.r, lowest.r, output.j, unproductive)
    return result


def receptive_fields(model: nn.Module, input_size: InputSize, per_axis: bool = False) -> "OrderedDict[str, Any]":
    """Receptive field size of every tracked layer's output.

    Parameters
    ----------
    model : torch.nn.Module
        The network (traced once, see :func:`trace_receptive_fields`).
    input_size : int or tuple of int
        ``(channels, *spatial)`` or an int for a square 2-D image.
    per_axis : bool
        Give a tuple per spatial axis instead of the largest of them.

    Returns
    -------
    OrderedDict
        Layer name (as in the tracker) to receptive field in input pixels;
        ``math.inf`` for layers that see the whole input by construction.

    Examples
    --------
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, dilation=2))
    >>> dict(receptive_fields(net, (1, 16, 16)))
    {'0': 3.0, '2': 12.0}
    """
    traced = trace_receptive_fields(model, input_size)
    return OrderedDict(
        (name, layer.receptive_field if per_axis else max(layer.receptive_field)) for name, layer in traced.items()
    )


def unproductive_layers(model: nn.Module, input_size: InputSize) -> List[str]:
    """Names of the layers that cannot add spatial context at this input size.

    A layer is unproductive when every input to it already has a receptive
    field at least the input size and its own receptive field exceeds it,
    along every spatial axis. Layers whose inputs are global already (a
    classifier head after global pooling) are not counted.

    Parameters
    ----------
    model : torch.nn.Module
        The network (traced once, see :func:`trace_receptive_fields`).
    input_size : int or tuple of int
        ``(channels, *spatial)`` or an int for a square 2-D image.

    Returns
    -------
    list of str
        Layer names in the order they ran.

    Examples
    --------
    >>> net = nn.Sequential(*[nn.Conv2d(1, 1, 3, padding=1) for _ in range(4)])
    >>> unproductive_layers(net, (1, 6, 6))  # fields 3, 5, 7, 9 > 6
    ['3']
    """
    return [name for name, layer in trace_receptive_fields(model, input_size).items() if layer.unproductive]


def _encode(values: Axes) -> List[Optional[float]]:
    return [None if math.isinf(v) else v for v in values]


def _decode(values: Sequence[Optional[float]]) -> Axes:
    return tuple(math.inf if v is None else float(v) for v in values)


def save_receptive_fields(path: str, model: nn.Module, input_size: InputSize) -> Dict[str, Any]:
    """Trace ``model`` and write the result as JSON, for ``delve report`` to mark the border.

    Parameters
    ----------
    path : str
        File to write (conventionally ``<savefile>/receptive_fields.json``).
    model : torch.nn.Module
        The network.
    input_size : int or tuple of int
        ``(channels, *spatial)`` or an int for a square 2-D image.

    Returns
    -------
    dict
        The written document: ``input_size`` (spatial extents) and ``layers``,
        a list of ``{name, receptive_field, input_receptive_field, jump,
        unproductive}`` with ``null`` for a global receptive field.
    """
    spatial = spatial_input_size(model, input_size)
    traced = trace_receptive_fields(model, input_size)
    document = {
        "input_size": list(spatial),
        "layers": [
            {
                "name": layer.name,
                "receptive_field": _encode(layer.receptive_field),
                "input_receptive_field": _encode(layer.input_receptive_field),
                "jump": _encode(layer.jump),
                "unproductive": layer.unproductive,
            }
            for layer in traced.values()
        ],
    }
    with open(path, "w") as handle:
        json.dump(document, handle, indent=1)
    return document


def load_receptive_fields(path: str) -> Tuple[Tuple[int, ...], "OrderedDict[str, LayerReceptiveField]"]:
    """Read a file written by :func:`save_receptive_fields`.

    Returns
    -------
    tuple
        The spatial input size and the layers as in :func:`trace_receptive_fields`.
    """
    with open(path) as handle:
        document = json.load(handle)
    layers: "OrderedDict[str, LayerReceptiveField]" = OrderedDict()
    for entry in document["layers"]:
        layers[entry["name"]] = LayerReceptiveField(
            entry["name"], _decode(entry["receptive_field"]), _decode(entry["input_receptive_field"]),
            _decode(entry["jump"]), bool(entry["unproductive"]),
        )
    return tuple(document["input_size"]), layers
