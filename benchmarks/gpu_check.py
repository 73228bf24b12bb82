"""delve's numbers and cost on a GPU: the numeric checks of the test suite on the device, then the overhead table.

Run by hand on a CUDA machine from the repository root::

    python benchmarks/gpu_check.py                  # checks, then benchmarks/overhead.py on cuda
    python benchmarks/gpu_check.py --checks-only
    python benchmarks/gpu_check.py --device cpu     # the same checks on the CPU (to check this script)

Each check feeds activations made on the device to delve and compares what it
computes with numpy float64 on the same activations (copied to the host):
float32 outputs through both update paths (a large batch straight to a GEMM;
small batches through the staging buffer), convolution outputs, bf16 outputs
under autocast, values far from zero with a tiny spread, row sampling on the
device (unbiased over seeds, reproducible, never synchronising with the
host), statistics kept on the host (``device='cpu'``) for activations on the
device, and a tracker on a small CNN end to end. The last line sums up.
Without CUDA (and without ``--device cpu``) it stops with exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
from typing import Callable, Iterator, List, Tuple

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for path in (REPO, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

from delve import SaturationTracker, TorchCovarianceMatrix  # noqa: E402
from delve.adapters import AdapterOptions, conv_samples  # noqa: E402
from delve.covariance import as_rows  # noqa: E402
from delve.metrics import compute_intrinsic_dimensionality  # noqa: E402
from delve.writers import STATMAP  # noqa: E402

#: Relative tolerance of float32 statistics against numpy float64 (as in tests/test_covariance.py).
RTOL = 1e-5

Check = Tuple[str, bool, str]


def reference(batches: List[torch.Tensor]) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and population covariance in numpy float64 of every row of ``batches`` ((n, d) or (b, d, l))."""
    rows = np.concatenate([as_rows(batch).detach().to("cpu", torch.float64).numpy() for batch in batches])
    mean = rows.mean(axis=0)
    centered = rows - mean
    return mean, centered.T @ centered / rows.shape[0]


def compare(name: str, acc: TorchCovarianceMatrix, batches: List[torch.Tensor], tolerance: float = RTOL) -> Check:
    """Covariance, mean and intrinsic dimensionality of ``acc`` against numpy float64."""
    mean, expected = reference(batches)
    cov = acc.compute().cpu().numpy()
    scale = np.abs(expected).max()
    error = np.abs(cov - expected).max() / scale
    mean_error = np.abs(acc.mean.cpu().numpy() - mean).max() / max(np.abs(mean).max(), math.sqrt(scale))
    same_idim = all(
        compute_intrinsic_dimensionality(cov, thresh) == compute_intrinsic_dimensionality(expected, thresh)
        for thresh in (0.9, 0.99)
    )
    ok = error <= tolerance and mean_error <= tolerance and same_idim
    return name, bool(ok), f"covariance {error:.1e}, mean {mean_error:.1e} (of the largest), idim {'=' if same_idim else '!='}"


def accumulate(batches: List[torch.Tensor], **kwargs) -> TorchCovarianceMatrix:
    acc = TorchCovarianceMatrix(**kwargs)
    for batch in batches:
        acc.update(batch)
    return acc


def linear_batches(device: str, sizes: List[int], width: int = 48, mean: float = 0.0, spread: float = 1.0):
    generator = torch.Generator(device=device).manual_seed(0)
    mixing = torch.randn(16, width, device=device, generator=generator)
    return [mean + spread * torch.randn(n, 16, device=device, generator=generator) @ mixing for n in sizes]


@contextlib.contextmanager
def no_host_sync(device: str) -> Iterator[None]:
    """CUDA raises on any synchronisation with the host inside (torch.cuda.set_sync_debug_mode)."""
    if device.startswith("cuda"):
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        if device.startswith("cuda"):
            torch.cuda.set_sync_debug_mode("default")


def check_float32_paths(device: str) -> List[Check]:
    direct = linear_batches(device, [2048] * 20)
    staged = linear_batches(device, [20] * 300 + [7])
    mixed = linear_batches(device, [20, 2048, 3, 500, 20] * 4)
    results = []
    for name, batches in (("float32, direct", direct), ("float32, staged", staged), ("float32, mixed", mixed)):
        acc = TorchCovarianceMatrix()
        with no_host_sync(device):
            for batch in batches:
                acc.update(batch)
        results.append(compare(name, acc, batches))
    return results


def check_convolutions(device: str) -> List[Check]:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 32, 3, padding=1).to(device)
    results = []
    for name, batch, size in (("conv, direct", 8, 16), ("conv, staged", 2, 3)):
        with torch.no_grad():
            batches = [
                conv_samples(conv, conv(torch.randn(batch, 3, size, size, device=device)), AdapterOptions())
                for _ in range(24)
            ]
        results.append(compare(name, accumulate(batches), batches))
    return results


def check_bf16_autocast(device: str) -> List[Check]:
    torch.manual_seed(1)
    layer = nn.Linear(16, 48).to(device)
    batches, acc = [], TorchCovarianceMatrix()
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16), torch.no_grad():
        for rows in [4096] * 3 + [30] * 100:
            out = layer(torch.randn(rows, 16, device=device))
            acc.update(out)
            batches.append(out)
    kind = str(batches[0].dtype).replace("torch.", "")
    return [compare(f"autocast ({kind} outputs)", acc, batches)]


def check_far_from_zero(device: str) -> List[Check]:
    results = []
    for name, sizes in (("mean 1e4, spread 1e-2, direct", [4096] * 4), ("mean 1e4, spread 1e-2, staged", [30] * 200)):
        batches = linear_batches(device, sizes, width=8, mean=1e4, spread=1e-2)
        mean, expected = reference(batches)
        cov = accumulate(batches).compute().cpu().numpy()
        error = np.abs(cov - expected).max() / np.abs(expected).max()
        results.append((name, bool(error <= RTOL), f"covariance {error:.1e} of the largest"))
    return results


def check_sampling_on_device(device: str) -> List[Check]:
    batches = linear_batches(device, [256] * 6, width=6)
    mean, expected = reference(batches)
    estimates = []
    for seed in range(100):
        acc = TorchCovarianceMatrix(sample_rows=16, seed=seed)
        with no_host_sync(device):
            for batch in batches:
                acc.update(batch)
        estimates.append(acc.fix(center=False).cpu().numpy())
    estimates = np.stack(estimates)
    second = expected + np.outer(mean, mean)
    z = np.abs(estimates.mean(0) - second) / (estimates.std(0, ddof=1) / math.sqrt(len(estimates)) + 1e-12)
    again = accumulate(batches, sample_rows=16, seed=99).fix(center=False).cpu().numpy()
    reproducible = np.array_equal(again, estimates[99])
    ok = bool(z.max() < 5.0 and reproducible)
    return [("sampling on the device", ok, f"largest |bias| {z.max():.1f} standard errors, reproducible: {reproducible}")]


def check_statistics_on_host(device: str) -> List[Check]:
    batches = linear_batches(device, [20] * 100 + [4096] * 2)
    acc = accumulate(batches, device="cpu")
    name, ok, detail = compare("device='cpu' statistics", acc, batches)
    on_host = acc.compute().device.type == "cpu"
    return [(name, ok and on_host, detail + f", state on the host: {on_host}")]


def check_tracker(device: str) -> List[Check]:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 24)).to(device)
    captured: List[torch.Tensor] = []
    handle = model[3].register_forward_hook(lambda module, inputs, output: captured.append(output.detach()))
    folder = tempfile.mkdtemp(prefix="delve-gpu-check-")
    with SaturationTracker(folder, "csv", model, stats=["trc", "idim"], nosave=True) as tracker:
        for _ in range(20):
            model(torch.randn(32, 3, 8, 8, device=device))
        results = tracker.compute()
    handle.remove()
    _, expected = reference(captured)
    trace = results[f"train-{STATMAP['trc']}_3"]
    trace_error = abs(trace - np.trace(expected)) / np.trace(expected)
    same_idim = results[f"train-{STATMAP['idim']}_3"] == compute_intrinsic_dimensionality(expected, 0.99)
    ok = bool(trace_error <= RTOL and same_idim)
    return [("tracker end to end", ok, f"trace {trace_error:.1e}, idim {'=' if same_idim else '!='}")]


CHECKS: List[Callable[[str], List[Check]]] = [
    check_float32_paths,
    check_convolutions,
    check_bf16_autocast,
    check_far_from_zero,
    check_sampling_on_device,
    check_statistics_on_host,
    check_tracker,
]


def run_checks(device: str) -> List[Check]:
    """Every numeric check on ``device``; a check that raises counts as failed."""
    results: List[Check] = []
    for check in CHECKS:
        try:
            results += check(device)
        except Exception as error:  # report and go on with the other checks
            results.append((check.__name__, False, f"{type(error).__name__}: {error}"))
    return results


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu to check the script")
    parser.add_argument("--checks-only", action="store_true", help="skip the overhead table")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the overhead table")
    parser.add_argument("--models", nargs="+", default=None, help="models of the overhead table (default: all)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a CUDA machine, "
            "or with --device cpu to check the script itself",
            file=sys.stderr,
        )
        return 2
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    results = run_checks(args.device)
    for name, ok, detail in results:
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    failed = [name for name, ok, _ in results if not ok]
    if not args.checks_only:
        import overhead

        table = ["--device", args.device, "--repeats", str(args.repeats), "--format", "rst"]
        overhead.main(table + (["--models", *args.models] if args.models else []))
    summary = f"{len(results) - len(failed)}/{len(results)} numeric checks passed on {where} (torch {torch.__version__})"
    print(f"gpu_check: {summary}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
