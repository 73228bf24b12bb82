"""The tracker's public surface: 0.1.50 compatibility, naming, validation, hooks and output."""
import gc
import inspect
import pickle
import warnings
from collections import OrderedDict

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import delve
from delve import CheckLayerSat, SaturationTracker, TorchCovarianceMatrix, register_adapter
from delve.adapters import unregister_adapter
from delve.hooks import attached_recorders
from reference import Capture, population_cov

PARAMETERS_0150 = OrderedDict(
    savefile=inspect.Parameter.empty,
    save_to=inspect.Parameter.empty,
    modules=inspect.Parameter.empty,
    layer_filter=None,
    writer_args=None,
    log_interval=1,
    max_samples=None,
    stats=["lsat"],
    layerwise_sat=True,
    reset_covariance=True,
    average_sat=False,
    ignore_layer_names=[],
    include_conv=True,
    conv_method="channelwise",
    timeseries_method="last_timestep",
    sat_threshold=0.99,
    nosave=False,
    verbose=False,
    device=None,
    initial_epoch=0,
    interpolation_strategy=None,
    interpolation_downsampling=32,
)


def test_constructor_keeps_names_order_and_defaults_of_0150():
    parameters = inspect.signature(SaturationTracker.__init__).parameters
    assert list(parameters)[1 : len(PARAMETERS_0150) + 1] == list(PARAMETERS_0150)
    assert all(p.default is not inspect.Parameter.empty for p in list(parameters.values())[len(PARAMETERS_0150) + 1 :])
    for name, default in PARAMETERS_0150.items():
        actual = parameters[name].default
        if name == "layer_filter":
            assert callable(actual)
        elif isinstance(default, list):
            assert list(actual) == default
        else:
            assert actual == default, name


def test_positional_call_as_in_0150(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3))
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, lambda layers: layers, None, 1, None, ["lsat"])
    model(torch.randn(4, 3))
    assert "train-saturation_0" in tracker.add_saturations()
    tracker.close()


def test_public_names_are_importable():
    from delve.metrics import (  # noqa: F401
        compute_cov_determinant,
        compute_cov_trace,
        compute_diag_trace,
        compute_intrinsic_dimensionality,
        compute_saturation,
    )
    from delve.torch_utils import TorchCovarianceMatrix as OldPath
    from delve.torchcallback import CheckLayerSat as OldAlias
    from delve.torchcallback import SaturationTracker as OldTracker

    assert OldPath is TorchCovarianceMatrix and OldTracker is SaturationTracker and OldAlias is CheckLayerSat
    for method in ("add_saturations", "save", "close", "stop", "resume", "is_recording", "add_scalar", "add_scalars"):
        assert callable(getattr(SaturationTracker, method))
    assert inspect.signature(SaturationTracker.add_saturations).parameters["save"].default is True


def test_check_layer_sat_warns_and_works(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3))
    with pytest.warns(DeprecationWarning, match="SaturationTracker"):
        tracker = CheckLayerSat(str(tmp_path / "run"), "csv", model)
    model(torch.randn(4, 3))
    assert "train-saturation_0" in tracker.add_saturations()
    tracker.close()


def test_names_are_module_paths_joined_with_dashes(tmp_path):
    model = nn.Sequential(
        OrderedDict(
            features=nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(2, 2, 1))),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            classifier=nn.Linear(2, 2),
            lstm=nn.LSTM(2, 2),
        )
    )
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model)
    assert list(tracker.layers) == ["features-0", "features-2-0", "classifier", "lstm"]
    tracker.close()


def test_modules_accepts_single_layers_and_lists(tmp_path):
    first, second = nn.Linear(2, 3), nn.Linear(3, 2)
    single = SaturationTracker(str(tmp_path / "a"), "csv", first)
    assert list(single.layers) == ["Module-0-Linear"]
    single.close()
    listed = SaturationTracker(str(tmp_path / "b"), "csv", [first, second])
    assert list(listed.layers) == ["Module-0-Linear", "Module-1-Linear"]
    listed.close()


def test_two_containers_in_a_list_never_collide(tmp_path):
    encoder = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3))
    decoder = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", [encoder, decoder])
    names = list(tracker.layers)
    assert len(names) == 4 and len(set(names)) == 4
    assert names == ["Module-0-0", "Module-0-1", "Module-1-0", "Module-1-1"]
    tracker.close()


def test_shared_module_is_tracked_once_and_records_both_calls(tmp_path):
    shared = nn.Linear(3, 3)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = shared
            self.second = shared

        def forward(self, x):
            return self.second(self.first(x))

    model = Twice()
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, stats=["trc"])
    assert list(tracker.layers) == ["first"]
    x = torch.randn(10, 3)
    with torch.no_grad():
        once = shared(x)
        twice = shared(once)
    tracker.reset()
    model(x)
    results = tracker.add_saturations()
    expected = population_cov(torch.cat([once, twice]).numpy())
    assert results["train-covariance-trace_first"] == pytest.approx(np.trace(expected), rel=1e-6)
    tracker.close()


def test_layer_filter_ignore_layer_names_and_include_conv(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 4), nn.Linear(4, 2))
    no_conv = SaturationTracker(str(tmp_path / "a"), "csv", model, include_conv=False)
    assert list(no_conv.layers) == ["2", "3"]
    no_conv.close()
    ignored = SaturationTracker(str(tmp_path / "b"), "csv", model, ignore_layer_names=["3"])
    assert list(ignored.layers) == ["0", "2"]
    ignored.close()
    filtered = SaturationTracker(
        str(tmp_path / "c"), "csv", model, layer_filter=lambda layers: {k: v for k, v in layers.items() if k != "0"}
    )
    assert list(filtered.layers) == ["2", "3"]
    model(torch.randn(4, 1, 3, 3))
    results = filtered.add_saturations()
    assert set(results) == {"train-saturation_2", "train-saturation_3"}
    filtered.close()


@pytest.mark.parametrize(
    "kwargs, parameter",
    [
        ({"stats": ["lsat", "bogus"]}, "stats"),
        ({"save_to": "excel"}, "save_to"),
        ({"save_to": ["csv", "nope"]}, "save_to"),
        ({"conv_method": "avg"}, "conv_method"),
        ({"timeseries_method": "first"}, "timeseries_method"),
        ({"sat_threshold": 0.0}, "sat_threshold"),
        ({"sat_threshold": 1.5}, "sat_threshold"),
        ({"log_interval": 0}, "log_interval"),
        ({"max_samples": 0}, "max_samples"),
        ({"interpolation_strategy": "cubic-ish"}, "interpolation_strategy"),
        ({"modules": nn.Sequential(nn.ReLU(), nn.Tanh())}, "modules"),
    ],
)
def test_bad_input_is_refused_at_construction(tmp_path, kwargs, parameter):
    arguments = {"savefile": str(tmp_path / "run"), "save_to": "csv", "modules": nn.Linear(2, 2)}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=parameter):
        SaturationTracker(**arguments)


def test_error_for_unknown_choice_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError) as error:
        SaturationTracker(str(tmp_path / "run"), "csv", nn.Conv2d(1, 1, 1), conv_method="avg")
    for choice in ("channelwise", "mean", "max", "median", "flatten"):
        assert choice in str(error.value)


def test_stats_as_string_and_0150_mode_suffixes(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3))
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, stats="idim")
    assert tracker.stats == ["idim"]
    tracker.close()
    tracker = SaturationTracker(str(tmp_path / "run2"), "csv", model, stats=["lsat", "lsat_eval"])
    assert tracker.stats == ["lsat"]
    tracker.close()


def test_default_device_follows_the_activations_and_cuda_falls_back(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3))
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the fallback is for CPU-only machines")
    with pytest.warns(UserWarning, match="CUDA is not available"):
        tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, device="cuda:0")
    model(torch.randn(5, 3))
    assert tracker.add_saturations()["train-saturation_0"] > 0
    tracker.close()


def test_close_removes_every_hook_and_leaves_modules_untouched(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2), nn.LSTM(2, 2))
    before = {name: set(vars(module)) for name, module in model.named_modules()}
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model)
    assert all(len(attached_recorders(model[i])) == 1 for i in (0, 2, 3))
    assert all(len(module._forward_hooks) == 0 for module in model.modules())
    assert {name: set(vars(module)) for name, module in model.named_modules()} == before
    tracker.close()
    tracker.close()
    assert all(len(attached_recorders(module)) == 0 for module in model.modules())
    pickle.loads(pickle.dumps(model))


def test_context_manager_closes(tmp_path):
    model = nn.Linear(2, 2)
    with SaturationTracker(str(tmp_path / "run"), "csv", model) as tracker:
        assert len(attached_recorders(model)) == 1
    assert len(attached_recorders(model)) == 0
    with pytest.raises(RuntimeError, match="closed"):
        tracker.add_saturations()


def test_a_forgotten_tracker_removes_its_hooks_when_collected(tmp_path):
    model = nn.Linear(2, 2)
    SaturationTracker(str(tmp_path / "run"), "csv", model)
    gc.collect()
    assert len(attached_recorders(model)) == 0


def test_second_tracker_does_not_inherit_the_first(tmp_path):
    model = nn.Sequential(nn.Linear(2, 2))
    first = SaturationTracker(str(tmp_path / "a"), "csv", model)
    first.close()
    second = SaturationTracker(str(tmp_path / "b"), "csv", model, stats=["idim"])
    model(torch.randn(4, 2))
    assert list(second.add_saturations()) == ["train-intrinsic-dimensionality_0"]
    second.close()


def test_csv_rows_columns_and_user_scalars(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc=nn.Linear(4, 4)))
    tracker = SaturationTracker(str(tmp_path / "exp"), save_to="csv", modules=model, stats=["lsat", "idim"])
    for epoch in range(3):
        model.train()
        model(torch.randn(16, 4))
        if epoch > 0:
            model.eval()
            model(torch.randn(16, 4))
        tracker.add_scalar("accuracy", 0.5 + epoch / 10)
        tracker.add_saturations()
    tracker.close()
    frame = pd.read_csv(str(tmp_path / "exp.csv"), sep=";", index_col=0)
    assert list(frame.index) == [0, 1, 2]
    assert list(frame.columns) == [
        "accuracy",
        "train-saturation_fc",
        "train-intrinsic-dimensionality_fc",
        "eval-saturation_fc",
        "eval-intrinsic-dimensionality_fc",
    ]
    assert np.isnan(frame.loc[0, "eval-saturation_fc"]) and 0 < frame.loc[1, "eval-saturation_fc"] <= 1
    assert frame["accuracy"].tolist() == pytest.approx([0.5, 0.6, 0.7])
    assert (tmp_path / "exp").is_dir()


def test_add_saturations_before_any_data_writes_nothing_wrong(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3))
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model)
    assert tracker.add_saturations() == {}
    model(torch.randn(5, 3))
    assert tracker.add_saturations()["train-saturation_0"] > 0
    tracker.close()
    frame = pd.read_csv(str(tmp_path / "run.csv"), sep=";", index_col=0)
    assert list(frame.index) == [0, 1]
    assert np.isnan(frame.loc[0, "train-saturation_0"])


def test_layer_without_data_in_an_active_mode_is_nan(tmp_path):
    model = nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)})
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model)
    model["a"](torch.randn(4, 2))
    results = tracker.add_saturations()
    assert results["train-saturation_a"] == 1.0 and np.isnan(results["train-saturation_b"])
    tracker.close()


def test_layerwise_sat_false_writes_only_averages(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3))
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, layerwise_sat=False, average_sat=True)
    model(torch.randn(5, 3))
    assert list(tracker.add_saturations()) == ["average-train-sat"]
    tracker.close()


def test_nosave_computes_but_writes_nothing(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3))
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, nosave=True)
    model(torch.randn(5, 3))
    tracker.add_scalar("loss", 1.0)
    assert tracker.add_saturations()["train-saturation_0"] > 0
    tracker.close()
    assert not (tmp_path / "run.csv").exists() and not (tmp_path / "run").exists()


def test_verbose_prints_saturations(tmp_path, capsys):
    model = nn.Sequential(nn.Linear(3, 3))
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, verbose=True)
    model(torch.randn(5, 3))
    tracker.add_saturations()
    tracker.close()
    assert "train-saturation_0" in capsys.readouterr().out


def test_print_writer_prints_name_value_lines(tmp_path, capsys):
    model = nn.Sequential(nn.Linear(3, 3))
    tracker = SaturationTracker(str(tmp_path / "run"), "print", model)
    model(torch.randn(5, 3))
    results = tracker.add_saturations()
    tracker.close()
    assert f"train-saturation_0: {results['train-saturation_0']:.6g}" in capsys.readouterr().out


def test_custom_layer_type_can_be_registered(tmp_path):
    class Doubler(nn.Module):
        def forward(self, x):
            return 2 * x

    register_adapter(Doubler, lambda module, output, options: output.reshape(-1, output.shape[-1]))
    try:
        model = nn.Sequential(Doubler())
        tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, stats=["trc"])
        x = torch.randn(10, 3)
        model(x)
        expected = np.trace(population_cov((2 * x).numpy()))
        assert tracker.add_saturations()["train-covariance-trace_0"] == pytest.approx(expected, rel=1e-6)
        tracker.close()
    finally:
        unregister_adapter(Doubler)


def test_failing_layer_is_disabled_with_a_warning_and_training_goes_on(tmp_path):
    class Broken(nn.Module):
        def forward(self, x):
            return x

    def explode(module, output, options):
        raise RuntimeError("out of memory (simulated)")

    register_adapter(Broken, explode)
    try:
        model = nn.Sequential(Broken(), nn.Linear(3, 3))
        tracker = SaturationTracker(str(tmp_path / "run"), "csv", model)
        with pytest.warns(RuntimeWarning, match="'0'.*out of memory"):
            model(torch.randn(4, 3))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(torch.randn(4, 3))
        results = tracker.add_saturations()
        assert results["train-saturation_1"] > 0
        tracker.close()
    finally:
        unregister_adapter(Broken)


def test_import_delve_does_not_import_heavy_optional_packages():
    import subprocess
    import sys

    code = "import sys, delve; print(sorted(m for m in ('matplotlib', 'tensorboardX', 'pandas', 'lightning', 'transformers', 'keras') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=delve.__path__[0] + "/..")
    assert out.stdout.strip() == "[]"


def test_sample_rows_keeps_statistics_close_and_memory_budget_refuses_wide_layers(tmp_path):
    torch.manual_seed(0)
    layer = nn.Linear(4, 4)
    capture = Capture(layer)
    exact = SaturationTracker(str(tmp_path / "a"), "csv", layer, stats=["trc"], sample_rows=64)
    layer(torch.randn(48, 4))
    # every batch is smaller than sample_rows: the sampled statistics are exact
    assert exact.add_saturations()["train-covariance-trace_Module-0-Linear"] == pytest.approx(
        np.trace(population_cov(capture.outputs[0].numpy())), rel=1e-6
    )
    exact.close()
    with pytest.raises(ValueError, match="sample_rows"):
        SaturationTracker(str(tmp_path / "b"), "csv", layer, sample_rows=1)
    with pytest.raises(ValueError, match="memory_budget"):
        SaturationTracker(str(tmp_path / "c"), "csv", layer, memory_budget=0)
    with pytest.raises(ValueError, match="Module-0-Linear"):
        SaturationTracker(str(tmp_path / "d"), "csv", nn.Linear(2, 4096), memory_budget=2**20)
