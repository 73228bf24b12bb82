"""Independent numpy float64 references for the tests."""
from __future__ import annotations

from typing import List

import numpy as np
import torch
from torch import nn


def population_cov(samples: np.ndarray) -> np.ndarray:
    """Population covariance (divided by n) of rows, in float64."""
    rows = np.asarray(samples, dtype=np.float64)
    centered = rows - rows.mean(axis=0)
    return centered.T @ centered / rows.shape[0]


def idim(cov: np.ndarray, thresh: float) -> int:
    """Smallest k whose k largest eigenvalues explain ``thresh`` of the variance (numpy)."""
    values = np.sort(np.clip(np.linalg.eigvalsh(cov), 0, None))[::-1]
    if values.sum() == 0:
        return 0  # k = 0 directions explain all of a zero variance
    shares = np.cumsum(values) / values.sum()
    # shares within 1e-6 of the threshold reach it: the resolution of float32 activations
    return int(np.argmax(shares >= thresh - 1e-6)) + 1


class Capture:
    """Record a module's raw outputs with a separate hook, as the reference sees them."""

    def __init__(self, module: nn.Module) -> None:
        self.outputs: List = []
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs, output) -> None:
        first = output[0] if isinstance(output, tuple) else output
        self.outputs.append(first.detach().to(torch.float64).clone())

    def remove(self) -> None:
        self.handle.remove()
