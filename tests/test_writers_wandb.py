"""The W&B writer against the real wandb package, offline: everything is read back from the run's local files."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

wandb = pytest.importorskip("wandb", reason="save_to='wandb' needs wandb (pip install 'delve[wandb]')")

from delve import SaturationTracker  # noqa: E402
from delve.writers.wandb import WandbWriter  # noqa: E402
from test_writers_common import read_wandb_run, run_epochs, tiny_model, wandb_offline  # noqa: E402

LAYERS = ["0", "2", "4"]
WIDTHS = (8, 5, 3)
SCALAR_STATS = {"saturation": "lsat", "intrinsic-dimensionality": "idim"}
STAT_NAMES = {"lsat": "saturation", "idim": "intrinsic-dimensionality"}


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A run the writer starts itself: three epochs, eval in epochs 1 and 2, every kind of value."""
    folder = tmp_path_factory.mktemp("wandb")
    with pytest.MonkeyPatch.context() as monkeypatch:
        wandb_offline(monkeypatch, folder)
        model = tiny_model()
        # "zip" belongs to the npy writer: a W&B writer in the same save_to list must leave it alone.
        tracker = SaturationTracker(str(folder / "run"), save_to="wandb", modules=model,
                                    stats=["lsat", "idim", "cov", "embed"],
                                    writer_args={"project": "delve-tests", "zip": True})
        results = run_epochs(tracker, model, range(3), eval_epochs={1, 2})
        tracker.add_scalar("weights", np.array([1.0, 2.0, np.nan, 4.0]))
        writer = tracker.writer
        tracker.close()
        yield SimpleNamespace(results=results, writer=writer, read=read_wandb_run(writer.run),
                              active_after_close=wandb.run)


def _epoch_rows(read: SimpleNamespace) -> list:
    return [row for row in read.rows if "accuracy" in row]


def test_every_value_is_logged_at_its_epoch_under_statistic_mode_layer(started):
    rows = _epoch_rows(started.read)
    assert [row["delve/epoch"] for row in rows] == [0, 1, 2]
    for epoch, (row, values) in enumerate(zip(rows, started.results)):
        assert row["accuracy"] == pytest.approx(0.5 + epoch / 100, rel=1e-12)
        expected = {}
        for mode in ("train", "eval"):
            for stat, name in STAT_NAMES.items():
                for layer in LAYERS:
                    output = f"{mode}-{name}_{layer}"
                    if output in values:
                        expected[f"{name}/{mode}/{layer}"] = values[output]
        assert len(expected) == (6 if epoch == 0 else 12)
        logged = {key: value for key, value in row.items() if key.split("/")[0] in SCALAR_STATS}
        assert logged == pytest.approx(expected, rel=1e-12)
    assert not [key for row in started.read.rows for key in row if "embedded" in key]


def test_covariance_is_logged_as_the_histogram_of_its_eigenvalues(started):
    for row, values in zip(_epoch_rows(started.read), started.results):
        for mode in ("train", "eval"):
            for layer, width in zip(LAYERS, WIDTHS):
                name = f"{mode}-covariance-matrix_{layer}"
                if name not in values:
                    assert f"covariance-eigenvalues/{mode}/{layer}" not in row
                    continue
                spectrum = np.clip(np.linalg.eigvalsh(values[name]), 0.0, None)
                histogram = row[f"covariance-eigenvalues/{mode}/{layer}"]
                assert histogram["_type"] == "histogram"
                assert sum(histogram["values"]) == width
                assert histogram["bins"][0] == pytest.approx(spectrum.min(), rel=1e-9, abs=1e-12)
                assert histogram["bins"][-1] == pytest.approx(spectrum.max(), rel=1e-9)


def test_every_key_is_charted_against_delve_epoch(started):
    metrics = started.read.metrics
    assert metrics["delve/epoch"].options.hidden
    keys = {key for row in _epoch_rows(started.read) for key in row
            if not key.startswith("_") and key != "delve/epoch"}
    assert "saturation/eval/4" in keys and "accuracy" in keys
    assert {key: metrics[key].step_metric for key in keys} == {key: "delve/epoch" for key in keys}


def test_last_epoch_profile_is_a_table_with_a_bar_chart(started):
    (profile,) = [row for row in started.read.rows if "saturation-profile/train_table" in row]
    assert profile["delve/epoch"] == 2
    last = started.results[-1]
    for mode in ("train", "eval"):
        entry = profile[f"saturation-profile/{mode}_table"]
        with open(os.path.join(started.writer.run.dir, entry["path"])) as handle:
            table = json.load(handle)
        assert table["columns"] == ["layer", "saturation", "intrinsic-dimensionality"]
        assert table["data"] == [
            [layer, pytest.approx(last[f"{mode}-saturation_{layer}"], rel=1e-12),
             last[f"{mode}-intrinsic-dimensionality_{layer}"]]
            for layer in LAYERS
        ]
        chart = started.read.config[("_wandb", "visualize", f"saturation-profile/{mode}")]
        assert chart["panel_config"]["panelDefId"] == "wandb/bar/v0"
        assert chart["panel_config"]["fieldSettings"] == {"label": "layer", "value": "saturation"}


def test_values_added_after_the_last_epoch_are_sent_at_close(started):
    (row,) = [row for row in started.read.rows if "weights" in row]
    assert row["delve/epoch"] == 3
    assert row["weights"]["_type"] == "histogram" and sum(row["weights"]["values"]) == 3


def test_a_run_the_writer_started_is_named_after_savefile_and_finished(started):
    assert started.writer.run.name == "run"
    assert started.active_after_close is None
    assert started.read.kinds[-1] == "exit"


def test_logs_into_the_active_run_beside_its_own_steps_and_leaves_it_open(tmp_path, monkeypatch):
    wandb_offline(monkeypatch, tmp_path)
    run = wandb.init(project="delve-tests", name="mine")
    for batch in range(10):
        run.log({"loss": 1.0 / (batch + 1)})
    model = tiny_model()
    tracker = SaturationTracker(str(tmp_path / "run"), save_to="wandb", modules=model, initial_epoch=5)
    results = run_epochs(tracker, model, range(5, 7))
    tracker.close()
    assert wandb.run is run
    run.log({"loss": 0.01})
    # A run finished before its tracker is closed: the profile cannot go anywhere, training goes on.
    late_model = tiny_model()
    late = SaturationTracker(str(tmp_path / "late"), save_to="wandb", modules=late_model, initial_epoch=7)
    run_epochs(late, late_model, [7])
    run.finish()
    with pytest.warns(RuntimeWarning, match="close the tracker before finishing its run"):
        late.close()

    read = read_wandb_run(run)
    rows = _epoch_rows(read)
    assert [row["delve/epoch"] for row in rows] == [5, 6, 7]
    for row, values in zip(rows, results):
        assert row["saturation/train/2"] == pytest.approx(values["train-saturation_2"], rel=1e-12)
    assert len([row for row in read.rows if "loss" in row]) == 11
    assert [row["delve/epoch"] for row in read.rows if "saturation-profile/train_table" in row] == [6]


def test_run_must_be_a_wandb_run():
    with pytest.raises(TypeError, match="run must be a W&B run"):
        WandbWriter("runs/x", run="my-run")
