"""PyTorch Lightning: record layer saturation with delve's ``SaturationCallback``.

Run ``python examples/lightning_callback.py`` (``--quick`` for a two-epoch smoke run
on a few batches). A small CNN learns scikit-learn's 8x8 digits; the callback

* writes ``runs/lightning_callback.csv``: one row per epoch with the training
  statistics (``train-saturation_conv1``...) and those of that epoch's validation
  (``eval-saturation_conv1``...), written when the validation ends;
* logs the same numbers as ``delve/train-saturation_conv1``... through
  ``pl_module.log_dict``: into ``trainer.callback_metrics``, where the
  ``ModelCheckpoint`` below picks the epoch with the most saturated ``fc1``, and
  to the trainer's loggers, here Lightning's CSVLogger under ``runs/lightning_logs/``.

Needs ``pip install delve[lightning] scikit-learn``.
"""
import argparse
from collections import OrderedDict

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl

from delve.integrations.lightning import SaturationCallback


def digits_loaders(batch_size: int = 64) -> tuple:
    """Train and validation loaders over the digits bundled with scikit-learn."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, val = order[:1400], order[1400:]
    return (
        DataLoader(TensorDataset(images[train], labels[train]), batch_size=batch_size, shuffle=True),
        DataLoader(TensorDataset(images[val], labels[val]), batch_size=256),
    )


class DigitsCNN(pl.LightningModule):
    """conv1 -> conv2 -> fc1 -> fc2, trained with Adam on cross-entropy."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr
        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(1, 16, kernel_size=3, padding=1),
                relu1=nn.ReLU(),
                conv2=nn.Conv2d(16, 32, kernel_size=3, padding=1),
                relu2=nn.ReLU(),
                pool=nn.MaxPool2d(2),
            )
        )
        self.classifier = nn.Sequential(
            OrderedDict(flatten=nn.Flatten(), fc1=nn.Linear(32 * 4 * 4, 64), relu=nn.ReLU(), fc2=nn.Linear(64, 10))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = nn.functional.cross_entropy(self(images), labels)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.log("val_loss", nn.functional.cross_entropy(logits, labels))
        self.log("val_acc", (logits.argmax(1) == labels).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="two epochs of a few batches, for smoke tests")
    args = parser.parse_args()

    pl.seed_everything(0, verbose=False)
    train_loader, val_loader = digits_loaders()
    callback = SaturationCallback("runs/lightning_callback", stats=["lsat", "idim"])
    best = pl.callbacks.ModelCheckpoint(
        dirpath="runs/lightning_checkpoints", monitor="delve/eval-saturation_classifier-fc1", mode="max"
    )
    trainer = pl.Trainer(
        max_epochs=2 if args.quick else args.epochs,
        limit_train_batches=4 if args.quick else 1.0,
        accelerator="cpu",
        logger=pl.loggers.CSVLogger("runs", name="lightning_logs"),
        callbacks=[callback, best],
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(DigitsCNN(), train_loader, val_loader)
    saturation = {k: round(float(v), 3) for k, v in trainer.callback_metrics.items() if "saturation" in k}
    print("last epoch:", saturation)
    print("most saturated fc1 (eval):", round(best.best_model_score.item(), 3), "in", best.best_model_path)
    print("written: runs/lightning_callback.csv and", trainer.logger.log_dir)


if __name__ == "__main__":
    main()
