"""Does delve's advice survive retraining? Train a small suite, follow every warning, retrain, compare.

Run by hand from the repository root (``--quick`` runs in the tests)::

    nice python benchmarks/advice.py --findings      # the full suite: 16 minutes on a busy 2-core VM
    python benchmarks/advice.py --cases mlp --seeds 0 1
    python benchmarks/advice.py --quick              # seconds: 128 examples, one epoch, one seed

For every case it trains the model with each seed while a
:class:`~delve.SaturationTracker` records the last epoch (train on the
training data, eval on the test data), runs :func:`delve.analysis.diagnose`
on the run of the first seed (with the model, its input size, and for the
image cases linear probes), and for every ``warn`` finding applies the
suggestion it carries (narrow layers to the given widths, raise the input
resolution) and retrains with the same seeds. The table gives the mean test
accuracy before and after, the change in points (paired by seed) and its
standard error. A ``warn`` whose change costs more than 0.5 points is a bug of
its rule (:data:`TOLERANCE`); ``info`` and ``ok`` findings are listed, not
followed. The docs' "Advice" page holds the full table.

The suite (all data ship with scikit-learn or are synthetic):

- ``quickstart``: the quickstart CNN (conv 16, conv 32, pool, Linear 64,
  classifier) on the 8x8 digits;
- ``conv8-8px`` and ``conv8-32px``: eight 3x3 convolutions with batch norm
  (16, 16, pool, 16, 16, pool, then 32 channels four times), global average
  pooling and a classifier, on the digits at 8 px and upsampled (bilinear) to
  32 px; at 8 px the last five see the whole input;
- ``deepcnn-8px``: the ten convolutions of ``examples/tail_resolution.py`` at
  8 px, whose last stage forms a tail;
- ``mlp``: a 512-wide three-layer MLP on 32-dimensional data that lie in an
  8-dimensional subspace (known intrinsic dimensionality 8), ten classes by the
  nearest of ten centres in that subspace;
- ``transformer``: a two-layer transformer encoder (width 32, feed-forward
  256) on synthetic sequences whose label is the token after a marker.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from delve import SaturationTracker  # noqa: E402
from delve.writers.base import STATMAP  # noqa: E402

#: Accuracy points a ``warn`` may cost when followed before it counts as a bug of its rule.
TOLERANCE = 0.5

Spec = Dict[str, Any]
Loaders = Tuple[DataLoader, DataLoader]


# ----------------------------------------------------------------------------- data
def digits(resolution: int, limit: int = 0, seed: int = 0) -> Loaders:
    """scikit-learn's digits, 1400 for training and 397 for testing, upsampled (bilinear) to ``resolution``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if resolution != 8:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    labels = torch.tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    if limit:
        train, test = train[:limit], test[: limit // 2]
    return _loaders(images, labels, train, test, seed)


def subspace_data(limit: int = 0, seed: int = 0, dim: int = 32, latent: int = 8, classes: int = 10) -> Loaders:
    """Points of a ``latent``-dimensional subspace of R^dim, labelled by the nearest of ``classes`` centres."""
    generator = torch.Generator().manual_seed(1)
    count = 6000
    codes = torch.randn(count, latent, generator=generator)
    basis, _ = torch.linalg.qr(torch.randn(dim, latent, generator=generator))
    centres = torch.randn(classes, latent, generator=generator)
    labels = torch.cdist(codes, centres).argmin(dim=1)
    inputs = codes @ basis.T
    train, test = torch.arange(4000), torch.arange(4000, count)
    if limit:
        train, test = train[:limit], test[: limit // 2]
    return _loaders(inputs, labels, train, test, seed)


def follower_sequences(limit: int = 0, seed: int = 0, length: int = 8, vocabulary: int = 8) -> Loaders:
    """A class token, then random tokens holding one marker token; the label is the token after the marker.

    Reading it takes two steps of attention (find the marker, then its right neighbour), the classic
    task of a two-layer transformer.
    """
    generator = torch.Generator().manual_seed(2)
    count = 6000
    tokens = torch.randint(1, vocabulary, (count, length), generator=generator)
    marker = torch.randint(0, length - 1, (count,), generator=generator)
    rows = torch.arange(count)
    tokens[rows, marker] = 0
    labels = tokens[rows, marker + 1]
    tokens = torch.cat([torch.full((count, 1), vocabulary), tokens], dim=1)
    train, test = torch.arange(4000), torch.arange(4000, count)
    if limit:
        train, test = train[:limit], test[: limit // 2]
    return _loaders(tokens, labels, train, test, seed)


def _loaders(inputs: torch.Tensor, labels: torch.Tensor, train: torch.Tensor, test: torch.Tensor,
             seed: int) -> Loaders:
    return (
        DataLoader(TensorDataset(inputs[train], labels[train]), batch_size=64, shuffle=True,
                   generator=torch.Generator().manual_seed(seed)),
        DataLoader(TensorDataset(inputs[test], labels[test]), batch_size=500),
    )


# --------------------------------------------------------------------------- models
def _conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


class QuickstartCNN(nn.Module):
    """examples/quickstart.py's CNN; ``widths`` of conv1, conv2 and fc1 (0 removes fc1)."""

    def __init__(self, widths: Dict[str, int]) -> None:
        super().__init__()
        self.conv1 = _conv(1, widths["conv1"])
        self.conv2 = _conv(widths["conv1"], widths["conv2"])
        features = widths["conv2"] * 16
        self.fc1 = nn.Linear(features, widths["fc1"]) if widths.get("fc1") else None
        self.classifier = nn.Linear(widths["fc1"] if self.fc1 is not None else features, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2).flatten(1)
        if self.fc1 is not None:
            x = F.relu(self.fc1(x))
        return self.classifier(x)


class ConvStack(nn.Module):
    """3x3 convolutions ``conv1`` ... in order, each with batch norm and ReLU, a 2x2 max-pool after
    ``pool_after``, global average pooling and a classifier."""

    def __init__(self, widths: Dict[str, int], pool_after: Sequence[str] = ("conv2", "conv4")) -> None:
        super().__init__()
        layers: "OrderedDict[str, nn.Module]" = OrderedDict()
        channels = 1
        for name, width in widths.items():
            layers[name] = _conv(channels, width)
            layers[f"norm_{name}"] = nn.BatchNorm2d(width)
            layers[f"relu_{name}"] = nn.ReLU()
            channels = width
            if name in pool_after:
                layers[f"pool_{name}"] = nn.MaxPool2d(2)
        self.features = nn.Sequential(layers)
        self.classifier = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


class MLP(nn.Module):
    """Linear layers ``fc1`` ... with ReLU, then a classifier; ``widths`` in order."""

    def __init__(self, widths: Dict[str, int], inputs: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.hidden = nn.ModuleDict()
        for name, width in widths.items():
            self.hidden[name] = nn.Linear(inputs, width)
            inputs = width
        self.classifier = nn.Linear(inputs, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden.values():
            x = F.relu(layer(x))
        return self.classifier(x)


class SequenceTransformer(nn.Module):
    """Token and position embeddings, a pre-norm transformer encoder, the first token's output classified."""

    def __init__(self, feedforward: Sequence[int], width: int = 32, vocabulary: int = 9, length: int = 9,
                 classes: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.position = nn.Parameter(torch.randn(length, width) * 0.1)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, 4, dim_feedforward=hidden, dropout=0.0, batch_first=True,
                                       norm_first=True)
            for hidden in feedforward
        )
        self.classifier = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position
        for layer in self.layers:
            x = layer(x)
        return self.classifier(x[:, 0])


# ---------------------------------------------------------------------------- cases
@dataclass
class Case:
    """A model family, its data and how long it trains; ``spec`` holds what advice may change."""

    name: str
    build: Callable[[Spec], nn.Module]
    data: Callable[[Spec, int, int], Loaders]
    spec: Spec
    epochs: int
    lr: float = 2e-3
    spatial: bool = False

    def input_size(self, spec: Spec) -> Optional[Tuple[int, ...]]:
        return (1, spec["resolution"], spec["resolution"]) if self.spatial else None


def _stack(pools: Tuple[str, ...]) -> Callable[[Spec], nn.Module]:
    return lambda spec: ConvStack(spec["widths"], pools)


def _digits(spec: Spec, limit: int, seed: int) -> Loaders:
    return digits(spec["resolution"], limit, seed)


CONV8 = {f"conv{i}": 16 if i <= 4 else 32 for i in range(1, 9)}
DEEP = {f"conv{i}": 16 if i <= 3 else 32 if i <= 6 else 64 for i in range(1, 11)}
CASES: "OrderedDict[str, Case]" = OrderedDict(
    (case.name, case)
    for case in (
        Case("quickstart", lambda s: QuickstartCNN(s["widths"]), _digits,
             {"widths": {"conv1": 16, "conv2": 32, "fc1": 64}, "resolution": 8}, epochs=10, lr=1e-3, spatial=True),
        Case("conv8-8px", _stack(("conv2", "conv4")), _digits, {"widths": CONV8, "resolution": 8}, epochs=15,
             spatial=True),
        Case("conv8-32px", _stack(("conv2", "conv4")), _digits, {"widths": CONV8, "resolution": 32}, epochs=15,
             spatial=True),
        Case("deepcnn-8px", _stack(("conv3", "conv6")), _digits, {"widths": DEEP, "resolution": 8}, epochs=15,
             spatial=True),
        Case("mlp", lambda s: MLP(s["widths"]), lambda s, limit, seed: subspace_data(limit, seed),
             {"widths": {"fc1": 512, "fc2": 512, "fc3": 512}}, epochs=20, lr=1e-3),
        Case("transformer", lambda s: SequenceTransformer(list(s["widths"].values())),
             lambda s, limit, seed: follower_sequences(limit, seed),
             {"widths": {"layers-0-linear1": 256, "layers-1-linear1": 256}}, epochs=30, lr=3e-3),
    )
)


def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for inputs, labels in loader:
            correct += int((model(inputs).argmax(dim=1) == labels).sum())
            total += len(labels)
    return correct / total


def train(case: Case, spec: Spec, seed: int, epochs: int, limit: int = 0,
          savefile: Optional[str] = None) -> Tuple[float, nn.Module, Loaders]:
    """Train once; with ``savefile`` a tracker records the last epoch (train data in train, test data in eval)."""
    torch.manual_seed(seed)
    loaders = case.data(spec, limit, seed)
    model = case.build(spec)
    optimizer = torch.optim.Adam(model.parameters(), lr=case.lr)
    stats = ["lsat", "idim"] + (["samples"] if "samples" in STATMAP else [])
    tracker = SaturationTracker(savefile, save_to="csv", modules=model, stats=stats) if savefile else None
    if tracker is not None:
        tracker.stop()
    for epoch in range(epochs):
        if tracker is not None and epoch == epochs - 1:
            tracker.resume()
        model.train()
        for inputs, labels in loaders[0]:
            optimizer.zero_grad()
            F.cross_entropy(model(inputs), labels).backward()
            optimizer.step()
    result = accuracy(model, loaders[1])
    if tracker is not None:
        tracker.add_scalar("test_accuracy", result)
        tracker.add_saturations()
        tracker.close()
    return result, model, loaders


# ------------------------------------------------------------------------ advice
def apply_suggestion(case: Case, spec: Spec, suggestion: Optional[Dict[str, Any]]) -> Optional[Spec]:
    """The spec after following ``suggestion``, or ``None`` when this case cannot follow it.

    Layer names of the run (``features-conv3``) match a width of the spec by
    their name or its last ``-`` parts (``conv3``).
    """
    if not suggestion:
        return None
    changed = copy.deepcopy(spec)
    if suggestion["action"] == "narrow":
        for layer, width in suggestion["widths"].items():
            keys = [k for k in changed["widths"] if layer == k or layer.endswith("-" + k)]
            if len(keys) != 1:
                return None
            changed["widths"][keys[0]] = int(width)
        return changed
    if suggestion["action"] == "raise-resolution" and case.spatial:
        changed["resolution"] = int(suggestion["input_size"])
        return changed
    return None


def _describe(suggestion: Dict[str, Any]) -> str:
    if suggestion["action"] == "narrow":
        return "narrow " + ", ".join(f"{layer.split('-')[-1]}→{width}" for layer, width in suggestion["widths"].items())
    if suggestion["action"] == "raise-resolution":
        return f"input {suggestion['input_size']} px"
    return suggestion["action"]


@dataclass
class Row:
    """One line of the table: a case with one finding (or none) and what following it changed."""

    case: str
    accuracy: float
    finding: str
    advice: str = ""
    after: Optional[float] = None
    change: Optional[float] = None
    spread: Optional[float] = None
    seconds: float = 0.0
    seeds: List[float] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if self.change is None:
            return ""
        return "bug of the rule" if self.change < -TOLERANCE else "holds"


def _mean(values: Sequence[float]) -> float:
    return 100 * statistics.fmean(values)


def _spread(values: Sequence[float]) -> float:
    """Standard error of a mean, in points; 0 for a single value."""
    return 100 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def run_case(case: Case, seeds: Sequence[int], epochs: int, limit: int, folder: str,
             probe_epochs: int = 5) -> Tuple[List[Row], list]:
    """Train ``case`` with every seed, diagnose the first, follow every ``warn``; rows of the table and findings."""
    from delve.analysis import diagnose
    from delve.probes import linear_probes

    started = time.perf_counter()
    savefile = os.path.join(folder, case.name)
    before, model, loaders = [], None, None
    for index, seed in enumerate(seeds):
        result, trained, used = train(case, case.spec, seed, epochs, limit, savefile if index == 0 else None)
        before.append(result)
        if index == 0:
            model, loaders = trained, used
    probes = linear_probes(model, loaders[0], loaders[1], epochs=probe_epochs) if case.spatial else None
    findings = diagnose(savefile, model=model, input_size=case.input_size(case.spec), probes=probes)
    rows = []
    for finding in findings:
        if finding.severity != "warn":
            continue
        changed = apply_suggestion(case, case.spec, finding.suggestion)
        row = Row(case.name, _mean(before), f"warn {finding.kind}: {', '.join(finding.layers)}",
                  _describe(finding.suggestion) if finding.suggestion else "none")
        if changed is None:
            row.advice += " (not applicable)"
        else:
            after = [train(case, changed, seed, epochs, limit)[0] for seed in seeds]
            differences = [b - a for a, b in zip(before, after)]
            row.after, row.change, row.spread = _mean(after), _mean(differences), _spread(differences)
        rows.append(row)
    if not rows:
        summary = ", ".join(sorted({f"{f.severity} {f.kind}" for f in findings if f.kind != "samples-unknown"}))
        rows.append(Row(case.name, _mean(before), f"no warn ({summary or 'no finding'})"))
    for row in rows:
        row.seconds = time.perf_counter() - started
        row.seeds = [round(100 * value, 1) for value in before]
    return rows, findings


def table(rows: Sequence[Row]) -> str:
    """The rows as a reStructuredText simple table (readable as plain text too)."""
    header = ("case", "accuracy %", "finding", "advice followed", "after %", "change (pts)", "verdict")
    lines = [(r.case, f"{r.accuracy:.1f}", r.finding, r.advice, "" if r.after is None else f"{r.after:.1f}",
              "" if r.change is None else f"{r.change:+.1f} ± {r.spread:.1f}", r.verdict) for r in rows]
    widths = [max(len(str(line[i])) for line in [header, *lines]) for i in range(len(header))]
    rule = "  ".join("=" * w for w in widths)
    body = ["  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    return "\n".join([rule, "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), rule, *body, rule])


def main(argv: Optional[Sequence[str]] = None) -> List[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="one epoch on 128 examples, one seed: a smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--findings", action="store_true", help="also print every finding's message")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = args.seeds[:1] if args.quick else args.seeds
    rows: List[Row] = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.cases:
            case = CASES[name]
            epochs = 1 if args.quick else case.epochs
            case_rows, findings = run_case(case, seeds, epochs, 128 if args.quick else 0, folder,
                                           probe_epochs=1 if args.quick else 5)
            rows += case_rows
            print(f"{name}: {case_rows[-1].seconds:.0f} s, accuracy per seed {case_rows[-1].seeds}", file=sys.stderr,
                  flush=True)
            if args.findings:
                for finding in findings:
                    print(f"  [{finding.severity}] {finding.kind}: {finding.message}", file=sys.stderr)
    print(f"seeds {', '.join(map(str, seeds))}; change = mean over seeds of (after - before), ± its standard error")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
