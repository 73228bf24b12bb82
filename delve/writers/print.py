"""Console output as plain ``name: value`` lines."""
from __future__ import annotations

from typing import Any, Mapping, TextIO, Optional
import sys

import numpy as np

from delve.writers.base import AbstractWriter


class PrintWriter(AbstractWriter):
    """Print each logged scalar as ``name: value`` when it is logged.

    Arrays (``cov``, ``embed``) are summarised by their shape.

    Parameters
    ----------
    stream : file-like, optional
        Where to print; ``sys.stdout`` by default.
    """

    def __init__(self, stream: Optional[TextIO] = None, **kwargs: Any) -> None:
        self.stream = stream

    def resume_from_saved_state(self, initial_epoch: int) -> None:
        """Printing keeps no state."""

    def add_scalar(self, name: str, value: Any, **kwargs: Any) -> None:
        if isinstance(value, np.ndarray) and value.ndim > 0:
            value = f"array of shape {value.shape}"
        elif isinstance(value, float):
            value = f"{value:.6g}"
        print(f"{name}: {value}", file=self.stream or sys.stdout)

    def add_scalars(self, prefix: str, value_dict: Mapping[str, Any], **kwargs: Any) -> None:
        for name, value in value_dict.items():
            self.add_scalar(prefix + name, value)

    def save(self) -> None:
        """Printing writes immediately; nothing to save."""

    def close(self) -> None:
        """Nothing to release."""
