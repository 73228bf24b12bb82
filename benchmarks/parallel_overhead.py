"""What tracking costs under tensor parallelism: the exchange of sharded outputs, per step and per layer.

Run by hand from the repository root (not part of the tests)::

    python benchmarks/parallel_overhead.py                     # 2 gloo processes, d = 256 and 512
    python benchmarks/parallel_overhead.py --widths 256 1024   # the table of docs/distributed.rst, 12 minutes
    python benchmarks/parallel_overhead.py --world 4 --widths 512 --rows 4096 --repeats 9

It starts ``--world`` gloo processes on this machine as one tensor-parallel
group and trains a stack of transformer-style MLP blocks (``up``: d -> 4d,
column-parallel; ``down``: 4d -> d, row-parallel) on ``--rows`` tokens per
step. Within every repeat, steps with the tracker recording and steps with it
stopped (``tracker.stop()``) take turns, so that the machine's drift cancels;
the table gives the medians over repeats of the mean time per step and of the
overhead (tracked / untracked - 1 of the same repeat), and the time of one
``add_saturations()`` (the merge over the ranks and the eigendecompositions).

A second table times, per recorded forward pass of one layer, what delve does
(redistribute the output so that each rank holds its share of the rows with
every feature, then accumulate that share) against the alternative of
gathering the whole output on every rank (``full_tensor()``) and accumulating
all of it there, and gives the elements each rank receives in delve's
exchange (gloo has no all-to-all, so it gathers the features: ``(t - 1) / t``
of the output; nccl's all-to-all receives ``(t - 1) / t^2`` of it).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Callable, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 64


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


def build(width: int, blocks: int, mesh) -> nn.Module:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    model = nn.Sequential(*(Block(width) for _ in range(blocks)))
    for block in model:
        parallelize_module(block, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
    return model


def _mean_seconds(function: Callable[[], None], calls: int) -> float:
    dist.barrier()
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls


def step_overhead(width: int, args: argparse.Namespace, mesh) -> Dict[str, float]:
    """Median ms per training step with and without recording, and one add_saturations()."""
    from delve import SaturationTracker

    model = build(width, args.blocks, mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    tokens = torch.randn(args.rows // SEQ, SEQ, width, generator=torch.Generator().manual_seed(1))

    def step() -> None:
        optimizer.zero_grad()
        model(tokens).square().mean().backward()
        optimizer.step()

    tracker = SaturationTracker("unused", save_to="csv", modules=model, nosave=True)
    step()  # first forward passes allocate the accumulators
    means: Dict[str, List[float]] = {"untracked": [], "tracked": []}
    ratios = []
    for repeat in range(args.repeats):
        totals = {"untracked": 0.0, "tracked": 0.0}
        for index in range(args.steps):
            order = ("untracked", "tracked") if (index + repeat) % 2 == 0 else ("tracked", "untracked")
            for config in order:
                tracker.resume() if config == "tracked" else tracker.stop()
                totals[config] += _mean_seconds(step, 1)
        for config, total in totals.items():
            means[config].append(total / args.steps)
        ratios.append(totals["tracked"] / totals["untracked"] - 1)
    start = time.perf_counter()
    tracker.add_saturations()
    add_saturations = time.perf_counter() - start
    tracker.close()
    return {
        "untracked": 1e3 * statistics.median(means["untracked"]),
        "tracked": 1e3 * statistics.median(means["tracked"]),
        "overhead": statistics.median(ratios),
        "add_saturations": add_saturations,
    }


def exchange_costs(width: int, args: argparse.Namespace, mesh) -> List[Dict[str, object]]:
    """Per recorded forward pass of a column- and a row-parallel layer: delve's row split against gather-all."""
    from torch.distributed.tensor import DTensor, Partial, Shard

    from delve.adapters import find_layer_adapter
    from delve.covariance import TorchCovarianceMatrix
    from delve.sharding import local_output

    world = mesh.size()
    layer = nn.Linear(width, width)
    adapter = find_layer_adapter(layer)
    rows = args.rows
    generator = torch.Generator().manual_seed(2)
    outputs = {
        # the raw output of up: every row, 4d / t of the features
        "column (Shard(-1))": DTensor.from_local(
            torch.randn(rows, 4 * width // world, generator=generator), mesh, [Shard(1)], run_check=False),
        # down's raw output: a summand of every value
        "row (Partial)": DTensor.from_local(
            torch.randn(rows, width, generator=generator), mesh, [Partial()], run_check=False),
    }
    results = []
    for kind, output in outputs.items():
        split_acc, full_acc = TorchCovarianceMatrix(), TorchCovarianceMatrix()

        def exchange() -> None:
            local_output(layer, output, None, adapter)

        def split() -> None:
            split_acc.update(local_output(layer, output, None, adapter).output)

        def gather_all() -> None:
            full_acc.update(output.full_tensor())

        timings = {name: [] for name in ("exchange", "split", "gather_all")}
        for _ in range(args.repeats):
            for name, function in (("exchange", exchange), ("split", split), ("gather_all", gather_all)):
                timings[name].append(_mean_seconds(function, args.steps))
        features = output.shape[-1]
        received = rows * features * (world - 1) // world
        results.append({"kind": kind, "features": features, "received": received,
                        **{name: 1e3 * statistics.median(values) for name, values in timings.items()}})
    return results


def _worker(rank: int, world: int, rendezvous: str, args: argparse.Namespace) -> None:
    sys.path.insert(0, REPO)  # this checkout's delve, not an installed one
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    warnings.filterwarnings("ignore", message="delve")  # few samples per feature in short runs
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        lines = [f"{world} gloo ranks, one tensor-parallel group; {args.rows} tokens per step, "
                 f"{args.blocks} blocks (up d->4d column-parallel, down 4d->d row-parallel), median of "
                 f"{args.repeats} repeats of {args.steps} steps",
                 "", f"{'d':>6} {'untracked ms/step':>18} {'delve ms/step':>14} {'overhead':>9} "
                     f"{'add_saturations s':>18}"]
        micro = ["", f"{'d':>6} {'layer output':>20} {'features':>9} {'received/rank':>14} {'exchange ms':>12} "
                     f"{'exchange+record ms':>19} {'gather-all+record ms':>21}"]
        for width in args.widths:
            costs = step_overhead(width, args, mesh)
            lines.append(f"{width:>6} {costs['untracked']:>18.1f} {costs['tracked']:>14.1f} "
                         f"{costs['overhead']:>8.0%} {costs['add_saturations']:>18.2f}")
            for row in exchange_costs(width, args, mesh):
                micro.append(f"{width:>6} {row['kind']:>20} {row['features']:>9} {row['received']:>14,} "
                             f"{row['exchange']:>12.2f} {row['split']:>19.2f} {row['gather_all']:>21.2f}")
        if rank == 0:
            print("\n".join(lines + micro))
        dist.barrier()  # without it, gloo on torch 2.13 aborts at shutdown about one run in five
    finally:
        dist.destroy_process_group()


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="tensor-parallel processes")
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--rows", type=int, default=2048, help="tokens per step (a multiple of 64)")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="steps (or calls) per configuration and repeat")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(args.world, os.path.join(folder, "rendezvous"), args), nprocs=args.world)


if __name__ == "__main__":
    main()
