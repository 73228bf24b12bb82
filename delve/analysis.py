"""Post-hoc analysis of a run: saturation tables and the low-saturation "tail".

A run is what a :class:`~delve.SaturationTracker` wrote, given as the path of
its CSV (``<savefile>.csv``) or of its savefile, as a DataFrame read from
that CSV, or as the live tracker itself. Saturation columns are named
``{train|eval}-saturation_{layer}`` and appear in the order the layers run.

"Feature Space Saturation during Training" (Shenk et al., arXiv 2006.08679)
and "Should You Go Deeper?" (Richter et al., arXiv 2106.12307) show that the
layers of a network deeper than its input resolution needs form a *tail*: a
run of final layers whose saturation sits far below the rest. Those layers
add little; :func:`find_tail` finds them.
"""
from __future__ import annotations

import math
import os
from typing import Any, List, Optional, Union

import numpy as np
import pandas as pd

from delve.metrics import check_share
from delve.writers.base import MODES, STATMAP

#: Output name of the saturation statistic, the default of the functions here.
SATURATION = STATMAP["lsat"]

Run = Union[str, "os.PathLike[str]", pd.DataFrame, Any]


def csv_path(run: Union[str, "os.PathLike[str]"]) -> str:
    """The CSV of a run given by its savefile or by the CSV's own path.

    Examples
    --------
    >>> csv_path("runs/digits")
    'runs/digits.csv'
    >>> csv_path("runs/digits.csv")
    'runs/digits.csv'
    """
    path = os.fspath(run)
    return path if path.endswith(".csv") else path + ".csv"


def load_run(run: Run) -> pd.DataFrame:
    """A run as a DataFrame: one row per epoch, one column per logged name.

    Parameters
    ----------
    run : str, os.PathLike, pandas.DataFrame or SaturationTracker
        The CSV's path or the savefile given to the tracker; a DataFrame
        (returned as is); or a tracker, whose ``last_results`` become a
        one-row frame (its CSV is read when it has no results yet).

    Returns
    -------
    pandas.DataFrame

    Raises
    ------
    FileNotFoundError
        If the CSV does not exist.
    ValueError
        If a tracker has neither results nor a CSV, or ``run`` is of another type.
    """
    if isinstance(run, pd.DataFrame):
        return run
    if isinstance(run, (str, os.PathLike)):
        path = csv_path(run)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no run at {path!r}: give the savefile passed to the tracker or its CSV")
        return pd.read_csv(path, sep=";", index_col=0)
    if hasattr(run, "last_results") and hasattr(run, "savefile"):
        scalars = {k: v for k, v in run.last_results.items() if np.ndim(v) == 0}
        if scalars:
            return pd.DataFrame([scalars], index=[max(getattr(run, "epoch", 1) - 1, 0)])
        if os.path.exists(csv_path(run.savefile)):
            return load_run(run.savefile)
        raise ValueError("the tracker has no results yet: call add_saturations() at least once")
    raise ValueError(
        f"run must be a CSV path, a savefile path, a pandas.DataFrame or a SaturationTracker, got {type(run).__name__}"
    )


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a mode; choose 'train' or 'eval'")


def available_modes(run: Run, statistic: str = SATURATION) -> List[str]:
    """The modes (``train``, ``eval``) for which the run holds ``statistic`` columns."""
    frame = load_run(run)
    return [mode for mode in MODES if any(c.startswith(f"{mode}-{statistic}_") for c in frame.columns)]


def statistic_table(run: Run, mode: str = "train", statistic: str = SATURATION) -> pd.DataFrame:
    """One statistic per layer over epochs.

    Parameters
    ----------
    run : str, os.PathLike, pandas.DataFrame or SaturationTracker
        See :func:`load_run`.
    mode : str
        ``'train'`` or ``'eval'``.
    statistic : str
        The statistic's output name, such as ``'saturation'`` or ``'intrinsic-dimensionality'``.

    Returns
    -------
    pandas.DataFrame
        Rows are epochs, columns the layer names in the order they run.

    Examples
    --------
    >>> frame = pd.DataFrame({"train-saturation_conv": [0.5, 0.6], "train-saturation_fc": [0.2, 0.3]})
    >>> statistic_table(frame).loc[1].to_dict()
    {'conv': 0.6, 'fc': 0.3}
    """
    _check_mode(mode)
    frame = load_run(run)
    prefix = f"{mode}-{statistic}_"
    columns = [c for c in frame.columns if c.startswith(prefix)]
    table = frame[columns].apply(pd.to_numeric, errors="coerce")
    table.columns = [c[len(prefix):] for c in columns]
    return table


def last_epoch(run: Run, mode: str = "train", statistic: str = SATURATION) -> pd.Series:
    """Each layer's ``statistic`` at the last epoch that recorded it in ``mode``.

    Returns
    -------
    pandas.Series
        Layer name to value, in layer order; named after the epoch. Empty when
        the run has no such values.
    """
    table = statistic_table(run, mode, statistic)
    recorded = table.dropna(how="all")
    if recorded.empty:
        return pd.Series(dtype=float)
    return recorded.iloc[-1]


def _default_mode(run: pd.DataFrame) -> str:
    modes = available_modes(run)
    if not modes:
        raise ValueError("the run holds no saturation columns ('train-saturation_<layer>'); track with stats=['lsat']")
    return modes[0]


def find_tail(
    run: Run,
    mode: Optional[str] = None,
    ratio: float = 0.7,
    min_gap: float = 0.2,
    skip_output: bool = True,
) -> List[str]:
    """The layers that form the low-saturation tail at the last epoch.

    The rule: take the saturations ``s_1 .. s_L`` of the last epoch in layer
    order (layers without a value are left out). A block of final layers
    ``s_t .. s_L`` (with at least one layer before it) is a tail when every
    layer in it is at most ``ratio`` times, and at least ``min_gap`` below,
    the median saturation of the layers before the block,
    ``m_t = median(s_1 .. s_{t-1})``:

    .. math::

        s_i \\le \\text{ratio} \\cdot m_t \\quad\\text{and}\\quad m_t - s_i \\ge \\text{min\\_gap}
        \\qquad \\text{for } t \\le i \\le L.

    The tail is the longest such block. With ``skip_output`` the output layer
    (the last one, whose width is set by the task rather than by depth) may
    stand outside the tail: when no block ends at ``L``, blocks ending at
    ``L - 1`` are tried. With no such block, the tail is empty.

    Parameters
    ----------
    run : str, os.PathLike, pandas.DataFrame or SaturationTracker
        See :func:`load_run`.
    mode : str, optional
        ``'train'`` or ``'eval'``; default: train when recorded, else eval.
    ratio : float
        How far below the median of the earlier layers a tail layer must sit, in (0, 1].
    min_gap : float
        The least absolute drop (saturation is a share, between 0 and 1).
    skip_output : bool
        Let the last layer stand outside the tail.

    Returns
    -------
    list of str
        Layer names of the tail in order; empty when there is none.

    Examples
    --------
    >>> sats = {"conv1": .45, "conv2": .7, "conv3": .75, "conv4": .28, "conv5": .15, "fc": .6}
    >>> find_tail(pd.DataFrame({f"train-saturation_{k}": [v] for k, v in sats.items()}))
    ['conv4', 'conv5']
    >>> find_tail(pd.DataFrame({f"train-saturation_{k}": [.5] for k in sats}))
    []
    """
    check_share("ratio", ratio)
    if isinstance(min_gap, bool) or not isinstance(min_gap, (int, float)) or not 0 <= min_gap <= 1:
        raise ValueError(f"min_gap must be a number in [0, 1], got {min_gap!r}")
    frame = load_run(run)
    mode = _default_mode(frame) if mode is None else mode
    _check_mode(mode)
    values = last_epoch(frame, mode).dropna()
    names, saturations = list(values.index), values.to_numpy(dtype=float)
    ends = [len(names)] + ([len(names) - 1] if skip_output and len(names) >= 3 else [])
    for end in ends:
        for start in range(1, end):
            reference = float(np.median(saturations[:start]))
            block = saturations[start:end]
            highest = float(block.max())
            if highest <= ratio * reference and reference - highest >= min_gap and math.isfinite(reference):
                return names[start:end]
    return []
