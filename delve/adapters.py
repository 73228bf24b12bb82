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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Type

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

_ADAPTERS: Dict[Type[nn.Module], Adapter] = {}


def register_adapter(layer_type: Type[nn.Module], adapter: Optional[Adapter] = None):
    """Register how outputs of ``layer_type`` (and its subclasses) become samples.

    Parameters
    ----------
    layer_type : type
        A subclass of :class:`torch.nn.Module`.
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
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise TypeError(f"layer_type must be a subclass of torch.nn.Module, got {layer_type!r}")

    def register(function: Adapter) -> Adapter:
        _ADAPTERS[layer_type] = function
        return function

    return register if adapter is None else register(adapter)


def unregister_adapter(layer_type: Type[nn.Module]) -> None:
    """Remove the adapter registered for exactly ``layer_type``."""
    _ADAPTERS.pop(layer_type, None)


def find_adapter(module: nn.Module) -> Optional[Adapter]:
    """The adapter for ``module``'s type, resolved along its MRO, or ``None``."""
    for cls in type(module).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    return None


def is_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a (transposed) convolution, the layers ``include_conv`` governs."""
    return isinstance(module, nn.modules.conv._ConvNd)


def feature_dimension(module: nn.Module, options: AdapterOptions) -> Optional[int]:
    """Number of columns the module's samples will have, when known before any forward pass."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if is_conv(module):
        return None if options.conv_method == "flatten" else module.out_channels
    if isinstance(module, nn.RNNBase):
        return (module.proj_size or module.hidden_size) * (2 if module.bidirectional else 1)
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim
    if isinstance(module, nn.RNNCellBase):
        return module.hidden_size
    return None


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


def _first(output: Any) -> Any:
    return output[0] if isinstance(output, (tuple, list)) else output


def linear_samples(module: nn.Module, output: Any, options: AdapterOptions) -> torch.Tensor:
    """Every position of the leading dimensions is a sample: ``(..., d) -> (N, d)``."""
    output = _first(output)
    return output.reshape(-1, output.shape[-1])


def conv_samples(module: nn.modules.conv._ConvNd, output: torch.Tensor, options: AdapterOptions) -> torch.Tensor:
    """Reduce a convolution's ``(b, c, *spatial)`` output according to ``options.conv_method``."""
    spatial_dims = len(module.kernel_size)
    if output.ndim == spatial_dims + 1:
        output = output.unsqueeze(0)
    strategy = options.interpolation_strategy
    if strategy is not None and max(output.shape[2:]) > options.interpolation_downsampling:
        output = torch.nn.functional.interpolate(
            output, size=(options.interpolation_downsampling,) * spatial_dims, mode=strategy
        )
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
    sequence = _first(output)
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


def cell_samples(module: nn.RNNCellBase, output: Any, options: AdapterOptions) -> torch.Tensor:
    """A recurrent cell's hidden state ``h`` (the first element for an LSTMCell)."""
    hidden = _first(output)
    return hidden.reshape(-1, hidden.shape[-1])


def attention_samples(module: nn.MultiheadAttention, output: Any, options: AdapterOptions) -> torch.Tensor:
    """Every token of the attention output is a sample."""
    attended = _first(output)
    return attended.reshape(-1, attended.shape[-1])


register_adapter(nn.Linear, linear_samples)
register_adapter(nn.modules.conv._ConvNd, conv_samples)
register_adapter(nn.RNNBase, recurrent_samples)
register_adapter(nn.RNNCellBase, cell_samples)
register_adapter(nn.MultiheadAttention, attention_samples)
