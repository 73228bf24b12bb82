"""A CNN deeper than its input needs: a saturation tail at 8 px that shrinks at 48 px.

The same ten-layer CNN is trained on scikit-learn's digits twice: at their
native 8x8 pixels and upsampled to 48x48. Its receptive field grows to 54
pixels (3x3 convolutions, two 2x2 max-pools), so at 8 px every layer after
the first pool already sees the whole image before it starts: those layers are
unproductive ("Should You Go Deeper?", arXiv 2106.12307) and the last stage's
saturation drops into a tail ("Feature Space Saturation during Training",
arXiv 2006.08679), while the probe accuracy stops improving. At 48 px every
layer still integrates new context: the last stage stays as saturated as the
rest, and only the layer right before global pooling stays low (it compresses
to the classes at any resolution; the report says so).

For each resolution the script writes, under ``runs/``:

- ``tail_resolution_<N>px.csv``: saturation per layer, train and eval, per epoch;
- ``tail_resolution_<N>px/receptive_fields.json``: the traced receptive fields;
- ``tail_resolution_<N>px/probes.csv``: logistic-regression probe accuracy per layer;
- ``tail_resolution_<N>px/report.html``: the report, also written by
  ``python -m delve report runs/tail_resolution_<N>px``.

and prints the findings of :func:`delve.analysis.diagnose` (also
``python -m delve diagnose runs/tail_resolution_<N>px``): at 8 px a ``warn``
that the tail's receptive fields cover the input, with the resolution to
raise it to, and the probes' verdict on the tail; at 48 px no warning.

A full run takes a few minutes on a laptop CPU.

Run ``python examples/tail_resolution.py`` (``--quick`` for a run of a few seconds).
"""
import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from delve import SaturationTracker
from delve.analysis import diagnose
from delve.probes import linear_probes, probes_to_frame
from delve.receptive_field import save_receptive_fields
from delve.report import format_findings, report


def conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU())


class DeepCNN(nn.Module):
    """Three 3x3 convolutions, pool, three more, pool, four more, global average pool, linear classifier.

    Receptive fields: 3, 5, 7 | 12, 16, 20 | 30, 38, 46, 54 pixels (each pool adds 1 step and doubles it).
    """

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv(1, 16), conv(16, 16), conv(16, 16), nn.MaxPool2d(2),
            conv(16, 32), conv(32, 32), conv(32, 32), nn.MaxPool2d(2),
            conv(32, 64), conv(64, 64), conv(64, 64), conv(64, 64),
        )
        self.classifier = nn.Linear(64, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images).mean(dim=(2, 3)))


def digit_loaders(resolution: int, batch_size: int = 64, limit: int = 0) -> tuple:
    """Train/test loaders of the digits, upsampled (bilinear) to ``resolution`` pixels."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if resolution != 8:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(labels), generator=generator)
    train, test = order[:1400], order[1400:]
    if limit:
        train, test = train[:limit], test[: limit // 2]
    return (
        DataLoader(TensorDataset(images[train], labels[train]), batch_size=batch_size, shuffle=True,
                   generator=generator),
        DataLoader(TensorDataset(images[test], labels[test]), batch_size=256),
    )


def accuracy(model: nn.Module, loader: DataLoader) -> float:
    correct = total = 0
    with torch.no_grad():
        for images, labels in loader:
            correct += int((model(images).argmax(dim=1) == labels).sum())
            total += len(labels)
    return correct / total


def run(resolution: int, epochs: int, limit: int, probe_epochs: int) -> str:
    torch.manual_seed(0)
    train_loader, test_loader = digit_loaders(resolution, limit=limit)
    model = DeepCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = nn.CrossEntropyLoss()
    savefile = f"runs/tail_resolution_{resolution}px"
    with SaturationTracker(savefile, save_to="csv", modules=model, stats=["lsat", "idim"]) as tracker:
        for epoch in range(epochs):
            model.train()
            for images, labels in train_loader:
                optimizer.zero_grad()
                loss_fn(model(images), labels).backward()
                optimizer.step()
            model.eval()
            tracker.add_scalar("test_accuracy", accuracy(model, test_loader))
            tracker.add_saturations()
    save_receptive_fields(f"{savefile}/receptive_fields.json", model, (1, resolution, resolution))
    probes = linear_probes(model, train_loader, test_loader, epochs=probe_epochs)
    probes_to_frame(probes).to_csv(f"{savefile}/probes.csv")
    path = report(savefile, model=model, input_size=(1, resolution, resolution))
    findings = diagnose(savefile, model=model)  # receptive_fields.json and probes.csv come from the run folder
    print(f"{resolution} px: report {path}\n{format_findings(findings)}\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[8, 48])
    parser.add_argument("--quick", action="store_true", help="1 epoch on 128 digits, for smoke tests")
    args = parser.parse_args()
    for resolution in args.resolutions:
        if args.quick:
            run(resolution, epochs=1, limit=128, probe_epochs=1)
        else:
            run(resolution, epochs=args.epochs, limit=0, probe_epochs=10)


if __name__ == "__main__":
    main()
