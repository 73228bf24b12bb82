"""What real training scripts do to a tracked model never corrupts, stops or loses tracking.

Each test reproduces a habit of real loops (EMA copies, torch.func, checkpointing,
empty batches, reruns into the same folder...) and checks the statistics against
numpy float64 on the outputs the layer really produced in ordinary forward passes.
"""
import copy
import io
import os
import pathlib
import pickle
import stat
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from delve import SaturationTracker
from delve.hooks import attached_recorders
from delve.writers.npy import load_npy_run
from reference import Capture, population_cov


def _trace(outputs):
    return float(np.trace(population_cov(torch.cat(outputs).reshape(-1, outputs[0].shape[-1]).numpy())))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def test_copies_of_a_tracked_model_never_feed_the_tracker(tmp_path):
    model = _mlp()
    capture = Capture(model[0])
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, stats=["trc", "samples"])
    ema = torch.optim.swa_utils.AveragedModel(model)
    snapshot = copy.deepcopy(model)
    model(torch.randn(7, 4))
    for copied in (ema, snapshot):
        with torch.no_grad():
            copied(torch.randn(5, 4))
    results = tracker.add_saturations()
    assert results["train-samples_0"] == 7
    assert results["train-covariance-trace_0"] == pytest.approx(_trace(capture.outputs[:1]), rel=1e-6)
    tracker.close()
    snapshot(torch.randn(5, 4))
    assert all(not attached_recorders(module) for module in snapshot.modules())


def test_a_tracked_model_pickles_saves_scripts_and_traces(tmp_path):
    model = _mlp()
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, stats=["samples"])
    restored = pickle.loads(pickle.dumps(model))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    scripted = torch.jit.script(model)
    traced = torch.jit.trace(model, torch.randn(3, 4), check_trace=False)
    for other in (restored, scripted, traced):
        other(torch.randn(2, 4))
    model(torch.randn(6, 4))
    results = tracker.add_saturations()
    assert results["train-samples_0"] == 6
    assert all(recorder.active for recorder in tracker._recorders.values())
    tracker.close()


def test_torch_func_transforms_are_skipped_and_counted_never_fatal(tmp_path):
    model = _mlp()
    capture = Capture(model[2])
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, stats=["trc"])
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(parameters, x):
        return torch.func.functional_call(model, parameters, (x[None],)).sum()

    for _ in range(5):  # per-sample gradients, as in DP-SGD
        torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, torch.randn(3, 4))
    torch.func.jacrev(lambda x: model(x))(torch.randn(2, 4))
    capture.outputs.clear()
    model(torch.randn(9, 4))
    results = tracker.add_saturations()
    assert results["train-covariance-trace_2"] == pytest.approx(_trace(capture.outputs), rel=1e-6)
    assert all(recorder.active and recorder.skipped_calls == 6 for recorder in tracker._recorders.values())
    model(torch.randn(9, 4))
    assert "train-covariance-trace_2" in tracker.add_saturations()
    tracker.close()


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_recomputation_is_recorded_once(tmp_path, use_reentrant):
    model = _mlp()
    capture = Capture(model[0])
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, stats=["trc", "samples"])
    x = torch.randn(8, 4, requires_grad=True)
    checkpoint(model, x, use_reentrant=use_reentrant).sum().backward()
    results = tracker.add_saturations()
    assert len(capture.outputs) == 2  # the forward and its recomputation in backward
    assert results["train-samples_0"] == 8
    assert results["train-covariance-trace_0"] == pytest.approx(_trace(capture.outputs[:1]), rel=1e-6)
    tracker.close()


@pytest.mark.parametrize("conv_method", ["channelwise", "mean", "max", "median", "flatten"])
def test_empty_batches_are_skipped_for_every_layer_type(tmp_path, conv_method):
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {"conv": nn.Conv2d(1, 2, 3), "fc": nn.Linear(3, 2), "lstm": nn.LSTM(3, 2, batch_first=True)}
    )
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, conv_method=conv_method, stats=["samples"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model["conv"](torch.randn(0, 1, 5, 5))
        model["fc"](torch.randn(0, 3))
        model["lstm"](torch.randn(0, 4, 3))
    model["conv"](torch.randn(2, 1, 5, 5))
    model["fc"](torch.randn(4, 3))
    model["lstm"](torch.randn(4, 4, 3))
    results = tracker.add_saturations()
    assert results["train-samples_conv"] == (18 if conv_method == "channelwise" else 2)
    assert results["train-samples_fc"] == 4 and results["train-samples_lstm"] == 4
    tracker.close()


def test_a_layer_is_given_up_only_when_it_keeps_failing(tmp_path):
    class Flaky(nn.Module):
        def forward(self, x):
            return x

    calls = []

    def sometimes(module, output, options):
        calls.append(1)
        if len(calls) in (1, 3, 4, 5):
            raise RuntimeError("transient")
        return output

    from delve.adapters import register_adapter, unregister_adapter

    register_adapter(Flaky, sometimes)
    try:
        model = nn.Sequential(Flaky())
        tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, stats=["samples"])
        with pytest.warns(RuntimeWarning, match="skipped a forward pass"):
            model(torch.randn(3, 2))
        model(torch.randn(3, 2))  # recorded; the failure count starts over
        model(torch.randn(3, 2))
        model(torch.randn(3, 2))
        assert tracker._recorders["0"].active
        with pytest.warns(RuntimeWarning, match="stopped tracking layer '0' after 3"):
            model(torch.randn(3, 2))
        assert tracker.add_saturations()["train-samples_0"] == 3
        tracker.close()
    finally:
        unregister_adapter(Flaky)


def test_two_writers_of_the_csv_write_each_row_once(tmp_path):
    model = _mlp()
    tracker = SaturationTracker(str(tmp_path / "run"), ["csv", "plot", "plotcsv"], model)
    for _ in range(3):
        model(torch.randn(8, 4))
        tracker.add_saturations()
    tracker.close()
    frame = pd.read_csv(tmp_path / "run.csv", sep=";", index_col=0)
    assert list(frame.index) == [0, 1, 2]


def test_saving_twice_in_an_epoch_opens_no_empty_row(tmp_path):
    model = _mlp()
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model)
    for _ in range(2):
        model(torch.randn(8, 4))
        tracker.add_saturations()
        tracker.save()  # as upstream's example_deep.py does
    tracker.close()
    frame = pd.read_csv(tmp_path / "run.csv", sep=";", index_col=0)
    assert list(frame.index) == [0, 1] and frame.notna().all().all()


def test_written_files_get_ordinary_umask_modes(tmp_path):
    model = _mlp()
    old = os.umask(0o022)
    try:
        tracker = SaturationTracker(str(tmp_path / "run"), ["plot", "npy"], model, stats=["lsat", "cov"])
        model(torch.randn(8, 4))
        tracker.add_saturations()
        tracker.close()
    finally:
        os.umask(old)
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    suffixes = {path.suffix for path in files}
    assert {".csv", ".png", ".npy", ".json"} <= suffixes
    assert {oct(stat.S_IMODE(path.stat().st_mode)) for path in files} == {oct(0o644)}


def test_a_fresh_run_moves_the_outputs_of_an_earlier_run_aside(tmp_path):
    savefile = str(tmp_path / "run")
    model = _mlp()
    with SaturationTracker(savefile, ["plot", "npy"], model, stats=["lsat", "cov"]) as tracker:
        for _ in range(4):
            model(torch.randn(8, 4))
            tracker.add_saturations()
    with pytest.warns(UserWarning, match="moved to .*run.previous") as caught:
        tracker = SaturationTracker(savefile, ["plot", "npy"], model, stats=["lsat", "cov"])
    assert len([w for w in caught if "earlier run" in str(w.message)]) == 1
    model(torch.randn(8, 4))
    tracker.add_saturations()
    tracker.close()
    names, values = load_npy_run(savefile)
    assert {epoch for per_epoch in values.values() for epoch in per_epoch} == {0}
    assert not [name for name in os.listdir(savefile) if "epoch_3" in name or "epoch_03" in name]
    assert len(pd.read_csv(savefile + ".csv", sep=";", index_col=0)) == 1
    _, previous = load_npy_run(os.path.join(savefile + ".previous", "run"))
    assert {epoch for per_epoch in previous.values() for epoch in per_epoch} == {0, 1, 2, 3}
    assert len(pd.read_csv(os.path.join(savefile + ".previous", "run.csv"), sep=";", index_col=0)) == 4


def test_resuming_keeps_the_earlier_run_in_place(tmp_path):
    savefile = str(tmp_path / "run")
    model = _mlp()
    with SaturationTracker(savefile, "csv", model) as tracker:
        for _ in range(2):
            model(torch.randn(8, 4))
            tracker.add_saturations()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracker = SaturationTracker(savefile, "csv", model, initial_epoch=2)
    model(torch.randn(8, 4))
    tracker.add_saturations()
    tracker.close()
    assert list(pd.read_csv(savefile + ".csv", sep=";", index_col=0).index) == [0, 1, 2]
    assert not os.path.exists(savefile + ".previous")


def test_a_string_ignore_layer_names_is_one_name(tmp_path):
    model = nn.ModuleDict({"enc": nn.Linear(2, 2), "e": nn.Linear(2, 2), "n": nn.Linear(2, 2)})
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, ignore_layer_names="enc")
    assert list(tracker.layers) == ["e", "n"]
    tracker.close()


def test_layers_whose_names_collide_keep_unique_names(tmp_path):
    model = nn.Module()
    model.x = nn.ModuleList([nn.Linear(2, 3)])
    model.add_module("x-0", nn.Linear(2, 4))
    with pytest.warns(UserWarning, match="'x-0#2'"):
        tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, stats=["samples"])
    model.x[0](torch.randn(5, 2))
    getattr(model, "x-0")(torch.randn(6, 2))
    results = tracker.add_saturations()
    assert results == {"train-samples_x-0": 5, "train-samples_x-0#2": 6}
    tracker.close()


def test_savefile_may_be_a_path_and_bad_arguments_name_the_parameter(tmp_path):
    model = _mlp()
    tracker = SaturationTracker(tmp_path / "run", "csv", model)
    model(torch.randn(8, 4))
    tracker.add_saturations()
    tracker.close()
    assert (tmp_path / "run.csv").exists()
    base = {"savefile": str(tmp_path / "bad"), "save_to": "csv", "modules": model}
    cases = [
        ({"savefile": ""}, "savefile"),
        ({"savefile": None}, "savefile"),
        ({"savefile": 123}, "savefile"),
        ({"stats": None}, "stats"),
        ({"stats": []}, "stats"),
        ({"modules": None}, "modules"),
        ({"modules": 5}, "modules"),
        ({"layer_filter": None}, "layer_filter"),
        ({"layer_filter": lambda layers: list(layers)}, "layer_filter"),
        ({"writer_args": [1]}, "writer_args"),
        ({"device": "meta"}, "meta"),
        ({"log_interval": 1.5}, "log_interval"),
        ({"initial_epoch": True}, "initial_epoch"),
    ]
    for kwargs, parameter in cases:
        with pytest.raises(ValueError, match=parameter):
            SaturationTracker(**{**base, **kwargs})
    assert not (tmp_path / "bad").exists() and not (tmp_path / ".csv").exists()


def test_numpy_scalars_are_numbers(tmp_path):
    model = _mlp()
    tracker = SaturationTracker(
        str(tmp_path / "run"), "csv", model, sat_threshold=np.float32(0.9), log_interval=np.int64(2),
        max_samples=np.int32(100), initial_epoch=np.int64(0), sample_rows=np.int64(8),
    )
    assert tracker.threshold == pytest.approx(0.9) and tracker.log_interval == 2
    tracker.close()


def test_a_closed_tracker_refuses_all_writing(tmp_path):
    model = _mlp()
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model)
    model(torch.randn(8, 4))
    tracker.add_saturations()
    tracker.close()
    for call in (lambda: tracker.add_scalar("loss", 1.0), tracker.save, tracker.add_saturations):
        with pytest.raises(RuntimeError, match="closed"):
            call()
    assert len(pd.read_csv(tmp_path / "run.csv", sep=";", index_col=0)) == 1


def test_skipped_batches_warn_once_per_epoch_with_counts_and_the_cause(tmp_path):
    layer = nn.Linear(3, 3)
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", layer, stats=["samples"])
    for epoch in range(2):
        layer(torch.randn(64, 3))
        layer(torch.full((64, 3), float("nan")))
        with torch.no_grad():
            layer.weight.mul_(1e18 if epoch == 1 else 1.0)
        layer(torch.randn(64, 3))
        with torch.no_grad():
            layer.weight.div_(1e18 if epoch == 1 else 1.0)
        with pytest.warns(RuntimeWarning, match=rf"epoch {epoch}: {1 + epoch} of 'Module-0-Linear'.*too large") as caught:
            results = tracker.add_saturations()
        assert len([w for w in caught if "left out batches" in str(w.message)]) == 1
        assert results["train-samples_Module-0-Linear"] == 128 - 64 * epoch
    tracker.close()


def test_sampled_statistics_resume_exactly_from_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    data = [torch.randn(40, 4) for _ in range(6)]

    def run(interrupt):
        model = _mlp()
        tracker = SaturationTracker(str(tmp_path / f"run{interrupt}"), "csv", model, stats=["trc"], sample_rows=8)
        for index, x in enumerate(data):
            model(x)
            if interrupt and index == 2:
                state = tracker.state_dict()
                tracker.close()
                tracker = SaturationTracker(str(tmp_path / f"run{interrupt}"), "csv", model, stats=["trc"],
                                            sample_rows=8)
                tracker.load_state_dict(state)
        results = tracker.add_saturations()
        tracker.close()
        return results

    resumed, uninterrupted = run(True), run(False)
    # The same rows are drawn (a different draw moves the traces by percents); only float32
    # round-off of the partial sums differs.
    assert resumed.keys() == uninterrupted.keys()
    for name, value in uninterrupted.items():
        assert resumed[name] == pytest.approx(value, rel=1e-6)


def test_0150_attributes_and_methods(tmp_path):
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, stats=["lsat", "embed"], log_interval=2,
                                interpolation_strategy="nearest", interpolation_downsampling=16)
    model(torch.randn(4, 3))
    assert tracker.logs["train-covariance-matrix"]["0"].saved_samples.shape == (4, 5)
    assert set(tracker.logs) == {"train-covariance-matrix", "eval-covariance-matrix"}
    assert tracker.seen_samples["train"] == {"0": 4, "2": 4}
    assert tracker.interval == 2 and tracker.global_steps == 0
    assert tracker.interpolation_strategy == "nearest" and tracker.interpolation_downsampling == 16
    assert list(tracker.get_layers_recursive(model)) == ["0", "2"]
    assert list(tracker.get_layer_from_submodule(model, {}, "net")) == ["net-0", "net-2"]
    extra = nn.Linear(2, 2)
    tracker.register_forward_hooks(extra, ["lsat"])
    extra(torch.randn(6, 2))
    assert tracker.seen_samples["train"]["Module-2-Linear"] == 6
    from delve.writers.csv import CSVWriter

    assert isinstance(tracker._get_writer("csv", {"savepath": str(tmp_path / "other")}), CSVWriter)
    tracker.close()


def test_0150_module_paths_and_writer_classes(tmp_path):
    import inspect

    import delve
    from delve.torchcallback import (  # noqa: F401
        STATMAP,
        WRITERS,
        CompositWriter,
        NPYWriter,
        TorchCovarianceMatrix,
        compute_saturation,
    )
    from delve.writers.plot import CSVandPlottingWriter

    assert {delve.torchcallback.__name__, delve.torch_utils.__name__, delve.tools.__name__} == {
        "delve.torchcallback", "delve.torch_utils", "delve.tools"
    }
    assert delve.logger.log.name == "delve"
    writer = WRITERS["csv"](str(tmp_path / "direct"))
    writer.add_scalar("loss", 0.5)
    writer.save()
    assert pd.read_csv(tmp_path / "direct.csv", sep=";", index_col=0)["loss"].tolist() == [0.5]
    assert WRITERS["plot"] is CSVandPlottingWriter
    assert inspect.signature(CSVandPlottingWriter).parameters["fontsize"].default == 16
    parameters = inspect.signature(delve.CheckLayerSat).parameters
    assert list(parameters)[:3] == ["savefile", "save_to", "modules"]
    assert pathlib.Path(delve.__file__).exists()


def test_torch_compile_of_a_tracked_model_records_without_warnings(tmp_path):
    model = _mlp()
    capture = Capture(model[0])
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, stats=["trc", "samples"])
    compiled = torch.compile(model, backend="eager")
    with warnings.catch_warnings(record=True) as caught:
        for _ in range(2):
            compiled(torch.randn(8, 4))
    assert not [w for w in caught if "global hooks" in str(w.message)]
    results = tracker.add_saturations()
    assert results["train-samples_0"] == 16
    assert results["train-covariance-trace_0"] == pytest.approx(_trace(capture.outputs), rel=1e-6)
    tracker.close()



def test_activation_checkpoint_wrappers_add_nothing_to_names_and_record_once(tmp_path):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    torch.manual_seed(0)
    model = nn.Sequential(checkpoint_wrapper(nn.Sequential(nn.Linear(4, 6), nn.Tanh())), nn.Linear(6, 3))
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, stats=["samples"])
    assert list(tracker.layers) == ["0-0", "1"]
    model(torch.randn(8, 4, requires_grad=True)).sum().backward()
    assert tracker.add_saturations() == {"train-samples_0-0": 8, "train-samples_1": 8}
    tracker.close()
