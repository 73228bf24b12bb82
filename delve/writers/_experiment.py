"""What the experiment-tracker writers (Weights & Biases, MLflow) share.

An experiment tracker charts a metric against a step, groups charts into
sections by the part of the key before the first ``/``, and costs a request
per call. So :class:`ExperimentWriter`, the base of
:class:`~delve.writers.wandb.WandbWriter` and
:class:`~delve.writers.mlflow.MLflowWriter`:

- names each output statistic first (:func:`metric_key`:
  ``train-saturation_features-0`` is ``saturation/train/features-0``), so a
  tracker's UI shows one section per statistic with a chart per mode and layer;
- gathers the values of each step (the ``global_step`` the tracker passes: the
  epoch) into one row and sends the rows, oldest step first, at
  :meth:`~ExperimentWriter.save`: one request per epoch, not one per value.
"""
from __future__ import annotations

import importlib
from abc import abstractmethod
from types import ModuleType
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from delve.writers.base import STATMAP, AbstractWriter, parse_stat_name

#: Statistic part of the key of a covariance matrix, which trackers receive as its eigenvalues.
COVARIANCE_SPECTRUM = "covariance-eigenvalues"


def import_extra(module: str, key: str) -> ModuleType:
    """Import the optional package behind ``save_to=key``, or say which extra installs it.

    Parameters
    ----------
    module : str
        The package to import (``'wandb'``).
    key : str
        The writer key, which is also the name of delve's extra.

    Returns
    -------
    module

    Raises
    ------
    ImportError
        Naming ``pip install 'delve[<key>]'`` when the package is missing.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"save_to={key!r} needs the {module} package, which is not installed: pip install 'delve[{key}]'"
        ) from error


def metric_key(name: str) -> str:
    """The key of an output name in an experiment tracker: statistic, then mode, then layer.

    Parameters
    ----------
    name : str
        A logged name.

    Returns
    -------
    str
        ``'{statistic}/{mode}/{layer}'`` for the tracker's statistics
        (``'covariance-eigenvalues/{mode}/{layer}'`` for covariance matrices),
        ``name`` itself for anything else (user scalars, averages).

    Examples
    --------
    >>> metric_key("train-saturation_features-0")
    'saturation/train/features-0'
    >>> metric_key("eval-covariance-matrix_fc")
    'covariance-eigenvalues/eval/fc'
    >>> metric_key("test_accuracy")
    'test_accuracy'
    """
    parsed = parse_stat_name(name)
    if parsed is None:
        return name
    statistic = COVARIANCE_SPECTRUM if parsed.stat == "cov" else STATMAP[parsed.stat]
    return f"{statistic}/{parsed.mode}/{parsed.layer}"


def plain_value(value: Any) -> Any:
    """A Python number for numbers and 0-d arrays or tensors, a numpy array for arrays, else ``value``.

    Examples
    --------
    >>> plain_value(np.float32(0.5)), plain_value(np.array(3)), plain_value([1, 2]).shape
    (0.5, 3, (2,))
    """
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    if isinstance(value, (list, tuple)):
        value = np.asarray(value)
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, np.generic):
        value = value.item()
    return value


def covariance_spectrum(matrix: Any) -> np.ndarray:
    """The eigenvalues of a covariance matrix, ascending, with round-off below zero clipped to zero.

    Examples
    --------
    >>> covariance_spectrum(np.diag([2.0, 1.0])).tolist()
    [1.0, 2.0]
    """
    return np.clip(np.linalg.eigvalsh(np.asarray(matrix, dtype=np.float64)), 0.0, None)


class ExperimentWriter(AbstractWriter):
    """Base of the writers to experiment trackers: one row per step, sent at :meth:`save`.

    Values are kept under their output names until :meth:`save` (or
    :meth:`close`) hands each step's row to :meth:`log_row`, oldest step
    first. A row that could not be sent (the tracker's server is unreachable)
    stays pending, with the rows after it, for the next :meth:`save`.

    Parameters
    ----------
    savepath : str, optional
        The tracker's ``savefile``; subclasses name a run they start after it.
    """

    def __init__(self, savepath: Optional[str] = None) -> None:
        self.savepath = savepath
        self.epoch = 0
        self.initial_epoch = 0
        self.pending: Dict[int, Dict[str, Any]] = {}
        #: Step and row of the latest sent row that held delve's statistics.
        self.last_statistics: Optional[Tuple[int, Dict[str, Any]]] = None
        self.closed = False

    def resume_from_saved_state(self, initial_epoch: int) -> None:
        """Number on from ``initial_epoch``; what the experiment tracker holds stays there."""
        self.epoch = self.initial_epoch = initial_epoch

    def add_scalar(self, name: str, value: Any, global_step: Optional[int] = None, **kwargs: Any) -> None:
        """Keep ``value`` for the row of step ``global_step`` (default: the current epoch)."""
        step = self.epoch if global_step is None else int(global_step)
        self.pending.setdefault(step, {})[name] = plain_value(value)

    def add_scalars(self, prefix: str, value_dict: Mapping[str, Any], **kwargs: Any) -> None:
        """Keep every value of ``value_dict`` under ``prefix + name``."""
        for name, value in value_dict.items():
            self.add_scalar(prefix + name, value, **kwargs)

    def _send_pending(self) -> None:
        for step in sorted(self.pending):
            self.log_row(step, self.pending[step])
            row = self.pending.pop(step)
            if any(parse_stat_name(name) is not None for name in row):
                self.last_statistics = (step, row)

    def save(self) -> None:
        """Send the pending rows and start the next epoch."""
        self._send_pending()
        self.epoch += 1

    def close(self) -> None:
        """Send what is still pending, then let the subclass finish; a second call does nothing."""
        if self.closed:
            return
        self.closed = True
        try:
            self._send_pending()
        finally:
            self.finish()

    @abstractmethod
    def log_row(self, step: int, row: Mapping[str, Any]) -> None:
        """Send the values of one step (output names to plain values) to the experiment tracker."""

    @abstractmethod
    def finish(self) -> None:
        """Log what belongs to the end of the run and end a run the writer started."""
