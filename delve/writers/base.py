"""The writer interface every output format implements, and the writer that fans out to several.

A writer receives plain values (Python numbers, numpy arrays) under names such as
``train-saturation_features-0``. The tracker calls :meth:`AbstractWriter.add_scalars`
once per :meth:`~delve.SaturationTracker.add_saturations` with ``global_step`` set
to the epoch, then :meth:`AbstractWriter.save`. Every ``save()`` closes one epoch;
user scalars added with ``add_scalar`` belong to the epoch being filled.
"""
from __future__ import annotations

import os
import warnings
from abc import ABC, abstractmethod
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional

STATMAP: Dict[str, str] = {
    "idim": "intrinsic-dimensionality",
    "lsat": "saturation",
    "cov": "covariance-matrix",
    "det": "covariance-determinant",
    "trc": "covariance-trace",
    "dtrc": "diagonal-trace",
    "embed": "embedded-sample",
    "samples": "samples",
    "nc1": "nc1",
    "cdnv": "class-distance-normalized-variance",
    "erank": "effective-rank",
    "rankme": "rankme",
    "pr": "participation-ratio",
    "srank": "stable-rank",
    "cond": "condition-number",
    "entropy": "matrix-entropy",
    "alpha": "power-law-alpha",
}
"""Statistic keys and the names they carry in every output (statistics registered later are added)."""

MODES = ("train", "eval")
"""The modes a statistic is recorded in, decided by the layer's ``training`` flag."""


class StatName(NamedTuple):
    """The parts of an output name ``'{mode}-{statistic}_{layer}'``."""

    mode: str
    stat: str
    layer: str


def parse_stat_name(name: str) -> Optional[StatName]:
    """Split an output name of the tracker into mode, statistic key and layer.

    Parameters
    ----------
    name : str
        A logged name such as ``'train-saturation_features-0'``.

    Returns
    -------
    StatName or None
        ``(mode, stat, layer)`` with ``stat`` a key of :data:`STATMAP`, or
        ``None`` for any other name (a user scalar, an average).

    Examples
    --------
    >>> parse_stat_name("eval-intrinsic-dimensionality_classifier-1")
    StatName(mode='eval', stat='idim', layer='classifier-1')
    >>> parse_stat_name("test_accuracy") is None
    True
    """
    head, sep, layer = name.partition("_")
    mode, dash, stat_name = head.partition("-")
    key = next((key for key, known in STATMAP.items() if known == stat_name), None)
    if not sep or not dash or not layer or mode not in MODES or key is None:
        return None
    return StatName(mode, key, layer)


class AbstractWriter(ABC):
    """Base class of all writers; subclass it to send delve's statistics anywhere.

    A subclass implements :meth:`add_scalar`, :meth:`add_scalars`, :meth:`save`,
    :meth:`close` and :meth:`resume_from_saved_state`. Writers are context
    managers: leaving the ``with`` block closes them.

    Examples
    --------
    >>> class ListWriter(AbstractWriter):
    ...     def __init__(self, **kwargs):
    ...         self.rows, self.current = [], {}
    ...     def resume_from_saved_state(self, initial_epoch):
    ...         pass
    ...     def add_scalar(self, name, value, **kwargs):
    ...         self.current[name] = value
    ...     def add_scalars(self, prefix, value_dict, **kwargs):
    ...         for name, value in value_dict.items():
    ...             self.add_scalar(prefix + name, value)
    ...     def save(self):
    ...         self.rows.append(self.current)
    ...         self.current = {}
    ...     def close(self):
    ...         pass
    >>> writer = ListWriter()
    >>> writer.add_scalar("loss", 0.5); writer.save(); writer.rows
    [{'loss': 0.5}]
    """

    def _check_savestate_ok(self, savepath: str) -> bool:
        """Whether the saved state at ``savepath`` exists; warns when it does not."""
        if not os.path.exists(savepath):
            warnings.warn(
                f"{savepath} does not exist, {type(self).__name__} cannot resume from it and starts afresh",
                stacklevel=2,
            )
            return False
        return True

    def previous_outputs(self) -> List[str]:
        """Files this writer would write that exist already: outputs of an earlier run in the same place.

        A tracker that starts a fresh run (``initial_epoch=0``) moves them
        aside before the first epoch, so that no stale file passes for one of
        the new run. Writers that keep nothing on disk return an empty list
        (the default).
        """
        return []

    @abstractmethod
    def resume_from_saved_state(self, initial_epoch: int) -> None:
        """Continue an earlier run: keep what was written before ``initial_epoch``, number on from it."""

    @abstractmethod
    def add_scalar(self, name: str, value: Any, **kwargs: Any) -> None:
        """Record one value under ``name`` for the current epoch."""

    @abstractmethod
    def add_scalars(self, prefix: str, value_dict: Mapping[str, Any], **kwargs: Any) -> None:
        """Record several values; their names are ``prefix + name``."""

    @abstractmethod
    def save(self) -> None:
        """Persist the current epoch and start the next one."""

    @abstractmethod
    def close(self) -> None:
        """Release files and handles; calling it twice is harmless."""

    def __enter__(self) -> "AbstractWriter":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class CompositWriter(AbstractWriter):
    """Send everything to several writers, in order.

    Parameters
    ----------
    writers : list of AbstractWriter
        The writers to call.
    """

    def __init__(self, writers: Iterable[AbstractWriter]) -> None:
        self.writers: List[AbstractWriter] = list(writers)

    def resume_from_saved_state(self, initial_epoch: int) -> None:
        for writer in self.writers:
            writer.resume_from_saved_state(initial_epoch)

    def previous_outputs(self) -> List[str]:
        return sorted({path for writer in self.writers for path in writer.previous_outputs()})

    def add_scalar(self, name: str, value: Any, **kwargs: Any) -> None:
        for writer in self.writers:
            writer.add_scalar(name, value, **kwargs)

    def add_scalars(self, prefix: str, value_dict: Mapping[str, Any], **kwargs: Any) -> None:
        for writer in self.writers:
            writer.add_scalars(prefix, value_dict, **kwargs)

    def save(self) -> None:
        """Save every writer, even when one fails; the first failure is raised afterwards."""
        failure: OSError | None = None
        for writer in self.writers:
            try:
                writer.save()
            except OSError as error:
                failure = failure or error
        if failure is not None:
            raise failure

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


class NullWriter(AbstractWriter):
    """A writer that drops everything: what ranks other than 0 get, so that they never touch files.

    Every ``add_*`` method (also backend-specific ones such as ``add_histogram``)
    exists and does nothing.

    Examples
    --------
    >>> writer = NullWriter()
    >>> writer.add_scalar("loss", 0.5); writer.add_histogram("w", [1, 2]); writer.save()
    """

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    def resume_from_saved_state(self, initial_epoch: int) -> None:
        """Nothing to resume."""

    def add_scalar(self, name: str, value: Any, **kwargs: Any) -> None:
        """Drop the value."""

    def add_scalars(self, prefix: str, value_dict: Mapping[str, Any], **kwargs: Any) -> None:
        """Drop the values."""

    def save(self) -> None:
        """Nothing to persist."""

    def close(self) -> None:
        """Nothing to release."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name.startswith("add_"):
            return _ignore
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None
