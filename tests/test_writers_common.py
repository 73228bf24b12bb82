"""What every writer must do, and the pieces the writer tests share.

Shared: a tiny model, a short run, readers of TensorBoard event files and of
the local files of an offline W&B run. Tested here for every key of
:data:`delve.writers.WRITERS`: the writer takes arrays, user scalars and eval
epochs, continues at ``initial_epoch`` and records each epoch's value at that
epoch, and closes twice without harm; the optional experiment trackers are
imported only when used and name the extra to install when missing.
"""
from __future__ import annotations

import glob
import io
import json
import os
import re
import struct
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Tuple

import pandas as pd
import pytest
import torch
from torch import nn

from delve import SaturationTracker
from delve.writers import WRITERS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))


def run_epochs(tracker: SaturationTracker, model: nn.Module, epochs, eval_epochs=(), seed: int = 0) -> List[dict]:
    """Feed a few batches per epoch (and an eval batch in ``eval_epochs``); return each epoch's results."""
    generator = torch.Generator().manual_seed(seed)
    results = []
    for epoch in epochs:
        model.train()
        for _ in range(3):
            model(torch.randn(32, 6, generator=generator))
        if epoch in eval_epochs:
            model.eval()
            with torch.no_grad():
                model(torch.randn(40, 6, generator=generator))
        tracker.add_scalar("accuracy", 0.5 + epoch / 100)
        results.append(tracker.add_saturations())
    return results


def _records(path: str):
    with open(path, "rb") as handle:
        data = handle.read()
    offset = 0
    while offset + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        start = offset + 12
        if start + length + 4 > len(data):
            break
        yield data[start:start + length]
        offset = start + length + 4


def read_event_scalars(folder: str, prefer_tensorboard: bool = True) -> Dict[str, List[Tuple[int, float]]]:
    """Tag -> [(step, value)] as TensorBoard shows them (later runs purge steps >= their purge step).

    Uses TensorBoard's own EventAccumulator when tensorboard is installed, else
    parses the TFRecord framing with tensorboardX's protobuf classes.
    """
    try:
        from tensorboard.backend.event_processing import event_accumulator
    except ImportError:
        event_accumulator = None
    if not prefer_tensorboard:
        event_accumulator = None
    if event_accumulator is not None:
        accumulator = event_accumulator.EventAccumulator(folder, size_guidance={event_accumulator.SCALARS: 0})
        accumulator.Reload()
        return {
            tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]
        }
    from tensorboardX.proto import event_pb2

    scalars: Dict[str, List[Tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        for record in _records(path):
            event = event_pb2.Event.FromString(record)
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                scalars = {tag: [(s, v) for s, v in values if s < event.step] for tag, values in scalars.items()}
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def read_event_histograms(folder: str) -> Dict[str, list]:
    """Tag -> [(step, HistogramProto-like with min, max, num, sum)] from the event files."""
    from tensorboardX.proto import event_pb2

    histograms: Dict[str, list] = {}
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        for record in _records(path):
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                if value.HasField("histo"):
                    histograms.setdefault(value.tag, []).append((event.step, value.histo))
    return histograms


def wandb_offline(monkeypatch: pytest.MonkeyPatch, folder) -> None:
    """W&B without network: offline runs written under ``folder``, quiet, no console capture."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(folder))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")


def _wandb_records(run: Any) -> List[Any]:
    """Every record of an offline W&B run's transaction log ``run-<id>.wandb``, in order.

    The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic, version),
    then 32 KiB blocks of chunks, each with a 7-byte header (CRC32, length,
    type: 1 full, 2 first, 3 middle, 4 last); a block's tail shorter than a
    header is padding. Each whole record is a ``wandb_internal_pb2.Record``.
    """
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(os.path.join(os.path.dirname(run.dir), "run-*.wandb"))
    with open(path, "rb") as handle:
        data = handle.read()
    assert data[:4] == b":W&B"
    block, offset, pending, records = 32768, 7, b"", []
    while offset + 7 <= len(data):
        room = block - offset % block
        if room < 7:
            offset += room
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        if kind == 0 and length == 0:
            offset += room
            continue
        pending += data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def read_wandb_run(run: Any, timeout_s: float = 60.0) -> SimpleNamespace:
    """What a finished offline W&B run recorded, from its local files.

    ``run.finish()`` returns before W&B's service has written the log (read at
    once, it often holds only its 7-byte header), so this waits until the log
    holds the run's ``exit`` record.

    Returns
    -------
    SimpleNamespace
        ``rows``: the history rows, key to decoded value (media as nested
        dicts); ``metrics``: metric definitions by name; ``config``: config
        updates by key path (a tuple); ``kinds``: the record types in order.
    """
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            read = _read_wandb_log(run)
        except (AssertionError, DecodeError):  # a log still being written
            read = None
        if read is not None and "exit" in read.kinds or time.monotonic() > deadline:
            return read
        time.sleep(0.1)


def _read_wandb_log(run: Any) -> SimpleNamespace:
    read = SimpleNamespace(rows=[], metrics={}, config={}, kinds=[])
    for record in _wandb_records(run):
        kind = record.WhichOneof("record_type")
        read.kinds.append(kind)
        if kind == "history":
            row: Dict[str, Any] = {}
            for item in record.history.item:
                path = list(item.nested_key) or [item.key]
                target = row
                for part in path[:-1]:
                    target = target.setdefault(part, {})
                target[path[-1]] = json.loads(item.value_json)
            read.rows.append(row)
        elif kind == "metric":
            read.metrics[record.metric.name or record.metric.glob_name] = record.metric
        elif kind == "config":
            for item in record.config.update:
                read.config[tuple(item.nested_key) or (item.key,)] = json.loads(item.value_json)
    return read


# --------------------------------------------------------------- the contract
def _csv_epochs(tracker: SaturationTracker) -> Dict[int, float]:
    return pd.read_csv(tracker.savefile + ".csv", sep=";", index_col=0)["accuracy"].dropna().to_dict()


def _npy_epochs(tracker: SaturationTracker) -> Dict[int, float]:
    from delve.writers.npy import load_npy_run

    return {epoch: float(value) for epoch, value in load_npy_run(tracker.savefile)[1]["accuracy"].items()}


def _tensorboard_epochs(tracker: SaturationTracker) -> Dict[int, float]:
    return dict(read_event_scalars(tracker.savefile)["accuracy"])


def _console_epochs(tracker: SaturationTracker) -> Dict[int, float]:
    text = tracker.writer.stream.getvalue()
    return {int(epoch): float(value) for epoch, value in re.findall(r"epoch (\d+) \| accuracy=([\d.]+)", text)}


def _wandb_epochs(tracker: SaturationTracker) -> Dict[int, float]:
    rows = read_wandb_run(tracker.writer.run).rows
    return {row["delve/epoch"]: row["accuracy"] for row in rows if "accuracy" in row}


def _mlflow_epochs(tracker: SaturationTracker) -> Dict[int, float]:
    writer = tracker.writer
    return {metric.step: metric.value for metric in writer.client.get_metric_history(writer.run_id, "accuracy")}


#: How to read back, for each writer key, the epoch and value of every logged ``accuracy``.
EPOCH_READERS: Dict[str, Callable[[SaturationTracker], Dict[int, float]]] = {
    "csv": _csv_epochs, "plot": _csv_epochs, "plotcsv": _csv_epochs, "csvplot": _csv_epochs,
    "csvplotting": _csv_epochs, "npy": _npy_epochs, "tb": _tensorboard_epochs,
    "tensorboard": _tensorboard_epochs, "console": _console_epochs, "wandb": _wandb_epochs,
    "mlflow": _mlflow_epochs,
}
#: Keys whose output has no epochs: ``print`` prints ``name: value`` lines as values come.
WITHOUT_EPOCHS = {"print"}
_NEEDS = {"tb": "tensorboardX", "tensorboard": "tensorboardX", "wandb": "wandb", "mlflow": "mlflow"}


def test_every_writer_key_has_an_epoch_reader() -> None:
    assert set(EPOCH_READERS) | WITHOUT_EPOCHS == set(WRITERS)


def _writer_args(key: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> Dict[str, Any]:
    if key in _NEEDS:
        pytest.importorskip(_NEEDS[key], reason=f"save_to={key!r} needs {_NEEDS[key]}")
    if key == "wandb":
        wandb_offline(monkeypatch, tmp_path)
        return {"project": "delve-tests"}
    if key == "mlflow":
        monkeypatch.chdir(tmp_path)
        return {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment_name": "delve-tests",
                "log_artifacts": False}
    if key == "console":
        return {"stream": io.StringIO()}
    return {}


@pytest.mark.filterwarnings("ignore:.*cannot resume from it and starts afresh:UserWarning")
@pytest.mark.parametrize("key", sorted(EPOCH_READERS))
def test_every_writer_resumes_at_initial_epoch_and_takes_arrays(tmp_path, monkeypatch, key) -> None:
    writer_args = _writer_args(key, tmp_path, monkeypatch)
    model = tiny_model()
    tracker = SaturationTracker(str(tmp_path / "run"), save_to=key, modules=model, stats=["lsat", "cov", "embed"],
                                writer_args=writer_args, initial_epoch=3)
    run_epochs(tracker, model, range(3, 5), eval_epochs={4})
    tracker.close()
    tracker.writer.close()
    read = EPOCH_READERS[key](tracker)
    assert sorted(read) == [3, 4]
    assert [read[3], read[4]] == pytest.approx([0.53, 0.54], abs=1e-4)


@pytest.mark.parametrize("key", ["wandb", "mlflow"])
def test_missing_tracker_package_names_the_extra(tmp_path, monkeypatch, key) -> None:
    monkeypatch.setitem(sys.modules, key, None)
    with pytest.raises(ImportError, match=rf"save_to='{key}' needs the {key} package.*pip install 'delve\[{key}\]'"):
        SaturationTracker(str(tmp_path / "run"), save_to=key, modules=tiny_model())


def test_tracker_writer_modules_import_no_tracker_package() -> None:
    code = ("import sys, delve, delve.writers.wandb, delve.writers.mlflow; "
            "print(sorted(name for name in ('wandb', 'mlflow') if name in sys.modules))")
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == "[]"
