"""Tools that work on written outputs: rebuild the CSV from the npy files, re-threshold saturation."""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch

from delve import metrics, statistics
from delve.writers._files import atomic_write_bytes
from delve.writers.base import parse_stat_name
from delve.writers.npy import load_npy_run

_ALIASES = {"sat": "lsat"}


def _covariance_statistics(stats: Union[str, Sequence[str]]) -> List[statistics.Statistic]:
    """The registered statistics of ``stats``; a ValueError unless a covariance matrix determines each."""
    requested = [stats] if isinstance(stats, str) else list(stats)
    choices = ", ".join(
        repr(key) for key in statistics.statistic_keys() if statistics.from_covariance(statistics.get_statistic(key))
    )
    entries: List[statistics.Statistic] = []
    for stat in requested:
        key = _ALIASES.get(stat, stat)
        if key not in statistics.statistic_keys():
            raise ValueError(f"stats contains {stat!r}, which is not a statistic; choose from {choices}")
        entry = statistics.get_statistic(key)
        if not statistics.from_covariance(entry):
            needs = [name for name in entry.inputs if name not in statistics.COVARIANCE_INPUTS]
            reason = f"it needs the {' and '.join(needs)}" if needs else "it is an array"
            raise ValueError(
                f"stats contains {stat!r}, which a saved covariance matrix does not determine ({reason}); "
                f"choose from {choices}"
            )
        if entry not in entries:
            entries.append(entry)
    return entries


def _scalar(array: np.ndarray) -> Any:
    return array.item() if array.ndim == 0 else None


def _recompute(
    names: Sequence[str],
    values: Dict[str, Dict[int, np.ndarray]],
    covariances: Sequence[str],
    entries: Sequence[statistics.Statistic],
    thresh: Optional[float],
) -> Dict[str, Dict[int, Any]]:
    """Output name to ``{epoch: value}`` of every statistic to compute from the saved covariances.

    With ``thresh``, every statistic of ``entries``; without, those not saved
    that need no threshold. One eigendecomposition per matrix serves them all.
    """
    recomputed: Dict[str, Dict[int, Any]] = {}
    for name in covariances:
        parsed = parse_stat_name(name)
        targets = {
            f"{parsed.mode}-{entry.name}_{parsed.layer}": entry
            for entry in entries
            if thresh is not None
            or ("threshold" not in entry.inputs and f"{parsed.mode}-{entry.name}_{parsed.layer}" not in names)
        }
        for target in targets:
            recomputed[target] = {}
        for epoch, cov in values[name].items():
            inputs = statistics.LayerInputs(torch.tensor(cov, dtype=torch.float64), None, None, thresh)
            for target, entry in targets.items():
                recomputed[target][epoch] = statistics.evaluate(entry, inputs)
    return recomputed


def reconstruct_csv_from_npy_data(
    npywriter_out_path: str,
    savefile: Optional[str] = None,
    thresh: Optional[float] = None,
    stats: Sequence[str] = ("lsat", "idim"),
) -> pd.DataFrame:
    """Rebuild the table of the CSV writer from the files of the npy writer.

    Every scalar the :class:`~delve.writers.NPYWriter` saved becomes a column,
    in the order it was first logged, indexed by epoch (missing epochs are NaN),
    exactly as :class:`~delve.writers.CSVWriter` lays it out. Statistics are
    computed from the saved covariance matrices (``stats=['cov', ...]`` during
    training), through the same functions as the tracker's: with ``thresh``,
    every statistic of ``stats`` of every layer, at that threshold, replacing
    the saved values; without it, those of ``stats`` that were not saved and
    need no threshold (effective rank, entropy...).

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
        matrices; ``None`` keeps the saved values.
    stats : list of str
        Statistics that a covariance matrix determines: ``'lsat'`` (or
        ``'sat'``), ``'idim'``, ``'det'``, ``'trc'``, ``'dtrc'``, ``'erank'``,
        ``'rankme'``, ``'pr'``, ``'srank'``, ``'cond'``, ``'entropy'``,
        ``'alpha'``, and any registered with :func:`delve.register_statistic`
        whose function asks for nothing but the eigenvalues, covariance,
        threshold or eigenvectors. A warning names each of them that is
        neither saved nor computed.

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
        For a ``thresh`` outside (0, 1], or a statistic that is unknown or
        needs more than a covariance matrix.

    Examples
    --------
    >>> import os, tempfile
    >>> from delve.writers import NPYWriter
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     writer = NPYWriter(os.path.join(folder, "run"))
    ...     writer.add_scalar("train-covariance-matrix_fc", np.diag([3.0, 1.0, 0.0]), global_step=0)
    ...     writer.save()
    ...     table = reconstruct_csv_from_npy_data(os.path.join(folder, "run"), thresh=0.7)
    ...     ranks = reconstruct_csv_from_npy_data(os.path.join(folder, "run"), stats=["srank", "pr"])
    >>> table.to_dict("records")
    [{'train-saturation_fc': 0.3333333333333333, 'train-intrinsic-dimensionality_fc': 1}]
    >>> ranks.to_dict("records")
    [{'train-stable-rank_fc': 1.3333333333333333, 'train-participation-ratio_fc': 1.6}]
    """
    entries = _covariance_statistics(stats)
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
    recomputed = _recompute(names, values, covariances, entries, thresh)

    columns: Dict[str, Dict[int, Any]] = {}
    for name in names:
        if name in recomputed:
            columns[name] = recomputed[name]
        elif name in covariances:
            parsed = parse_stat_name(name)
            for entry in entries:
                target = f"{parsed.mode}-{entry.name}_{parsed.layer}"
                if target in recomputed and target not in names:
                    columns[target] = recomputed[target]
        else:
            scalars = {epoch: _scalar(array) for epoch, array in values[name].items()}
            if all(value is not None for value in scalars.values()):
                columns[name] = scalars
    order = list(columns)

    for entry in entries:
        if not any((parsed := parse_stat_name(name)) and parsed.stat == entry.key for name in order):
            hint = " (give thresh to compute it from the saved covariance matrices)" if covariances else ""
            warnings.warn(f"no npy file holds {entry.name!r}; the table has no such column{hint}", stacklevel=2)
    epochs = sorted({epoch for column in columns.values() for epoch in column})
    table = pd.DataFrame(
        {name: [columns[name].get(epoch, math.nan) for epoch in epochs] for name in order}, index=epochs
    )
    if savefile is not None:
        atomic_write_bytes(savefile, table.to_csv(sep=";").encode("utf-8"))
    return table
