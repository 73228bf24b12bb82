"""reconstruct_csv_from_npy_data: the CSV rebuilt from npy files, statistics re-thresholded from covariances."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from delve import SaturationTracker
from delve.tools import reconstruct_csv_from_npy_data
from delve.writers.npy import NPYWriter
from reference import idim as reference_idim
from test_writers_common import run_epochs, tiny_model


def _known_rank_model() -> nn.Linear:
    """A Linear layer that passes its 6 inputs through unchanged."""
    layer = nn.Linear(6, 6)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(6))
        layer.bias.zero_()
    return layer


def _known_spectrum_batch() -> torch.Tensor:
    """Rows whose population covariance has eigenvalues exactly 4, 2, 1, 0, 0, 0 (up to float32)."""
    signs = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])
    scores = signs * torch.tensor([2.0, 2.0 ** 0.5, 1.0])  # orthogonal, zero-mean columns, variances 4, 2, 1
    basis, _ = torch.linalg.qr(torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    return (scores.to(torch.float64) @ basis.T).to(torch.float32)


def test_csv_and_reconstruction_agree(tmp_path):
    model = tiny_model()
    tracker = SaturationTracker(str(tmp_path / "run"), save_to=["csv", "npy"], modules=model,
                                stats=["lsat", "idim", "cov", "trc"])
    run_epochs(tracker, model, range(3), eval_epochs={1})
    tracker.close()
    from_csv = pd.read_csv(tmp_path / "run.csv", sep=";", index_col=0)
    rebuilt = reconstruct_csv_from_npy_data(str(tmp_path / "run"), savefile=str(tmp_path / "rebuilt.csv"))
    pd.testing.assert_frame_equal(rebuilt, from_csv, check_dtype=False)
    reread = pd.read_csv(tmp_path / "rebuilt.csv", sep=";", index_col=0)
    pd.testing.assert_frame_equal(reread, from_csv, check_dtype=False)
    from_zip_free_path = reconstruct_csv_from_npy_data(str(tmp_path / "run"), stats=["lsat"])
    assert list(from_zip_free_path.columns) == list(from_csv.columns)


@pytest.mark.parametrize("thresh, expected_idim", [(0.99, 3), (0.8, 2), (0.5, 1), (0.58, 2)])
def test_rethreshold_known_spectrum(tmp_path, thresh, expected_idim):
    # Eigenvalues 4, 2, 1 of 7: shares 0.571, 0.857, 1.0, so idim is known by construction.
    layer = _known_rank_model()
    tracker = SaturationTracker(str(tmp_path / "run"), save_to="npy", modules=layer, stats=["cov"])
    name = next(iter(tracker.layers))
    layer(_known_spectrum_batch())
    tracker.add_saturations()
    tracker.close()
    table = reconstruct_csv_from_npy_data(str(tmp_path / "run"), thresh=thresh)
    assert table.loc[0, f"train-intrinsic-dimensionality_{name}"] == expected_idim
    assert table.loc[0, f"train-saturation_{name}"] == pytest.approx(expected_idim / 6)


def test_rethreshold_matches_numpy_and_a_live_tracker(tmp_path):
    model = tiny_model()
    tracker = SaturationTracker(str(tmp_path / "run"), save_to="npy", modules=model, stats=["lsat", "cov"],
                                sat_threshold=0.99)
    run_epochs(tracker, model, range(2), eval_epochs={0})
    tracker.close()
    live_model = tiny_model()
    live = SaturationTracker(str(tmp_path / "live"), save_to="csv", modules=live_model,
                             stats=["lsat", "idim", "trc"], sat_threshold=0.9)
    live_results = run_epochs(live, live_model, range(2), eval_epochs={0})
    live.close()
    table = reconstruct_csv_from_npy_data(str(tmp_path / "run"), thresh=0.9, stats=["sat", "idim", "trc"])
    for epoch, results in enumerate(live_results):
        for name, value in results.items():
            assert table.loc[epoch, name] == pytest.approx(value, rel=1e-9), (epoch, name)
    for layer in ("0", "2", "4"):
        name = f"train-covariance-matrix_{layer}"
        cov = np.load(tmp_path / "run" / name / f"{name}_epoch1.npy")
        assert table.loc[1, f"train-intrinsic-dimensionality_{layer}"] == reference_idim(cov, 0.9)
        assert table.loc[1, f"train-covariance-trace_{layer}"] == pytest.approx(np.trace(cov))
    assert np.isnan(table.loc[1, "eval-saturation_0"]) and not np.isnan(table.loc[0, "eval-saturation_0"])
    assert table["accuracy"].tolist() == pytest.approx([0.5, 0.51])


def test_reads_the_zip_archive(tmp_path):
    model = tiny_model()
    tracker = SaturationTracker(str(tmp_path / "run"), save_to="npy", modules=model, stats=["lsat", "cov"],
                                writer_args={"zip": True})
    run_epochs(tracker, model, range(2))
    tracker.close()
    from_folder = reconstruct_csv_from_npy_data(str(tmp_path / "run"), thresh=0.95)
    from_zip = reconstruct_csv_from_npy_data(str(tmp_path / "run.zip"), thresh=0.95)
    pd.testing.assert_frame_equal(from_folder, from_zip)


def test_bad_input(tmp_path):
    writer = NPYWriter(str(tmp_path / "run"))
    writer.add_scalar("train-saturation_fc", 0.5, global_step=0)
    writer.save()
    with pytest.raises(FileNotFoundError, match="covariance"):
        reconstruct_csv_from_npy_data(str(tmp_path / "run"), thresh=0.9)
    with pytest.raises(ValueError, match="thresh"):
        reconstruct_csv_from_npy_data(str(tmp_path / "run"), thresh=1.5)
    with pytest.raises(ValueError, match="stats"):
        reconstruct_csv_from_npy_data(str(tmp_path / "run"), stats=["embed"])
    with pytest.raises(FileNotFoundError):
        reconstruct_csv_from_npy_data(str(tmp_path / "missing"))
    with pytest.warns(UserWarning, match="intrinsic-dimensionality"):
        table = reconstruct_csv_from_npy_data(str(tmp_path / "run"))
    assert table.to_dict("list") == {"train-saturation_fc": [0.5]}


COVARIANCE_STATS = ["lsat", "idim", "det", "trc", "dtrc", "erank", "rankme", "pr", "srank", "cond", "entropy",
                    "alpha"]


def test_every_covariance_statistic_is_recomputed_as_the_tracker_computes_it(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 20), nn.Tanh(), nn.Linear(20, 10))
    tracker = SaturationTracker(str(tmp_path / "run"), save_to="npy", modules=model,
                                stats=COVARIANCE_STATS + ["cov"], sat_threshold=0.95)
    live = run_epochs(tracker, model, range(2), eval_epochs={1})
    tracker.close()
    table = reconstruct_csv_from_npy_data(str(tmp_path / "run"), thresh=0.95, stats=COVARIANCE_STATS)
    for epoch, results in enumerate(live):
        for name, value in results.items():
            if np.ndim(value) == 0:
                assert table.loc[epoch, name] == pytest.approx(value, rel=1e-9, nan_ok=True), (epoch, name)
    cov = np.load(tmp_path / "run" / "train-covariance-matrix_2" / "train-covariance-matrix_2_epoch1.npy")
    values = np.linalg.eigvalsh(cov)
    shares = values / values.sum()
    assert table.loc[1, "train-effective-rank_2"] == pytest.approx(np.exp(-np.sum(shares * np.log(shares))))
    assert table.loc[1, "train-participation-ratio_2"] == pytest.approx(1 / np.sum(shares ** 2))
    assert table.loc[1, "train-condition-number_2"] == pytest.approx(np.linalg.cond(cov), rel=1e-6)


def test_without_thresh_only_missing_statistics_that_need_no_threshold_are_computed(tmp_path):
    layer = _known_rank_model()
    tracker = SaturationTracker(str(tmp_path / "run"), save_to="npy", modules=layer, stats=["lsat", "cov"])
    name = next(iter(tracker.layers))
    layer(_known_spectrum_batch())
    saved = tracker.add_saturations()
    tracker.close()
    with pytest.warns(UserWarning, match="'intrinsic-dimensionality'.*give thresh"):
        table = reconstruct_csv_from_npy_data(str(tmp_path / "run"), stats=["lsat", "idim", "srank", "erank"])
    assert list(table.columns) == [f"train-saturation_{name}", f"train-stable-rank_{name}",
                                   f"train-effective-rank_{name}"]
    assert table.loc[0, f"train-saturation_{name}"] == saved[f"train-saturation_{name}"]
    shares = np.array([4.0, 2.0, 1.0]) / 7.0  # eigenvalues 4, 2, 1 by construction
    assert table.loc[0, f"train-stable-rank_{name}"] == pytest.approx(7 / 4, rel=1e-6)
    assert table.loc[0, f"train-effective-rank_{name}"] == pytest.approx(np.exp(-np.sum(shares * np.log(shares))),
                                                                         rel=1e-6)


def test_nan_covariance_gives_nan_not_a_crash(tmp_path):
    writer = NPYWriter(str(tmp_path / "run"))
    cov = np.eye(3)
    cov[1, 2] = cov[2, 1] = np.nan
    writer.add_scalar("train-covariance-matrix_fc", cov, global_step=0)
    writer.save()
    table = reconstruct_csv_from_npy_data(str(tmp_path / "run"), thresh=0.9, stats=COVARIANCE_STATS)
    assert table.shape == (1, len(COVARIANCE_STATS))
    assert table.pop("train-covariance-trace_fc").tolist() == [3.0]  # the diagonal is finite
    assert table.isna().all(axis=None)


@pytest.mark.parametrize("stat, match", [
    ("embed", "needs the samples and mean"),
    ("samples", "needs the count"),
    ("cov", "it is an array"),
    ("erank_eval", "not a statistic; choose from 'lsat', 'idim'"),
])
def test_statistics_a_covariance_does_not_determine_are_refused(tmp_path, stat, match):
    with pytest.raises(ValueError, match=match):
        reconstruct_csv_from_npy_data(str(tmp_path / "missing"), stats=[stat])
