"""What a tracker records, as a table: layer, type, features, rows per forward pass, memory.

Used by :meth:`delve.SaturationTracker.summary` (and printed with ``verbose=True``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, List, Mapping, Optional

from delve.adapters import AdapterOptions
from delve.covariance import covariance_nbytes, format_bytes

if TYPE_CHECKING:
    from delve.hooks import LayerRecorder

COLUMNS = ("layer", "type", "features", "rows per forward", "memory per mode")


def _features(recorder: "LayerRecorder", options: AdapterOptions) -> Optional[int]:
    for state in recorder.modes.values():
        if state.accumulator.dim is not None:
            return state.accumulator.dim
    return recorder.adapter.features(recorder.module, options)


def _rows(recorder: "LayerRecorder", options: AdapterOptions) -> str:
    described = recorder.adapter.rows(recorder.module, options)
    if recorder.rows_per_forward is None:
        return described
    return f"{described}: {recorder.rows_per_forward} in the last batch"


def tracking_summary(
    recorders: Iterable["LayerRecorder"],
    options: AdapterOptions,
    skipped_layers: Mapping[str, int],
    as_frame: bool = False,
) -> Any:
    """The summary of ``recorders`` as text (with totals) or as a :class:`pandas.DataFrame`.

    Parameters
    ----------
    recorders : iterable of LayerRecorder
        The tracked layers.
    options : AdapterOptions
        How outputs become samples.
    skipped_layers : mapping
        Layers left out by ``memory_budget``: name to the bytes they would need.
    as_frame : bool
        Return the table as a DataFrame (one row per tracked layer; the memory
        in bytes, ``None`` where the width shows only at the first batch).

    Returns
    -------
    str or pandas.DataFrame
    """
    rows: List[dict] = []
    for recorder in recorders:
        features = _features(recorder, options)
        rows.append(
            {
                "layer": recorder.name,
                "type": type(recorder.module).__name__,
                "features": features,
                "rows per forward": _rows(recorder, options),
                "memory per mode": None if features is None else covariance_nbytes(features),
            }
        )
    if as_frame:
        import pandas as pd

        return pd.DataFrame(rows, columns=list(COLUMNS))
    cells = [
        [
            row["layer"],
            row["type"],
            "?" if row["features"] is None else str(row["features"]),
            row["rows per forward"],
            "at first batch" if row["memory per mode"] is None else format_bytes(row["memory per mode"]),
        ]
        for row in rows
    ]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(COLUMNS)]
    right = {2, 4}

    def format_row(values: List[str]) -> str:
        return "  ".join(v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths)))

    rule = "-" * len(format_row(list(COLUMNS)))
    lines = [format_row(list(COLUMNS)), rule, *(format_row(values) for values in cells), rule]
    known = [row["memory per mode"] for row in rows if row["memory per mode"] is not None]
    lines.append(
        f"{len(rows)} layer(s) tracked; statistics memory {format_bytes(sum(known))} per mode "
        "(train, and as much again once eval forwards are recorded)"
    )
    for name, nbytes in skipped_layers.items():
        lines.append(f"left out by memory_budget: {name} (would need {format_bytes(nbytes)} per mode)")
    return "\n".join(text.rstrip() for text in lines)
