"""torch.distributed support: exact merge across ranks, rank-0-only writing, mergeable accumulators.

The multi-process tests start two gloo processes on CPU once per module
(``torch.multiprocessing.spawn``); each rank stores what it saw in a file, and
the assertions run here against one process over all the data and against
numpy float64.
"""
from __future__ import annotations

import datetime
import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from delve import SaturationTracker, TorchCovarianceMatrix
from delve.distributed import NullWriter, get_rank, is_distributed, is_main_process, sync_accumulators
from reference import Capture, idim, population_cov

WORLD_SIZE = 2
STATS = ["lsat", "idim", "trc", "cov"]
# Unequal shares, so that the merge must weight the ranks by their counts.
ROWS = {0: (0, 70), 1: (70, 120)}
EVAL_ROWS = (120, 150)  # fed on rank 0 only: the eval mode has data on one rank
MORE_ROWS = {0: (150, 190), 1: (190, 250)}  # a second epoch, for reset_covariance=False


class Net(nn.Module):
    """Two tracked layers always used and one (``extra``) that only rank 0 calls."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4))
        self.extra = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, use_extra: bool = False) -> torch.Tensor:
        if use_extra:
            self.extra(x)
        return self.body(x)


def make_net() -> Net:
    torch.manual_seed(0)
    return Net()


def make_data() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    mixing = torch.randn(6, 6, generator=generator) * torch.tensor([3.0, 2.0, 1.0, 0.5, 0.1, 0.01])
    # A large common offset: merging must not lose the small spread around it.
    return torch.randn(250, 6, generator=generator) @ mixing + 20.0


def feed_epoch(model: nn.Module, data: torch.Tensor, rank: int) -> None:
    """What rank ``rank`` sees in the first epoch: its train share (``extra`` on rank 0), eval on rank 0."""
    start, stop = ROWS[rank]
    model.train()
    with torch.no_grad():
        for batch in data[start:stop].split(16):
            model(batch, use_extra=rank == 0)
        if rank == 0:
            model.eval()
            model(data[slice(*EVAL_ROWS)])
            model.train()


def feed_more(model: nn.Module, data: torch.Tensor, rank: int) -> None:
    with torch.no_grad():
        model(data[slice(*MORE_ROWS[rank])])


def _accumulator(rows: torch.Tensor) -> TorchCovarianceMatrix:
    acc = TorchCovarianceMatrix()
    acc.update(rows)
    return acc


def _state(acc: TorchCovarianceMatrix) -> dict:
    return {key: value.clone() if torch.is_tensor(value) else value for key, value in acc.state_dict().items()}


def _worker(rank: int, folder: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)  # two processes on a small machine
    data = make_data()
    # 0. A tracker created too early: every rank builds a CSV writer.
    early_net = make_net()
    early = SaturationTracker(os.path.join(folder, f"early{rank}"), save_to="csv", modules=early_net)
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        out: dict = {"rank": rank, "is_distributed": is_distributed(), "main": is_main_process()}
        feed_epoch(early_net, data, rank)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            early.add_saturations()
        out["early_warnings"] = [str(warning.message) for warning in caught]
        early.close()

        # 1. A tracker on a DDP-wrapped model, writing CSV (each rank gets its own path).
        net = make_net()
        ddp = DistributedDataParallel(net)
        tracker = SaturationTracker(
            os.path.join(folder, f"run{rank}"), save_to="csv", modules=ddp, stats=STATS, average_sat=True
        )
        out["layer_names"] = list(tracker.layers)
        out["writer"] = type(tracker.writer).__name__
        feed_epoch(ddp, data, rank)
        shapes, gathered = [], []
        all_reduce, all_gather = dist.all_reduce, dist.all_gather

        def recording_all_reduce(tensor: torch.Tensor, *args, **kwargs):
            shapes.append(tuple(tensor.shape))
            return all_reduce(tensor, *args, **kwargs)

        def recording_all_gather(tensors: list, tensor: torch.Tensor, *args, **kwargs):
            gathered.append((len(tensors), tuple(tensor.shape)))
            return all_gather(tensors, tensor, *args, **kwargs)

        dist.all_reduce, dist.all_gather = recording_all_reduce, recording_all_gather
        try:
            out["results"] = tracker.add_saturations()
        finally:
            dist.all_reduce, dist.all_gather = all_reduce, all_gather
        out["all_reduce_shapes"], out["all_gather_shapes"] = shapes, gathered
        tracker.close()

        # 2. reset_covariance=False over two epochs: the local state must survive the merges.
        tracker = SaturationTracker("unused", save_to="csv", modules=net, stats=STATS, nosave=True,
                                    reset_covariance=False)
        feed_epoch(net, data, rank)
        out["epoch1"] = tracker.add_saturations()
        feed_more(net, data, rank)
        out["epoch2"] = tracker.add_saturations()
        out["local_counts"] = {
            name: {mode: state.accumulator.count for mode, state in layer.modes.items()}
            for name, layer in tracker._recorders.items()
        }
        tracker.close()

        # 3. sync_accumulators directly: shared, one-rank-only, nowhere, and emptied-on-one-rank keys.
        accs = {
            "shared": _accumulator(data[slice(*ROWS[rank]), :3]),
            "only0": _accumulator(data[:40, 2:]) if rank == 0 else TorchCovarianceMatrix(),
            "nowhere": TorchCovarianceMatrix(),
            "reset1": _accumulator(data[slice(*ROWS[rank]), :2]),
            # The same rows on both ranks (as tensor-parallel ranks record a replicated output): counted once.
            "same": _accumulator(data[:30, 1:4]),
        }
        if rank == 1:
            accs["reset1"].reset()
        accs["saved"] = TorchCovarianceMatrix(save_data=True, max_saved_samples=5)
        accs["saved"].update(data[slice(*ROWS[rank]), :2])
        before = {key: _state(acc) for key, acc in accs.items()}
        merged = sync_accumulators(accs)
        out["merged"] = {key: _state(acc) for key, acc in merged.items()}
        # Rows kept for the ``embed`` statistic stay those of the rank.
        out["saved_rows"] = merged["saved"].saved_samples
        out["unchanged"] = all(
            all(torch.equal(before[key][name], value) for name, value in _state(acc).items() if torch.is_tensor(value))
            and before[key].keys() == _state(acc).keys()
            for key, acc in accs.items()
        )

        # 4. Inconsistent ranks raise on every rank instead of hanging.
        errors = []
        for bad in ({"x": _accumulator(torch.randn(5, 3 + 2 * rank))}, {f"key{rank}": _accumulator(torch.randn(5, 3))}):
            try:
                sync_accumulators(bad)
            except ValueError as error:
                errors.append(str(error))
        out["errors"] = errors
        torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
        dist.barrier()  # gloo on torch 2.13 aborts at shutdown about 1 run in 5 without it
    finally:
        dist.destroy_process_group()


def spawn_ranks(worker, folder: str, world_size: int) -> list:
    """Run ``worker(rank, folder)`` on ``world_size`` processes; what each rank saved as ``rank{r}.pt``."""
    if not torch.distributed.is_available():
        pytest.skip("this torch build has no torch.distributed")
    # fork: the workers inherit the imported torch and delve instead of importing them again.
    mp.start_processes(worker, args=(folder,), nprocs=world_size, join=True, start_method="fork")
    return [torch.load(os.path.join(folder, f"rank{rank}.pt"), weights_only=False) | {"folder": folder}
            for rank in range(world_size)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list:
    return spawn_ranks(_worker, str(tmp_path_factory.mktemp("distributed")), WORLD_SIZE)


def single_process(reset_covariance: bool = True) -> tuple:
    """The same runs in one process over the data of both ranks."""
    data = make_data()
    net = make_net()
    tracker = SaturationTracker("unused", save_to="csv", modules=net, stats=STATS, nosave=True,
                                average_sat=reset_covariance, reset_covariance=reset_covariance)
    for rank in range(WORLD_SIZE):
        feed_epoch(net, data, rank)
    first = tracker.add_saturations()
    for rank in range(WORLD_SIZE):
        feed_more(net, data, rank)
    second = tracker.add_saturations()
    tracker.close()
    return first, second


def assert_same_statistics(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        got = actual[key]
        if "covariance-matrix" in key:
            # Merges are exact in float64; the float32 Grams of differently grouped rows (each rank
            # stages its own) agree to float32 precision of the largest entry.
            np.testing.assert_allclose(got, value, rtol=1e-6, atol=1e-6 * np.abs(value).max())
        elif isinstance(value, float) and math.isnan(value):
            assert math.isnan(got), key
        elif "intrinsic-dimensionality" in key:
            assert got == value, key
        else:
            assert got == pytest.approx(value, rel=1e-5), key


def test_two_gloo_ranks_equal_one_process_on_all_data(ranks: list) -> None:
    expected, _ = single_process()
    assert "eval-saturation_body-0" in expected and math.isnan(expected["eval-saturation_extra"])
    for out in ranks:
        assert out["is_distributed"]
        assert_same_statistics(out["results"], expected)


def test_merged_statistics_match_numpy(ranks: list) -> None:
    data = make_data().to(torch.float64)
    net = make_net().double()
    captures = {name: Capture(module) for name, module in (("body-0", net.body[0]), ("body-2", net.body[2]),
                                                           ("extra", net.extra))}
    with torch.no_grad():
        net(data[: ROWS[1][1]])
        net.extra(data[slice(*ROWS[0])])
    results = ranks[0]["results"]
    for name, capture in captures.items():
        cov = population_cov(torch.cat(capture.outputs).numpy())
        assert results[f"train-covariance-trace_{name}"] == pytest.approx(np.trace(cov), rel=1e-5)
        assert results[f"train-intrinsic-dimensionality_{name}"] == idim(cov, 0.99)


def test_every_rank_gets_the_same_results(ranks: list) -> None:
    first, second = ranks[0]["results"], ranks[1]["results"]
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])


def test_only_rank_zero_writes(ranks: list) -> None:
    folder = ranks[0]["folder"]
    assert ranks[0]["main"] and not ranks[1]["main"]
    assert ranks[0]["writer"] == "CSVWriter" and ranks[1]["writer"] == "NullWriter"
    assert not os.path.exists(os.path.join(folder, "run1.csv"))
    assert not os.path.exists(os.path.join(folder, "run1"))
    import pandas as pd

    written = pd.read_csv(os.path.join(folder, "run0.csv"), sep=";", index_col=0)
    key = "train-covariance-trace_body-0"
    assert written.loc[0, key] == pytest.approx(ranks[0]["results"][key], rel=1e-12)


def test_collectives_per_call(ranks: list) -> None:
    """Three small reductions and one small gather for all layers, then one d x d reduction per layer and mode."""
    widths = {"body-0": 10, "body-2": 4, "extra": 3}
    with_data = [("body-0", "train"), ("body-0", "eval"), ("body-2", "train"), ("body-2", "eval"), ("extra", "train")]
    for out in ranks:
        shapes = out["all_reduce_shapes"]
        small = [shape for shape in shapes if len(shape) == 1]
        square = [shape for shape in shapes if len(shape) == 2]
        assert len(small) == 3 and len(shapes) == 3 + len(square)
        assert sorted(square) == sorted((widths[name], widths[name]) for name, _ in with_data)
        # key check, dimensions (max and min of 6 accumulators), then [n, n * mean, skipped] of each
        assert small == [(4,), (12,), (sum(widths[name] + 2 for name, _ in with_data) + 2,)]
        # count and two projections of each of the 6 states, from each rank
        assert out["all_gather_shapes"] == [(WORLD_SIZE, (6, 3))]


def test_tracker_created_before_init_writes_on_rank_zero_only(ranks: list) -> None:
    folder = ranks[0]["folder"]
    assert os.path.isfile(os.path.join(folder, "early0.csv"))
    assert not os.path.exists(os.path.join(folder, "early1.csv"))
    assert not any("init_process_group" in message for message in ranks[0]["early_warnings"])
    assert any("Create the tracker after init_process_group" in message for message in ranks[1]["early_warnings"])


def test_layer_names_unchanged_under_ddp(ranks: list) -> None:
    plain = SaturationTracker("unused", save_to="csv", modules=make_net(), nosave=True)
    for out in ranks:
        assert out["layer_names"] == list(plain.layers) == ["body-0", "body-2", "extra"]
    plain.close()


def test_local_state_survives_merges(ranks: list) -> None:
    first, second = single_process(reset_covariance=False)
    for out in ranks:
        assert_same_statistics(out["epoch1"], first)
        assert_same_statistics(out["epoch2"], second)
    rows = {rank: ROWS[rank][1] - ROWS[rank][0] + MORE_ROWS[rank][1] - MORE_ROWS[rank][0] for rank in ROWS}
    for rank, out in enumerate(ranks):
        assert out["local_counts"]["body-0"]["train"] == rows[rank]
        assert out["local_counts"]["extra"]["train"] == (ROWS[0][1] - ROWS[0][0] if rank == 0 else 0)
        assert out["local_counts"]["body-0"]["eval"] == (EVAL_ROWS[1] - EVAL_ROWS[0] if rank == 0 else 0)


def _assert_state_is(state: dict, rows: torch.Tensor) -> None:
    expected = rows.to(torch.float64).numpy()
    assert state["count"].item() == expected.shape[0]
    np.testing.assert_allclose(state["mean"].numpy(), expected.mean(axis=0), rtol=1e-7)
    np.testing.assert_allclose(state["m2"].numpy(), population_cov(expected) * expected.shape[0], rtol=1e-5,
                               atol=1e-8)


def test_sync_accumulators_merges_exactly_and_leaves_local_state(ranks: list) -> None:
    data = make_data()
    for out in ranks:
        merged = out["merged"]
        assert out["unchanged"]
        _assert_state_is(merged["shared"], data[: ROWS[1][1], :3])
        _assert_state_is(merged["only0"], data[:40, 2:])
        _assert_state_is(merged["reset1"], data[slice(*ROWS[0]), :2])
        _assert_state_is(merged["same"], data[:30, 1:4])
        assert "m2" not in merged["nowhere"]
        _assert_state_is(merged["saved"], data[: ROWS[1][1], :2])
    for rank, out in enumerate(ranks):
        start = ROWS[rank][0]
        np.testing.assert_array_equal(out["saved_rows"].numpy(), data[start : start + 5, :2].numpy())


def test_inconsistent_ranks_raise_everywhere(ranks: list) -> None:
    for out in ranks:
        dims_error, keys_error = out["errors"]
        assert "3 features on one rank and 5" in dims_error
        assert "different layers" in keys_error


# ----------------------------------------------------------------- one process


def test_without_process_group_nothing_changes() -> None:
    acc = _accumulator(torch.randn(10, 3))
    assert not is_distributed() and get_rank() == 0 and is_main_process()
    assert sync_accumulators({"a": acc})["a"] is acc


def test_null_writer_drops_everything() -> None:
    with NullWriter(savepath="ignored") as writer:
        writer.resume_from_saved_state(3)
        writer.add_scalar("a", 1.0)
        writer.add_scalars("p", {"b": 2.0})
        assert writer.add_histogram("h", np.zeros(3), global_step=1) is None
        writer.save()
    with pytest.raises(AttributeError):
        writer.flush_everything


def test_null_writer_lives_with_the_writers() -> None:
    from delve.writers.base import AbstractWriter, NullWriter as BaseNullWriter

    assert NullWriter is BaseNullWriter and issubclass(NullWriter, AbstractWriter)


def test_state_dict_round_trip(tmp_path) -> None:
    rows = make_data()[:60]
    acc = _accumulator(rows)
    path = tmp_path / "acc.pt"
    torch.save(acc.state_dict(), path)
    restored = TorchCovarianceMatrix()
    restored.load_state_dict(torch.load(path))
    np.testing.assert_array_equal(restored.compute().numpy(), acc.compute().numpy())
    assert restored.count == 60
    np.testing.assert_allclose(restored.compute().numpy(), population_cov(rows.numpy()), rtol=1e-5)
    restored.update(rows[:5])  # still a working accumulator
    assert restored.count == 65 and acc.count == 60

    empty = TorchCovarianceMatrix()
    empty.load_state_dict(TorchCovarianceMatrix().state_dict())
    assert not empty.is_initialized
    with pytest.raises(ValueError, match="version"):
        empty.load_state_dict({"version": 999})


def test_merge_shards_saved_elsewhere(tmp_path) -> None:
    rows = make_data()
    bounds = [0, 17, 100, 250]
    for index, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        torch.save(_accumulator(rows[start:stop]).state_dict(), tmp_path / f"shard{index}.pt")
    total = TorchCovarianceMatrix()
    total.merge(TorchCovarianceMatrix())  # merging an empty accumulator changes nothing
    for index in range(len(bounds) - 1):
        shard = TorchCovarianceMatrix()
        shard.load_state_dict(torch.load(tmp_path / f"shard{index}.pt"))
        total.merge(shard)
    total.merge(TorchCovarianceMatrix())
    assert total.count == 250
    np.testing.assert_allclose(total.mean.numpy(), rows.to(torch.float64).numpy().mean(axis=0), rtol=1e-7)
    np.testing.assert_allclose(total.compute().numpy(), population_cov(rows.numpy()), rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="dimension"):
        total.merge(_accumulator(torch.randn(4, 2)))
