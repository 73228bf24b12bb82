"""Extract layer saturation: the two-layer regression network of delve's gallery.

A two-layer network regresses random targets from random inputs, once with a
hidden layer of 3 units and once with 32. delve records the saturation of both
Linear layers on the training batch (train mode) and, after each epoch, on a
held-out batch (eval mode). The 10 outputs of ``linear2`` are an affine
function of the hidden units, so with 3 hidden units one forward pass spans at
most 3 directions: the eval saturation of ``linear2`` is at most 3/10. The train
statistics pool the outputs of every step of the epoch, taken with weights that
change from step to step, so they may exceed that bound a little. Only the wide
network fits the random targets.

As in delve 0.1.50's gallery example the layers are handed over as a list and
``stats=["lsat", "lsat_eval"]`` is accepted (``lsat`` already covers train and
eval). Unlike 0.1.50, the covariance accumulates every batch between two calls
of ``add_saturations()``, so this script calls it once per "epoch" of
``--steps-per-epoch`` optimisation steps instead of after every step, and
evaluates once per epoch.

Run ``python examples/regression.py`` (``--quick`` for a run of a few seconds).
It writes ``runs/regression/h3.csv`` and ``runs/regression/h32.csv`` (one row
per epoch, ``;``-separated) and, with the default ``--save-to plotcsv``, plots
into ``runs/regression/h3/`` and ``runs/regression/h32/``.
"""
import argparse

import torch
from torch import nn

from delve import SaturationTracker


class TwoLayerNet(nn.Module):
    """``linear2(relu(linear1(x)))``."""

    def __init__(self, d_in: int, hidden: int, d_out: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_in, hidden)
        self.linear2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.linear1(x).clamp(min=0))


def train(hidden: int, epochs: int, steps_per_epoch: int, save_to: str) -> dict:
    """Fit one network and return the statistics of its last epoch."""
    # N is the batch size, D_in the input dimension, D_out the output dimension.
    n, d_in, d_out = 64, 1000, 10
    x, y = torch.randn(n, d_in), torch.randn(n, d_out)
    x_test, y_test = torch.randn(n, d_in), torch.randn(n, d_out)

    model = TwoLayerNet(d_in, hidden, d_out)
    # Hand delve the layers to watch as a list, or the whole model to track every supported layer.
    layers = [model.linear1, model.linear2]
    loss_fn = nn.MSELoss(reduction="sum")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    results: dict = {}
    with SaturationTracker(f"runs/regression/h{hidden}", save_to=save_to, modules=layers,
                           stats=["lsat", "lsat_eval"]) as tracker:
        for epoch in range(epochs):
            model.train()
            for _ in range(steps_per_epoch):
                loss = loss_fn(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            model.eval()
            with torch.no_grad():
                loss_test = loss_fn(model(x_test), y_test)
            tracker.add_scalar("train-loss", loss.item())
            tracker.add_scalar("test-loss", loss_test.item())
            results = tracker.add_saturations()
            saturations = "  ".join(f"{name}={value:.2f}" for name, value in results.items()
                                    if name.endswith("Linear"))
            print(f"h={hidden} epoch {epoch}: loss={loss.item():.4g}  {saturations}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--steps-per-epoch", type=int, default=100)
    parser.add_argument("--save-to", default="plotcsv", help="writer key(s), comma-separated (default plotcsv)")
    parser.add_argument("--quick", action="store_true", help="2 epochs of 5 steps, for smoke tests")
    args = parser.parse_args()
    epochs, steps = (2, 5) if args.quick else (args.epochs, args.steps_per_epoch)
    save_to = args.save_to.split(",") if "," in args.save_to else args.save_to

    torch.manual_seed(1)
    for hidden in (3, 32):
        train(hidden, epochs, steps, save_to)
    print("wrote runs/regression/h3.csv and runs/regression/h32.csv")


if __name__ == "__main__":
    main()
