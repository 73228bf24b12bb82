"""Saturation of an LSTM that reads scikit-learn's digits row by row.

Each 8x8 digit is a sequence of 8 time steps of 8 pixels. An LSTM
(``batch_first=True``, hidden size 32) reads the sequence and a Linear layer
classifies its last hidden state. delve tracks both layers.

``--timeseries-method`` decides how the LSTM's output ``(batch, time, hidden)``
becomes samples: ``last_timestep`` (the default) takes one sample per sequence,
the output after the last row; ``timestepwise`` makes every time step of every
sequence a sample, so the covariance also sees how the state evolves while the
digit is read. delve honours ``batch_first`` for both, so the time axis is the
right one whichever layout the layer uses.

Run ``python examples/lstm.py`` (``--quick`` for a run of a few seconds). It
writes ``runs/lstm.csv`` (one row per epoch, ``;``-separated) with saturation
and intrinsic dimensionality of both layers, in train and eval mode.
"""
import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from delve import SaturationTracker


class DigitReader(nn.Module):
    """An LSTM over the rows of an image, then a linear classifier of its last output."""

    def __init__(self, hidden: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size=8, hidden_size=hidden, batch_first=True)
        self.classifier = nn.Linear(hidden, classes)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        outputs, _ = self.lstm(rows)
        return self.classifier(outputs[:, -1])


def digit_sequences(batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    """Train and test loaders of digits as (batch, 8 rows, 8 pixels) sequences."""
    digits = load_digits()
    rows = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(labels), generator=generator)
    train, test = order[:1400], order[1400:]
    return (
        DataLoader(TensorDataset(rows[train], labels[train]), batch_size=batch_size, shuffle=True,
                   generator=generator),
        DataLoader(TensorDataset(rows[test], labels[test]), batch_size=256),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--timeseries-method", default="last_timestep", choices=["last_timestep", "timestepwise"])
    parser.add_argument("--quick", action="store_true", help="2 epochs on 256 training digits, for smoke tests")
    args = parser.parse_args()
    epochs = 2 if args.quick else args.epochs

    torch.manual_seed(0)
    train_loader, test_loader = digit_sequences()
    model = DigitReader()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()

    with SaturationTracker("runs/lstm", save_to="csv", modules=model, stats=["lsat", "idim"],
                           timeseries_method=args.timeseries_method) as tracker:
        for epoch in range(epochs):
            model.train()
            for batch, (rows, labels) in enumerate(train_loader):
                if args.quick and batch == 4:
                    break
                optimizer.zero_grad()
                loss = loss_fn(model(rows), labels)
                loss.backward()
                optimizer.step()
            model.eval()
            correct = 0
            with torch.no_grad():
                for rows, labels in test_loader:
                    correct += (model(rows).argmax(1) == labels).sum().item()
            accuracy = correct / len(test_loader.dataset)
            tracker.add_scalar("accuracy", accuracy)
            results = tracker.add_saturations()
            print(f"epoch {epoch}: test accuracy {accuracy:.3f} | "
                  f"lstm saturation train {results['train-saturation_lstm']:.2f} "
                  f"eval {results['eval-saturation_lstm']:.2f}")
    print("wrote runs/lstm.csv")


if __name__ == "__main__":
    main()
