"""Long runs, odd models and misuse: the tracker never crashes training nor leaks."""
import gc
import os
import tracemalloc
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from delve import SaturationTracker
from delve.writers import AbstractWriter
from reference import Capture, population_cov


class _MemoryWriter(AbstractWriter):
    """Keeps nothing: isolates the tracker's own allocations from a writer's history."""

    def resume_from_saved_state(self, initial_epoch):
        pass

    def add_scalar(self, name, value, **kwargs):
        pass

    def add_scalars(self, prefix, value_dict, **kwargs):
        pass

    def save(self):
        pass

    def close(self):
        pass


def test_a_thousand_trackers_leave_no_hooks_and_no_memory_growth(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 8))
    x = torch.randn(2, 1, 8, 8)

    def cycle():
        tracker = SaturationTracker(str(tmp_path / "run"), _MemoryWriter(), model, stats=["lsat", "trc"])
        model(x)
        tracker.add_saturations()
        tracker.close()

    for _ in range(50):
        cycle()
    gc.collect()
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    for _ in range(1000):
        cycle()
    gc.collect()
    after, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert after - before < 256 * 1024, f"memory grew by {after - before} bytes"
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_csv_trackers_leave_no_open_files(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3))
    fds_before = len(os.listdir("/proc/self/fd"))
    for index in range(100):
        with SaturationTracker(str(tmp_path / f"run{index % 3}"), "csv", model) as tracker:
            model(torch.randn(4, 3))
            tracker.add_saturations()
    assert len(os.listdir("/proc/self/fd")) <= fds_before


def test_hooks_hold_no_reference_cycle_to_the_model(tmp_path):
    import weakref

    model = nn.Sequential(nn.Linear(3, 3))
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model)
    alive = weakref.ref(model)
    gc.disable()
    try:
        del model
        del tracker
        assert alive() is None, "model kept alive only through a reference cycle"
    finally:
        gc.enable()


def test_inference_mode_and_no_grad_forward_passes_are_recorded(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3))
    capture = Capture(model[0])
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, stats=["trc"])
    model.eval()
    with torch.inference_mode():
        model(torch.randn(6, 3))
    with torch.no_grad():
        model(torch.randn(6, 3))
    model.train()
    loss = model(torch.randn(6, 3)).sum()
    loss.backward()
    results = tracker.add_saturations()
    evaluation = torch.cat(capture.outputs[:2]).numpy()
    assert results["eval-covariance-trace_0"] == pytest.approx(np.trace(population_cov(evaluation)), rel=1e-6)
    assert results["train-covariance-trace_0"] == pytest.approx(
        np.trace(population_cov(capture.outputs[2].numpy())), rel=1e-6
    )
    tracker.close()


def test_channels_last_and_half_precision_outputs(tmp_path):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    capture = Capture(conv)
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", conv, stats=["trc"])
    conv(torch.randn(4, 3, 6, 6).to(memory_format=torch.channels_last))
    half = nn.Linear(3, 3).half()
    half_capture = Capture(half)
    half_tracker = SaturationTracker(str(tmp_path / "half"), "csv", half, stats=["trc"])
    half(torch.randn(16, 3).half())
    samples = np.moveaxis(capture.outputs[0].numpy(), 1, -1).reshape(-1, 4)
    assert tracker.add_saturations()["train-covariance-trace_Module-0-Conv2d"] == pytest.approx(
        np.trace(population_cov(samples)), rel=1e-5
    )
    assert half_tracker.add_saturations()["train-covariance-trace_Module-0-Linear"] == pytest.approx(
        np.trace(population_cov(half_capture.outputs[0].numpy())), rel=1e-5
    )
    tracker.close()
    half_tracker.close()


def test_layers_returning_tuples_and_dicts_through_registered_adapters(tmp_path):
    from delve import register_adapter
    from delve.adapters import unregister_adapter

    class TwoHeads(nn.Module):
        def forward(self, x):
            return {"features": 2 * x, "logits": x.sum(-1)}

    register_adapter(TwoHeads, lambda module, output, options: output["features"])
    try:
        model = nn.Sequential(TwoHeads())
        tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, stats=["trc"])
        x = torch.randn(8, 3)
        model(x)
        assert tracker.add_saturations()["train-covariance-trace_0"] == pytest.approx(
            np.trace(population_cov(2 * x.numpy())), rel=1e-5
        )
        tracker.close()
    finally:
        unregister_adapter(TwoHeads)


def test_module_never_called_gives_nan_not_a_crash(tmp_path):
    import pandas as pd

    model = nn.ModuleDict({"used": nn.Linear(2, 2), "unused": nn.Linear(2, 2)})
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model)
    for _ in range(2):
        model["used"](torch.randn(4, 2))
        tracker.add_saturations()
    tracker.close()
    frame = pd.read_csv(str(tmp_path / "run.csv"), sep=";", index_col=0)
    assert frame["train-saturation_unused"].isna().all() and frame["train-saturation_used"].notna().all()


def test_torch_compile_model_is_tracked_or_warns(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    capture = Capture(model[0])
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, stats=["trc"])
    compiled = torch.compile(model, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled(torch.randn(8, 4))
    results = tracker.add_saturations()
    expected = np.trace(population_cov(capture.outputs[0].numpy()))
    assert results["train-covariance-trace_0"] == pytest.approx(expected, rel=1e-5)
    tracker.close()


def test_tracker_state_resumes_mid_epoch_from_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    capture = Capture(model[2])
    first = SaturationTracker(str(tmp_path / "run"), "csv", model, stats=["trc", "idim"], max_samples=40)
    for _ in range(3):
        model(torch.randn(8, 4))
    path = tmp_path / "tracker.pt"
    torch.save(first.state_dict(), path)
    first.close()
    second = SaturationTracker(str(tmp_path / "run"), "csv", model, stats=["trc", "idim"], max_samples=40)
    second.load_state_dict(torch.load(path))
    for _ in range(3):
        model(torch.randn(8, 4))
    results = second.add_saturations()
    samples = torch.cat(capture.outputs)[:40].numpy()
    assert results["train-covariance-trace_2"] == pytest.approx(np.trace(population_cov(samples)), rel=1e-6)
    second.close()


def test_tracker_state_of_other_layers_is_refused(tmp_path):
    tracker = SaturationTracker(str(tmp_path / "a"), "csv", nn.Sequential(nn.Linear(2, 2)))
    other = SaturationTracker(str(tmp_path / "b"), "csv", nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="missing"):
        tracker.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="version"):
        tracker.load_state_dict({"version": 99})
    tracker.close()
    other.close()


def test_unwritable_savefile_fails_at_construction(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError):
        SaturationTracker(str(blocker / "run"), "csv", nn.Linear(2, 2))


def test_full_disk_warns_and_keeps_rows_for_the_next_save(tmp_path, monkeypatch):
    import errno

    import pandas as pd

    import delve.writers.csv as csv_module

    model = nn.Sequential(nn.Linear(3, 3))
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model)
    model(torch.randn(5, 3))
    tracker.add_saturations()
    real_append = csv_module.append_bytes

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(csv_module, "append_bytes", full_disk)
    model(torch.randn(5, 3))
    with pytest.warns(RuntimeWarning, match="could not save epoch 1"):
        tracker.add_saturations()
    monkeypatch.setattr(csv_module, "append_bytes", real_append)
    model(torch.randn(5, 3))
    tracker.add_saturations()
    tracker.close()
    frame = pd.read_csv(str(tmp_path / "run.csv"), sep=";", index_col=0)
    assert list(frame.index) == [0, 1, 2] and frame["train-saturation_0"].notna().all()
