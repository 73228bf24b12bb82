"""TensorBoard output through tensorboardX: one scalar tag per statistic and layer, step = epoch.

Tags group the layers of one statistic in TensorBoard's dashboard: the output
name ``train-saturation_features-0`` becomes the tag
``train-saturation/features-0``; user scalars (``accuracy``) and averages
(``average-train-sat``) keep their names. A covariance matrix (statistic
``cov``) is written as the histogram of its eigenvalues under
``train-covariance-eigenvalues/<layer>``; the embedded samples of ``embed``
are left to the plot and npy writers, and so are values that are not finite
(NaN for a layer without data in a mode, an infinite condition number), which
TensorBoard cannot chart.
"""
from __future__ import annotations

import math
import numbers
import os
import time
from typing import Any, List, Mapping, Optional

import numpy as np

from delve.writers._experiment import covariance_spectrum
from delve.writers.base import AbstractWriter, parse_stat_name


def tensorboard_tag(name: str) -> str:
    """The TensorBoard tag of an output name.

    Parameters
    ----------
    name : str
        A logged name.

    Returns
    -------
    str
        ``'{mode}-{statistic}/{layer}'`` for the tracker's statistics,
        ``'{mode}-covariance-eigenvalues/{layer}'`` for covariance matrices,
        ``name`` itself for anything else.

    Examples
    --------
    >>> tensorboard_tag("eval-saturation_classifier-1")
    'eval-saturation/classifier-1'
    >>> tensorboard_tag("train-covariance-matrix_fc")
    'train-covariance-eigenvalues/fc'
    >>> tensorboard_tag("test_accuracy")
    'test_accuracy'
    """
    parsed = parse_stat_name(name)
    if parsed is None:
        return name
    head = name.partition("_")[0]
    if parsed.stat == "cov":
        head = f"{parsed.mode}-covariance-eigenvalues"
    return f"{head}/{parsed.layer}"


class TensorBoardWriter(AbstractWriter):
    """Write scalars (and covariance spectra) to TensorBoard event files in the run folder.

    Every value carries ``global_step`` = the epoch, the one the tracker passes
    or, without it, the number of :meth:`save` calls so far. On resume at epoch
    ``E`` the new event file asks TensorBoard to hide the earlier run's events
    from step ``E`` on (tensorboardX's ``purge_step``), so the curves continue
    without a fold.

    Parameters
    ----------
    savepath : str
        Folder of the event files (the tracker's ``savefile``).
    flush_secs : int
        How often tensorboardX flushes in the background; :meth:`save` flushes too.
    """

    def __init__(self, savepath: str, flush_secs: int = 30, **kwargs: Any) -> None:
        try:
            import tensorboardX  # noqa: F401  (checked here so the error comes at construction)
        except ImportError as error:
            raise ImportError(
                "save_to='tensorboard' needs tensorboardX: pip install tensorboardX"
            ) from error
        self.savepath = savepath
        self.flush_secs = flush_secs
        self.epoch = 0
        self._purge_step: Optional[int] = None
        self._writer: Any = None

    @property
    def writer(self) -> Any:
        """The underlying ``tensorboardX.SummaryWriter``, opened on first use."""
        if self._writer is None:
            from tensorboardX import SummaryWriter

            # A unique, time-ordered suffix: tensorboardX names files by the second and truncates an
            # existing file, so a resume within the same second would erase the earlier run.
            self._writer = SummaryWriter(
                self.savepath,
                purge_step=self._purge_step,
                flush_secs=self.flush_secs,
                filename_suffix=f".{time.time_ns()}",
            )
        return self._writer

    def previous_outputs(self) -> List[str]:
        if not os.path.isdir(self.savepath):
            return []
        return [
            os.path.join(self.savepath, name)
            for name in sorted(os.listdir(self.savepath))
            if name.startswith("events.out.tfevents.")
        ]

    def resume_from_saved_state(self, initial_epoch: int) -> None:
        """Number on from ``initial_epoch`` and hide the earlier run's events from that step on."""
        self.epoch = initial_epoch
        self._check_savestate_ok(self.savepath)
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._purge_step = initial_epoch

    def add_scalar(self, name: str, value: Any, global_step: Optional[int] = None, **kwargs: Any) -> None:
        """Write a number as a scalar, a covariance matrix as its spectrum, any other array as a histogram."""
        step = self.epoch if global_step is None else int(global_step)
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        parsed = parse_stat_name(name)
        if parsed is not None and parsed.stat == "embed":
            return
        if parsed is not None and parsed.stat == "cov":
            self.writer.add_histogram(tensorboard_tag(name), covariance_spectrum(value), global_step=step)
        elif isinstance(value, str):
            self.writer.add_text(name, value, global_step=step)
        elif isinstance(value, (numbers.Number, np.generic)) or np.ndim(value) == 0:
            # NaN (a layer without data in a mode) and infinities (a singular covariance's condition number)
            # cannot be charted; tensorboardX would warn about each.
            if math.isfinite(float(value)):
                self.writer.add_scalar(tensorboard_tag(name), float(value), global_step=step)
        else:
            self.writer.add_histogram(tensorboard_tag(name), np.asarray(value, dtype=np.float64), global_step=step)

    def add_scalars(self, prefix: str, value_dict: Mapping[str, Any], **kwargs: Any) -> None:
        """Write every value of ``value_dict`` under ``prefix + name`` (one tag each)."""
        for name, value in value_dict.items():
            self.add_scalar(prefix + name, value, **kwargs)

    def save(self) -> None:
        """Flush the event file and start the next epoch."""
        if self._writer is not None:
            self._writer.flush()
        self.epoch += 1

    def __getattr__(self, name: str) -> Any:
        # Other add_* methods of SummaryWriter (add_histogram, add_image...) pass straight through.
        if name.startswith("add_") and "_writer" in self.__dict__:
            return getattr(self.writer, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def close(self) -> None:
        """Flush and close the event file; a second call does nothing."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
