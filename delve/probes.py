"""Linear probes: how well a logistic regression on each layer's output predicts the labels.

A probe (Alain & Bengio, "Understanding intermediate layers using linear
classifier probes") is a softmax regression trained on a frozen layer's
output. "Feature Space Saturation during Training" (arXiv 2006.08679) uses
them to confirm what saturation suggests: the layers of the low-saturation
tail do not improve the probe accuracy of the layers before them.

Each layer's output is pooled to one vector per example (convolutions:
mean over the spatial positions; recurrent layers: the last time step;
other layers: mean over every axis between the batch and the features),
standardized with a mean and variance gathered in a first pass, and fed
to one softmax regression per layer trained with Adam on the cross entropy.
Everything is streamed: the model runs once per pass over the loader and
every layer's probe takes its step on that batch, so neither the data set
nor its features are ever held in memory.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from delve.adapters import AdapterOptions, recurrent_samples
from delve.layers import find_layers

if TYPE_CHECKING:
    import pandas as pd

LayerSpec = Union[None, Sequence[str], Mapping[str, nn.Module], Any]


@dataclass(frozen=True)
class ProbeResult:
    """Probe accuracy of one layer.

    Attributes
    ----------
    layer : str
        Layer name, as in the tracker.
    features : int
        Width of the pooled output the probe reads.
    train_accuracy : float
        Share of the training examples the probe classifies correctly.
    test_accuracy : float or None
        Same on the test loader; ``None`` without one.
    """

    layer: str
    features: int
    train_accuracy: float
    test_accuracy: Optional[float]


def pool_output(module: nn.Module, output: Any) -> torch.Tensor:
    """One feature vector per example, ``(batch, features)``, from a layer's output.

    Examples
    --------
    >>> pool_output(nn.Conv2d(1, 3, 1), torch.ones(2, 3, 4, 4)).shape
    torch.Size([2, 3])
    """
    if isinstance(module, nn.RNNBase):
        return recurrent_samples(module, output, AdapterOptions())
    tensor = output[0] if isinstance(output, (tuple, list)) else output
    if isinstance(module, nn.modules.conv._ConvNd):
        return tensor.flatten(2).mean(dim=2) if tensor.ndim > 2 else tensor
    if tensor.ndim > 2:
        return tensor.flatten(1, -2).mean(dim=1)
    return tensor


def _select_layers(model: nn.Module, layers: LayerSpec) -> "OrderedDict[str, nn.Module]":
    if layers is None:
        return find_layers(model)
    if hasattr(layers, "layers") and isinstance(layers.layers, Mapping):
        return OrderedDict(layers.layers)
    if isinstance(layers, Mapping):
        return OrderedDict(layers)
    available = find_layers(model)
    names = [layers] if isinstance(layers, str) else list(layers)
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(f"layers contains {unknown!r}, not layers of the model; choose from {list(available)}")
    return OrderedDict((name, available[name]) for name in names)


def _split(batch: Any) -> Tuple[Any, torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError("every batch of the loaders must be (inputs, labels, ...)")
    return batch[0], batch[1]


def _to(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to(x, device) for x in inputs)
    if isinstance(inputs, dict):
        return {k: _to(v, device) for k, v in inputs.items()}
    return inputs


class _Capture:
    """Forward hooks that keep the pooled output of each layer for the current batch only."""

    def __init__(self, layers: Mapping[str, nn.Module]) -> None:
        self.features: Dict[str, torch.Tensor] = {}
        self.handles = [layer.register_forward_hook(self._hook(name)) for name, layer in layers.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self.features[name] = pool_output(module, output).detach().float()

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _batches(model: nn.Module, loader: Iterable, capture: _Capture, device: torch.device):
    """Run the model on every batch; yield the captured features and the labels."""
    for batch in loader:
        inputs, labels = _split(batch)
        capture.features.clear()
        with torch.no_grad():
            model(_to(inputs, device))
        yield capture.features, labels.to(device).long()


def linear_probes(
    model: nn.Module,
    train_loader: Iterable,
    test_loader: Optional[Iterable] = None,
    layers: LayerSpec = None,
    epochs: int = 20,
    lr: float = 0.01,
    weight_decay: float = 0.0,
    num_classes: Optional[int] = None,
    device: Union[str, torch.device, None] = None,
    seed: int = 0,
) -> "OrderedDict[str, ProbeResult]":
    """Fit a logistic-regression probe on each layer and report its train/test accuracy.

    Parameters
    ----------
    model : torch.nn.Module
        The trained network; it runs in eval mode without gradients, and its
        training flag is restored afterwards.
    train_loader : iterable
        Re-iterable source of ``(inputs, labels)`` batches (a DataLoader), passed
        over ``epochs + 2`` times.
    test_loader : iterable, optional
        Held-out batches for the test accuracy.
    layers : None, list of str, dict or SaturationTracker
        Which layers: all layers delve tracks (default), their names, a dict of
        name to module, or a tracker (its layers).
    epochs : int
        Passes of Adam over the training batches.
    lr : float
        Adam's learning rate.
    weight_decay : float
        L2 penalty on the probe weights.
    num_classes : int, optional
        Number of classes; default: the largest training label plus one.
    device : str or torch.device, optional
        Where the model runs and the probes live; default: the model's device.
    seed : int
        Seed of the probes' initial weights.

    Returns
    -------
    OrderedDict
        Layer name to :class:`ProbeResult`, in layer order. Layers that produced
        no output are left out.

    Raises
    ------
    ValueError
        If an argument is invalid or the training loader is empty.

    Examples
    --------
    >>> model = nn.Sequential(nn.Linear(2, 4))
    >>> x = torch.tensor([[-2.0, 0.1], [-1.5, -0.3], [1.7, 0.2], [2.2, -0.1]])
    >>> y = torch.tensor([0, 0, 1, 1])
    >>> result = linear_probes(model, [(x, y)], epochs=50, lr=0.1)
    >>> result["0"].train_accuracy
    1.0
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
        raise ValueError(f"num_classes must be None or an int >= 2, got {num_classes!r}")
    selected = _select_layers(model, layers)
    if not selected:
        raise ValueError("layers selects no layer to probe")
    if device is None:
        parameter = next(iter(model.parameters()), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
    device = torch.device(device)
    was_training = model.training
    capture = _Capture(selected)
    model.eval()
    try:
        moments, largest_label = _moments(model, train_loader, capture, device)
        classes = num_classes or int(largest_label) + 1
        generator = torch.Generator().manual_seed(seed)
        probes = {
            name: _Probe(count, total, squares, classes, generator, device, lr, weight_decay)
            for name, (count, total, squares) in moments.items()
        }
        for _ in range(epochs):
            for features, labels in _batches(model, train_loader, capture, device):
                for name, probe in probes.items():
                    if name in features:
                        probe.step(features[name], labels)
        train_accuracy = _accuracy(model, train_loader, capture, device, probes)
        test_accuracy = _accuracy(model, test_loader, capture, device, probes) if test_loader is not None else {}
    finally:
        capture.remove()
        model.train(was_training)
    return OrderedDict(
        (
            name,
            ProbeResult(name, probes[name].weight.shape[1], train_accuracy[name], test_accuracy.get(name)),
        )
        for name in selected
        if name in probes
    )


class _Probe:
    """Softmax regression on standardized features, trained with Adam on analytic gradients.

    The gradient of the mean cross entropy of logits ``z W^T + b`` is
    ``(softmax - onehot)^T z / n`` for ``W`` and the column sums of
    ``softmax - onehot`` over ``n`` for ``b``; no autograd graph is built.
    """

    betas = (0.9, 0.999)
    eps = 1e-8

    def __init__(
        self, count: int, total: torch.Tensor, squares: torch.Tensor, classes: int,
        generator: torch.Generator, device: torch.device, lr: float, weight_decay: float,
    ) -> None:
        mean = total / count
        self.mean = mean.float().to(device)
        self.std = (squares / count - mean ** 2).clamp_min(0).sqrt().clamp_min(1e-6).float().to(device)
        bound = 1.0 / mean.numel() ** 0.5
        self.weight = ((torch.rand((classes, mean.numel()), generator=generator) * 2 - 1) * bound).to(device)
        self.bias = torch.zeros(classes, device=device)
        self.moments = [torch.zeros_like(p) for p in (self.weight, self.bias, self.weight, self.bias)]
        self.lr, self.weight_decay, self.steps = lr, weight_decay, 0

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return ((features - self.mean) / self.std) @ self.weight.T + self.bias

    def step(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        standardized = (features - self.mean) / self.std
        residual = torch.softmax(standardized @ self.weight.T + self.bias, dim=1)
        residual[torch.arange(labels.shape[0], device=labels.device), labels] -= 1.0
        residual /= labels.shape[0]
        gradients = (residual.T @ standardized + self.weight_decay * self.weight, residual.sum(dim=0))
        self.steps += 1
        beta1, beta2 = self.betas
        for parameter, gradient, first, second in zip(
            (self.weight, self.bias), gradients, self.moments[:2], self.moments[2:]
        ):
            first.mul_(beta1).add_(gradient, alpha=1 - beta1)
            second.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
            corrected = second / (1 - beta2 ** self.steps)
            parameter.sub_(self.lr * first / (1 - beta1 ** self.steps) / (corrected.sqrt() + self.eps))


def _moments(model: nn.Module, loader: Iterable, capture: _Capture, device: torch.device):
    """Count, sum and sum of squares of every layer's pooled features (float64), and the largest label."""
    moments: Dict[str, list] = {}
    largest = None
    for features, labels in _batches(model, loader, capture, device):
        batch_largest = labels.max()
        largest = batch_largest if largest is None else torch.maximum(largest, batch_largest)
        for name, values in features.items():
            values = values.double()
            entry = moments.setdefault(name, [0, torch.zeros_like(values[0]), torch.zeros_like(values[0])])
            entry[0] += values.shape[0]
            entry[1] += values.sum(dim=0)
            entry[2] += (values ** 2).sum(dim=0)
    if largest is None:
        raise ValueError("train_loader yielded no batch")
    return moments, largest.item()


def _accuracy(
    model: nn.Module, loader: Iterable, capture: _Capture, device: torch.device, probes: Dict[str, _Probe]
) -> Dict[str, float]:
    correct = {name: torch.zeros((), dtype=torch.long, device=device) for name in probes}
    seen = {name: 0 for name in probes}
    with torch.no_grad():
        for features, labels in _batches(model, loader, capture, device):
            for name, probe in probes.items():
                if name in features:
                    predictions = probe.logits(features[name]).argmax(dim=1)
                    correct[name] += (predictions == labels).sum()
                    seen[name] += labels.shape[0]
    return {name: correct[name].item() / seen[name] if seen[name] else float("nan") for name in probes}


def probes_to_frame(results: Mapping[str, ProbeResult]) -> pd.DataFrame:
    """The probe results as a :class:`pandas.DataFrame`, one row per layer.

    Parameters
    ----------
    results : mapping of str to ProbeResult
        What :func:`linear_probes` returns.

    Returns
    -------
    pandas.DataFrame
        Indexed by layer name, one column per field of :class:`ProbeResult`.

    Examples
    --------
    >>> float(probes_to_frame({"fc": ProbeResult("fc", 4, 1.0, 0.5)}).loc["fc", "test_accuracy"])
    0.5
    """
    import pandas as pd

    return pd.DataFrame([asdict(result) for result in results.values()]).set_index("layer")
