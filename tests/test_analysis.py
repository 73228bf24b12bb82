"""Tail detection on synthetic runs and on runs of a real tracker whose tail is built in by rank."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from delve import SaturationTracker
from delve.analysis import (
    available_modes, csv_path, find_tail, last_epoch, layer_table, load_run, statistic_table, tidy_frame,
)


def run_frame(epochs: list, mode: str = "train", names: list = None) -> pd.DataFrame:
    """A run as the CSV writer lays it out: rows are epochs, columns ``{mode}-saturation_{layer}``."""
    names = names or [f"layer{i}" for i in range(len(epochs[0]))]
    return pd.DataFrame(
        {f"{mode}-saturation_{name}": [row[i] for row in epochs] for i, name in enumerate(names)}
    )


def test_last_layers_far_below_the_rest_are_the_tail() -> None:
    early = [0.9, 0.85, 0.9, 0.8, 0.85, 0.9]  # epoch 0: no tail yet
    late = [0.42, 0.55, 0.6, 0.58, 0.07, 0.04]
    assert find_tail(run_frame([early, late])) == ["layer4", "layer5"]
    assert find_tail(run_frame([late, early])) == []  # only the last epoch counts


def test_no_drop_gives_no_tail() -> None:
    assert find_tail(run_frame([[0.5, 0.55, 0.6, 0.52, 0.5]])) == []
    assert find_tail(run_frame([[0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5]])) == []  # a gentle decline
    assert find_tail(run_frame([[0.05, 0.06, 0.04, 0.05]])) == []  # uniformly low is not a tail


def test_output_layer_may_stand_outside_the_tail() -> None:
    frame = run_frame([[0.5, 0.6, 0.55, 0.1, 0.08, 0.7]])
    assert find_tail(frame) == ["layer3", "layer4"]
    assert find_tail(frame, skip_output=False) == []
    # A low output layer belongs to the tail.
    assert find_tail(run_frame([[0.5, 0.6, 0.55, 0.1, 0.08, 0.09]])) == ["layer3", "layer4", "layer5"]


def test_thresholds_of_the_rule() -> None:
    # Defaults ratio=0.7, min_gap=0.2. Median of the earlier layers 0.8: the limit is 0.56.
    assert find_tail(run_frame([[0.8, 0.8, 0.8, 0.55]])) == ["layer3"]
    assert find_tail(run_frame([[0.8, 0.8, 0.8, 0.58]])) == []
    assert find_tail(run_frame([[0.8, 0.8, 0.8, 0.58]]), ratio=0.75) == ["layer3"]
    # Median 0.4: 0.25 is below 0.7 * 0.4 = 0.28 but only 0.15 below the median.
    assert find_tail(run_frame([[0.4, 0.4, 0.4, 0.25]])) == []
    assert find_tail(run_frame([[0.4, 0.4, 0.4, 0.25]]), min_gap=0.1) == ["layer3"]
    # The longest block wins: 0.5 and 0.3 are both below 0.63 and at least 0.2 below 0.9.
    assert find_tail(run_frame([[0.9, 0.9, 0.5, 0.3]])) == ["layer2", "layer3"]


def test_missing_values_and_modes() -> None:
    frame = pd.concat(
        [run_frame([[0.6, 0.6, 0.1]]), run_frame([[0.6, 0.1, 0.05]], mode="eval")], axis=1
    )
    frame["train-saturation_layer1"] = np.nan  # a layer without data is left out
    assert available_modes(frame) == ["train", "eval"]
    assert find_tail(frame) == ["layer2"]
    assert find_tail(frame, mode="eval") == ["layer1", "layer2"]
    only_eval = run_frame([[0.6, 0.6, 0.05]], mode="eval")
    assert find_tail(only_eval) == ["layer2"]
    # eval ran in epoch 0 but not in epoch 1: its last epoch is 0.
    two_epochs = pd.concat(
        [run_frame([[0.6, 0.6, 0.6], [0.6, 0.6, 0.6]]), run_frame([[0.6, 0.6, 0.05], [np.nan] * 3], mode="eval")],
        axis=1,
    )
    assert last_epoch(two_epochs, "eval").name == 0
    assert find_tail(two_epochs, mode="eval") == ["layer2"]


def test_bad_arguments_name_the_parameter(tmp_path) -> None:
    frame = run_frame([[0.5, 0.1]])
    with pytest.raises(ValueError, match="mode"):
        find_tail(frame, mode="test")
    with pytest.raises(ValueError, match="ratio"):
        find_tail(frame, ratio=2)
    with pytest.raises(ValueError, match="min_gap"):
        find_tail(frame, min_gap=-1)
    with pytest.raises(ValueError, match="saturation"):
        find_tail(pd.DataFrame({"accuracy": [0.5]}))
    with pytest.raises(FileNotFoundError, match="savefile"):
        find_tail(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="run must be"):
        load_run(42)


# ------------------------------------------------------------ real tracker runs
def rank_one_tail_model() -> nn.Sequential:
    """Three orthogonal layers, then a rank-one layer: every layer from it on sees one direction."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(5)], nn.Linear(16, 4))
    with torch.no_grad():
        for layer in model:
            nn.init.orthogonal_(layer.weight)
        model[3].weight.copy_(torch.randn(16, 1) @ torch.randn(1, 16))
    return model


def train_epochs(tracker: SaturationTracker, model: nn.Module, epochs: int = 2) -> dict:
    torch.manual_seed(1)
    for _ in range(epochs):
        for _ in range(4):
            model(torch.randn(256, 16))
        tracker.add_saturations()
    return tracker.last_results


def test_tail_of_a_real_tracker_live_from_csv_and_frame(tmp_path) -> None:
    model = rank_one_tail_model()
    savefile = str(tmp_path / "run")
    with SaturationTracker(savefile, save_to="csv", modules=model) as tracker:
        results = train_epochs(tracker, model)
        # Independent expectation: orthogonal layers on white noise keep all 16 directions
        # (saturation 1); from the rank-one layer on one direction is left (1/16, then 1/4 of the output's 4).
        assert [results[f"train-saturation_{i}"] for i in range(6)] == [1.0, 1.0, 1.0, 1 / 16, 1 / 16, 1 / 4]
        assert find_tail(tracker) == ["3", "4", "5"]
    assert find_tail(savefile) == ["3", "4", "5"]
    assert find_tail(csv_path(savefile)) == ["3", "4", "5"]
    assert find_tail(load_run(savefile), skip_output=False) == ["3", "4", "5"]
    assert list(statistic_table(savefile).columns) == ["0", "1", "2", "3", "4", "5"]
    assert len(statistic_table(savefile)) == 2


def test_real_tracker_without_a_tail(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])
    for layer in model:
        nn.init.orthogonal_(layer.weight)
    with SaturationTracker(str(tmp_path / "run"), save_to="csv", modules=model) as tracker:
        with pytest.raises(ValueError, match="add_saturations"):
            find_tail(tracker)
        train_epochs(tracker, model, epochs=1)
        assert find_tail(tracker) == []


# ------------------------------------------------------------------------ tidy tables
def test_tidy_frame_turns_every_value_into_one_row() -> None:
    wide = pd.DataFrame(
        {"train-saturation_features-0": [0.5, 0.25], "eval-intrinsic-dimensionality_features-0": [3, np.nan],
         "train-samples_fc": [640, 640], "test_accuracy": [0.9, 0.95], "average-train-sat": [0.4, 0.3]},
        index=[4, 5],
    )
    long = tidy_frame(wide)
    assert list(long.columns) == ["epoch", "mode", "statistic", "layer", "value"]
    expected = [
        (4, "train", "saturation", "features-0", 0.5), (4, "eval", "intrinsic-dimensionality", "features-0", 3.0),
        (4, "train", "samples", "fc", 640.0), (4, "", "test_accuracy", "", 0.9), (4, "train", "average-sat", "", 0.4),
        (5, "train", "saturation", "features-0", 0.25), (5, "train", "samples", "fc", 640.0),
        (5, "", "test_accuracy", "", 0.95), (5, "train", "average-sat", "", 0.3),
    ]
    assert [tuple(row) for row in long.itertuples(index=False)] == expected  # NaN (eval did not run) gives no row
    # Every number of the wide frame is in the long one once: the sums agree.
    assert long["value"].sum() == pytest.approx(np.nansum(wide.to_numpy(dtype=float)))
    # A one-row frame of the tracker's last results, arrays (covariances) left out.
    last = pd.DataFrame([{"train-saturation_fc": 0.5, "train-covariance-matrix_fc": np.eye(2)}], index=[0])
    assert tidy_frame(last)[["statistic", "value"]].values.tolist() == [["saturation", 0.5]]
    assert tidy_frame(pd.DataFrame()).empty


def test_load_run_tidy_and_layer_table_of_a_real_run(tmp_path) -> None:
    model = rank_one_tail_model()
    savefile = str(tmp_path / "run") + "/"  # a trailing separator, as a shell completes the run folder
    with SaturationTracker(savefile.rstrip("/"), save_to="csv", modules=model, stats=["lsat", "idim"]) as tracker:
        train_epochs(tracker, model)
    long = load_run(savefile, tidy=True)
    assert len(long) == 2 * 6 * 2 and set(long["mode"]) == {"train"}
    saturation = long[(long.statistic == "saturation") & (long.epoch == 1)].set_index("layer")["value"]
    assert saturation.to_dict() == {"0": 1.0, "1": 1.0, "2": 1.0, "3": 1 / 16, "4": 1 / 16, "5": 1 / 4}
    table = layer_table(savefile, model)
    # Widths of the run (intrinsic dimensionality / saturation) agree with the model's.
    assert table["width"].tolist() == [16, 16, 16, 16, 16, 4]
    assert layer_table(savefile)["width"].tolist() == [16, 16, 16, 16, 16, 4]
    saturation_only = load_run(savefile).filter(like="-saturation_")
    assert layer_table(saturation_only)["width"].isna().all()
    assert layer_table(saturation_only, model)["width"].tolist() == [16, 16, 16, 16, 16, 4]
    assert table["train-intrinsic-dimensionality"].tolist() == [16, 16, 16, 1, 1, 1]
    assert table["train-samples"].isna().all()  # the run does not record samples
