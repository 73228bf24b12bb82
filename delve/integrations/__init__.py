"""Callbacks that run a :class:`~delve.tracker.SaturationTracker` inside training frameworks.

* :mod:`delve.integrations.lightning`: ``SaturationCallback`` for PyTorch Lightning
  (``pip install delve[lightning]``).
* :mod:`delve.integrations.huggingface`: ``SaturationCallback`` for the
  ``transformers`` :class:`~transformers.Trainer` (``pip install delve[hf]``).

Both take ``SaturationCallback(savefile, every_n_steps=None, log_prefix='delve/',
log_to_trainer=True, **options)`` where ``options`` are the keyword arguments of
:class:`~delve.tracker.SaturationTracker` (``save_to`` defaults to ``'csv'``,
``modules`` to the model being trained). ``import delve`` never imports this
package; each submodule imports only its own framework.

This package module holds the framework-neutral part the callbacks share.
"""
from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Dict, Optional

import numpy as np
from torch import nn

from delve.tracker import SaturationTracker

#: Keyword arguments a callback forwards to :class:`SaturationTracker`.
TRACKER_OPTIONS = tuple(name for name in inspect.signature(SaturationTracker).parameters if name != "savefile")


def scalar_results(results: Dict[str, Any], prefix: str) -> Dict[str, float]:
    """The scalar statistics of ``results`` as floats, named ``prefix + name``.

    Parameters
    ----------
    results : dict
        What :meth:`SaturationTracker.add_saturations` returned.
    prefix : str
        Put in front of every name (``'delve/'`` groups them in TensorBoard).

    Returns
    -------
    dict
        Name to float; arrays (``cov``, ``embed``) are left out.

    Examples
    --------
    >>> scalar_results({"train-saturation_fc": 0.5, "train-covariance-matrix_fc": np.eye(2)}, "delve/")
    {'delve/train-saturation_fc': 0.5}
    """
    scalars = {}
    for name, value in results.items():
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()
        if isinstance(value, (numbers.Real, np.generic)) and not isinstance(value, bool):
            scalars[prefix + name] = float(value)
    return scalars


class TrackerDriver:
    """Options, life cycle and row bookkeeping of the tracker a callback runs.

    Parameters
    ----------
    savefile : str
        Passed to :class:`SaturationTracker`.
    every_n_steps : int, optional
        ``None``: one row of statistics per epoch. An int: one row every that
        many optimizer steps.
    log_prefix : str
        Prefix of the names sent to the framework's loggers.
    options : dict
        Keyword arguments of :class:`SaturationTracker`.

    Raises
    ------
    TypeError
        If ``options`` holds a name that is not a tracker option.
    ValueError
        If ``every_n_steps`` is not ``None`` or a positive int.

    Examples
    --------
    >>> import torch
    >>> driver = TrackerDriver("runs/doc_driver", None, "delve/", {"nosave": True})
    >>> model = nn.Sequential(nn.Linear(3, 2))
    >>> _ = driver.start(model)
    >>> _ = model(torch.randn(16, 3))
    >>> driver.write_row(), driver.rows_written
    ({'delve/train-saturation_0': 1.0}, 1)
    >>> driver.close()
    """

    def __init__(self, savefile: str, every_n_steps: Optional[int], log_prefix: str, options: Dict[str, Any]) -> None:
        unknown = sorted(set(options) - set(TRACKER_OPTIONS))
        if unknown:
            raise TypeError(
                f"unknown SaturationTracker option(s) {', '.join(map(repr, unknown))}; "
                f"valid options are {', '.join(TRACKER_OPTIONS)}"
            )
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1
        ):
            raise ValueError(f"every_n_steps must be None (one row per epoch) or an int >= 1, got {every_n_steps!r}")
        if not isinstance(log_prefix, str):
            raise ValueError(f"log_prefix must be a str, got {log_prefix!r}")
        self.savefile = savefile
        self.every_n_steps = every_n_steps
        self.log_prefix = log_prefix
        self.options = dict(options)
        self.options.setdefault("save_to", "csv")
        self.tracker: Optional[SaturationTracker] = None
        #: Row number of the first row of a fresh run (the tracker's ``initial_epoch``).
        self.initial_epoch = int(self.options.pop("initial_epoch", 0))
        #: Rows written so far, including those of a run this one resumes.
        self.rows_written = self.initial_epoch

    def start(self, model: nn.Module) -> SaturationTracker:
        """Close a previous tracker and start one on ``options['modules']`` or ``model``."""
        self.close()
        options = dict(self.options)
        if options.get("modules") is None:
            options["modules"] = model
        self.tracker = SaturationTracker(self.savefile, initial_epoch=self.rows_written, **options)
        return self.tracker

    def write_row(self) -> Dict[str, float]:
        """Compute and write one row; return its scalars for the framework's loggers."""
        if self.tracker is None:
            return {}
        results = self.tracker.add_saturations()
        self.rows_written = self.tracker.epoch
        return {
            name: value
            for name, value in scalar_results(results, self.log_prefix).items()
            if not math.isnan(value)
        }

    def close(self) -> None:
        """Remove the tracker's hooks and close its writers (does nothing without a tracker)."""
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None


__all__ = ["TRACKER_OPTIONS", "TrackerDriver", "scalar_results"]
