"""Keras layers as delve sees them: which layers count, and how their outputs become samples.

Importing this module picks Keras' backend when nothing else did: with
``KERAS_BACKEND`` unset, Keras not imported yet and TensorFlow not installed
(so Keras' default backend could not load), it sets ``KERAS_BACKEND=torch``;
otherwise the user's choice stands. On the torch backend Keras layers are
:class:`torch.nn.Module` instances, and :func:`keras_samples` is registered as
their adapter, so delve's forward hooks handle them like torch layers.

Used by :mod:`delve.kerascallback`.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections import OrderedDict
from typing import Any, List, Mapping, Optional

import numpy as np
import torch
from torch import nn

from delve import metrics
from delve.adapters import AdapterOptions, conv_samples, linear_samples, register_adapter
from delve.covariance import TorchCovarianceMatrix


def _configured_backend() -> Optional[str]:
    """The backend named in ``keras.json`` (where Keras looks for it), or ``None``."""
    if "KERAS_HOME" in os.environ:
        folder = os.environ["KERAS_HOME"]
    else:
        home = os.path.expanduser("~")
        folder = os.path.join(home if os.access(home, os.W_OK) else "/tmp", ".keras")
    try:
        with open(os.path.join(os.path.expanduser(folder), "keras.json")) as handle:
            return json.load(handle).get("backend")
    except (OSError, ValueError, AttributeError):
        return None


def _default_to_torch_backend() -> None:
    """Choose the torch backend when Keras would otherwise try to load a missing TensorFlow."""
    if "keras" in sys.modules or "KERAS_BACKEND" in os.environ:
        return
    if importlib.util.find_spec("tensorflow") is not None:
        return
    if _configured_backend() in (None, "tensorflow"):
        os.environ["KERAS_BACKEND"] = "torch"


_default_to_torch_backend()

if importlib.util.find_spec("keras") is None:
    raise ImportError("delve.kerascallback needs Keras 3: pip install 'delve[keras]' (and set KERAS_BACKEND=torch)")

import keras  # noqa: E402  (after the backend is chosen)

if str(keras.__version__).split(".")[0] in ("1", "2"):
    raise ImportError(f"delve.kerascallback needs Keras 3, found {keras.__version__}: pip install 'delve[keras]'")

_DENSE_TYPES = (keras.layers.Dense,)
_CONV_TYPES = (
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
    keras.layers.SeparableConv1D,
    keras.layers.SeparableConv2D,
    keras.layers.DepthwiseConv1D,
    keras.layers.DepthwiseConv2D,
)


def is_torch_backend() -> bool:
    """Whether Keras runs on the torch backend, where its layers are torch modules."""
    return keras.backend.backend() == "torch"


def require_torch_backend(what: str) -> None:
    """Raise a RuntimeError naming ``what`` unless Keras runs on the torch backend."""
    if not is_torch_backend():
        raise RuntimeError(
            f"{what} needs the torch backend of Keras (set KERAS_BACKEND=torch before importing keras); "
            f"Keras runs on {keras.backend.backend()!r}. SaturationLogger works on every backend."
        )


def keras_layers(model: "keras.Model", include_conv: bool = True, nested: bool = True) -> "OrderedDict[str, Any]":
    """The Dense and convolution layers of a Keras model, under the names delve gives them.

    Parameters
    ----------
    model : keras.Model
        A Sequential, functional or subclassed model.
    include_conv : bool
        ``False`` leaves the convolutions out.
    nested : bool
        Also look inside nested models; their layers are named ``<model>-<layer>``.

    Returns
    -------
    OrderedDict
        Layer name to layer, in the order of ``model.layers``; a layer reached
        twice (shared) is listed once.

    Examples
    --------
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="hidden"),
    ...                           keras.layers.ReLU(), keras.layers.Dense(2, name="out")])
    >>> list(keras_layers(model))
    ['hidden', 'out']
    """
    types = _DENSE_TYPES + (_CONV_TYPES if include_conv else ())
    found: "OrderedDict[str, Any]" = OrderedDict()
    seen: set = set()

    def walk(container: Any, prefix: str) -> None:
        for layer in getattr(container, "layers", []):
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            name = layer.name if not prefix else f"{prefix}-{layer.name}"
            if isinstance(layer, types):
                found[name] = layer
            elif nested and isinstance(layer, keras.Model):
                walk(layer, name)

    walk(model, "")
    return found


def keras_samples(layer: Any, output: torch.Tensor, options: AdapterOptions) -> torch.Tensor:
    """Turn a Keras Dense or convolution output into samples, as delve does for torch layers.

    Parameters
    ----------
    layer : keras.layers.Layer
        The Dense or convolution layer that produced ``output``.
    output : torch.Tensor
        Its output, in Keras' layout (``channels_last`` unless the layer's
        ``data_format`` says otherwise).
    options : delve.adapters.AdapterOptions
        ``conv_method`` and the interpolation settings.

    Returns
    -------
    torch.Tensor
        ``(n, d)`` samples, or ``(b, d, l)`` blocks for a channels-first
        channelwise convolution (see :meth:`delve.TorchCovarianceMatrix.update`).

    Examples
    --------
    >>> conv = keras.layers.Conv2D(4, 3)
    >>> keras_samples(conv, torch.zeros(2, 6, 6, 4), AdapterOptions()).shape
    torch.Size([72, 4])
    """
    if not isinstance(layer, _CONV_TYPES):
        return linear_samples(layer, output, options)
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        return conv_samples(layer, output, options)
    if options.conv_method == "channelwise" and options.interpolation_strategy is None:
        return output.reshape(-1, output.shape[-1])
    return conv_samples(layer, output.movedim(-1, 1), options)


def _register_torch_adapters() -> None:
    """Let the tracker's hooks handle Keras layers, which are torch modules on the torch backend."""
    for layer_type in _DENSE_TYPES + _CONV_TYPES:
        if isinstance(layer_type, type) and issubclass(layer_type, nn.Module):
            register_adapter(layer_type, keras_samples)


_register_torch_adapters()


def _chunks(data: Any, batch_size: int) -> List[Any]:
    """Split an array (or a list/dict of arrays with the same first axis) into batches."""
    leaves = keras.tree.flatten(data)
    if not leaves:
        raise ValueError("input_data holds no array")
    total = int(leaves[0].shape[0])
    return [
        keras.tree.map_structure(lambda array, start=start: array[start : start + batch_size], data)
        for start in range(0, total, batch_size)
    ]


def _as_torch(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    return torch.from_numpy(np.asarray(keras.ops.convert_to_numpy(value)))


def _symbolic_inputs(model: "keras.Model") -> Any:
    """The model's symbolic inputs, in the structure its ``call`` expects."""
    if isinstance(model, keras.Sequential):
        inputs = model.inputs
        return inputs[0] if len(inputs) == 1 else inputs
    return model.input


class FixedInputSaturation:
    """Saturation of chosen layers for a fixed input, through a feature-extraction model."""

    def __init__(self, layers: Mapping[str, Any], options: AdapterOptions, threshold: float, batch_size: int) -> None:
        self.layers = OrderedDict(layers)
        self.options = options
        self.threshold = threshold
        self.batch_size = batch_size
        self._extractor: Optional[keras.Model] = None
        self._source: Optional[keras.Model] = None

    def _build(self, model: "keras.Model") -> "keras.Model":
        if self._extractor is None or self._source is not model:
            try:
                inputs = _symbolic_inputs(model)
                outputs = [layer.output for layer in self.layers.values()]
            except (AttributeError, ValueError) as error:
                raise ValueError(
                    "SaturationLogger needs a built Sequential or functional model whose layers have "
                    "symbolic outputs (give the model a keras.Input, or call it once first); for a "
                    f"subclassed model use SaturationCallback on the torch backend ({error})"
                ) from None
            self._extractor = keras.Model(inputs, outputs)
            self._source = model
        return self._extractor

    def __call__(self, model: "keras.Model", input_data: Any) -> "OrderedDict[str, float]":
        extractor = self._build(model)
        accumulators = {name: TorchCovarianceMatrix() for name in self.layers}
        for chunk in _chunks(input_data, self.batch_size):
            outputs = extractor.predict_on_batch(chunk)
            if not isinstance(outputs, (list, tuple)):
                outputs = [outputs]
            for (name, layer), output in zip(self.layers.items(), outputs):
                accumulators[name].update(keras_samples(layer, _as_torch(output), self.options))
        return OrderedDict(
            (name, metrics.compute_saturation(accumulators[name].compute(), self.threshold)) for name in self.layers
        )


__all__ = ["FixedInputSaturation", "is_torch_backend", "keras_layers", "keras_samples", "require_torch_backend"]
