"""Shared pieces of the writer tests (no tests here): a tiny model, a short run, an event-file reader."""
from __future__ import annotations

import glob
import os
import struct
from typing import Dict, List, Tuple

import torch
from torch import nn

from delve import SaturationTracker


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
