"""Writers: every output is read back from disk and compared with what the tracker computed."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pandas as pd
import pytest

from delve import SaturationTracker
from delve.writers import WRITERS, AbstractWriter, CompositWriter, build_writer
from delve.writers.csv import CSVWriter
from delve.writers.npy import NPYWriter, load_npy_run
from test_writers_common import read_event_histograms, read_event_scalars, run_epochs, tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ["0", "2", "4"]


def _tracker(tmp_path, save_to, **kwargs):
    model = kwargs.pop("model", None) or tiny_model()
    return SaturationTracker(str(tmp_path / "run"), save_to=save_to, modules=model, **kwargs), model


# ------------------------------------------------------------------ registry
@pytest.mark.parametrize("key", sorted(WRITERS))
def test_every_key_builds_its_writer(tmp_path, key):
    pytest.importorskip("tensorboardX", reason="the tensorboard writer needs tensorboardX")
    writer = build_writer(key, {"savepath": str(tmp_path / "run")})
    assert type(writer) is WRITERS[key]
    writer.close()


@pytest.mark.parametrize("save_to", ["bogus", ["csv", "bogus"], 3, [], ["csv", None]])
def test_unknown_writer_fails_at_tracker_construction(tmp_path, save_to):
    with pytest.raises(ValueError, match="save_to") as error:
        SaturationTracker(str(tmp_path / "run"), save_to=save_to, modules=tiny_model())
    if save_to != []:
        assert "'csv'" in str(error.value) and "'console'" in str(error.value)
    assert not (tmp_path / "run.csv").exists()


def test_list_gives_composite_and_writer_args_reach_writers(tmp_path):
    custom = CSVWriter(str(tmp_path / "other"))
    tracker, model = _tracker(tmp_path, ["npy", custom], writer_args={"zip": True})
    assert isinstance(tracker.writer, CompositWriter)
    npy_writer = tracker.writer.writers[0]
    assert isinstance(npy_writer, NPYWriter) and npy_writer.zip is True
    assert tracker.writer.writers[1] is custom
    run_epochs(tracker, model, range(2))
    tracker.close()
    assert (tmp_path / "run.zip").exists()
    assert len(pd.read_csv(tmp_path / "other.csv", sep=";", index_col=0)) == 2


# ----------------------------------------------------------------------- csv
def test_csv_rows_late_columns_and_values(tmp_path):
    tracker, model = _tracker(tmp_path, "csv", stats=["lsat", "idim", "cov"])
    results = run_epochs(tracker, model, range(4), eval_epochs={1, 3})
    tracker.add_scalar("late_metric", 7.5)
    results += run_epochs(tracker, model, [4], eval_epochs={})
    tracker.close()
    table = pd.read_csv(tmp_path / "run.csv", sep=";", index_col=0)
    assert list(table.index) == [0, 1, 2, 3, 4]
    assert table.index.name is None
    assert not any("covariance-matrix" in column for column in table.columns)
    for epoch, values in enumerate(results):
        for name, value in values.items():
            if np.ndim(value) == 0:
                assert table.loc[epoch, name] == pytest.approx(value, rel=1e-12), name
    for layer in LAYERS:
        eval_column = table[f"eval-saturation_{layer}"]
        assert eval_column.isna().tolist() == [True, False, True, False, True]
        assert table[f"train-intrinsic-dimensionality_{layer}"].dtype.kind == "i"
    assert table["late_metric"].isna().tolist() == [True] * 4 + [False]
    assert table["accuracy"].tolist() == pytest.approx([0.5, 0.51, 0.52, 0.53, 0.54])


def test_csv_saves_append_without_rewriting(tmp_path, monkeypatch):
    from delve.writers import csv as csv_module

    writer = CSVWriter(str(tmp_path / "run"))
    writer.add_scalars("", {"a": 1.0, "b": 2}, global_step=0)
    writer.save()
    rewrites = []
    original = csv_module.atomic_write_bytes
    monkeypatch.setattr(csv_module, "atomic_write_bytes", lambda *a: (rewrites.append(a[0]), original(*a)))
    sizes = []
    for epoch in range(1, 40):
        writer.add_scalars("", {"a": epoch / 2, "b": epoch}, global_step=epoch)
        writer.save()
        sizes.append(os.path.getsize(tmp_path / "run.csv"))
    assert rewrites == []
    assert len(set(np.diff(sizes))) <= 3  # each save adds one line of about the same length
    writer.add_scalar("c", 3.0)
    writer.save()
    assert len(rewrites) == 1
    table = pd.read_csv(tmp_path / "run.csv", sep=";", index_col=0)
    assert table.shape == (41, 3) and table["c"].isna().sum() == 40 and table.loc[40, "c"] == 3.0


_CRASH_CHILD = textwrap.dedent(
    """
    import sys, types
    # Load delve.writers without delve/__init__ (which imports torch) so the child starts fast.
    package = types.ModuleType("delve")
    package.__path__ = [{repo!r} + "/delve"]
    sys.modules["delve"] = package
    from delve.writers.csv import CSVWriter
    writer = CSVWriter({path!r})
    for epoch in range(100000):
        values = {{"col0": epoch * 1.5, "epoch_copy": epoch}}
        if epoch % 7 == 3:
            values["col_%d" % epoch] = -epoch  # a new column: this save rewrites the file
        writer.add_scalars("", values)
        writer.save()
        print(epoch, flush=True)
    """
)


def test_csv_survives_sigkill_at_any_moment(tmp_path):
    path = str(tmp_path / "crash")
    script = tmp_path / "child.py"
    script.write_text(_CRASH_CHILD.format(repo=REPO, path=path))
    for kill_after in (2, 9, 24, 45):
        if os.path.exists(path + ".csv"):
            os.unlink(path + ".csv")
        child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
        saved = -1
        while saved < kill_after:
            saved = int(child.stdout.readline())
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
        table = pd.read_csv(path + ".csv", sep=";", index_col=0)
        rows = len(table)
        assert rows >= saved + 1
        assert list(table.index) == list(range(rows))
        assert table["epoch_copy"].tolist() == list(range(rows))
        assert table["col0"].tolist() == pytest.approx([1.5 * e for e in range(rows)])
        for epoch in range(rows):
            if epoch % 7 == 3:
                assert table.loc[epoch, f"col_{epoch}"] == -epoch
                assert table[f"col_{epoch}"].isna().sum() == rows - 1


def test_csv_resume_keeps_earlier_rows(tmp_path):
    tracker, model = _tracker(tmp_path, "csv")
    first = run_epochs(tracker, model, range(4))
    tracker.close()
    tracker, model = _tracker(tmp_path, "csv", initial_epoch=2)
    second = run_epochs(tracker, model, range(2, 5), seed=1)
    tracker.close()
    table = pd.read_csv(tmp_path / "run.csv", sep=";", index_col=0)
    assert list(table.index) == [0, 1, 2, 3, 4]
    expected = first[:2] + second
    for epoch, values in enumerate(expected):
        for name, value in values.items():
            assert table.loc[epoch, name] == pytest.approx(value), (epoch, name)


# --------------------------------------------------------------------- print
def test_print_writes_name_value_lines(tmp_path, capsys):
    tracker, model = _tracker(tmp_path, "print", stats=["lsat", "cov"])
    results = run_epochs(tracker, model, range(1))[0]
    tracker.close()
    lines = capsys.readouterr().out.splitlines()
    assert "accuracy: 0.5" in lines
    assert "train-covariance-matrix_2: array of shape (5, 5)" in lines
    for name, value in results.items():
        if "covariance" in name:
            continue
        line = next(line for line in lines if line.startswith(name + ": "))
        assert float(line.split(": ")[1]) == pytest.approx(value, rel=1e-5)


# ----------------------------------------------------------------------- npy
def test_npy_layout_values_and_true_epochs(tmp_path):
    tracker, model = _tracker(tmp_path, "npy", stats=["lsat", "idim", "cov", "embed"])
    results = run_epochs(tracker, model, range(3), eval_epochs={1})
    tracker.close()
    folder = tmp_path / "run"
    names = sorted(entry for entry in os.listdir(folder) if (folder / entry).is_dir())
    assert not [name for name in names if name.startswith("_")]
    expected_names = {name for values in results for name in values} | {"accuracy"}
    assert set(names) == expected_names
    for epoch, values in enumerate(results):
        for name, value in values.items():
            stored = np.load(folder / name / f"{name}_epoch{epoch}.npy")
            np.testing.assert_array_equal(stored, value)
        assert float(np.load(folder / "accuracy" / f"accuracy_epoch{epoch}.npy")) == 0.5 + epoch / 100
    assert sorted(os.listdir(folder / "eval-saturation_2")) == ["eval-saturation_2_epoch1.npy"]
    cov = np.load(folder / "train-covariance-matrix_2" / "train-covariance-matrix_2_epoch0.npy")
    assert cov.shape == (5, 5) and np.allclose(cov, cov.T)
    assert np.load(folder / "train-embedded-sample_0" / "train-embedded-sample_0_epoch2.npy").shape[1] == 2
    manifest = json.loads((folder / "npy_names.json").read_text())
    assert manifest["names"][:4] == ["accuracy", "train-saturation_0", "train-intrinsic-dimensionality_0",
                                     "train-covariance-matrix_0"]
    assert not [path for path, _, files in os.walk(folder) for name in files if name.startswith(".tmp-")]


def test_npy_zip_goes_beside_the_folder_not_the_cwd(tmp_path, monkeypatch):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    tracker, model = _tracker(tmp_path / "out", "npy", writer_args={"zip": True}, stats=["lsat", "cov"])
    run_epochs(tracker, model, range(2))
    tracker.close()
    assert os.listdir(elsewhere) == []
    archive = tmp_path / "out" / "run.zip"
    with zipfile.ZipFile(archive) as handle:
        members = set(handle.namelist())
        stored = np.load(io.BytesIO(handle.read("run/train-covariance-matrix_0/train-covariance-matrix_0_epoch1.npy")))
    assert "run/npy_names.json" in members
    on_disk = np.load(tmp_path / "out" / "run" / "train-covariance-matrix_0" / "train-covariance-matrix_0_epoch1.npy")
    np.testing.assert_array_equal(stored, on_disk)
    names_zip, values_zip = load_npy_run(str(archive))
    names_dir, values_dir = load_npy_run(str(tmp_path / "out" / "run"))
    assert names_zip == names_dir
    np.testing.assert_array_equal(values_zip["accuracy"][1], values_dir["accuracy"][1])


def test_npy_names_with_slashes_round_trip(tmp_path):
    writer = NPYWriter(str(tmp_path / "run"))
    writer.add_scalar("loss/train", 0.25, global_step=0)
    writer.add_scalar("../escape", 1.0, global_step=0)
    writer.save()
    assert sorted(os.listdir(tmp_path)) == ["run"]
    names, values = load_npy_run(str(tmp_path / "run"))
    assert names == ["loss/train", "../escape"]
    assert float(values["loss/train"][0]) == 0.25 and float(values["../escape"][0]) == 1.0


def test_npy_resume_keeps_earlier_epochs_and_drops_later_ones(tmp_path):
    tracker, model = _tracker(tmp_path, "npy", stats=["lsat", "cov"])
    first = run_epochs(tracker, model, range(5), eval_epochs={4})
    tracker.close()
    tracker, model = _tracker(tmp_path, "npy", stats=["lsat", "cov"], initial_epoch=2)
    second = run_epochs(tracker, model, range(2, 4), seed=3)
    tracker.close()
    names, values = load_npy_run(str(tmp_path / "run"))
    assert sorted(values["train-saturation_0"]) == [0, 1, 2, 3]
    assert "eval-saturation_0" not in values  # only epoch 4 had eval, and it was dropped
    for epoch, expected in list(enumerate(first))[:2] + list(zip((2, 3), second)):
        for name, value in expected.items():
            np.testing.assert_array_equal(values[name][epoch], value)


# --------------------------------------------------------------- tensorboard
def test_tensorboard_tags_steps_values_and_cov_spectrum(tmp_path):
    pytest.importorskip("tensorboardX", reason="the tensorboard writer needs tensorboardX")
    tracker, model = _tracker(tmp_path, "tensorboard", stats=["lsat", "idim", "cov", "embed"])
    results = run_epochs(tracker, model, range(3), eval_epochs={0, 2})
    tracker.close()
    scalars = read_event_scalars(str(tmp_path / "run"))
    assert [step for step, _ in scalars["accuracy"]] == [0, 1, 2]
    assert [step for step, _ in scalars["eval-saturation/2"]] == [0, 2]
    for epoch, values in enumerate(results):
        for name, value in values.items():
            mode_stat, layer = name.split("_", 1)
            if "covariance" in name or "embedded" in name:
                continue
            stored = dict(scalars[f"{mode_stat}/{layer}"])
            assert stored[epoch] == pytest.approx(value, rel=1e-6)
    assert not [tag for tag in scalars if "covariance" in tag or "embedded" in tag]
    histograms = read_event_histograms(str(tmp_path / "run"))
    for epoch, values in enumerate(results):
        for layer, width in zip(LAYERS, (8, 5, 3)):
            cov = values[f"train-covariance-matrix_{layer}"]
            spectrum = np.clip(np.linalg.eigvalsh(cov), 0, None)
            histogram = dict(histograms[f"train-covariance-eigenvalues/{layer}"])[epoch]
            assert histogram.num == width
            assert histogram.sum == pytest.approx(np.trace(cov), rel=1e-6)
            assert histogram.max == pytest.approx(spectrum.max(), rel=1e-6)


def test_tensorboard_resume_continues_at_initial_epoch(tmp_path):
    pytest.importorskip("tensorboardX", reason="the tensorboard writer needs tensorboardX")
    tracker, model = _tracker(tmp_path, "tb")
    first = run_epochs(tracker, model, range(4))
    tracker.close()
    tracker, model = _tracker(tmp_path, "tb", initial_epoch=2)
    second = run_epochs(tracker, model, range(2, 5), seed=5)
    tracker.close()
    scalars = read_event_scalars(str(tmp_path / "run"))
    series = scalars["train-saturation/0"]
    assert [step for step, _ in series] == [0, 1, 2, 3, 4]
    expected = [values["train-saturation_0"] for values in first[:2] + second]
    assert [value for _, value in series] == pytest.approx(expected, rel=1e-6)
    assert [step for step, _ in scalars["accuracy"]] == [0, 1, 2, 3, 4]
    if importlib.util.find_spec("tensorboard") is not None:  # the fallback reader agrees with TensorBoard's
        assert read_event_scalars(str(tmp_path / "run"), prefer_tensorboard=False) == scalars


# ------------------------------------------------------------------- console
def test_console_shows_one_bar_per_layer_with_its_saturation(tmp_path):
    stream = io.StringIO()
    tracker, model = _tracker(tmp_path, "console", stats=["lsat", "idim"],
                              writer_args={"stream": stream, "ncols": 90})
    results = run_epochs(tracker, model, range(2), eval_epochs={1})
    tracker.close()
    text = stream.getvalue()
    final = results[-1]
    for mode in ("train", "eval"):
        for layer in LAYERS:
            shown = re.findall(rf"{mode} {layer}\s*:\s*(\d+)%\|[^|]*\| idim (\d+)", text)
            assert shown, (mode, layer)
            percent, idim = shown[-1]
            assert int(percent) == round(100 * final[f"{mode}-saturation_{layer}"])
            assert int(idim) == final[f"{mode}-intrinsic-dimensionality_{layer}"]
    assert "epoch 1 | accuracy=0.51" in text


def test_console_resume_numbers_from_initial_epoch(tmp_path):
    stream = io.StringIO()
    tracker, model = _tracker(tmp_path, "console", initial_epoch=7, writer_args={"stream": stream})
    run_epochs(tracker, model, range(7, 8))
    tracker.close()
    assert "epoch 7 | accuracy=0.57" in stream.getvalue()


# ----------------------------------------------------------- custom writers
def test_user_writer_receives_epochs_and_resume(tmp_path):
    class Recorder(AbstractWriter):
        def __init__(self):
            self.calls = []

        def resume_from_saved_state(self, initial_epoch):
            self.calls.append(("resume", initial_epoch))

        def add_scalar(self, name, value, **kwargs):
            self.calls.append(("scalar", name, kwargs.get("global_step")))

        def add_scalars(self, prefix, value_dict, **kwargs):
            self.calls.append(("scalars", sorted(value_dict), kwargs.get("global_step")))

        def save(self):
            self.calls.append(("save",))

        def close(self):
            self.calls.append(("close",))

    recorder = Recorder()
    tracker, model = _tracker(tmp_path, recorder, initial_epoch=3)
    run_epochs(tracker, model, range(3, 5))
    tracker.close()
    assert recorder.calls[0] == ("resume", 3)
    assert recorder.calls[1] == ("scalar", "accuracy", 3)
    assert recorder.calls[2] == ("scalars", [f"train-saturation_{layer}" for layer in LAYERS], 3)
    assert recorder.calls[3] == ("save",)
    assert recorder.calls[4:7] == [("scalar", "accuracy", 4), ("scalars", recorder.calls[2][1], 4), ("save",)]
    assert recorder.calls[-1] == ("close",)
