"""How each layer type's output becomes a matrix of samples (rows) by features (columns).

An adapter is a function ``adapter(module, output, options) -> Tensor | None``
registered for a module type with :func:`register_adapter`. It is looked up
along the module's MRO, so a subclass of :class:`torch.nn.Linear` is handled
like a Linear unless it has an adapter of its own. The returned tensor is
either ``(n, d)`` or, for a convolution reduced channelwise, ``(b, d, l)``
(see :meth:`delve.covariance.TorchCovarianceMatrix.update`). Returning ``None``
skips the batch.

Dispatch is on the layer type, never on the rank of the output: a Linear on
``(batch, tokens, features)`` makes every token a sample, and a recurrent layer
honours its ``batch_first`` flag.

Besides the sample function, delve keeps per layer type a :class:`LayerAdapter`:
the feature count when it is known before a forward pass (for the memory
budget and the summary), the ``(batch, sequence, features)`` view of the output
that a padding mask applies to, and how outputs become rows, in words. A type
can be registered by its ``'module.Class'`` path, so that Hugging Face's
``transformers.pytorch_utils.Conv1D`` is handled without importing
``transformers``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Type, Union

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from delve.covariance import check_memory_budget

CONV_METHODS = ("channelwise", "mean", "max", "median", "flatten")
TIMESERIES_METHODS = ("last_timestep", "timestepwise")
INTERPOLATION_MODES = ("nearest", "nearest-exact", "linear", "bilinear", "bicubic", "trilinear", "area")


@dataclass(frozen=True)
class AdapterOptions:
    """Options that decide how outputs are turned into samples.

    Attributes
    ----------
    conv_method : str
        One of :data:`CONV_METHODS`.
    timeseries_method : str
        One of :data:`TIMESERIES_METHODS`.
    interpolation_strategy : str or None
        A ``mode`` of :func:`torch.nn.functional.interpolate`; feature maps larger
        than ``interpolation_downsampling`` are resized to it first.
    interpolation_downsampling : int
        Target resolution of the resizing.
    """

    conv_method: str = "channelwise"
    timeseries_method: str = "last_timestep"
    interpolation_strategy: Optional[str] = None
    interpolation_downsampling: int = 32

    def __post_init__(self) -> None:
        _check_choice("conv_method", self.conv_method, CONV_METHODS)
        _check_choice("timeseries_method", self.timeseries_method, TIMESERIES_METHODS)
        if self.interpolation_strategy is not None:
            _check_choice("interpolation_strategy", self.interpolation_strategy, INTERPOLATION_MODES)
        if not isinstance(self.interpolation_downsampling, int) or self.interpolation_downsampling < 1:
            raise ValueError(
                f"interpolation_downsampling must be a positive int, got {self.interpolation_downsampling!r}"
            )


def _check_choice(parameter: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{parameter}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}")


Adapter = Callable[[nn.Module, Any, AdapterOptions], Optional[torch.Tensor]]
TokenLayout = Callable[[nn.Module, Any, AdapterOptions], Optional[torch.Tensor]]
LayerType = Union[Type[nn.Module], str]


def _no_tokens(module: nn.Module, output: Any, options: AdapterOptions) -> Optional[torch.Tensor]:
    return None


def _unknown_features(module: nn.Module, options: AdapterOptions) -> Optional[int]:
    return None


def _custom_rows(module: nn.Module, options: AdapterOptions) -> str:
    return "as its registered adapter returns them"


@dataclass(frozen=True)
class LayerAdapter:
    """Everything delve knows about one layer type.

    Attributes
    ----------
    samples : callable
        ``samples(module, output, options)``: the output as ``(n, d)`` samples,
        ``(b, d, l)`` blocks, or ``None`` to skip the batch.
    features : callable
        ``features(module, options)``: the number of columns of the samples when
        it is known before a forward pass, else ``None``.
    tokens : callable
        ``tokens(module, output, options)``: the output as ``(batch, sequence, features)``
        when every position is a sample (so that a padding mask of shape
        ``(batch, sequence)`` applies to it), else ``None``.
    rows : callable
        ``rows(module, options)``: how one output becomes rows, in words (for
        :meth:`delve.SaturationTracker.summary`).
    """

    samples: Adapter
    features: Callable[[nn.Module, AdapterOptions], Optional[int]] = _unknown_features
    tokens: TokenLayout = _no_tokens
    rows: Callable[[nn.Module, AdapterOptions], str] = _custom_rows


_ADAPTERS: Dict[LayerType, LayerAdapter] = {}


def _check_layer_type(layer_type: Any) -> None:
    if isinstance(layer_type, str):
        if "." not in layer_type:
            raise TypeError(
                f"layer_type given by name must be the full 'module.Class' path, got {layer_type!r}"
            )
        return
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise TypeError(
            f"layer_type must be a subclass of torch.nn.Module or its 'module.Class' path, got {layer_type!r}"
        )


def register_adapter(layer_type: LayerType, adapter: Optional[Adapter] = None):
    """Register how outputs of ``layer_type`` (and its subclasses) become samples.

    Parameters
    ----------
    layer_type : type or str
        A subclass of :class:`torch.nn.Module`, or its full ``'module.Class'``
        path: a type given by name is matched without importing its package
        (``'transformers.pytorch_utils.Conv1D'`` is registered that way).
    adapter : callable, optional
        ``adapter(module, output, options)`` returning an ``(n, d)`` tensor of
        samples (or ``(b, d, l)``, or ``None`` to skip). When omitted,
        ``register_adapter`` works as a decorator.

    Examples
    --------
    >>> class Scale(nn.Module):
    ...     def forward(self, x):
    ...         return 2 * x
    >>> @register_adapter(Scale)
    ... def scale_samples(module, output, options):
    ...     return output.reshape(-1, output.shape[-1])
    """
    _check_layer_type(layer_type)

    def register(function: Adapter) -> Adapter:
        _ADAPTERS[layer_type] = LayerAdapter(samples=function)
        return function

    return register if adapter is None else register(adapter)


def unregister_adapter(layer_type: LayerType) -> None:
    """Remove the adapter registered for exactly ``layer_type``."""
    _ADAPTERS.pop(layer_type, None)


def find_layer_adapter(module: nn.Module) -> Optional[LayerAdapter]:
    """What delve knows about ``module``'s type, resolved along its MRO (types, then 'module.Class' names)."""
    for cls in type(module).__mro__:
        entry = _ADAPTERS.get(cls) or _ADAPTERS.get(f"{cls.__module__}.{cls.__qualname__}")
        if entry is not None:
            return entry
    return None


def find_adapter(module: nn.Module) -> Optional[Adapter]:
    """The sample function for ``module``'s type, resolved along its MRO, or ``None``."""
    entry = find_layer_adapter(module)
    return None if entry is None else entry.samples


def is_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a (transposed) convolution, the layers ``include_conv`` governs."""
    return isinstance(module, nn.modules.conv._ConvNd)


def feature_dimension(module: nn.Module, options: AdapterOptions) -> Optional[int]:
    """Number of columns the module's samples will have, when known before any forward pass."""
    entry = find_layer_adapter(module)
    return None if entry is None else entry.features(module, options)


def check_layer_memory(
    name: str, module: nn.Module, options: AdapterOptions, memory_budget: Optional[int], dim: Optional[int] = None
) -> Optional[int]:
    """Bytes the covariance of one layer takes per mode, refused above ``memory_budget``.

    Parameters
    ----------
    name : str
        The layer's name, for the error message.
    module : torch.nn.Module
        The layer.
    options : AdapterOptions
        How its outputs become samples.
    memory_budget : int or None
        Most bytes per layer and mode; ``None`` for no limit.
    dim : int, optional
        Number of features when already known (from a first batch); otherwise
        it is derived from the layer, which is impossible for ``flatten``
        convolutions before they have seen an input.

    Returns
    -------
    int or None
        The bytes, or ``None`` when the feature dimension is not known yet
        (pass ``memory_budget`` and ``name`` to the accumulator to check it on
        the first batch).

    Raises
    ------
    delve.covariance.CovarianceMemoryError
        A ``ValueError`` naming the layer, its size and what to do instead.

    Examples
    --------
    >>> check_layer_memory("fc", nn.Linear(10, 256), AdapterOptions(), memory_budget=2**21)
    1056768
    """
    if dim is None:
        dim = feature_dimension(module, options)
    return None if dim is None else check_memory_budget(name, dim, memory_budget)


def first_tensor(output: Any) -> Any:
    """The output itself, or the first element of a tuple or list output (``(output, state)`` of an RNN)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _tokens_if_3d(module: nn.Module, output: Any, options: AdapterOptions) -> Optional[torch.Tensor]:
    tensor = first_tensor(output)
    return tensor if isinstance(tensor, torch.Tensor) and tensor.ndim == 3 else None


def linear_samples(module: nn.Module, output: Any, options: AdapterOptions) -> torch.Tensor:
    """Every position of the leading dimensions is a sample: ``(..., d) -> (N, d)``."""
    output = first_tensor(output)
    return output.reshape(-1, output.shape[-1])


def _every_position(module: nn.Module, options: AdapterOptions) -> str:
    return "every token / leading position"


def _pooled_or_positions(spatial: str, options: AdapterOptions) -> str:
    method = options.conv_method
    if method == "channelwise":
        return f"every {spatial} position"
    if method == "flatten":
        return "one per input (flattened)"
    return f"one per input ({method} over positions)"


def _interpolate(output: torch.Tensor, spatial_dims: int, options: AdapterOptions) -> torch.Tensor:
    strategy = options.interpolation_strategy
    if strategy is not None and max(output.shape[2:]) > options.interpolation_downsampling:
        output = torch.nn.functional.interpolate(
            output, size=(options.interpolation_downsampling,) * spatial_dims, mode=strategy
        )
    return output


def _feature_map_samples(output: torch.Tensor, options: AdapterOptions) -> torch.Tensor:
    """A ``(b, c, *spatial)`` feature map reduced according to ``options.conv_method``."""
    method = options.conv_method
    if method == "flatten":
        return output.reshape(output.shape[0], -1)
    positions = output.reshape(output.shape[0], output.shape[1], -1)
    if method == "channelwise":
        return positions
    if method == "mean":
        return positions.mean(dim=2)
    if method == "max":
        return positions.amax(dim=2)
    return positions.median(dim=2).values


def conv_samples(module: nn.modules.conv._ConvNd, output: torch.Tensor, options: AdapterOptions) -> torch.Tensor:
    """Reduce a convolution's ``(b, c, *spatial)`` output according to ``options.conv_method``."""
    spatial_dims = len(module.kernel_size)
    if output.ndim == spatial_dims + 1:
        output = output.unsqueeze(0)
    return _feature_map_samples(_interpolate(output, spatial_dims, options), options)


def _conv_features(module: nn.modules.conv._ConvNd, options: AdapterOptions) -> Optional[int]:
    return None if options.conv_method == "flatten" else module.out_channels


def _conv_rows(module: nn.modules.conv._ConvNd, options: AdapterOptions) -> str:
    return _pooled_or_positions({1: "time", 2: "(y, x)", 3: "(z, y, x)"}[len(module.kernel_size)], options)


def block_samples(module: nn.Module, output: Any, options: AdapterOptions) -> torch.Tensor:
    """Samples of a whole block's output (its first tensor): the block's "hidden states".

    ``(batch, d)`` rows stay as they are, ``(batch, tokens, d)`` makes every
    token a sample (features last, the convention of transformer blocks), and
    ``(batch, channels, *spatial)`` (a ResNet stage) is reduced like a
    convolution's output, by ``options.conv_method``.
    """
    tensor = first_tensor(output)
    if tensor.ndim <= 3:
        return linear_samples(module, tensor, options)
    return _feature_map_samples(_interpolate(tensor, tensor.ndim - 2, options), options)


def _block_rows(module: nn.Module, options: AdapterOptions) -> str:
    return "every token (or " + _pooled_or_positions("spatial", options) + " of feature maps)"


#: How the output of a tracked block (``blocks=``) becomes samples.
BLOCK_ADAPTER = LayerAdapter(samples=block_samples, tokens=_tokens_if_3d, rows=_block_rows)


def _last_valid_steps(packed: PackedSequence) -> torch.Tensor:
    padded, lengths = pad_packed_sequence(packed, batch_first=True)
    index = (lengths - 1).to(padded.device)
    return padded[torch.arange(padded.shape[0], device=padded.device), index]


def recurrent_samples(module: nn.RNNBase, output: Any, options: AdapterOptions) -> torch.Tensor:
    """Samples of an RNN/LSTM/GRU output.

    ``last_timestep`` keeps each sequence's last output (its last valid step for a
    packed sequence); ``timestepwise`` makes every (valid) time step of every
    sequence a sample. The time axis follows ``module.batch_first``.
    """
    sequence = first_tensor(output)
    if isinstance(sequence, PackedSequence):
        if options.timeseries_method == "timestepwise":
            return sequence.data
        return _last_valid_steps(sequence)
    if sequence.ndim == 2:
        sequence = sequence.unsqueeze(1)
        time_dim = 0
    else:
        time_dim = 1 if module.batch_first else 0
    if options.timeseries_method == "timestepwise":
        return sequence.reshape(-1, sequence.shape[-1])
    return sequence.select(time_dim, -1)


def _recurrent_features(module: nn.RNNBase, options: AdapterOptions) -> int:
    return (module.proj_size or module.hidden_size) * (2 if module.bidirectional else 1)


def _recurrent_tokens(module: nn.RNNBase, output: Any, options: AdapterOptions) -> Optional[torch.Tensor]:
    sequence = first_tensor(output)
    if options.timeseries_method != "timestepwise" or not isinstance(sequence, torch.Tensor) or sequence.ndim != 3:
        return None
    return sequence if module.batch_first else sequence.transpose(0, 1)


def _recurrent_rows(module: nn.RNNBase, options: AdapterOptions) -> str:
    if options.timeseries_method == "timestepwise":
        return "every time step"
    return "one per sequence (last step)"


def cell_samples(module: nn.RNNCellBase, output: Any, options: AdapterOptions) -> torch.Tensor:
    """A recurrent cell's hidden state ``h`` (the first element for an LSTMCell)."""
    hidden = first_tensor(output)
    return hidden.reshape(-1, hidden.shape[-1])


def attention_samples(module: nn.MultiheadAttention, output: Any, options: AdapterOptions) -> torch.Tensor:
    """Every token of the attention output is a sample."""
    attended = first_tensor(output)
    return attended.reshape(-1, attended.shape[-1])


def _attention_tokens(module: nn.MultiheadAttention, output: Any, options: AdapterOptions) -> Optional[torch.Tensor]:
    attended = first_tensor(output)
    if attended.ndim != 3:
        return None
    return attended if module.batch_first else attended.transpose(0, 1)


def _linear_features(module: nn.Linear, options: AdapterOptions) -> int:
    return module.out_features


_ADAPTERS.update(
    {
        nn.Linear: LayerAdapter(linear_samples, _linear_features, _tokens_if_3d, _every_position),
        # Hugging Face's Conv1D (GPT-2 and its relatives): a Linear with a transposed weight and
        # ``nf`` outputs; matched by name so that delve never imports transformers itself.
        "transformers.pytorch_utils.Conv1D": LayerAdapter(
            linear_samples, lambda module, options: module.nf, _tokens_if_3d, _every_position
        ),
        nn.modules.conv._ConvNd: LayerAdapter(conv_samples, _conv_features, _no_tokens, _conv_rows),
        nn.RNNBase: LayerAdapter(recurrent_samples, _recurrent_features, _recurrent_tokens, _recurrent_rows),
        nn.RNNCellBase: LayerAdapter(
            cell_samples, lambda module, options: module.hidden_size, _no_tokens, lambda m, o: "one per input"
        ),
        nn.MultiheadAttention: LayerAdapter(
            attention_samples, lambda module, options: module.embed_dim, _attention_tokens, _every_position
        ),
    }
)
