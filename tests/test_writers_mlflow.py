"""The MLflow writer against a real local tracking store (SQLite in a temporary folder), read back with MlflowClient."""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

mlflow = pytest.importorskip("mlflow", reason="save_to='mlflow' needs mlflow (pip install 'delve[mlflow]')")

from mlflow.tracking import MlflowClient  # noqa: E402

from delve import SaturationTracker  # noqa: E402
from delve.writers.mlflow import MLflowWriter, mlflow_key  # noqa: E402
from test_writers_common import run_epochs, tiny_model  # noqa: E402

LAYERS = ["0", "2", "4"]
STAT_NAMES = {"lsat": "saturation", "idim": "intrinsic-dimensionality", "det": "covariance-determinant"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One SQLite tracking store for the module (creating its tables takes a second or two)."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_experiment("delve-tests", artifact_location=str(folder / "artifacts"))
    return SimpleNamespace(folder=folder, uri=uri, client=client)


@pytest.fixture(scope="module")
def started(store: SimpleNamespace) -> SimpleNamespace:
    """A run the writer starts: three epochs, eval in epochs 0 and 2, a name MLflow would reject, arrays."""
    model = tiny_model()
    tracker = SaturationTracker(str(store.folder / "run"), save_to="mlflow", modules=model,
                                stats=["lsat", "idim", "det", "cov", "embed"],
                                writer_args={"tracking_uri": store.uri, "experiment_name": "delve-tests"})
    results = run_epochs(tracker, model, range(3), eval_epochs={0, 2})
    tracker.add_scalar("top-1 acc (%)", 0.75, global_step=2)
    tracker.close()
    run_id = tracker.writer.run_id
    return SimpleNamespace(results=results, run_id=run_id, run=store.client.get_run(run_id), writer=tracker.writer)


def _history(client: MlflowClient, run_id: str, key: str) -> dict:
    return {metric.step: metric.value for metric in client.get_metric_history(run_id, key)}


def test_metrics_are_logged_at_their_epoch_under_statistic_mode_layer(store, started):
    client = store.client
    assert _history(client, started.run_id, "accuracy") == pytest.approx({0: 0.5, 1: 0.51, 2: 0.52}, rel=1e-12)
    for mode in ("train", "eval"):
        for stat, name in STAT_NAMES.items():
            for layer in LAYERS:
                output = f"{mode}-{name}_{layer}"
                expected = {epoch: values[output] for epoch, values in enumerate(started.results) if output in values}
                assert sorted(expected) == ([0, 1, 2] if mode == "train" else [0, 2])
                assert _history(client, started.run_id, f"{name}/{mode}/{layer}") == pytest.approx(expected, rel=1e-12)


def test_only_numbers_become_metrics_under_names_mlflow_accepts(started):
    names = set(started.run.data.metrics)
    assert "top-1 acc ___" in names
    assert not [name for name in names if "covariance-matrix" in name or "embedded" in name
                or "covariance-eigenvalues" in name]
    assert len(names) == 1 + 1 + 3 * 3 * 2  # accuracy, the renamed scalar, 3 statistics x 3 layers x 2 modes


def test_a_run_the_writer_started_is_named_after_savefile_and_finished(started):
    assert started.run.info.run_name == "run"
    assert started.run.info.status == "FINISHED"


def test_table_plots_and_report_are_artifacts(store, started, tmp_path):
    client = store.client
    listed = {entry.path for entry in client.list_artifacts(started.run_id, "delve")}
    assert listed == {"delve/run.csv", "delve/run"}
    figures = {os.path.basename(entry.path) for entry in client.list_artifacts(started.run_id, "delve/run")}
    expected = {f"run_{stat}_epoch_0002.png" for stat in ("lsat", "idim", "det")}
    expected |= {f"run_{stat}_evolution.png" for stat in ("lsat", "idim")}
    expected |= {"run_embed_train_epoch_0002.png", "run_embed_eval_epoch_0002.png", "report.html"}
    assert figures == expected
    table = pd.read_csv(client.download_artifacts(started.run_id, "delve/run.csv", str(tmp_path)), sep=";", index_col=0)
    assert list(table.index) == [0, 1, 2]
    for epoch, values in enumerate(started.results):
        scalars = {name: value for name, value in values.items() if np.ndim(value) == 0}
        assert table.loc[epoch, list(scalars)].to_dict() == pytest.approx(scalars, rel=1e-12)
    assert table.loc[2, "top-1 acc (%)"] == 0.75 and np.isnan(table.loc[1, "eval-saturation_0"])
    report = client.download_artifacts(started.run_id, "delve/run/report.html", str(tmp_path))
    assert "<html" in open(report).read()[:200].lower()


def test_active_run_is_used_and_left_open_and_a_resumed_run_keeps_earlier_rows(store, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    experiment = store.client.get_experiment_by_name("delve-tests").experiment_id
    model = tiny_model()
    with mlflow.start_run(experiment_id=experiment) as active:
        tracker = SaturationTracker(str(store.folder / "resumed"), save_to="mlflow", modules=model)
        first = run_epochs(tracker, model, range(4))
        tracker.close()
        assert tracker.writer.run_id == active.info.run_id
        assert store.client.get_run(active.info.run_id).info.status == "RUNNING"
    assert store.client.get_run(active.info.run_id).info.status == "FINISHED"

    model = tiny_model()
    tracker = SaturationTracker(str(store.folder / "resumed"), save_to="mlflow", modules=model, initial_epoch=2,
                                writer_args={"run_id": active.info.run_id, "tracking_uri": store.uri})
    second = run_epochs(tracker, model, range(2, 5), seed=5)
    tracker.close()
    assert store.client.get_run(active.info.run_id).info.status == "FINISHED"
    metrics = store.client.get_metric_history(active.info.run_id, "saturation/train/2")
    # MLflow keeps every point: epochs 2 and 3 hold the first session's value and the second's.
    assert sorted(metric.step for metric in metrics) == [0, 1, 2, 2, 3, 3, 4]
    latest = {metric.step: metric.value for metric in sorted(metrics, key=lambda metric: metric.timestamp)}
    expected = [values["train-saturation_2"] for values in first[:2] + second]
    assert [latest[step] for step in range(5)] == pytest.approx(expected, rel=1e-12)
    path = store.client.download_artifacts(active.info.run_id, "delve/resumed.csv", str(tmp_path))
    table = pd.read_csv(path, sep=";", index_col=0)
    assert list(table.index) == [0, 1, 2, 3, 4]
    assert list(table["train-saturation_2"]) == pytest.approx(expected, rel=1e-12)


def test_metric_names_are_sanitized_and_kept_apart():
    assert mlflow_key("eval-saturation_features-0") == "saturation/eval/features-0"
    assert mlflow_key("a:b/./c//d") == "a_b/_/c/d"
    assert mlflow_key("../x") == "__/x"
    long = "x" * 300
    assert len(mlflow_key(long)) == 250 and mlflow_key(long) != mlflow_key(long + "y")
    writer = MLflowWriter("runs/x")
    first, second = writer.metric_name("acc(1)"), writer.metric_name("acc[1]")
    assert first == "acc_1_" and second.startswith("acc_1__") and len(second) == len("acc_1_") + 9
    assert writer.metric_name("acc(1)") == first


@pytest.mark.parametrize("argument, value", [("tracking_uri", 5), ("run_id", 3), ("artifact_path", None),
                                             ("log_artifacts", "yes")])
def test_bad_arguments_fail_at_construction(argument, value):
    with pytest.raises(ValueError, match=argument):
        MLflowWriter("runs/x", **{argument: value})
