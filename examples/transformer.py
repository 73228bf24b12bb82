"""Saturation of a small transformer that classifies scikit-learn's digits.

Each 8x8 digit is cut into 16 patches of 2x2 pixels; a Linear embeds each patch
as a token of 32 features, a learned position embedding is added, and a
two-layer ``nn.TransformerEncoder`` (pre-norm, 4 heads) processes the 16 tokens
before a Linear classifies their mean.

delve dispatches on the layer type, not on the rank of the output: a Linear
applied to ``(batch, tokens, features)`` makes every token a sample, and a
``MultiheadAttention`` contributes its attention output (again every token a
sample). So the saturation of ``encoder-layers-0-self_attn`` tells how many of
the 32 feature directions the attention output of the first layer really uses,
and ``encoder-layers-0-linear1`` how much of the 64-wide feed-forward layer.

While forward hooks are attached, PyTorch's encoder layer skips its fused
inference fast path and calls its sub-modules one by one, so eval statistics
are recorded too; the price is a somewhat slower evaluation while tracking.

Run ``python examples/transformer.py`` (``--quick`` for a run of a few seconds).
It writes ``runs/transformer.csv`` (one row per epoch, ``;``-separated) with the
saturation and intrinsic dimensionality of every Linear and attention layer, in
train and eval mode.
"""
import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from delve import SaturationTracker


class PatchTransformer(nn.Module):
    """Patch embedding, a transformer encoder, mean over tokens, linear classifier."""

    def __init__(self, width: int = 32, heads: int = 4, depth: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.position = nn.Parameter(torch.zeros(16, width))
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.classifier = nn.Linear(width, classes)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(self.embed(patches) + self.position)
        return self.classifier(tokens.mean(dim=1))


def digit_patches(batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    """Train and test loaders of digits as (batch, 16 patches, 4 pixels)."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    patches = images.reshape(-1, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(-1, 16, 4)
    labels = torch.tensor(digits.target)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(labels), generator=generator)
    train, test = order[:1400], order[1400:]
    return (
        DataLoader(TensorDataset(patches[train], labels[train]), batch_size=batch_size, shuffle=True,
                   generator=generator),
        DataLoader(TensorDataset(patches[test], labels[test]), batch_size=256),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="2 epochs on 256 training digits, for smoke tests")
    args = parser.parse_args()
    epochs = 2 if args.quick else args.epochs

    torch.manual_seed(0)
    train_loader, test_loader = digit_patches()
    model = PatchTransformer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()

    with SaturationTracker("runs/transformer", save_to="csv", modules=model, stats=["lsat", "idim"]) as tracker:
        print("tracking", ", ".join(tracker.layers))
        for epoch in range(epochs):
            model.train()
            for batch, (patches, labels) in enumerate(train_loader):
                if args.quick and batch == 4:
                    break
                optimizer.zero_grad()
                loss = loss_fn(model(patches), labels)
                loss.backward()
                optimizer.step()
            model.eval()
            correct = 0
            with torch.no_grad():
                for patches, labels in test_loader:
                    correct += (model(patches).argmax(1) == labels).sum().item()
            accuracy = correct / len(test_loader.dataset)
            tracker.add_scalar("accuracy", accuracy)
            results = tracker.add_saturations()
            attention = "  ".join(
                f"{name.split('_', 1)[1]}={value:.2f}"
                for name, value in results.items()
                if name.startswith("eval-saturation") and name.endswith("self_attn")
            )
            print(f"epoch {epoch}: test accuracy {accuracy:.3f} | eval saturation {attention}")
    print("wrote runs/transformer.csv")


if __name__ == "__main__":
    main()
