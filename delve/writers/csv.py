"""CSV output: one row per epoch, readable with ``pandas.read_csv(path, sep=';', index_col=0)``."""
from __future__ import annotations

import csv
import io
import math
import numbers
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from delve.writers._files import append_bytes, atomic_write_bytes
from delve.writers.base import AbstractWriter


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (numbers.Number, str, np.generic)) or (
        isinstance(value, np.ndarray) and value.ndim == 0
    )


def _format(value: Any) -> str:
    if isinstance(value, np.ndarray):
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        return "" if math.isnan(number) else repr(number)
    return str(value)


def _parse(text: str) -> Any:
    if text == "":
        return float("nan")
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


class CSVWriter(AbstractWriter):
    """Write every scalar to ``<savepath>.csv``, one row per :meth:`save` (per epoch).

    The first column is the epoch (an unnamed index): the ``global_step`` the
    tracker passes, so epochs left out (a callback's ``freq``) leave gaps, else
    one more than the last saved row. The other columns are the
    logged names in the order they first appeared. Array values (``cov``,
    ``embed``) are left to the other writers. A row is appended in one write; a
    column that appears late makes the writer rewrite the file once, through an
    atomic replace, with NaN (an empty field) in the earlier rows. So a crash at
    any moment leaves a readable file with every saved row.

    Parameters
    ----------
    savepath : str
        Path of the run without extension; the file is ``savepath + '.csv'``.
    """

    def __init__(self, savepath: str, **kwargs: Any) -> None:
        self.savepath = savepath
        self.path = savepath + ".csv"
        self.epoch = 0
        self.columns: List[str] = []
        self.rows: List[Tuple[int, Dict[str, Any]]] = []
        self.current: Dict[str, Any] = {}
        self._written_columns: List[str] | None = None

    def previous_outputs(self) -> List[str]:
        return [self.path] if os.path.exists(self.path) else []

    def resume_from_saved_state(self, initial_epoch: int) -> None:
        """Keep the rows of epochs before ``initial_epoch`` and continue numbering there."""
        self.epoch = initial_epoch
        self.rows, self.columns = [], []
        if not self._check_savestate_ok(self.path):
            return
        with open(self.path, newline="") as handle:
            reader = csv.reader(handle, delimiter=";")
            header = next(reader, [""])[1:]
            for record in reader:
                if not record:
                    continue
                epoch = int(record[0])
                if epoch < initial_epoch:
                    self.rows.append((epoch, {n: _parse(v) for n, v in zip(header, record[1:]) if v != ""}))
        self.columns = list(header)
        self._rewrite()

    def add_scalar(self, name: str, value: Any, global_step: Optional[int] = None, **kwargs: Any) -> None:
        """Keep a scalar for the row of epoch ``global_step`` (default: the epoch after the last saved one)."""
        if global_step is not None:
            self.epoch = int(global_step)
        if not _is_scalar(value):
            return
        if name not in self.current and name not in self.columns:
            self.columns.append(name)
        self.current[name] = value

    def add_scalars(self, prefix: str, value_dict: Mapping[str, Any], **kwargs: Any) -> None:
        for name, value in value_dict.items():
            self.add_scalar(prefix + name, value, **kwargs)

    def _encode(self, rows: List[Tuple[int, Dict[str, Any]]], header: bool) -> bytes:
        buffer = io.StringIO()
        out = csv.writer(buffer, delimiter=";", lineterminator="\n")
        if header:
            out.writerow([""] + self.columns)
        for epoch, values in rows:
            out.writerow([epoch] + [_format(values[c]) if c in values else "" for c in self.columns])
        return buffer.getvalue().encode("utf-8")

    def _rewrite(self) -> None:
        atomic_write_bytes(self.path, self._encode(self.rows, header=True))
        self._written_columns = list(self.columns)

    def save(self) -> None:
        """Close the epoch: append its row, or rewrite the file once if it brought new columns."""
        row = (self.epoch, self.current)
        self.rows.append(row)
        self.current = {}
        self.epoch += 1
        try:
            if self._written_columns == self.columns and os.path.exists(self.path):
                append_bytes(self.path, self._encode([row], header=False))
            else:
                self._rewrite()
        except OSError:
            # The rows stay in memory; the next save rewrites the whole file with them.
            self._written_columns = None
            raise

    def close(self) -> None:
        """Nothing stays open between saves; kept for the writer interface."""
