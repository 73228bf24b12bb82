"""Every script in examples/ runs as written (with --quick) and writes what it promises.

Examples are discovered by glob, so a new script is covered without touching
this file: it must exit 0 and write at least one file under ``runs/``. The
examples listed in ``EXPECTED`` are also checked for their specific outputs.
A script that imports an optional package which is not installed is skipped.

Each script runs in a subprocess (``cwd`` a fresh temporary folder, ``PYTHONPATH``
the repository). The selected scripts are started together, as many at a time
as there are CPU cores, because most of their time is spent importing torch.
"""
from __future__ import annotations

import ast
import importlib.util
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(path for path in (REPO / "examples").glob("*.py") if not path.name.startswith("_"))

#: Import name -> pip name of the packages an example may need beyond delve's own dependencies.
OPTIONAL_PACKAGES = {
    "sklearn": "scikit-learn",
    "lightning": "lightning",
    "pytorch_lightning": "pytorch-lightning",
    "transformers": "transformers",
    "accelerate": "accelerate",
    "keras": "keras",
    "torchvision": "torchvision",
    "tensorboardX": "tensorboardX",
    "matplotlib": "matplotlib",
}

TIMEOUT_S = 300


def _imported_top_level_names(path: Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _missing_optional(path: Path) -> List[str]:
    return sorted(
        OPTIONAL_PACKAGES[name]
        for name in _imported_top_level_names(path) & OPTIONAL_PACKAGES.keys()
        if importlib.util.find_spec(name) is None
    )


def _read_csv(path: Path) -> pd.DataFrame:
    assert path.is_file(), f"{path} was not written"
    frame = pd.read_csv(path, sep=";", index_col=0)
    assert len(frame) > 0, f"{path} has no rows"
    assert list(frame.index) == list(range(len(frame))), f"{path}: the index must be the epoch 0, 1, ..."
    return frame


def _check_statistics(frame: pd.DataFrame, layer_dims: Dict[str, int], rows: int) -> None:
    """Saturation and intrinsic dimensionality of every layer, in both modes, consistent with the layer width."""
    assert len(frame) == rows
    for mode in ("train", "eval"):
        for layer, dim in layer_dims.items():
            saturation = frame[f"{mode}-saturation_{layer}"]
            idim = frame[f"{mode}-intrinsic-dimensionality_{layer}"]
            assert ((saturation > 0) & (saturation <= 1)).all(), (layer, saturation.tolist())
            assert (idim >= 1).all() and (idim <= dim).all(), (layer, idim.tolist())
            # saturation is the intrinsic dimensionality over the feature dimension
            assert [math.isclose(s * dim, i) for s, i in zip(saturation, idim)] == [True] * rows, layer


def _check_quickstart(runs: Path) -> None:
    frame = _read_csv(runs / "quickstart.csv")
    assert "accuracy" in frame.columns
    assert frame["accuracy"].between(0, 1).all()
    layers = {"conv1": 16, "conv2": 32, "fc1": 64, "classifier": 10}
    _check_statistics(frame, layers, rows=len(frame))
    assert list(runs.rglob("*.png")), "quickstart promises plots under runs/"


def _check_regression(runs: Path) -> None:
    for hidden in (3, 32):
        frame = _read_csv(runs / "regression" / f"h{hidden}.csv")
        assert len(frame) == 2
        assert {"train-loss", "test-loss"} <= set(frame.columns)
        for mode in ("train", "eval"):
            assert frame[f"{mode}-saturation_Module-0-Linear"].between(1 / hidden, 1).all()
            assert frame[f"{mode}-saturation_Module-1-Linear"].between(0.1, 1).all()
        # Evaluation is one forward pass of a fixed network, whose 10 outputs are an affine map
        # of `hidden` units: they span at most `hidden` directions.
        eval_output = frame["eval-saturation_Module-1-Linear"]
        assert (eval_output <= min(hidden, 10) / 10 + 1e-12).all(), eval_output.tolist()
    # The default writer, plotcsv, also draws the saturation of each epoch.
    assert list(runs.rglob("*.png")), "regression promises plots under runs/"


def _check_lstm(runs: Path) -> None:
    frame = _read_csv(runs / "lstm.csv")
    _check_statistics(frame, {"lstm": 32, "classifier": 10}, rows=2)


def _check_transformer(runs: Path) -> None:
    frame = _read_csv(runs / "transformer.csv")
    layers = {"embed": 32, "classifier": 10}
    for block in range(2):
        layers.update({
            f"encoder-layers-{block}-self_attn": 32,
            f"encoder-layers-{block}-linear1": 64,
            f"encoder-layers-{block}-linear2": 32,
        })
    _check_statistics(frame, layers, rows=2)


#: Specific checks of the outputs of known examples (others only need to write something under runs/).
EXPECTED: Dict[str, Callable[[Path], None]] = {
    "quickstart": _check_quickstart,
    "regression": _check_regression,
    "lstm": _check_lstm,
    "transformer": _check_transformer,
}


def test_examples_are_discovered() -> None:
    names = {path.stem for path in EXAMPLES}
    assert {"quickstart", "regression", "lstm", "transformer"} <= names, names


def _run_quick(script: Path, folder: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), MPLBACKEND="Agg")
    return subprocess.run(
        [sys.executable, str(script), "--quick"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


@pytest.fixture(scope="module")
def quick_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, tuple]]:
    """Start every selected, runnable example at once; name -> (future of its process, its folder)."""
    selected = [
        item.callspec.params["script"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_example_runs_quick" and hasattr(item, "callspec")
    ]
    runs: Dict[str, tuple] = {}
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        for script in selected:
            if not _missing_optional(script):
                folder = tmp_path_factory.mktemp(script.stem)
                runs[script.stem] = (pool.submit(_run_quick, script, folder), folder)
        yield runs


@pytest.mark.parametrize("script", EXAMPLES, ids=[path.stem for path in EXAMPLES])
def test_example_runs_quick(script: Path, quick_runs: Dict[str, tuple]) -> None:
    missing = _missing_optional(script)
    if missing:
        pytest.skip(f"{script.name} needs {', '.join(missing)} (pip install {' '.join(missing)})")
    future, folder = quick_runs[script.stem]
    completed = future.result()
    assert completed.returncode == 0, (
        f"{script.name} --quick exited {completed.returncode}\n"
        f"stdout:\n{completed.stdout[-3000:]}\nstderr:\n{completed.stderr[-3000:]}"
    )
    runs = folder / "runs"
    written = [path for path in runs.rglob("*") if path.is_file()] if runs.is_dir() else []
    assert written, f"{script.name} wrote nothing under runs/"
    check = EXPECTED.get(script.stem)
    if check is not None:
        check(runs)
