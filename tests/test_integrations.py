"""The framework-neutral part of the trainer callbacks, and helpers for their tests.

``test_integrations_lightning.py`` and ``test_integrations_huggingface.py`` run
the callbacks in real trainers on a tiny model (CPU, no downloads). The
statistics in the CSV are checked against numpy on activations that an
independent forward hook collected during the same run.
"""
import os
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

N_TRAIN, N_VAL, BATCH = 64, 32, 16
WIDTH = 8  # outputs of the first tracked layer, "net-0"


def reference_stats(outputs, threshold=0.99):
    """Trace and intrinsic dimensionality of the population covariance, numpy float64."""
    x = np.concatenate(outputs).astype(np.float64)
    cov = np.cov(x, rowvar=False, bias=True)
    values = np.clip(np.linalg.eigvalsh(cov)[::-1], 0, None)
    shares = np.cumsum(values) / values.sum()
    idim = int(np.argmax(shares >= threshold * (1 - 1e-10))) + 1
    return float(np.trace(cov)), idim


def synthetic(n, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return x, y


def read_csv(savefile):
    return pd.read_csv(f"{savefile}.csv", sep=";", index_col=0)


def check_saturation_columns(frame, layers, modes):
    for mode in modes:
        for layer in layers:
            column = f"{mode}-saturation_{layer}"
            assert column in frame.columns, f"missing {column} in {list(frame.columns)}"
            values = frame[column].dropna()
            assert len(values) and values.between(0, 1).all() and (values > 0).all()


def check_row(frame, row, mode, outputs, samples, layer="net-0", width=WIDTH):
    """Row ``row``'s trace, intrinsic dimensionality and saturation of ``layer`` in ``mode`` against numpy."""
    assert sum(len(o) for o in outputs) == samples
    trace, idim = reference_stats(outputs)
    assert frame.loc[row, f"{mode}-covariance-trace_{layer}"] == pytest.approx(trace, rel=1e-5)
    assert frame.loc[row, f"{mode}-intrinsic-dimensionality_{layer}"] == idim
    assert frame.loc[row, f"{mode}-saturation_{layer}"] == pytest.approx(idim / width)


def check_rows(frame, recorder, expected, layer="net-0"):
    """Every row of ``frame`` against numpy: ``expected`` lists per row ``{mode: (recorder key, samples)}``.

    A mode a row does not name must be empty (NaN) in that row.
    """
    assert list(frame.index) == list(range(len(expected)))
    for row, modes in enumerate(expected):
        for mode in ("train", "eval"):
            if mode in modes:
                key, samples = modes[mode]
                check_row(frame, row, mode, recorder.outputs[key, mode], samples, layer)
            elif f"{mode}-saturation_{layer}" in frame.columns:
                assert np.isnan(frame.loc[row, f"{mode}-saturation_{layer}"]), (row, mode)


def check_rows_against_numpy(frame, recorder, epochs=(0, 1), layer="net-0"):
    """One row per epoch with all training (``N_TRAIN``) and validation (``N_VAL``) samples of that epoch."""
    check_rows(frame, recorder, [{"train": (e, N_TRAIN), "eval": (e, N_VAL)} for e in epochs], layer)


def needs_fresh_run_rule():
    """Skip unless the tracker moves an earlier run's outputs aside when a new run starts in their place."""
    from delve.writers.base import AbstractWriter

    if not hasattr(AbstractWriter, "previous_outputs"):
        pytest.skip("this tracker does not move an earlier run aside yet (the fresh-run rule of the writers)")


def check_moved_aside(savefile, caught, earlier):
    """The new run said that it moved the earlier run aside, and the backup holds the earlier CSV."""
    assert [str(w.message) for w in caught if "fresh run" in str(w.message)], [str(w.message) for w in caught]
    backup = os.path.join(f"{savefile}.previous", os.path.basename(savefile))
    pd.testing.assert_frame_equal(read_csv(backup), earlier)


class OutputRecorder:
    """Independent record of a layer's outputs per (row key, mode), collected by a forward hook.

    ``key()`` names the row the current batch belongs to, or ``None`` for a
    batch no row holds.
    """

    def __init__(self, layer, key):
        self.outputs = defaultdict(list)
        self.key = key
        layer.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        key = self.key()
        if key is not None:
            self.outputs[key, "train" if module.training else "eval"].append(output.detach().numpy().copy())


def test_core_import_does_not_load_frameworks():
    code = (
        "import sys, delve, delve.pca_layers; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'transformers') "
        "or m.startswith('delve.integrations')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_driver_uses_the_given_modules_and_numbers_rows_from_initial_epoch(tmp_path):
    from delve.integrations import TrackerDriver

    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    driver = TrackerDriver(str(tmp_path / "drv"), None, "", {"modules": model[2], "initial_epoch": 3})
    with pytest.warns(UserWarning, match="cannot resume"):  # no CSV of rows 0-2 to continue
        tracker = driver.start(model)
    assert list(tracker.layers) == ["Module-0-Linear"] and tracker.epoch == 3
    out = model(torch.randn(32, 6)).detach().numpy()
    driver.note_batch("train")
    _, idim = reference_stats([out])
    assert driver.write_row() == {"train-saturation_Module-0-Linear": idim / 3}
    assert driver.rows_written == 4
    assert driver.write_row() is None and driver.rows_written == 4  # nothing recorded since: no row
    driver.close()
    assert driver.tracker is None and read_csv(tmp_path / "drv").index.tolist() == [3]


def test_driver_parks_training_batches_during_an_evaluation(tmp_path):
    """An evaluation row holds only the evaluation; the training batches before it go on into the next row."""
    from delve.integrations import TrackerDriver

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    driver = TrackerDriver(str(tmp_path / "park"), None, "", {"stats": ["lsat", "idim", "trc"]})
    driver.start(model)
    recorder = OutputRecorder(model[0], lambda: "row")
    batches = [torch.randn(16, 6) for _ in range(3)]
    with torch.no_grad():
        model(batches[0])
        driver.note_batch("train")
        driver.park_training()
        model.eval()
        model(torch.randn(24, 6))
        driver.note_batch("eval")
        evaluation = driver.write_row()
        driver.restore_training()
        model.train()
        for batch in batches[1:]:
            model(batch)
            driver.note_batch("train")
        state = driver.state_dict(statistics=True)
        training = driver.write_row()
    driver.close()
    assert set(evaluation) == {"eval-saturation_0", "eval-saturation_2", "eval-intrinsic-dimensionality_0",
                               "eval-intrinsic-dimensionality_2", "eval-covariance-trace_0", "eval-covariance-trace_2"}
    assert all(name.startswith("train-") for name in training)
    assert state["rows_written"] == 1 and state["batches"] == {"train": 3, "eval": 0}
    frame = read_csv(tmp_path / "park")
    check_rows(frame, recorder, [{"eval": ("row", 24)}, {"train": ("row", 48)}], layer="0")


def test_driver_parks_nothing_when_the_statistics_span_the_run(tmp_path):
    from delve.integrations import TrackerDriver

    model = nn.Sequential(nn.Linear(6, 8))
    driver = TrackerDriver(str(tmp_path / "cumulative"), None, "", {"reset_covariance": False, "nosave": True})
    driver.start(model)
    model(torch.randn(16, 6))
    driver.note_batch("train")
    driver.park_training()  # every row holds all training batches so far anyway
    model.eval()
    model(torch.randn(16, 6))
    driver.note_batch("eval")
    assert {name.split("-")[0] for name in driver.write_row()} == {"train", "eval"}
    driver.close()
