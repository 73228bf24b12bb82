"""Callbacks that run a :class:`~delve.tracker.SaturationTracker` inside training frameworks.

* :mod:`delve.integrations.lightning`: ``SaturationCallback`` for PyTorch Lightning
  (``pip install delve[lightning]``).
* :mod:`delve.integrations.huggingface`: ``SaturationCallback`` for the
  ``transformers`` :class:`~transformers.Trainer` (``pip install delve[hf]``).

Both take ``SaturationCallback(savefile, every_n_steps=None, log_prefix='delve/',
log_to_trainer=True, checkpoint_statistics=None, **options)`` (the Hugging Face
one also ``trainer=None``) where ``options`` are the keyword arguments of
:class:`~delve.tracker.SaturationTracker` (``save_to`` defaults to ``'csv'``,
``modules`` to the model being trained). ``import delve`` never imports this
package; each submodule imports only its own framework. The Keras callbacks
live in :mod:`delve.kerascallback`.

This package module holds the framework-neutral part the callbacks share: the
row bookkeeping of :class:`TrackerDriver` and the message a callback gives
when it continues a run (a new run moves an earlier one aside, which the
tracker says).
"""
from __future__ import annotations

import inspect
import math
import numbers
import warnings
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from delve.tracker import SaturationTracker
from delve.writers.base import MODES

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


def announce_continuation(savefile: str, row: int, reason: str) -> None:
    """Say once that a callback continues the run in ``savefile`` instead of starting a new one.

    The tracker says so itself when a new run moves an earlier one aside; this is
    the other half of that rule, shared by every trainer callback.

    Examples
    --------
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     announce_continuation("runs/lit", 3, "the checkpoint's run")
    >>> str(caught[0].message)
    "delve continues the checkpoint's run in 'runs/lit' at row 3 (the rows before it are kept)"
    """
    warnings.warn(
        f"delve continues {reason} in {savefile!r} at row {row} (the rows before it are kept)",
        UserWarning,
        stacklevel=3,
    )


#: Keys under which a dict batch holds its labels, in the order they are looked for.
LABEL_KEYS = ("labels", "label", "targets", "target", "y")


def batch_labels(batch: Any) -> Optional[torch.Tensor]:
    """The class labels of a batch, for the class-conditional statistics, or ``None``.

    A dict batch gives the first 1-D integer tensor under :data:`LABEL_KEYS`;
    a tuple or list ``(inputs, labels, ...)`` its second element when that is
    a 1-D integer tensor as long as the inputs' first dimension.

    Examples
    --------
    >>> batch_labels((torch.zeros(3, 4), torch.tensor([0, 2, 1]))).tolist()
    [0, 2, 1]
    >>> batch_labels({"input_ids": torch.zeros(2, 5), "labels": torch.tensor([1, 0])}).tolist()
    [1, 0]
    >>> batch_labels(torch.zeros(3, 4)) is None
    True
    """

    def is_labels(value: Any) -> bool:
        return isinstance(value, torch.Tensor) and value.ndim == 1 and not value.is_floating_point()

    if isinstance(batch, dict):
        return next((batch[key] for key in LABEL_KEYS if is_labels(batch.get(key))), None)
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and is_labels(batch[1]):
        inputs = batch[0]
        if isinstance(inputs, torch.Tensor) and inputs.ndim >= 1 and inputs.shape[0] == batch[1].shape[0]:
            return batch[1]
    return None


class TrackerDriver:
    """Options, life cycle and row bookkeeping of the tracker a callback runs.

    A row is written only when batches were recorded since the previous one.
    Before an evaluation that must not share a row with the training batches
    recorded so far, :meth:`park_training` sets them aside; the rows written
    then hold only evaluations, and :meth:`restore_training` puts the training
    batches back afterwards, so that they go on into the next training row.

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
    >>> _ = model(torch.randn(16, 3)); driver.note_batch("train")
    >>> driver.write_row(), driver.rows_written
    ({'delve/train-saturation_0': 1.0}, 1)
    >>> driver.write_row() is None  # nothing recorded since the last row
    True
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
        #: Row number of the first row of a new run (the tracker's ``initial_epoch``).
        self.initial_epoch = int(self.options.pop("initial_epoch", 0))
        #: Number of the next row, counting those of a run this one continues.
        self.rows_written = self.initial_epoch
        self._batches = dict.fromkeys(MODES, 0)
        self._parked: Optional[Tuple[Dict[str, Any], Dict[str, int]]] = None

    def start(self, model: nn.Module, continue_at: Optional[int] = None) -> SaturationTracker:
        """Close a previous tracker and start one on ``options['modules']`` or ``model``.

        Parameters
        ----------
        model : torch.nn.Module
            Tracked when the options name no ``modules``.
        continue_at : int, optional
            ``None`` starts a new run at ``initial_epoch`` (by the tracker's
            rule, a new run at row 0 moves an earlier run in ``savefile``
            aside). A row number continues the run there, keeping the rows
            before it.
        """
        self.close()
        options = dict(self.options)
        if options.get("modules") is None:
            options["modules"] = model
        self.rows_written = self.initial_epoch if continue_at is None else int(continue_at)
        self._batches = dict.fromkeys(MODES, 0)
        self._parked = None
        self.tracker = SaturationTracker(self.savefile, initial_epoch=self.rows_written, **options)
        return self.tracker

    def note_batch(self, mode: str) -> None:
        """Count a batch the tracker recorded in ``mode`` (``'train'`` or ``'eval'``) since the last row."""
        self._batches[mode] += 1

    def park_training(self) -> None:
        """Set the training batches recorded since the last row aside, until :meth:`restore_training`.

        Does nothing without such batches, or with ``reset_covariance=False``
        (every row then holds all training batches so far anyway).
        """
        tracker = self.tracker
        if tracker is None or self._parked is not None or not self._batches["train"] or not tracker.reset_covariance:
            return
        self._parked = (tracker.state_dict(), dict(self._batches))
        tracker.reset()
        self._batches = dict.fromkeys(MODES, 0)

    def restore_training(self) -> None:
        """Put back the training batches set aside by :meth:`park_training` (nothing happens without them)."""
        if self._parked is None or self.tracker is None:
            return
        (state, batches), self._parked = self._parked, None
        epoch = self.tracker.epoch
        self.tracker.load_state_dict(state)
        self.tracker.epoch = epoch
        self._batches = {mode: self._batches[mode] + batches[mode] for mode in MODES}

    def write_row(self) -> Optional[Dict[str, float]]:
        """Compute and write one row; return its finite scalars for the framework's loggers.

        Returns ``None`` (and writes nothing) when no batch was recorded since
        the last row.
        """
        if self.tracker is None or not any(self._batches.values()):
            return None
        results = self.tracker.add_saturations()
        self.rows_written = self.tracker.epoch
        self._batches = dict.fromkeys(MODES, 0)
        return {
            name: value
            for name, value in scalar_results(results, self.log_prefix).items()
            if not math.isnan(value)
        }

    def state_dict(self, statistics: bool) -> Dict[str, Any]:
        """The next row's number and, with ``statistics``, what was recorded since the last row."""
        state: Dict[str, Any] = {"rows_written": self.rows_written}
        if statistics and self.tracker is not None:
            # During an evaluation, the training batches set aside are what the next row still needs.
            tracker_state, batches = self._parked or (self.tracker.state_dict(), self._batches)
            state.update(tracker=tracker_state, batches=dict(batches))
        return state

    def load_statistics(self, state: Dict[str, Any]) -> None:
        """Go on with the statistics of :meth:`state_dict` (warns and starts afresh if they do not fit)."""
        if self.tracker is None or "tracker" not in state:
            return
        try:
            self.tracker.load_state_dict(state["tracker"])
        except ValueError as error:
            warnings.warn(
                f"delve could not restore the statistics stored in the checkpoint ({error}); they start afresh",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        self.tracker.epoch = self.rows_written
        # States written before the batch counts were stored: assume training batches are pending.
        self._batches = {mode: int(state.get("batches", {"train": 1}).get(mode, 0)) for mode in MODES}

    def close(self) -> None:
        """Remove the tracker's hooks and close its writers (does nothing without a tracker)."""
        self._parked = None
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None


__all__ = [
    "LABEL_KEYS",
    "TRACKER_OPTIONS",
    "TrackerDriver",
    "announce_continuation",
    "batch_labels",
    "scalar_results",
]
