"""What tracking every layer costs during training, measured against training without it.

Run by hand from the repository root (not part of the tests)::

    python benchmarks/overhead.py                      # all four models, about 8 minutes on 2 cores
    python benchmarks/overhead.py --delve-0150 /tmp/delve0150   # side by side with delve 0.1.50
    python benchmarks/overhead.py --models mlp cnn --repeats 9 --format rst

For each model it trains a fixed number of steps (SGD, random data) untracked,
tracked by :class:`delve.SaturationTracker` with every layer at full rate, and
tracked with row sampling (``sample_rows``). Within every repeat the
configurations take turns step by step, in a rotating order, so that the
machine's drift cancels; the trackers keep accumulating across repeats, as
within an epoch, so work they defer to a later step is timed in that step;
the table gives medians over repeats of the mean time per step, the overhead
(the median over repeats of tracked / untracked - 1, both means of a ratio
from the same repeat), the time of one ``add_saturations()``, the peak
resident memory of a process running each configuration, and the analytic
floor: FLOPs of :math:`X^T X` for every tracked output over the training
FLOPs (3x forward) of those layers.

``--delve-0150 PATH`` runs delve 0.1.50 in a subprocess with ``PATH`` first on
``sys.path`` (a folder holding its ``delve`` package, e.g. from
``pip install --no-deps --target PATH delve==0.1.50``), against its own
interleaved untracked baseline, on the same models.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("mlp", "cnn", "vgg", "lstm", "transformer")
CONFIGS = ("untracked", "tracked", "sampled")
DEFAULT_SAMPLE_ROWS = 32


# --------------------------------------------------------------------------- models
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


def build(name: str, batch: Optional[int] = None) -> Tuple[nn.Module, torch.Tensor, torch.Tensor, int]:
    """Model, a batch of inputs and targets, and the steps of one repeat.

    A repeat is long enough to hold whole cycles of the work a tracker defers
    (staged rows become one GEMM every few steps; pending GEMMs are folded into
    float64 every 16), so that the median over repeats does not skip it.
    """
    torch.manual_seed(0)
    if name == "mlp":
        layers: List[nn.Module] = []
        for _ in range(4):
            layers += [nn.Linear(1024, 1024), nn.ReLU()]
        batch = batch or 128
        return nn.Sequential(*layers[:-1]), torch.randn(batch, 1024), torch.randint(1024, (batch,)), 32
    if name == "cnn":
        batch = batch or 8
        return ResNet18(), torch.randn(batch, 3, 32, 32), torch.randint(10, (batch,)), 16
    if name == "vgg":
        batch = batch or 32
        return vgg_style(), torch.randn(batch, 3, 32, 32), torch.randint(10, (batch,)), 16
    if name == "lstm":
        batch = batch or 32
        return LSTMClassifier(), torch.randn(batch, 50, 64), torch.randint(10, (batch,)), 16
    if name == "transformer":
        batch = batch or 8
        return TransformerClassifier(), torch.randn(batch, 128, 256), torch.randint(10, (batch,)), 16
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
    if isinstance(module, nn.MultiheadAttention):
        tokens, length, width = out.shape[0] * out.shape[1], out.shape[1], module.embed_dim
        return 2.0 * tokens * 4 * width * width + 4.0 * tokens * length * width
    raise TypeError(f"no FLOP count for {type(module).__name__}")


def analytic_floor(model: nn.Module, data: torch.Tensor, sample_rows: Optional[int] = None) -> float:
    """FLOPs of X^T X of every tracked output over the training FLOPs (3x forward) of those layers."""
    from delve.adapters import AdapterOptions, find_adapter
    from delve.covariance import num_samples
    from delve.layers import find_layers

    options, totals = AdapterOptions(), {"gram": 0.0, "train": 0.0}

    def hook(module: nn.Module, inputs: Tuple[Any, ...], output: Any) -> None:
        samples = find_adapter(module)(module, output, options)
        rows = num_samples(samples)
        if sample_rows is not None:
            rows = min(rows, sample_rows)
        totals["gram"] += 2.0 * rows * samples.shape[1] ** 2
        totals["train"] += 3.0 * _forward_flops(module, inputs, output)

    handles = [layer.register_forward_hook(hook) for layer in find_layers(model).values()]
    with torch.no_grad():
        model(data)
    for handle in handles:
        handle.remove()
    return totals["gram"] / totals["train"]


# ----------------------------------------------------------------------------- timing
def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: torch.Tensor,
    target: torch.Tensor,
    steps: int,
) -> float:
    """Mean seconds per training step over ``steps`` steps."""
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(data), target).backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def _set_sample_rows(tracker: Any, sample_rows: int) -> None:
    """Sampling on a tracker whose constructor does not take ``sample_rows`` yet."""
    for layer_state in tracker._layer_states.values():
        for mode_state in layer_state.modes.values():
            mode_state.accumulator.sample_rows = sample_rows


def make_tracker(impl: str, model: nn.Module, folder: str, sample_rows: Optional[int]) -> Any:
    savefile = os.path.join(folder, "run")
    if impl == "0150":
        from delve import SaturationTracker

        return SaturationTracker(savefile, save_to="csv", modules=model, device="cpu", stats=["lsat"])
    from delve import SaturationTracker

    kwargs: Dict[str, Any] = dict(save_to="csv", modules=model, stats=["lsat"], nosave=True)
    try:
        tracker = SaturationTracker(savefile, sample_rows=sample_rows, **kwargs)
    except TypeError:
        tracker = SaturationTracker(savefile, **kwargs)
        if sample_rows is not None:
            _set_sample_rows(tracker, sample_rows)
    return tracker


def state_bytes(tracker: Any) -> int:
    """Bytes the tracker's accumulators hold (their float64 state and scratch buffers)."""
    total = 0
    for layer_state in getattr(tracker, "_layer_states", {}).values():
        for mode_state in layer_state.modes.values():
            total += getattr(mode_state.accumulator, "nbytes", 0)
    return total


def time_model(
    name: str, impl: str, configs: Tuple[str, ...], repeats: int, sample_rows: int, steps: Optional[int]
) -> Dict[str, Any]:
    """Interleaved repeats of every configuration on one model; medians and raw times."""
    model, data, target, default_steps = build(name)
    steps = steps or default_steps
    models = {config: model if config == "untracked" else copy.deepcopy(model) for config in configs}
    optimizers = {config: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for config, m in models.items()}
    times: Dict[str, List[float]] = {config: [] for config in configs}
    saturation_times: Dict[str, List[float]] = {config: [] for config in configs if config != "untracked"}
    held: Dict[str, int] = {}
    folder = tempfile.mkdtemp(prefix="delve-overhead-")
    # One tracker per tracked configuration for the whole run, each on its own copy of the model
    # (delve 0.1.50 cannot remove its hooks).
    trackers = {
        config: make_tracker(
            impl, models[config], os.path.join(folder, config), sample_rows if config == "sampled" else None
        )
        for config in configs
        if config != "untracked"
    }
    for config in configs:  # warm-up: allocator, thread pools, the trackers' state
        train_steps(models[config], optimizers[config], data, target, 1)
        if config in trackers:
            trackers[config].add_saturations()
    # As within an epoch, the trackers keep accumulating across steps and repeats, so work they
    # defer (staged rows, folds into float64) is timed in the later step that does it.
    # Within a repeat the configurations take turns step by step, in a rotating order, so that a
    # machine whose speed drifts (shared hosts do) slows them all alike.
    turn = 0
    for _ in range(repeats):
        totals = {config: 0.0 for config in configs}
        for _ in range(steps):
            shift = turn % len(configs)
            turn += 1
            for config in configs[shift:] + configs[:shift]:
                totals[config] += train_steps(models[config], optimizers[config], data, target, 1)
        for config in configs:
            times[config].append(totals[config] / steps)
    for config, tracker in trackers.items():  # add_saturations() after a run of steps, as at an epoch's end
        for _ in range(3):
            train_steps(models[config], optimizers[config], data, target, 2)
            held[config] = state_bytes(tracker)
            start = time.perf_counter()
            tracker.add_saturations()
            saturation_times[config].append(time.perf_counter() - start)
    if impl == "ours":
        for tracker in trackers.values():
            tracker.close()
    return {
        "model": name,
        "impl": impl,
        "steps": steps,
        "batch": int(data.shape[0]),
        "step_s": {config: statistics.median(values) for config, values in times.items()},
        "raw_step_s": times,
        "add_saturations_s": {config: statistics.median(values) for config, values in saturation_times.items()},
        "state_bytes": held,
    }


# ----------------------------------------------------------------------------- memory
def memory_child(name: str, impl: str, config: str, sample_rows: int) -> int:
    """Peak resident set (KiB) of this process after a few tracked or untracked steps."""
    model, data, target, _ = build(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    tracker = None
    if config != "untracked":
        folder = tempfile.mkdtemp(prefix="delve-memory-")
        tracker = make_tracker(impl, model, folder, sample_rows if config == "sampled" else None)
    train_steps(model, optimizer, data, target, 2)
    if tracker is not None:
        tracker.add_saturations()
    return peak_rss_kib()


def peak_rss_kib() -> int:
    """High-water mark of this process's resident memory (KiB).

    ``VmHWM`` belongs to the process's own address space; ``ru_maxrss`` would
    also carry the parent's peak over ``fork`` + ``exec``.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _child(args: List[str], delve_0150: Optional[str]) -> str:
    env = dict(os.environ)
    command = [sys.executable, os.path.abspath(__file__)] + args
    if delve_0150:
        command += ["--delve-0150", delve_0150]
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return result.stdout.strip().splitlines()[-1]


def peak_memory_mib(name: str, impl: str, config: str, sample_rows: int, delve_0150: Optional[str]) -> float:
    line = _child(["--_memory", name, config, "--impl", impl, "--sample-rows", str(sample_rows)], delve_0150)
    return int(line) / 1024


# ----------------------------------------------------------------------------- report
def overhead(result: Dict[str, Any], config: str) -> str:
    """Median over repeats of tracked / untracked - 1, each ratio from runs of the same repeat."""
    raw = result["raw_step_s"]
    ratios = [tracked / untracked - 1 for tracked, untracked in zip(raw[config], raw["untracked"])]
    return f"{100 * statistics.median(ratios):+.0f}%"


def table(rows: List[Dict[str, Any]], fmt: str, sample_rows: int, with_0150: bool, with_memory: bool) -> str:
    header = ["model", "untracked ms/step", "delve ms/step", "overhead", "floor"]
    header += [f"sampled {sample_rows} rows", "floor (sampled)"]
    if with_0150:
        header += ["0.1.50 overhead"]
    header += ["add_saturations s"]
    if with_memory:
        header += ["peak RSS MiB (untracked / delve / sampled" + (" / 0.1.50)" if with_0150 else ")")]
    lines = []
    for row in rows:
        step = row["ours"]["step_s"]
        cells = [
            row["label"],
            f"{1000 * step['untracked']:.1f}",
            f"{1000 * step['tracked']:.1f}",
            overhead(row["ours"], "tracked"),
            f"{100 * row['floor']:.0f}%",
            overhead(row["ours"], "sampled"),
            f"{100 * row['floor_sampled']:.1f}%",
        ]
        if with_0150:
            old = row.get("0150")
            cells.append(overhead(old, "tracked") if old else "n/a")
        cells.append(f"{row['ours']['add_saturations_s']['tracked']:.2f}")
        if with_memory:
            memory = row["memory"]
            parts = [memory.get(key) for key in ("untracked", "tracked", "sampled") + (("0150",) if with_0150 else ())]
            cells.append(" / ".join("n/a" if value is None else f"{value:.0f}" for value in parts))
        lines.append(cells)
    if fmt == "rst":
        widths = [max(len(str(cells[i])) for cells in [header] + lines) for i in range(len(header))]
        rule = "  ".join("=" * width for width in widths)
        out = [rule, "  ".join(h.ljust(w) for h, w in zip(header, widths)), rule]
        out += ["  ".join(str(c).ljust(w) for c, w in zip(cells, widths)) for cells in lines]
        return "\n".join(out + [rule])
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in cells) + " |" for cells in lines]
    return "\n".join(out)


LABELS = {
    "mlp": "MLP 4x Linear 1024, batch 128",
    "cnn": "ResNet-18 32x32, batch 8",
    "vgg": "VGG-style 6 conv 32x32, batch 32",
    "lstm": "LSTM 256, 50 steps, batch 32",
    "transformer": "Transformer d256 x4, 128 tokens, batch 8",
}


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats per configuration (median)")
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps per repeat and configuration (default per model)"
    )
    parser.add_argument("--sample-rows", type=int, default=DEFAULT_SAMPLE_ROWS, help="rows per batch when sampling")
    parser.add_argument("--delve-0150", default=None, metavar="PATH", help="folder holding delve 0.1.50's package")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--format", choices=("md", "rst"), default="md")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write every measurement here")
    parser.add_argument("--impl", default="ours", choices=("ours", "0150"), help=argparse.SUPPRESS)
    parser.add_argument("--_memory", nargs=2, metavar=("MODEL", "CONFIG"), help=argparse.SUPPRESS)
    parser.add_argument("--_timing", metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.impl == "0150":
        if not args.delve_0150:
            parser.error("--impl 0150 needs --delve-0150")
        sys.path.insert(0, os.path.abspath(args.delve_0150))
    else:
        sys.path.insert(0, REPO)
    warnings.simplefilter("ignore")
    if args._memory:
        print(memory_child(args._memory[0], args.impl, args._memory[1], args.sample_rows))
        return
    if args._timing:
        configs = ("untracked", "tracked")
        result = time_model(args._timing, args.impl, configs, args.repeats, args.sample_rows, args.steps)
        print(json.dumps(result))
        return

    started = time.perf_counter()
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {args.repeats} interleaved repeats", file=sys.stderr)
    rows = []
    for name in args.models:
        row: Dict[str, Any] = {"label": LABELS[name]}
        model, data, _, _ = build(name)
        row["floor"] = analytic_floor(model, data)
        row["floor_sampled"] = analytic_floor(model, data, args.sample_rows)
        row["ours"] = time_model(name, "ours", CONFIGS, args.repeats, args.sample_rows, args.steps)
        if args.delve_0150:
            timing = ["--_timing", name, "--impl", "0150", "--repeats", str(args.repeats)]
            timing += ["--steps", str(args.steps)] if args.steps else []
            timing += ["--threads", str(args.threads)] if args.threads else []
            row["0150"] = json.loads(_child(timing, args.delve_0150))
        if not args.no_memory:
            row["memory"] = {
                config: peak_memory_mib(name, "ours", config, args.sample_rows, None) for config in CONFIGS
            }
            if args.delve_0150:
                row["memory"]["0150"] = peak_memory_mib(name, "0150", "tracked", args.sample_rows, args.delve_0150)
        rows.append(row)
        print(f"  {name} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    print(table(rows, args.format, args.sample_rows, bool(args.delve_0150), not args.no_memory))
    if args.delve_0150 and "transformer" in args.models:
        print(
            "\n0.1.50 records only the last token of a Linear layer's (batch, tokens, features) output and "
            "no attention layer, so it does far less (and different) work on the transformer."
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
