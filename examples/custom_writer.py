"""A writer of your own: send delve's statistics anywhere by subclassing ``AbstractWriter``.

Run ``python examples/custom_writer.py`` (``--quick`` for a few-second run). It
trains a small MLP on scikit-learn's digits and writes, through the
``JSONLinesWriter`` below, ``runs/custom_writer.jsonl`` (one JSON object per
epoch), next to the built-in CSV ``runs/custom_writer.csv``.

A writer implements five methods. The tracker calls

- ``add_scalars("", values, global_step=epoch)`` once per ``add_saturations()``
  with every statistic (numbers; numpy arrays for ``cov`` and ``embed``),
- ``add_scalar(name, value, global_step=epoch)`` for the user's own values,
- ``save()`` to close the epoch,
- ``resume_from_saved_state(initial_epoch)`` when ``initial_epoch`` is not 0,
- ``close()`` at the end.
"""
import argparse
import json
import math
import os
from typing import Any, Dict, Mapping

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from delve import SaturationTracker
from delve.writers import AbstractWriter


class JSONLinesWriter(AbstractWriter):
    """One JSON object per epoch, appended to ``<savepath>.jsonl``; arrays are summarised by their shape."""

    def __init__(self, savepath: str, **kwargs: Any) -> None:
        self.path = savepath + ".jsonl"
        self.current: Dict[str, Any] = {}
        self.epoch = 0

    def resume_from_saved_state(self, initial_epoch: int) -> None:
        # Keep the lines of the epochs before initial_epoch, drop the rest.
        self.epoch = initial_epoch
        if not self._check_savestate_ok(self.path):
            return
        with open(self.path) as handle:
            kept = [line for line in handle if json.loads(line)["epoch"] < initial_epoch]
        with open(self.path, "w") as handle:
            handle.writelines(kept)

    def add_scalar(self, name: str, value: Any, global_step: int = None, **kwargs: Any) -> None:
        if global_step is not None:
            self.epoch = global_step
        if isinstance(value, np.ndarray) and value.ndim > 0:
            self.current[name] = {"shape": list(value.shape)}
        elif isinstance(value, (int, np.integer)):
            self.current[name] = int(value)
        else:
            number = float(value)
            self.current[name] = None if math.isnan(number) else number

    def add_scalars(self, prefix: str, value_dict: Mapping[str, Any], **kwargs: Any) -> None:
        for name, value in value_dict.items():
            self.add_scalar(prefix + name, value, **kwargs)

    def save(self) -> None:
        # One write of one line per epoch: a crash never leaves half a line.
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"epoch": self.epoch, **self.current}) + "\n")
        self.current = {}
        self.epoch += 1

    def close(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="two short epochs, for smoke tests")
    args = parser.parse_args()
    epochs = 2 if args.quick else args.epochs

    torch.manual_seed(0)
    digits = load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    if args.quick:
        inputs, labels = inputs[:256], labels[:256]
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    os.makedirs("runs", exist_ok=True)
    savefile = "runs/custom_writer"
    if os.path.exists(savefile + ".jsonl"):
        os.unlink(savefile + ".jsonl")
    writer = JSONLinesWriter(savefile)
    with SaturationTracker(savefile, save_to=[writer, "csv"], modules=model, stats=["lsat", "idim"]) as tracker:
        for epoch in range(epochs):
            model.train()
            for batch in torch.randperm(len(labels)).split(64):
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
                loss.backward()
                optimizer.step()
            tracker.add_scalar("loss", loss.item())
            tracker.add_saturations()
    with open(savefile + ".jsonl") as handle:
        for line in handle:
            row = json.loads(line)
            saturations = ", ".join(
                f"{name.split('_', 1)[1]}={value:.2f}" for name, value in row.items() if "saturation" in name
            )
            print(f"epoch {row['epoch']}: loss {row['loss']:.3f}, saturation per layer: {saturations}")
    print(f"wrote {savefile}.jsonl and {savefile}.csv")


if __name__ == "__main__":
    main()
