"""delve: how much of each layer's feature space the data uses, live during training.

Wrap a model in a :class:`SaturationTracker`, call
:meth:`~SaturationTracker.add_saturations` once per epoch, and read the
saturation, intrinsic dimensionality and other statistics of every layer from
the CSV, plots, npy files, TensorBoard or the console.
"""
from __future__ import annotations

import importlib
from typing import Any

from delve.adapters import register_adapter
from delve.covariance import TorchCovarianceMatrix
from delve.statistics import register_statistic
from delve.tracker import CheckLayerSat, SaturationTracker

__version__ = "1.0.0"
name = "delve"

# Names of delve 0.1.50 kept importable from the top level, loaded on first use.
_LAZY = {
    "csv": ("delve.writers.csv", "CSVWriter"),
    "npy": ("delve.writers.npy", "NPYWriter"),
    "tensorboard": ("delve.writers.tensorboard", "TensorBoardWriter"),
    "console": ("delve.writers.print", "PrintWriter"),
    "reconstruct_csv_from_npy_data": ("delve.tools", "reconstruct_csv_from_npy_data"),
}


# Submodules delve 0.1.50 made available on ``import delve``.
_LAZY_MODULES = ("torchcallback", "torch_utils", "tools", "logger")


def __getattr__(attribute: str) -> Any:
    if attribute in _LAZY_MODULES:
        return importlib.import_module(f"delve.{attribute}")
    if attribute in _LAZY:
        module_name, member = _LAZY[attribute]
        return getattr(importlib.import_module(module_name), member)
    raise AttributeError(f"module 'delve' has no attribute {attribute!r}")


__all__ = [
    "SaturationTracker",
    "CheckLayerSat",
    "TorchCovarianceMatrix",
    "register_adapter",
    "register_statistic",
    "reconstruct_csv_from_npy_data",
    "__version__",
]
