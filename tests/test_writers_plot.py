"""The CSV-and-plots writer and the 0.1.50 plotting helpers: files, drawn data, labels, no pyplot state."""
from __future__ import annotations

import os
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from delve import SaturationTracker
from test_writers_common import run_epochs, tiny_model

matplotlib = pytest.importorskip("matplotlib", reason="the plot writer needs matplotlib")
from matplotlib.image import imread  # noqa: E402

from delve.writers import heatmap, plotting  # noqa: E402

LAYERS = ["0", "2", "4"]


@pytest.fixture
def drawn(monkeypatch):
    """Record what every profile and heatmap showed, read from the axes before they are saved."""
    records = {"profile": [], "evolution": []}
    draw_profiles, draw_evolution = plotting.draw_profiles, heatmap.draw_evolution

    def profiles(ax, labels, values, stat, title, **kwargs):
        ax = draw_profiles(ax, labels, values, stat, title, **kwargs)
        records["profile"].append({
            "stat": stat, "title": ax.get_title(), "ylim": ax.get_ylim(), "xlabel": ax.get_xlabel(),
            "ylabel": ax.get_ylabel(), "ticks": [tick.get_text() for tick in ax.get_xticklabels()],
            "modes": list(values), "legend": [t.get_text() for t in ax.get_legend().get_texts()]
            if ax.get_legend() else [],
            "y": {line.get_label(): np.asarray(line.get_ydata(), dtype=float) for line in ax.lines
                  if line.get_label() in values},
            "yticks": list(ax.get_yticks()),
        })
        return ax

    def evolution(figure, layers, epochs, matrices, stat, title, widths=None, fontsize=12):
        axes = draw_evolution(figure, layers, epochs, matrices, stat, title, widths, fontsize)
        colorbar = figure.axes[-1]
        records["evolution"].append({
            "stat": stat, "title": figure.get_suptitle(), "modes": [ax.get_title() for ax in axes],
            "layers": [t.get_text() for t in axes[0].get_yticklabels()], "epochs": list(epochs),
            "colour": [np.ma.filled(ax.images[0].get_array().astype(float), np.nan) for ax in axes],
            "numbers": [[t.get_text() for t in ax.texts] for ax in axes],
            "clim": [ax.images[0].get_clim() for ax in axes], "xlabel": axes[0].get_xlabel(),
            "ylabel": axes[0].get_ylabel(), "colorbar_ticks": list(colorbar.get_yticks()),
            "colorbar_label": colorbar.get_ylabel(),
        })
        return axes

    monkeypatch.setattr(plotting, "draw_profiles", profiles)
    monkeypatch.setattr(heatmap, "draw_evolution", evolution)
    return records


def test_plot_writer_files_and_what_they_show(tmp_path, drawn):
    backend = matplotlib.get_backend()
    had_pyplot = "matplotlib.pyplot" in sys.modules
    model = tiny_model()
    tracker = SaturationTracker(str(tmp_path / "run"), save_to="plot", modules=model,
                                stats=["lsat", "idim", "embed"], writer_args={"plot_every": 1})
    run_epochs(tracker, model, range(2), eval_epochs={1})
    tracker.close()
    assert matplotlib.get_backend() == backend
    if not had_pyplot:
        assert "matplotlib.pyplot" not in sys.modules

    expected = {f"run_{stat}_epoch_{epoch:04d}.png" for stat in ("lsat", "idim") for epoch in (0, 1)}
    expected |= {"run_embed_train_epoch_0000.png", "run_embed_train_epoch_0001.png", "run_embed_eval_epoch_0001.png"}
    expected |= {f"run_{stat}_evolution.png" for stat in ("lsat", "idim")}
    assert set(os.listdir(tmp_path / "run")) == expected
    for name in expected:
        image = imread(tmp_path / "run" / name)
        assert image.shape[0] > 200 and image.shape[1] > 300 and image.std() > 0.01, name

    table = pd.read_csv(tmp_path / "run.csv", sep=";", index_col=0)
    names = {"lsat": "saturation", "idim": "intrinsic-dimensionality"}
    first, *_, last = drawn["profile"]
    assert first["modes"] == ["train"] and len(first["legend"]) == 1  # epoch 0: no eval ran, the mean is marked
    assert first["legend"][0].startswith("mean over layers")
    for record in drawn["profile"][-2:]:  # epoch 1: train and eval on the same axes
        assert record["modes"] == ["train", "eval"] and record["legend"] == ["train", "eval"]
        for mode in ("train", "eval"):
            columns = [f"{mode}-{names[record['stat']]}_{layer}" for layer in LAYERS]
            np.testing.assert_allclose(record["y"][mode], table.loc[1, columns])
        assert record["ticks"] == LAYERS and "epoch 1" in record["title"] and record["xlabel"] and record["ylabel"]
    assert [r["ylim"] for r in drawn["profile"] if r["stat"] == "lsat"] == [(0.0, 1.0)] * 2
    assert all(float(tick).is_integer() for tick in last["yticks"]) and last["stat"] == "idim"

    by_stat = {record["stat"]: record for record in drawn["evolution"][-2:]}
    lsat, idim = by_stat["lsat"], by_stat["idim"]
    for record in (lsat, idim):  # train and eval side by side, on one colour scale
        assert record["modes"] == ["train", "eval"] and record["epochs"] == [0, 1]
        assert record["clim"] == [(0.0, 1.0), (0.0, 1.0)] and record["xlabel"] == "epoch" and record["ylabel"]
    for colour, mode in zip(lsat["colour"], ("train", "eval")):
        expected_data = table[[f"{mode}-saturation_{layer}" for layer in LAYERS]].to_numpy().T
        np.testing.assert_allclose(colour, expected_data)  # NaN where eval did not run
    # Intrinsic dimensionality: colour relative to each layer's width (8, 5, 3), the numbers in dimensions.
    assert lsat["layers"] == LAYERS and idim["layers"] == ["0 (8)", "2 (5)", "4 (3)"]
    train_idim = table[[f"train-intrinsic-dimensionality_{layer}" for layer in LAYERS]].to_numpy().T
    np.testing.assert_allclose(idim["colour"][0], train_idim / np.array([[8], [5], [3]]))
    assert idim["numbers"][0] == [f"{value:.0f}" for value in train_idim.ravel()]
    assert "share of" in idim["colorbar_label"] and "numbers: dimensions" in idim["title"]


def test_default_draws_at_close_every_tenth_epoch_and_names_sort_by_epoch(tmp_path, drawn):
    model = tiny_model()
    tracker = SaturationTracker(str(tmp_path / "run"), save_to="plot", modules=model, stats=["lsat"])
    run_epochs(tracker, model, range(3))
    assert not (tmp_path / "run").exists() or os.listdir(tmp_path / "run") == []  # nothing drawn before close
    tracker.close()
    assert sorted(os.listdir(tmp_path / "run")) == ["run_lsat_epoch_0002.png", "run_lsat_evolution.png"]
    tracker.close()
    assert len(drawn["evolution"]) == 1  # a second close draws nothing

    tracker = SaturationTracker(str(tmp_path / "long"), save_to="plot", modules=model, stats=["lsat"])
    run_epochs(tracker, model, range(12))
    assert sorted(os.listdir(tmp_path / "long")) == ["long_lsat_epoch_0009.png", "long_lsat_evolution.png"]
    tracker.close()
    assert sorted(os.listdir(tmp_path / "long")) == [
        "long_lsat_epoch_0009.png", "long_lsat_epoch_0011.png", "long_lsat_evolution.png"]
    assert drawn["evolution"][-1]["epochs"] == list(range(12))

    tracker = SaturationTracker(str(tmp_path / "every"), save_to="plot", modules=model, stats=["lsat"],
                                writer_args={"plot_every": 1})
    run_epochs(tracker, model, range(11))
    tracker.close()
    files = sorted(name for name in os.listdir(tmp_path / "every") if "_epoch_" in name)
    assert [int(name.rsplit("_", 1)[1][:-4]) for name in files] == list(range(11))  # 10 sorts after 9


def test_integer_colour_scale_when_widths_are_unknown(tmp_path, drawn):
    from delve.writers import CSVandPlottingWriter

    with CSVandPlottingWriter(str(tmp_path / "run")) as writer:
        for epoch, values in enumerate([(3, 12), (4, 9)]):
            writer.add_scalars("", {"train-intrinsic-dimensionality_a": values[0],
                                    "eval-intrinsic-dimensionality_a": values[1] - 1,
                                    "train-intrinsic-dimensionality_b": values[1]})
            writer.save()
    record = drawn["evolution"][-1]
    assert record["layers"] == ["a", "b"]  # no width: one absolute scale for train and eval
    assert record["clim"] == [(0.0, 12.0), (0.0, 12.0)]
    assert all(float(tick).is_integer() for tick in record["colorbar_ticks"])
    assert record["numbers"][0] == ["3", "4", "12", "9"] and record["numbers"][1] == ["11", "8"]


def test_bad_plot_every_is_refused_at_construction(tmp_path):
    from delve.writers import CSVandPlottingWriter

    for bad in (0, -1, 2.5, True, "10"):
        with pytest.raises(ValueError, match="plot_every"):
            CSVandPlottingWriter(str(tmp_path / "run"), plot_every=bad)


class _LongNames(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder_block_with_a_long_name = nn.ModuleDict({
            "attention_projection": nn.Linear(4, 6), "feed_forward_output_layer": nn.Linear(6, 5)})

    def forward(self, x):
        block = self.encoder_block_with_a_long_name
        return block["feed_forward_output_layer"](torch.relu(block["attention_projection"](x)))


def test_long_layer_names_stay_whole_and_options_apply(tmp_path, drawn):
    model = _LongNames()
    seen = []
    tracker = SaturationTracker(str(tmp_path / "run"), save_to="csvplot", modules=model,
                                writer_args={"primary_metric": "accuracy",
                                             "plot_manipulation_func": lambda ax: seen.append(ax) or ax})
    model(torch.randn(50, 4))
    tracker.add_scalar("accuracy", 0.75)
    tracker.add_saturations()
    tracker.close()
    names = list(tracker.layers)
    assert drawn["profile"][0]["ticks"] == names
    assert max(map(len, names)) > 40
    assert drawn["evolution"][0]["layers"] == names
    assert len(seen) == 1 and seen[0].get_title().endswith("epoch 0 (accuracy 0.75)")


def test_plot_writer_resume_continues_numbering_and_history(tmp_path, drawn):
    model = tiny_model()
    tracker = SaturationTracker(str(tmp_path / "run"), save_to="plot", modules=model, writer_args={"plot_every": 1})
    run_epochs(tracker, model, range(4))
    tracker.close()
    assert (tmp_path / "run" / "run_lsat_epoch_0003.png").exists()
    tracker = SaturationTracker(str(tmp_path / "run"), save_to="plot", modules=model, initial_epoch=2,
                                writer_args={"plot_every": 1})
    run_epochs(tracker, model, range(2, 3), seed=9)
    tracker.close()
    table = pd.read_csv(tmp_path / "run.csv", sep=";", index_col=0)
    assert list(table.index) == [0, 1, 2]
    assert sorted(name for name in os.listdir(tmp_path / "run") if "epoch" in name) == [
        f"run_lsat_epoch_{epoch:04d}.png" for epoch in range(3)]
    evolution = drawn["evolution"][-1]
    assert evolution["epochs"] == [0, 1, 2]
    np.testing.assert_allclose(evolution["colour"][0],
                               table[[f"train-saturation_{l}" for l in LAYERS]].to_numpy().T)


# ------------------------------------------------------------- 0.1.50 helpers
@pytest.fixture
def csv_run(tmp_path):
    model = tiny_model()
    tracker = SaturationTracker(str(tmp_path / "run"), save_to="csv", modules=model, stats=["lsat", "idim"])
    run_epochs(tracker, model, range(2), eval_epochs={0})
    tracker.close()
    return tmp_path / "run.csv"


def test_extract_layer_stat(csv_run):
    from delve.writers import extract_layer_stat

    table = pd.read_csv(csv_run, sep=";", index_col=0)
    row, metric = extract_layer_stat(table, epoch=1, primary_metric="accuracy", stat="saturation")
    assert list(row.columns) == [f"train-saturation_{layer}" for layer in LAYERS]
    assert list(row.index) == [1] and metric == pytest.approx(0.51)
    eval_row, none = extract_layer_stat(table, epoch=0, stat="intrinsic-dimensionality", state_mode="eval")
    assert list(eval_row.columns) == [f"eval-intrinsic-dimensionality_{layer}" for layer in LAYERS]
    assert none is None
    with pytest.raises(ValueError, match="epoch"):
        extract_layer_stat(table, epoch=5)


def test_plot_stat_level_from_results_writes_beside_the_csv(csv_run):
    from delve.writers import plot_stat_level_from_results

    table = pd.read_csv(csv_run, sep=";", index_col=0)
    ax = plot_stat_level_from_results(str(csv_run), -1, "lsat", primary_metric="accuracy")
    png = csv_run.parent / "run_lsat_train_epoch_1.png"
    assert imread(png).shape[0] > 200
    np.testing.assert_allclose(ax.lines[0].get_ydata(), table.loc[1, [f"train-saturation_{l}" for l in LAYERS]])
    assert ax.get_ylim() == (0.0, 1.0) and ax.get_xlabel() and ax.get_ylabel() == "saturation"
    ax = plot_stat_level_from_results(str(csv_run), 0, "idim_eval", save=False)
    np.testing.assert_allclose(ax.lines[0].get_ydata(),
                               table.loc[0, [f"eval-intrinsic-dimensionality_{l}" for l in LAYERS]])
    assert not (csv_run.parent / "run_idim_eval_epoch_0.png").exists()
    with pytest.raises(ValueError, match="stat"):
        plot_stat_level_from_results(str(csv_run), 0, "bogus")


def test_plot_stat_skips_rows_without_data(tmp_path):
    from delve.writers import plot_stat

    row = pd.DataFrame({"eval-saturation_a": [np.nan], "eval-saturation_b": [np.nan]}, index=[3])
    ax = plot_stat(row, "lsat", savepath=str(tmp_path / "run.csv"), epoch=3, stat_mode="eval")
    assert len(ax.lines) == 0 and os.listdir(tmp_path) == []


def test_plot_scatter_from_results(tmp_path):
    from delve.writers import plot_scatter_from_results

    rng = np.random.default_rng(0)
    samples = {f"train-embedded-sample_{layer}": [rng.normal(size=(20, 2)), rng.normal(size=(30, 2))]
               for layer in LAYERS}
    df = pd.DataFrame(samples)
    ax = plot_scatter_from_results(str(tmp_path / "run.csv"), -1, "embed", df)
    np.testing.assert_allclose(ax.collections[0].get_offsets(), samples["train-embedded-sample_0"][1])
    assert ax.get_title() == "layer 0"
    assert imread(tmp_path / "run_embed_train_epoch_1.png").shape[1] > 300
    assert plot_scatter_from_results(str(tmp_path / "run.csv"), -1, "embed", pd.DataFrame()) is None


def test_sample_values_of_0150_add_scalars(tmp_path):
    from delve.writers import CSVandPlottingWriter

    writer = CSVandPlottingWriter(str(tmp_path / "run"), plot_every=1)
    points = np.random.default_rng(1).normal(size=(25, 2))
    writer.add_scalars("", {"train-saturation_a": 0.5}, {"train-embedded-sample_a": points})
    writer.save()
    assert sorted(os.listdir(tmp_path / "run")) == [
        "run_embed_train_epoch_0000.png", "run_lsat_epoch_0000.png", "run_lsat_evolution.png"]
    assert list(pd.read_csv(tmp_path / "run.csv", sep=";", index_col=0).columns) == ["train-saturation_a"]


def test_infinite_and_missing_values_never_break_a_figure(tmp_path, drawn):
    from delve.writers import CSVandPlottingWriter

    writer = CSVandPlottingWriter(str(tmp_path / "run"), plot_every=1)
    writer.add_scalars("", {"train-covariance-determinant_a": np.inf, "train-covariance-determinant_b": 2.0,
                            "train-covariance-determinant_c": np.nan, "eval-covariance-determinant_a": np.nan})
    writer.save()
    assert os.listdir(tmp_path / "run") == ["run_det_epoch_0000.png"]
    assert drawn["profile"][0]["ylim"] == (0.0, pytest.approx(2.16))


def test_sample_counts_stay_in_the_csv(tmp_path):
    model = tiny_model()
    tracker = SaturationTracker(str(tmp_path / "run"), save_to="plot", modules=model, stats=["lsat", "samples"],
                                writer_args={"plot_every": 1})
    run_epochs(tracker, model, range(1))
    tracker.close()
    files = sorted(os.listdir(tmp_path / "run"))
    assert "run_lsat_epoch_0000.png" in files and not [name for name in files if "samples" in name]
    assert any(column.startswith("train-samples_") for column in pd.read_csv(tmp_path / "run.csv", sep=";"))
