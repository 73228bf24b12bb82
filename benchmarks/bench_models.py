"""The models of ``benchmarks/overhead.py`` and ``benchmarks/gpu_check.py``, and the analytic floor of tracking them.

Every model trains on random data of a fixed batch; :func:`build` gives the
model, one batch, its targets and the steps of one benchmark repeat.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

MODELS = ("mlp", "cnn", "vgg", "lstm", "transformer", "gpt2")

LABELS = {
    "mlp": "MLP 4x Linear 1024, batch 128",
    "cnn": "ResNet-18 32x32, batch 8",
    "vgg": "VGG-style 6 conv 32x32, batch 32",
    "lstm": "LSTM 256, 50 steps, batch 32",
    "transformer": "Transformer d256 x4, 128 tokens, batch 8",
    "gpt2": "GPT-2 small (Conv1D), 128 tokens, batch 8",
}

#: Steps of one benchmark repeat: whole cycles of the work a tracker defers (staged rows become one
#: GEMM every few steps: GPT-2's 2304- and 3072-wide layers every 2 and 3 steps of 1024 tokens).
REPEAT_STEPS = {"mlp": 32, "cnn": 16, "vgg": 16, "lstm": 16, "transformer": 16, "gpt2": 6}

#: Tracker arguments a model needs beyond the defaults: GPT-2's lm_head (50257 wide) is left out.
TRACKER_OPTIONS: Dict[str, Dict[str, Any]] = {"gpt2": {"ignore_layer_names": ["gpt2-lm_head"]}}


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), as used on CIFAR-10."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        blocks, in_channels = [], 64
        for channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(in_channels, channels, stride), BasicBlock(channels, channels, 1)]
            in_channels = channels
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(x)).mean(dim=(2, 3)))


def vgg_style() -> nn.Sequential:
    """Six 3x3 convolutions 3-32-32-64-64-128-128 (strides 1, 1, 2, 1, 2, 1) with ReLU, then a linear head."""
    layers: List[nn.Module] = []
    in_channels = 3
    for channels, stride in zip((32, 32, 64, 64, 128, 128), (1, 1, 2, 1, 2, 1)):
        layers += [nn.Conv2d(in_channels, channels, 3, stride, 1), nn.ReLU()]
        in_channels = channels
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, 10))


class LSTMClassifier(nn.Module):
    def __init__(self, inputs: int = 64, hidden: int = 256, num_classes: int = 10) -> None:
        super().__init__()
        self.lstm = nn.LSTM(inputs, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.lstm(x)[0][:, -1])


class TransformerClassifier(nn.Module):
    def __init__(self, d_model: int = 256, layers: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=4 * d_model, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.fc = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(x).mean(dim=1))


class GPT2Small(nn.Module):
    """GPT-2 small (12 layers, 768 wide, 12 heads) from ``transformers.GPT2Config``, randomly initialised.

    Its forward returns the next-token logits as ``(tokens, vocabulary)``, so
    that a plain cross-entropy trains it. Its 48 projections are
    ``transformers.pytorch_utils.Conv1D`` layers, which delve tracks like Linear layers.
    """

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(n_positions=128, n_layer=12, n_embd=768, n_head=12)
        self.vocab_size = config.vocab_size
        self.gpt2 = GPT2LMHeadModel(config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.gpt2(tokens).logits.reshape(-1, self.vocab_size)


def build(name: str, batch: Optional[int] = None) -> Tuple[nn.Module, torch.Tensor, torch.Tensor, int]:
    """Model, a batch of inputs and targets, and the steps of one repeat.

    A repeat (:data:`REPEAT_STEPS`) is long enough to hold whole cycles of the
    work a tracker defers, so that the median over repeats does not skip it.
    """
    torch.manual_seed(0)
    if name == "mlp":
        layers: List[nn.Module] = []
        for _ in range(4):
            layers += [nn.Linear(1024, 1024), nn.ReLU()]
        batch = batch or 128
        return nn.Sequential(*layers[:-1]), torch.randn(batch, 1024), torch.randint(1024, (batch,)), REPEAT_STEPS[name]
    if name == "cnn":
        batch = batch or 8
        return ResNet18(), torch.randn(batch, 3, 32, 32), torch.randint(10, (batch,)), REPEAT_STEPS[name]
    if name == "vgg":
        batch = batch or 32
        return vgg_style(), torch.randn(batch, 3, 32, 32), torch.randint(10, (batch,)), REPEAT_STEPS[name]
    if name == "lstm":
        batch = batch or 32
        return LSTMClassifier(), torch.randn(batch, 50, 64), torch.randint(10, (batch,)), REPEAT_STEPS[name]
    if name == "transformer":
        batch = batch or 8
        return TransformerClassifier(), torch.randn(batch, 128, 256), torch.randint(10, (batch,)), REPEAT_STEPS[name]
    if name == "gpt2":
        batch = batch or 8
        model = GPT2Small()
        tokens = torch.randint(model.vocab_size, (batch, 129))
        return model, tokens[:, :-1], tokens[:, 1:].reshape(-1), REPEAT_STEPS[name]
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


# ----------------------------------------------------------------------- analytic floor
def _forward_flops(module: nn.Module, inputs: Tuple[Any, ...], output: Any) -> float:
    """Multiply-add FLOPs (x2) of one forward pass of a tracked layer."""
    out = output[0] if isinstance(output, tuple) else output
    if isinstance(module, nn.Linear):
        return 2.0 * out.numel() * module.in_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return 2.0 * out.numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
    if isinstance(module, nn.LSTM):
        x = inputs[0]
        steps = x.shape[0] * x.shape[1]
        gates, total, size_in = 4 * module.hidden_size, 0.0, module.input_size
        for _ in range(module.num_layers):
            total += 2.0 * steps * gates * (size_in + module.hidden_size)
            size_in = module.hidden_size
        return total
    if type(module).__name__ == "Conv1D":  # transformers' Linear with a transposed (in, out) weight
        return 2.0 * out.numel() * module.weight.shape[0]
    if isinstance(module, nn.MultiheadAttention):
        tokens, length, width = out.shape[0] * out.shape[1], out.shape[1], module.embed_dim
        return 2.0 * tokens * 4 * width * width + 4.0 * tokens * length * width
    raise TypeError(f"no FLOP count for {type(module).__name__}")


def analytic_floor(
    model: nn.Module, data: torch.Tensor, sample_rows: Union[None, bool, int] = None, ignore: Tuple[str, ...] = ()
) -> float:
    """FLOPs of X^T X of every tracked output over the training FLOPs (3x forward) of those layers.

    ``sample_rows`` as the tracker takes it (``True``: rows in proportion to
    the width); ``ignore``: names of layers left out.
    """
    from delve.adapters import AdapterOptions, find_adapter
    from delve.covariance import num_samples, resolve_sample_rows
    from delve.layers import find_layers

    options, totals = AdapterOptions(), {"gram": 0.0, "train": 0.0}

    def hook(module: nn.Module, inputs: Tuple[Any, ...], output: Any) -> None:
        samples = find_adapter(module)(module, output, options)
        rows, dim = num_samples(samples), samples.shape[1]
        kept = resolve_sample_rows(sample_rows, dim)
        totals["gram"] += 2.0 * min(rows, kept or rows) * dim**2
        totals["train"] += 3.0 * _forward_flops(module, inputs, output)

    layers = [layer for name, layer in find_layers(model).items() if name not in ignore]
    handles = [layer.register_forward_hook(hook) for layer in layers]
    with torch.no_grad():
        model(data)
    for handle in handles:
        handle.remove()
    return totals["gram"] / totals["train"]


