"""Tools that work on written outputs: rebuild the CSV from the npy files, re-threshold saturation."""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from delve import metrics
from delve.writers._files import atomic_write_bytes
from delve.writers.base import STATMAP, parse_stat_name
from delve.writers.npy import load_npy_run

_FROM_COVARIANCE: Dict[str, Callable[[np.ndarray, float], Any]] = {
    "lsat": lambda cov, thresh: metrics.compute_saturation(cov, thresh),
    "idim": lambda cov, thresh: metrics.compute_intrinsic_dimensionality(cov, thresh),
    "det": lambda cov, thresh: metrics.compute_cov_determinant(cov),
    "trc": lambda cov, thresh: metrics.compute_cov_trace(cov),
    "dtrc": lambda cov, thresh: metrics.compute_diag_trace(cov),
}
_ALIASES = {"sat": "lsat"}


def _normalize_stats(stats: Sequence[str]) -> List[str]:
    requested = [stats] if isinstance(stats, str) else list(stats)
    normalized = []
    for stat in requested:
        key = _ALIASES.get(stat, stat)
        if key not in _FROM_COVARIANCE:
            raise ValueError(
                f"stats contains {stat!r}; choose from {', '.join(map(repr, _FROM_COVARIANCE))} "
                "(the statistics that a covariance matrix determines)"
            )
        if key not in normalized:
            normalized.append(key)
    return normalized


def _scalar(array: np.ndarray) -> Any:
    return array.item() if array.ndim == 0 else None


def reconstruct_csv_from_npy_data(
    npywriter_out_path: str,
    savefile: Optional[str] = None,
    thresh: Optional[float] = None,
    stats: Sequence[str] = ("lsat", "idim"),
) -> pd.DataFrame:
    """Rebuild the table of the CSV writer from the files of the npy writer.

    Every scalar the :class:`~delve.writers.NPYWriter` saved becomes a column,
    in the order it was first logged, indexed by epoch (missing epochs are NaN),
    exactly as :class:`~delve.writers.CSVWriter` lays it out. With ``thresh``,
    the statistics ``stats`` of every layer are recomputed from the saved
    covariance matrices (``stats=['cov']`` during training) at that threshold,
    replacing the saved values; this also gives statistics that were not
    computed during training.

    Parameters
    ----------
    npywriter_out_path : str
        The folder the npy writer wrote (the tracker's ``savefile``) or its
        ``.zip`` archive.
    savefile : str, optional
        Path of a CSV file to write the table to (``;``-separated, readable with
        ``pandas.read_csv(savefile, sep=';', index_col=0)``); ``None`` writes nothing.
    thresh : float, optional
        Threshold in (0, 1] at which to recompute ``stats`` from the covariance
        matrices; ``None`` reads the saved values as they are.
    stats : list of str
        With ``thresh``: the statistics to recompute, among ``'lsat'`` (or
        ``'sat'``), ``'idim'``, ``'det'``, ``'trc'``, ``'dtrc'``. Without
        ``thresh``: a warning names each of them that was not saved.

    Returns
    -------
    pandas.DataFrame
        One row per epoch, one column per logged scalar.

    Raises
    ------
    FileNotFoundError
        If the path holds no npy output, or ``thresh`` is given but no
        covariance matrix was saved.
    ValueError
        For a ``thresh`` outside (0, 1] or an unknown statistic.

    Examples
    --------
    >>> import os, tempfile
    >>> from delve.writers import NPYWriter
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     writer = NPYWriter(os.path.join(folder, "run"))
    ...     writer.add_scalar("train-covariance-matrix_fc", np.diag([3.0, 1.0, 0.0]), global_step=0)
    ...     writer.save()
    ...     table = reconstruct_csv_from_npy_data(os.path.join(folder, "run"), thresh=0.7)
    >>> table.to_dict("records")
    [{'train-saturation_fc': 0.3333333333333333, 'train-intrinsic-dimensionality_fc': 1}]
    """
    keys = _normalize_stats(stats)
    if thresh is not None:
        metrics.check_share("thresh", thresh)
    names, values = load_npy_run(npywriter_out_path)
    if not values:
        raise FileNotFoundError(f"{npywriter_out_path!r} holds no file written by the npy writer")

    covariances = [name for name in names if (parsed := parse_stat_name(name)) and parsed.stat == "cov"]
    if thresh is not None and not covariances:
        raise FileNotFoundError(
            f"{npywriter_out_path!r} holds no covariance matrix; record stats=['cov', ...] with "
            "save_to='npy' to recompute statistics at another threshold"
        )
    recomputed: Dict[str, Dict[int, Any]] = {}
    for name in covariances if thresh is not None else []:
        parsed = parse_stat_name(name)
        for key in keys:
            recomputed[f"{parsed.mode}-{STATMAP[key]}_{parsed.layer}"] = {
                epoch: _FROM_COVARIANCE[key](cov, float(thresh)) for epoch, cov in values[name].items()
            }

    columns: Dict[str, Dict[int, Any]] = {}
    for name in names:
        if name in recomputed:
            columns[name] = recomputed[name]
        elif name in covariances and thresh is not None:
            parsed = parse_stat_name(name)
            for key in keys:
                target = f"{parsed.mode}-{STATMAP[key]}_{parsed.layer}"
                if target not in names:
                    columns[target] = recomputed[target]
        else:
            scalars = {epoch: _scalar(array) for epoch, array in values[name].items()}
            if all(value is not None for value in scalars.values()):
                columns[name] = scalars
    order = list(columns)

    if thresh is None:
        for key in keys:
            if not any((parsed := parse_stat_name(name)) and parsed.stat == key for name in order):
                warnings.warn(
                    f"no npy file holds {STATMAP[key]!r}; the table has no such column", stacklevel=2
                )
    epochs = sorted({epoch for column in columns.values() for epoch in column})
    table = pd.DataFrame(
        {name: [columns[name].get(epoch, math.nan) for epoch in epochs] for name in order}, index=epochs
    )
    if savefile is not None:
        atomic_write_bytes(savefile, table.to_csv(sep=";").encode("utf-8"))
    return table
