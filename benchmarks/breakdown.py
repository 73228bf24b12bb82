"""Where tracking one model's layers spends its time, layer by layer (run by hand, not part of the tests).

::

    python benchmarks/breakdown.py --models vgg cnn

For each tracked layer it takes one batch of the layer's samples (as the
tracker records them) and times, as medians of interleaved repeats: a read of
the samples (their sum: the read bandwidth), the centering copy, the GEMM on
that copy (its GFLOP/s), a whole ``TorchCovarianceMatrix.update`` (amortised
over 16 batches, fold included) and the fold alone (per batch). The last line
sets the sum of the updates against one training step. Timed outside the
training step, on data already in cache: in a training step the numbers are
somewhat higher.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(HERE), HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

from bench_models import MODELS, TRACKER_OPTIONS, build  # noqa: E402
from delve._gram import add_gram_product  # noqa: E402
from delve.adapters import AdapterOptions, find_adapter  # noqa: E402
from delve.covariance import TorchCovarianceMatrix, num_samples  # noqa: E402
from delve.layers import find_layers  # noqa: E402


def layer_samples(name: str) -> Tuple[Dict[str, torch.Tensor], float]:
    """One batch of samples of every tracked layer of model ``name``, and the median seconds of a training step."""
    model, data, target, _ = build(name)
    ignore = TRACKER_OPTIONS.get(name, {}).get("ignore_layer_names", ())
    layers = {key: layer for key, layer in find_layers(model).items() if key not in ignore}
    samples: Dict[str, torch.Tensor] = {}

    def recorder(key: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            samples[key] = find_adapter(module)(module, output, AdapterOptions()).detach().clone()

        return hook

    handles = [layer.register_forward_hook(recorder(key)) for key, layer in layers.items()]
    with torch.no_grad():
        model(data)
    for handle in handles:
        handle.remove()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(data), target).backward()
        optimizer.step()

    return samples, median_seconds(step, 7)


def median_seconds(function: Callable[[], Any], repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def breakdown(x: torch.Tensor, repeats: int) -> Dict[str, float]:
    """Seconds of each part of recording one batch ``x`` ((n, d) or (b, d, l) samples)."""
    dim, rows = x.shape[1], num_samples(x)
    cols = torch.empty(dim, rows)
    shift = torch.zeros(dim)
    if x.ndim == 3:
        center = lambda: torch.sub(x.transpose(0, 1), shift[:, None, None], out=cols.view(dim, x.shape[0], -1))
    else:
        center = lambda: cols.copy_(x.T).sub_(shift[:, None])
    gram = torch.empty(dim, dim)
    acc = TorchCovarianceMatrix()
    batches = 16

    def updates() -> None:
        for _ in range(batches):
            acc.update(x)
        acc.flush()

    def fold() -> None:
        acc.update(x)
        acc.flush()

    return {
        "read": median_seconds(lambda: x.sum(), repeats),
        "center": median_seconds(center, repeats),
        "gemm": median_seconds(lambda: add_gram_product(gram, cols, beta=0.0), repeats),
        "update": median_seconds(updates, max(3, repeats // 4)) / batches,
        "fold": max(0.0, median_seconds(fold, repeats) - median_seconds(lambda: acc.update(x), repeats)) / batches,
    }


def report(name: str, repeats: int) -> List[str]:
    samples, step = layer_samples(name)
    lines = [f"{name}: one training step {1000 * step:.1f} ms"]
    lines.append(f"{'layer':34} {'samples':>16} {'MB':>6} {'read GB/s':>9} {'center ms':>9} {'GEMM ms':>8}"
                 f" {'GFLOP/s':>7} {'update ms':>9} {'fold ms':>7}")
    total = 0.0
    for key, x in samples.items():
        parts = breakdown(x, repeats)
        megabytes = x.numel() * x.element_size() / 1e6
        flops = 2.0 * num_samples(x) * x.shape[1] ** 2
        total += parts["update"]
        lines.append(
            f"{key[-34:]:34} {'x'.join(map(str, x.shape)):>16} {megabytes:6.2f} {megabytes / 1e3 / parts['read']:9.1f}"
            f" {1000 * parts['center']:9.3f} {1000 * parts['gemm']:8.3f} {flops / 1e9 / parts['gemm']:7.0f}"
            f" {1000 * parts['update']:9.3f} {1000 * parts['fold']:7.3f}"
        )
    lines.append(f"updates of all layers: {1000 * total:.2f} ms per step, {100 * total / step:.1f}% of a step")
    return lines


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vgg", "cnn"], choices=MODELS)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.models:
        print("\n".join(report(name, args.repeats)) + "\n")


if __name__ == "__main__":
    main()
