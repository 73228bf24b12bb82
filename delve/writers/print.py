"""Console output as plain ``name: value`` lines."""
from __future__ import annotations

import sys
from typing import Any, Mapping, Optional, TextIO

import numpy as np

from delve.writers.base import AbstractWriter


class PrintWriter(AbstractWriter):
    """Print each logged scalar as ``name: value`` when it is logged.

    Arrays (``cov``, ``embed``) are summarised by their shape.

    Parameters
    ----------
    stream : file-like, optional
        Where to print; ``sys.stdout`` by default.

    Examples
    --------
    >>> writer = PrintWriter()
    >>> writer.add_scalars("", {"train-saturation_fc": 0.25, "train-covariance-matrix_fc": np.eye(2)})
    train-saturation_fc: 0.25
    train-covariance-matrix_fc: array of shape (2, 2)
    """

    def __init__(self, stream: Optional[TextIO] = None, **kwargs: Any) -> None:
        self.stream = stream

    def resume_from_saved_state(self, initial_epoch: int) -> None:
        """Printing keeps no state."""

    def add_scalar(self, name: str, value: Any, **kwargs: Any) -> None:
        """Print ``name: value`` now (floats to 6 significant digits, arrays as their shape)."""
        if isinstance(value, np.ndarray) and value.ndim > 0:
            value = f"array of shape {value.shape}"
        elif isinstance(value, float):
            value = f"{value:.6g}"
        print(f"{name}: {value}", file=self.stream or sys.stdout)

    def add_scalars(self, prefix: str, value_dict: Mapping[str, Any], **kwargs: Any) -> None:
        """Print every value of ``value_dict`` under ``prefix + name``."""
        for name, value in value_dict.items():
            self.add_scalar(prefix + name, value)

    def save(self) -> None:
        """Printing writes immediately; nothing to save."""

    def close(self) -> None:
        """Nothing to release."""
