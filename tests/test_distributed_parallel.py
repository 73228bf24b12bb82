"""Tensor, sequence and fully sharded parallelism: the statistics of one process over all the data.

Four gloo processes are started once per module (fork, as in
tests/test_distributed.py) and arranged as a 2 x 2 device mesh (data x tensor);
some scenarios use the four ranks as a 1 x 4 tensor-parallel mesh or as four
data-parallel ranks. Every rank stores what it computed; the assertions run
here against one process over all the data and against numpy float64.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import math
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from delve import SaturationTracker
from parallel_models import (BATCH, EVAL_2, EVAL_4, SEQ, SEQUENCES_2, STATS, TRAIN_2, TRAIN_4, ChannelShards,
                             LocalShardLinear, MislabelledLinear, PartialSumLinear, SequenceBlock, feed,
                             local_counts, make, make_data, make_images, make_sequences, track, train_rows)
from reference import Capture, population_cov
from test_distributed import assert_same_statistics, spawn_ranks

BENCHMARK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                         "parallel_overhead.py")
WORLD_SIZE = 4
MAX_SAMPLES = 20


# ----------------------------------------------------------------- the ranks


def _tensor_and_fully_sharded(mesh, data: torch.Tensor) -> dict:
    """FSDP2 over the data dimension and tensor parallelism over the other, with backward passes."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = make()
    parallelize_module(model, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
    for layer in (model.up, model.down, model.head):
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    dp = mesh["dp"].get_local_rank()
    with track(model) as tracker:
        feed(model, data, TRAIN_2, EVAL_2, dp, backward=True)
        out = {"layers": list(tracker.layers), "counts": local_counts(tracker), "results": tracker.add_saturations()}
        out["row_meshes"] = {name: None if recorder.row_mesh is None else recorder.row_mesh.mesh.tolist()
                             for name, recorder in tracker._recorders.items()}
    with track(model, max_samples=MAX_SAMPLES) as tracker:
        feed(model, data, TRAIN_2, EVAL_2, dp)
        out["budget_rows"] = {name: recorder.modes["train"].rows for name, recorder in tracker._recorders.items()}
        out["budget_counts"] = local_counts(tracker)
        out["budget_results"] = tracker.add_saturations()
    # The data-parallel dimension alone lacks the ranks that hold the other rows of up and down.
    with track(model, process_group=mesh["dp"]) as tracker:
        feed(model, data, TRAIN_2, EVAL_2, dp)
        try:
            tracker.add_saturations()
        except ValueError as error:
            out["dp_only_error"] = str(error)
    from delve.distributed import resolve_group

    out["whole_mesh_is_world"] = resolve_group(mesh) is None
    return out


def _sequence_parallel(mesh) -> dict:
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module)

    tokens, _ = make_sequences()
    model = make(SequenceBlock)
    parallelize_module(model, mesh["tp"], {
        "norm": SequenceParallel(),
        "up": ColwiseParallel(input_layouts=Shard(1)),
        "down": RowwiseParallel(output_layouts=Shard(1)),
    })
    dp, tp = mesh["dp"].get_local_rank(), mesh["tp"].get_local_rank()
    # Each rank of a tensor-parallel pair feeds its half of the positions of the same sequences.
    local = tokens[slice(*SEQUENCES_2[dp])].chunk(2, dim=1)[tp]
    with track(model) as tracker, torch.no_grad():
        for batch in local.split(4):
            model(batch)
        return {"counts": local_counts(tracker), "results": tracker.add_saturations()}


def _padding_mask(mesh) -> dict:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tokens, masks = make_sequences()
    model = make()
    parallelize_module(model, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
    dp = mesh["dp"].get_local_rank()
    rows = slice(*SEQUENCES_2[dp])
    with track(model) as tracker, torch.no_grad():
        for batch, mask in zip(tokens[rows].split(5), masks[rows].split(5)):
            with tracker.padding_mask(mask):
                model(batch)
        return {"results": tracker.add_saturations()}


def _tensor_parallel_1x4(data: torch.Tensor) -> dict:
    """All four ranks one tensor-parallel group: the same samples everywhere, rows split four ways."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (4,))
    model = make()
    parallelize_module(model, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
    with track(model) as tracker:
        for rank in TRAIN_2:
            feed(model, data, TRAIN_2, EVAL_2, rank)
        return {"counts": local_counts(tracker), "results": tracker.add_saturations()}


def _local_shards(mesh, data: torch.Tensor) -> dict:
    """Layers whose DTensor weights are sharded but whose forward returns plain local tensors."""
    from torch.distributed.tensor import Shard, distribute_tensor

    column = make(lambda: LocalShardLinear(6, 10))
    column.weight = nn.Parameter(distribute_tensor(column.weight.detach(), mesh["tp"], [Shard(0)]))
    column.bias = nn.Parameter(distribute_tensor(column.bias.detach(), mesh["tp"], [Shard(0)]))
    row = make(lambda: PartialSumLinear(6, 3, bias=False))
    row.weight = nn.Parameter(distribute_tensor(row.weight.detach(), mesh["tp"], [Shard(1)]))
    dp = mesh["dp"].get_local_rank()
    with track([column, row]) as tracker, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            for batch in data[train_rows(TRAIN_2, dp)].split(BATCH):
                column(batch)
                row(batch)
        results = tracker.add_saturations()
    return {"results": results, "warnings": [str(warning.message) for warning in caught]}


def _other_layouts(mesh) -> dict:
    """A feature map sharded on its channels (no rows-by-features output) and a mislabelled DTensor output."""
    feature_maps = nn.Sequential(ChannelShards(mesh["tp"]))
    mislabelled = make(lambda: MislabelledLinear(6, 4))
    mislabelled.mesh = mesh["tp"]
    dp = mesh["dp"].get_local_rank()
    images = make_images()[:7] if dp == 0 else make_images()[7:]
    with track(feature_maps, blocks=ChannelShards) as maps, track(mislabelled) as linear, \
            warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for batch in images.split(3):
            feature_maps(batch)
        for batch in make_data()[train_rows(TRAIN_2, dp)].split(BATCH):
            mislabelled(batch)
        return {"counts": local_counts(maps), "results": maps.add_saturations(),
                "mislabelled": linear.add_saturations(), "warnings": [str(warning.message) for warning in caught]}


def _fully_sharded_only(data: torch.Tensor) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (4,))
    model = make()
    for layer in (model.up, model.down, model.head):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    rank = mesh.get_local_rank()
    with track(model) as tracker:
        feed(model, data, TRAIN_4, EVAL_4, rank, backward=True)
        return {"layers": list(tracker.layers), "results": tracker.add_saturations()}


def _fsdp1(data: torch.Tensor, rank: int) -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = FullyShardedDataParallel(make(), device_id=torch.device("cpu"), use_orig_params=True)
    with track(model) as tracker:
        feed(model, data, TRAIN_4, EVAL_4, rank, backward=True)
        return {"layers": list(tracker.layers), "results": tracker.add_saturations()}


def _pipeline_stages(data: torch.Tensor, folder: str, rank: int) -> dict:
    """Two stages of two ranks each track different models; each tracker merges over its own stage."""
    from torch.distributed.device_mesh import init_device_mesh

    stage_mesh = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("pp", "dp", "tp"))
    stage = stage_mesh["pp"].get_local_rank()
    model = make() if stage == 0 else make(lambda: nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)))
    tracker = SaturationTracker(os.path.join(folder, f"stage{stage}-rank{rank}"), save_to="csv", modules=model,
                                stats=STATS, process_group=stage_mesh["dp", "tp"])
    feed(model, data, TRAIN_4, EVAL_4, rank)
    out = {"stage": stage, "results": tracker.add_saturations(), "writer": type(tracker.writer).__name__}
    tracker.close()
    # The same with the stage's ProcessGroup itself.
    with track(model, process_group=stage_mesh["tp"].get_group()) as tracker:
        feed(model, data, TRAIN_4, EVAL_4, rank)
        out["results_of_group"] = tracker.add_saturations()
    return out


def _benchmark(mesh) -> dict:
    """benchmarks/parallel_overhead.py's measurements, tiny, on the tensor-parallel pairs."""
    spec = importlib.util.spec_from_file_location("parallel_overhead", BENCHMARK)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    args = argparse.Namespace(rows=128, blocks=1, steps=1, repeats=1)
    return {"steps": benchmark.step_overhead(32, args, mesh["tp"]),
            "exchange": benchmark.exchange_costs(32, args, mesh["tp"])}


def _worker(rank: int, folder: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)  # four processes on a small machine
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=120))
    try:
        data = make_data()
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        out = {
            "tensor_and_fully_sharded": _tensor_and_fully_sharded(mesh, data),
            "sequence_parallel": _sequence_parallel(mesh),
            "padding_mask": _padding_mask(mesh),
            "tensor_parallel_1x4": _tensor_parallel_1x4(data),
            "local_shards": _local_shards(mesh, data),
            "other_layouts": _other_layouts(mesh),
            "fully_sharded_only": _fully_sharded_only(data),
            "fsdp1": _fsdp1(data, rank),
            "pipeline_stages": _pipeline_stages(data, folder, rank),
            "benchmark": _benchmark(mesh),
        }
        torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
        dist.barrier()  # gloo on torch 2.13 aborts at shutdown about 1 run in 5 without it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list:
    return spawn_ranks(_worker, str(tmp_path_factory.mktemp("parallel")), WORLD_SIZE)


# ------------------------------------------------------------- one process


def one_process(model: nn.Module, feed_all, **options) -> dict:
    with track(model, **options) as tracker:
        feed_all(model)
        return tracker.add_saturations()


def feed_shares(data: torch.Tensor, train: dict, evaluate: dict, ranks: tuple = ()):
    def feed_all(model: nn.Module) -> None:
        for rank in ranks or train:
            feed(model, data, train, evaluate, rank)
    return feed_all


def test_tensor_parallel_with_fsdp2_on_2x2_mesh_equals_one_process(ranks: list) -> None:
    expected = one_process(make(), feed_shares(make_data(), TRAIN_2, EVAL_2))
    assert expected["train-samples_up"] == 115 and expected["eval-samples_head"] == 35
    for out in ranks:
        scenario = out["tensor_and_fully_sharded"]
        assert scenario["layers"] == ["up", "down", "head"]
        assert_same_statistics(scenario["results"], expected)


def test_sharded_layers_match_numpy(ranks: list) -> None:
    data = make_data().to(torch.float64)
    model = make().double()
    captures = {name: Capture(getattr(model, name)) for name in ("up", "down", "head")}
    with torch.no_grad():
        model(data[:115])
    results = ranks[3]["tensor_and_fully_sharded"]["results"]
    for name, capture in captures.items():
        cov = population_cov(torch.cat(capture.outputs).numpy())
        np.testing.assert_allclose(results[f"train-covariance-matrix_{name}"], cov, rtol=1e-5,
                                   atol=1e-6 * np.abs(cov).max())
        assert results[f"train-covariance-trace_{name}"] == pytest.approx(np.trace(cov), rel=1e-5)


def test_tensor_parallel_ranks_split_the_rows_of_sharded_layers(ranks: list) -> None:
    for dp, pair in enumerate((ranks[:2], ranks[2:])):
        rows = sum(TRAIN_2[dp])
        counts = [out["tensor_and_fully_sharded"]["counts"] for out in pair]
        for name in ("up", "down"):
            assert counts[0][name]["train"] + counts[1][name]["train"] == rows
            assert abs(counts[0][name]["train"] - counts[1][name]["train"]) <= 8  # about half each
        # The plain layer after the row-parallel one sees the same rows on both: counted once at the merge.
        assert counts[0]["head"]["train"] == counts[1]["head"]["train"] == rows
    for out in ranks:
        meshes = out["tensor_and_fully_sharded"]["row_meshes"]
        assert meshes["head"] is None
        assert meshes["up"] == meshes["down"] == ([0, 1] if out is ranks[0] or out is ranks[1] else [2, 3])


def test_max_samples_counts_the_rows_of_the_tensor_parallel_group(ranks: list) -> None:
    for pair in (ranks[:2], ranks[2:]):
        scenarios = [out["tensor_and_fully_sharded"] for out in pair]
        assert scenarios[0]["budget_rows"] == scenarios[1]["budget_rows"]  # the same decisions on both ranks
        for name in ("up", "down"):
            kept = sum(scenario["budget_counts"][name]["train"] for scenario in scenarios)
            assert MAX_SAMPLES - 2 <= kept <= MAX_SAMPLES
        assert scenarios[0]["budget_counts"]["head"]["train"] == MAX_SAMPLES
    results = ranks[0]["tensor_and_fully_sharded"]["budget_results"]
    assert results["train-samples_head"] == 2 * MAX_SAMPLES
    assert 2 * MAX_SAMPLES - 4 <= results["train-samples_up"] <= 2 * MAX_SAMPLES


def test_merging_over_the_data_dimension_alone_is_refused(ranks: list) -> None:
    for out in ranks:
        scenario = out["tensor_and_fully_sharded"]
        assert "split the rows of layer 'up'" in scenario["dp_only_error"]
        assert "pass the whole DeviceMesh" in scenario["dp_only_error"]
        assert scenario["whole_mesh_is_world"]


def test_sequence_parallel_equals_one_process(ranks: list) -> None:
    tokens, _ = make_sequences()

    def feed_all(model: nn.Module) -> None:
        with torch.no_grad():
            for rows in SEQUENCES_2.values():
                for batch in tokens[slice(*rows)].split(4):
                    model(batch)

    expected = one_process(make(SequenceBlock), feed_all)
    assert expected["train-samples_head"] == 24 * SEQ
    for out in ranks:
        assert_same_statistics(out["sequence_parallel"]["results"], expected)
    # head holds this rank's positions only: different rows on the two ranks of a pair, all of them merged
    assert ranks[0]["sequence_parallel"]["counts"]["head"]["train"] == SEQUENCES_2[0][1] * SEQ // 2


def test_padding_mask_under_tensor_parallelism_equals_one_process(ranks: list) -> None:
    tokens, masks = make_sequences()

    def feed_all(model: nn.Module) -> None:
        with torch.no_grad():
            for rows in SEQUENCES_2.values():
                for batch, mask in zip(tokens[slice(*rows)].split(5), masks[slice(*rows)].split(5)):
                    with tracker.padding_mask(mask):
                        model(batch)

    model = make()
    with track(model) as tracker:
        feed_all(model)
        expected = tracker.add_saturations()
    assert expected["train-samples_up"] == int(masks.sum())
    for out in ranks:
        assert_same_statistics(out["padding_mask"]["results"], expected)


def test_tensor_parallel_1x4_equals_one_process(ranks: list) -> None:
    expected = one_process(make(), feed_shares(make_data(), TRAIN_2, EVAL_2))
    for out in ranks:
        assert_same_statistics(out["tensor_parallel_1x4"]["results"], expected)
    # The one-row batch at the end of the first share leaves three of the four ranks without a row.
    assert sum(out["tensor_parallel_1x4"]["counts"]["up"]["train"] for out in ranks) == 115


def test_local_feature_shards_equal_the_whole_layer(ranks: list) -> None:
    column = make(lambda: nn.Linear(6, 10))
    data = make_data()
    with track(column) as tracker, torch.no_grad():
        for rank in TRAIN_2:
            for batch in data[train_rows(TRAIN_2, rank)].split(BATCH):
                column(batch)
        expected = tracker.add_saturations()
    for out in ranks:
        results = out["local_shards"]["results"]
        got = {key.replace("Module-0-LocalShardLinear", "Module-0-Linear"): value for key, value in results.items()
               if "LocalShardLinear" in key}
        assert_same_statistics(got, expected)


def test_unknown_layout_is_left_out_with_a_warning(ranks: list) -> None:
    for out in ranks:
        scenario = out["local_shards"]
        left_out = [message for message in scenario["warnings"] if "PartialSumLinear" in message]
        assert len(left_out) == 1, scenario["warnings"]
        assert "delve leaves out layer 'Module-1-PartialSumLinear'" in left_out[0]
        assert "cannot tell" in left_out[0]
        assert math.isnan(scenario["results"]["train-saturation_Module-1-PartialSumLinear"])


def test_feature_maps_sharded_on_channels_equal_one_process(ranks: list) -> None:
    feature_maps = nn.Sequential(ChannelShards())
    with track(feature_maps, blocks=ChannelShards) as tracker, torch.no_grad():
        for images in (make_images()[:7], make_images()[7:]):
            for batch in images.split(3):
                feature_maps(batch)
        expected = tracker.add_saturations()
    assert expected["train-samples_0"] == 12 * 5 * 5
    for out in ranks:
        assert_same_statistics(out["other_layouts"]["results"], expected)
    # Both ranks of a pair gather every channel of every position: identical states, counted once.
    assert ranks[0]["other_layouts"]["counts"] == ranks[1]["other_layouts"]["counts"]
    assert ranks[0]["other_layouts"]["counts"]["0"]["train"] == 7 * 25


def test_output_whose_local_shape_contradicts_its_placement_is_left_out(ranks: list) -> None:
    for out in ranks:
        scenario = out["other_layouts"]
        left_out = [message for message in scenario["warnings"] if "MislabelledLinear" in message]
        assert len(left_out) == 1, scenario["warnings"]
        assert "local shape (16, 4)" in left_out[0] and "has shape (16, 2)" in left_out[0]
        assert scenario["mislabelled"] == {}  # nothing recorded, so no numbers


def test_fsdp2_on_four_ranks_equals_one_process(ranks: list) -> None:
    expected = one_process(make(), feed_shares(make_data(), TRAIN_4, EVAL_4))
    for out in ranks:
        assert out["fully_sharded_only"]["layers"] == ["up", "down", "head"]
        assert_same_statistics(out["fully_sharded_only"]["results"], expected)


def test_fsdp1_on_four_ranks_equals_one_process(ranks: list) -> None:
    expected = one_process(make(), feed_shares(make_data(), TRAIN_4, EVAL_4))
    for out in ranks:
        # FullyShardedDataParallel keeps the model as its child ``_fsdp_wrapped_module``: not in the names.
        assert not [key for key in out["fsdp1"]["results"] if "_fsdp_wrapped_module" in key]
        assert_same_statistics(out["fsdp1"]["results"], expected)


def test_each_pipeline_stage_merges_over_its_own_ranks(ranks: list) -> None:
    data = make_data()
    for stage, pair in enumerate((ranks[:2], ranks[2:])):
        model = make() if stage == 0 else make(lambda: nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)))
        expected = one_process(model, feed_shares(data, TRAIN_4, EVAL_4, (0, 1) if stage == 0 else (2, 3)))
        for out in pair:
            assert out["pipeline_stages"]["stage"] == stage
            assert_same_statistics(out["pipeline_stages"]["results"], expected)
            assert_same_statistics(out["pipeline_stages"]["results_of_group"], expected)
        # Rank 0 of each stage's group writes.
        assert [out["pipeline_stages"]["writer"] for out in pair] == ["CSVWriter", "NullWriter"]
    folder = ranks[0]["folder"]
    assert sorted(name for name in os.listdir(folder) if name.endswith(".csv")) == [
        "stage0-rank0.csv", "stage1-rank2.csv"]


def test_parallel_overhead_benchmark_runs(ranks: list) -> None:
    """No timing is asserted: the script still runs, and its exchange volumes are those of the docs."""
    for out in ranks:
        steps, exchange = out["benchmark"]["steps"], out["benchmark"]["exchange"]
        assert steps["untracked"] > 0 and steps["tracked"] > 0 and steps["add_saturations"] > 0
        assert [row["kind"] for row in exchange] == ["column (Shard(-1))", "row (Partial)"]
        # (t - 1) / t of a 128-row output, t = 2: 4 * 32 features of up, 32 of down
        assert [row["received"] for row in exchange] == [128 * 128 // 2, 128 * 32 // 2]
        assert all(row[name] > 0 for row in exchange for name in ("exchange", "split", "gather_all"))


# ----------------------------------------------------------------- one process


def test_process_group_needs_torch_distributed() -> None:
    with pytest.raises(ValueError, match="process_group=.*init_process_group"):
        track(make(), process_group=object())
