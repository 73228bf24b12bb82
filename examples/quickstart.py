"""Quickstart: watch the saturation of a small CNN while it learns scikit-learn's digits.

Run ``python examples/quickstart.py`` (``--quick`` for a one-epoch smoke run). It
writes ``runs/quickstart.csv`` (one row per epoch) and plots into ``runs/quickstart/``.
"""
import argparse
from collections import OrderedDict

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from delve import SaturationTracker


def digits_loaders(batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    """Train and test loaders over the 8x8 digits bundled with scikit-learn."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(labels), generator=generator)
    train, test = order[:1400], order[1400:]
    return (
        DataLoader(TensorDataset(images[train], labels[train]), batch_size=batch_size, shuffle=True, generator=generator),
        DataLoader(TensorDataset(images[test], labels[test]), batch_size=256),
    )


def small_cnn() -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 16, kernel_size=3, padding=1),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(16, 32, kernel_size=3, padding=1),
            relu2=nn.ReLU(),
            pool=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc1=nn.Linear(32 * 4 * 4, 64),
            relu3=nn.ReLU(),
            classifier=nn.Linear(64, 10),
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="one epoch, for smoke tests")
    args = parser.parse_args()
    epochs = 1 if args.quick else args.epochs

    torch.manual_seed(0)
    train_loader, test_loader = digits_loaders()
    model = small_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    stats = ["lsat", "idim", "samples"]
    with SaturationTracker("runs/quickstart", save_to="plotcsv", modules=model, stats=stats) as tracker:
        for epoch in range(epochs):
            model.train()
            for images, labels in train_loader:
                optimizer.zero_grad()
                loss = loss_fn(model(images), labels)
                loss.backward()
                optimizer.step()
            model.eval()
            correct = 0
            with torch.no_grad():
                for images, labels in test_loader:
                    correct += (model(images).argmax(1) == labels).sum().item()
            accuracy = correct / len(test_loader.dataset)
            tracker.add_scalar("accuracy", accuracy)
            results = tracker.add_saturations()
            saturations = ", ".join(
                f"{name.split('_', 1)[1]}={value:.2f}"
                for name, value in results.items()
                if name.startswith("train-saturation")
            )
            print(f"epoch {epoch}: test accuracy {accuracy:.3f} | train saturation {saturations}")
    print("wrote runs/quickstart.csv and plots in runs/quickstart/")


if __name__ == "__main__":
    main()
