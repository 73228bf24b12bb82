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
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from bench_models import (  # noqa: E402
    LABELS,
    MODELS,
    REPEAT_STEPS,
    TRACKER_OPTIONS,
    analytic_floor,
    build,
)

CONFIGS = ("untracked", "tracked", "sampled")


# ----------------------------------------------------------------------------- timing
def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: torch.Tensor,
    target: torch.Tensor,
    steps: int,
) -> float:
    """Mean seconds per training step over ``steps`` steps (waiting for a GPU's queue at both ends)."""
    loss_fn = nn.CrossEntropyLoss()
    synchronize(data.device)
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(data), target).backward()
        optimizer.step()
    synchronize(data.device)
    return (time.perf_counter() - start) / steps


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_on(name: str, device: str) -> Tuple[nn.Module, torch.Tensor, torch.Tensor, int]:
    """:func:`bench_models.build` with the model and its batch on ``device``."""
    model, data, target, steps = build(name)
    return model.to(device), data.to(device), target.to(device), steps


def make_tracker(impl: str, name: str, model: nn.Module, folder: str, sample_rows: Union[None, bool, int]) -> Any:
    """A tracker of every layer of ``model`` (lsat only, nothing written to disk)."""
    from delve import SaturationTracker

    savefile = os.path.join(folder, "run")
    if impl == "0150":
        return SaturationTracker(savefile, save_to="csv", modules=model, device="cpu", stats=["lsat"])
    options = dict(TRACKER_OPTIONS.get(name, {}), stats=["lsat"], nosave=True, sample_rows=sample_rows)
    return SaturationTracker(savefile, save_to="csv", modules=model, **options)


def state_bytes(tracker: Any) -> int:
    """Bytes the tracker's accumulators hold (their float64 state and scratch buffers)."""
    total = 0
    for recorder in getattr(tracker, "_recorders", {}).values():
        for mode_state in recorder.modes.values():
            total += getattr(mode_state.accumulator, "nbytes", 0)
    return total


def time_model(
    name: str,
    impl: str,
    configs: Tuple[str, ...],
    repeats: int,
    sample_rows: Union[bool, int],
    steps: Optional[int],
    device: str = "cpu",
) -> Dict[str, Any]:
    """Interleaved repeats of every configuration on one model; medians and raw times.

    delve's configurations share one model: the trackers not taking their turn
    are paused (their hooks return at once). delve 0.1.50 cannot pause, so
    there each configuration trains its own copy of the model.
    """
    model, data, target, default_steps = build_on(name, device)
    steps = steps or default_steps
    shared = impl == "ours"
    models = {config: model if shared or config == "untracked" else copy.deepcopy(model) for config in configs}
    optimizers = {config: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for config, m in models.items()}
    if shared:
        optimizers = {config: optimizers["untracked"] for config in configs}
    times: Dict[str, List[float]] = {config: [] for config in configs}
    folder = tempfile.mkdtemp(prefix="delve-overhead-")
    trackers = {
        config: make_tracker(
            impl, name, models[config], os.path.join(folder, config), sample_rows if config == "sampled" else None
        )
        for config in configs
        if config != "untracked"
    }

    def step(config: str, count: int = 1) -> float:
        if shared:
            for other, tracker in trackers.items():
                tracker.resume() if other == config else tracker.stop()
        return train_steps(models[config], optimizers[config], data, target, count)

    for config in configs:  # warm-up: allocator, thread pools, the trackers' state
        step(config)
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
                totals[config] += step(config)
        for config in configs:
            times[config].append(totals[config] / steps)
    saturation_times: Dict[str, List[float]] = {config: [] for config in trackers}
    held: Dict[str, int] = {}
    for config, tracker in trackers.items():  # add_saturations() after a run of steps, as at an epoch's end
        for _ in range(1 if name == "gpt2" else 3):
            step(config, 2)
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


def sampling_error(name: str, steps: int, sample_rows: Union[bool, int], device: str = "cpu") -> Dict[str, float]:
    """Largest difference over layers between sampled and exact statistics recorded in the same run.

    One model trains ``steps`` steps with two trackers on it, one exact and one
    sampled; returns the largest absolute difference in saturation
    (``saturation``, a share) and in intrinsic dimensionality (``idim``,
    directions; ``idim_relative``, over the exact one).
    """
    model, data, target, _ = build_on(name, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    folder = tempfile.mkdtemp(prefix="delve-error-")
    from delve import SaturationTracker

    options = dict(TRACKER_OPTIONS.get(name, {}), stats=["lsat", "idim"], nosave=True)
    exact = SaturationTracker(os.path.join(folder, "exact"), "csv", model, **options)
    sampled = SaturationTracker(os.path.join(folder, "sampled"), "csv", model, sample_rows=sample_rows, **options)
    train_steps(model, optimizer, data, target, steps)
    truth, estimate = exact.compute(), sampled.compute()
    exact.close()
    sampled.close()
    errors = {"saturation": 0.0, "idim": 0.0, "idim_relative": 0.0}
    for key, value in truth.items():
        difference = abs(estimate[key] - value)
        if "-saturation_" in key:
            errors["saturation"] = max(errors["saturation"], difference)
        elif "-intrinsic-dimensionality_" in key:
            errors["idim"] = max(errors["idim"], difference)
            errors["idim_relative"] = max(errors["idim_relative"], difference / max(value, 1))
    return errors


def wide_layer_seconds(width: int = 4096, batches: int = 2, device: str = "cpu") -> float:
    """Time of one ``add_saturations()`` of a tracker on a single ``width``-wide Linear layer."""
    from delve import SaturationTracker

    torch.manual_seed(0)
    layer = nn.Linear(64, width).to(device)
    tracker = SaturationTracker(tempfile.mkdtemp(prefix="delve-wide-"), "csv", layer, nosave=True)
    with torch.no_grad():
        for _ in range(batches):
            layer(torch.randn(width, 64, device=device))
    synchronize(torch.device(device))
    start = time.perf_counter()
    tracker.add_saturations()
    seconds = time.perf_counter() - start
    tracker.close()
    return seconds


def eigenvalue_seconds(name: str, steps: int, thresh: float = 0.99) -> Dict[str, Any]:
    """Eigenvalues of every tracked covariance of ``name`` after ``steps`` steps: one after the other in
    float64 (as ``metrics.eigenvalues``), and with :func:`delve.metrics.eigenvalues_many` in float64 and
    with ``thresh``; whether the intrinsic dimensionalities agree, and how many matrices went to float64."""
    from delve import SaturationTracker, metrics

    model, data, target, _ = build(name)
    folder = tempfile.mkdtemp(prefix="delve-eigen-")
    options = dict(TRACKER_OPTIONS.get(name, {}), stats=["cov"], nosave=True)
    tracker = SaturationTracker(os.path.join(folder, "run"), "csv", model, **options)
    train_steps(model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9), data, target, steps)
    covs = [torch.from_numpy(value) for value in tracker.compute().values()]
    tracker.close()
    del tracker, model  # their state: gigabytes for GPT-2
    timings: Dict[str, Any] = {"matrices": len(covs)}
    start = time.perf_counter()
    serial = [metrics.eigenvalues(cov) for cov in covs]
    timings["serial_float64_s"] = time.perf_counter() - start
    start = time.perf_counter()
    metrics.eigenvalues_many(covs)
    timings["parallel_float64_s"] = time.perf_counter() - start
    start = time.perf_counter()
    mixed = metrics.eigenvalues_many(covs, thresh=thresh)
    timings["parallel_float32_s"] = time.perf_counter() - start
    idims = [metrics.intrinsic_dimensionality_from_eigenvalues(values, thresh) for values in serial]
    timings["same_idim"] = idims == [metrics.intrinsic_dimensionality_from_eigenvalues(v, thresh) for v in mixed]
    timings["recomputed_float64"] = sum(torch.equal(a, b) for a, b in zip(serial, mixed))
    return timings


# ----------------------------------------------------------------------------- memory
def memory_child(name: str, impl: str, config: str, sample_rows: Union[bool, int]) -> int:
    """Peak resident set (KiB) of this process after one repeat's steps (tracked or not) and add_saturations()."""
    model, data, target, steps = build(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    tracker = None
    if config != "untracked":
        folder = tempfile.mkdtemp(prefix="delve-memory-")
        tracker = make_tracker(impl, name, model, folder, sample_rows if config == "sampled" else None)
    train_steps(model, optimizer, data, target, max(2, steps))
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


def peak_memory_mib(
    name: str, impl: str, config: str, sample_rows: Union[bool, int], delve_0150: Optional[str]
) -> float:
    line = _child(["--_memory", name, config, "--impl", impl, "--sample-rows", sample_rows_argument(sample_rows)], delve_0150)
    return int(line) / 1024


def sample_rows_argument(sample_rows: Union[bool, int]) -> str:
    return "width" if sample_rows is True else str(sample_rows)


def parse_sample_rows(text: str) -> Union[bool, int]:
    """``width`` (delve's rule: rows in proportion to each layer's width) or a number of rows per batch."""
    if text == "width":
        return True
    try:
        rows = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sample-rows must be 'width' or an int >= 2, got {text!r}") from None
    if rows < 2:
        raise argparse.ArgumentTypeError(f"--sample-rows must be 'width' or an int >= 2, got {text!r}")
    return rows


# ----------------------------------------------------------------------------- report
def overhead(result: Dict[str, Any], config: str) -> str:
    """Median over repeats of tracked / untracked - 1, each ratio from runs of the same repeat."""
    raw = result["raw_step_s"]
    ratios = [tracked / untracked - 1 for tracked, untracked in zip(raw[config], raw["untracked"])]
    return f"{100 * statistics.median(ratios):+.0f}%"


def sampled_label(sample_rows: Union[bool, int]) -> str:
    from delve.covariance import DEFAULT_SAMPLE_ROWS, SAMPLE_ROWS_PER_FEATURE

    if sample_rows is True:
        return f"sampled (max({DEFAULT_SAMPLE_ROWS}, {SAMPLE_ROWS_PER_FEATURE} d) rows)"
    return f"sampled {sample_rows} rows"


def table(
    rows: List[Dict[str, Any]], fmt: str, sample_rows: Union[bool, int], with_0150: bool, with_memory: bool
) -> str:
    header = ["model", "untracked ms/step", "delve ms/step", "overhead", "floor"]
    header += [sampled_label(sample_rows), "floor (sampled)", "sampling error: saturation / idim"]
    if with_0150:
        header += ["0.1.50 overhead"]
    header += ["add_saturations s"]
    if with_memory:
        header += ["peak RSS MiB (untracked / delve / sampled" + (" / 0.1.50)" if with_0150 else ")")]
    lines = []
    for row in rows:
        step = row["ours"]["step_s"]
        error = row["error"]
        cells = [
            row["label"],
            f"{1000 * step['untracked']:.1f}",
            f"{1000 * step['tracked']:.1f}",
            overhead(row["ours"], "tracked"),
            f"{100 * row['floor']:.0f}%",
            overhead(row["ours"], "sampled"),
            f"{100 * row['floor_sampled']:.1f}%",
            f"{error['saturation']:.3f} / {error['idim']:.0f} ({100 * error['idim_relative']:.0f}%)",
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


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats per configuration (median)")
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps per repeat and configuration (default per model)"
    )
    parser.add_argument(
        "--sample-rows",
        type=parse_sample_rows,
        default=True,
        metavar="{width,N}",
        help="rows per batch when sampling: delve's rule in proportion to the width (default), or N",
    )
    parser.add_argument("--delve-0150", default=None, metavar="PATH", help="folder holding delve 0.1.50's package")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="where the models train (cuda: no peak-memory column)")
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
    if args.device != "cpu":
        args.no_memory = True  # resident memory says nothing about a GPU's
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
    where = f"{threads} threads" if args.device == "cpu" else torch.cuda.get_device_name(args.device)
    print(f"torch {torch.__version__}, {where}, {args.repeats} interleaved repeats", file=sys.stderr)
    rows = []
    for name in args.models:
        row: Dict[str, Any] = {"label": LABELS[name]}
        model, data, _, _ = build(name)
        ignore = tuple(TRACKER_OPTIONS.get(name, {}).get("ignore_layer_names", ()))
        row["floor"] = analytic_floor(model, data, ignore=ignore)
        row["floor_sampled"] = analytic_floor(model, data, args.sample_rows, ignore=ignore)
        del model
        row["ours"] = time_model(name, "ours", CONFIGS, args.repeats, args.sample_rows, args.steps, args.device)
        steps = (args.steps or REPEAT_STEPS[name]) * args.repeats
        row["error"] = sampling_error(name, steps, args.sample_rows, args.device)
        if args.delve_0150 and name != "gpt2":  # 0.1.50 would track only GPT-2's 50257-wide lm_head
            timing = ["--_timing", name, "--impl", "0150", "--repeats", str(args.repeats)]
            timing += ["--steps", str(args.steps)] if args.steps else []
            timing += ["--threads", str(args.threads)] if args.threads else []
            row["0150"] = json.loads(_child(timing, args.delve_0150))
        if not args.no_memory:
            row["memory"] = {
                config: peak_memory_mib(name, "ours", config, args.sample_rows, None) for config in CONFIGS
            }
            if args.delve_0150 and name != "gpt2":
                row["memory"]["0150"] = peak_memory_mib(name, "0150", "tracked", args.sample_rows, args.delve_0150)
        rows.append(row)
        print(f"  {name} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    print(table(rows, args.format, args.sample_rows, bool(args.delve_0150), not args.no_memory))
    if args.delve_0150 and "transformer" in args.models:
        print(
            "\n0.1.50 records only the last token of a Linear layer's (batch, tokens, features) output and "
            "no attention layer, so it does far less (and different) work on the transformer."
        )
    if "gpt2" in args.models:
        wide = wide_layer_seconds(device=args.device)
        eigen = eigenvalue_seconds("gpt2", REPEAT_STEPS["gpt2"])
        rows.append({"label": "add_saturations of one 4096-wide layer", "seconds": wide, "gpt2_eigenvalues": eigen})
        print(f"\nadd_saturations() of one 4096-wide layer: {wide:.2f} s")
        print(
            f"eigenvalues of GPT-2's {eigen['matrices']} covariances: {eigen['serial_float64_s']:.1f} s one after "
            f"the other in float64, {eigen['parallel_float64_s']:.1f} s side by side (eigenvalues_many), "
            f"{eigen['parallel_float32_s']:.1f} s side by side in float32 with float64 where it could change the "
            f"intrinsic dimensionality ({eigen['recomputed_float64']} matrices; same intrinsic dimensionality "
            f"as float64: {eigen['same_idim']})"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
