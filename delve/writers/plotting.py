"""Figures of delve's statistics, and the plotting helpers of delve 0.1.50.

Everything here draws on :class:`matplotlib.figure.Figure` objects rendered by
the Agg canvas: nothing touches pyplot's global state or the user's backend,
and a figure is gone as soon as its last reference is. PNG files are written
to a temporary name and renamed into place.

The 0.1.50 helpers keep their signatures: :func:`extract_layer_stat`,
:func:`plot_stat`, :func:`plot_stat_level_from_results` and
:func:`plot_scatter_from_results`.
"""
from __future__ import annotations

import io
import math
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from delve.writers._files import atomic_write_bytes
from delve.writers.base import STATMAP, parse_stat_name

#: Colour of each mode in every figure.
MODE_COLORS = {"train": "#1f77b4", "eval": "#2ca02c"}
_AXIS_LABELS = {
    "lsat": "saturation",
    "idim": "intrinsic dimensionality",
    "det": "covariance determinant",
    "trc": "covariance trace",
    "dtrc": "sum of eigenvalues",
}
_DPI = 110


def new_figure(width: float, height: float, layout: Optional[str] = None) -> Any:
    """A figure outside pyplot, rendered with Agg (the user's backend is left alone).

    ``width`` and ``height`` are in inches; ``layout`` is matplotlib's layout
    engine (``'constrained'``), ``None`` for none.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=_DPI, layout=layout)
    FigureCanvasAgg(figure)
    return figure


def png_bytes(figure: Any) -> bytes:
    """``figure`` as PNG bytes, cut to its content."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight", pil_kwargs={"compress_level": 1})
    return buffer.getvalue()


def save_figure(figure: Any, path: str) -> None:
    """Write ``figure`` as a PNG to ``path`` atomically.

    Figures made by :func:`new_figure` live outside pyplot: nothing needs closing,
    the figure is freed with its last reference.
    """
    atomic_write_bytes(path, png_bytes(figure), durable=False)


def stat_label(stat: str) -> str:
    """Axis label of a statistic key (``'lsat'`` -> ``'saturation'``); other strings as given."""
    return _AXIS_LABELS.get(stat, STATMAP.get(stat, stat))


def tick_fontsize(count: int, fontsize: float) -> float:
    """Size of tick labels: smaller with more of them."""
    return max(6.0, min(fontsize * 0.8, 11.0 - count / 10.0))


def profile_size(labels: Sequence[str], figsize: Optional[Tuple[float, float]] = None) -> Tuple[float, float]:
    """Figure size of the axes of a per-layer profile: wider with more layers.

    Tick labels are added outside this size when the PNG is cut to its content.
    """
    if figsize is not None:
        return figsize
    return min(max(6.4, 0.38 * len(labels) + 2.5), 28.0), 4.2


def draw_profile(
    ax: Any,
    labels: Sequence[str],
    values: Sequence[float],
    stat: str,
    title: str,
    *,
    fontsize: float = 12,
    line: bool = True,
    scatter: bool = True,
    ylim: Optional[Tuple[float, float]] = (0.0, 1.0),
    alpha_line: float = 0.6,
    alpha_scatter: float = 1.0,
    color_line: Optional[str] = None,
    color_scatter: Optional[str] = None,
    show_col_label_x: bool = True,
    show_col_label_y: bool = True,
    show_grid: bool = True,
    mean_line: bool = False,
) -> Any:
    """Draw one statistic per layer (forward order along x) on ``ax`` and return it."""
    positions = np.arange(len(labels))
    numbers = np.asarray(values, dtype=np.float64)
    if line:
        ax.plot(positions, numbers, alpha=alpha_line, color=color_line, linewidth=1.8, zorder=2)
    if scatter:
        ax.scatter(positions, numbers, alpha=alpha_scatter, color=color_scatter or color_line, s=36, zorder=3,
                   clip_on=False)
    if mean_line and np.isfinite(numbers).any():
        mean = float(np.nanmean(numbers))
        ax.axhline(mean, color="0.35", linestyle="--", linewidth=1, zorder=1, label=f"mean over layers {mean:.2f}")
        ax.legend(loc="best", fontsize=fontsize * 0.75, framealpha=0.8)
    ax.set_xticks(positions)
    tick_size = tick_fontsize(len(labels), fontsize)
    width_inches = ax.figure.get_size_inches()[0] * 0.8
    fits = max((len(label) for label in labels), default=0) * tick_size * 0.011 * len(labels) < width_inches
    if fits:
        ax.set_xticklabels(labels, fontsize=tick_size)
    else:
        ax.set_xticklabels(labels, rotation=45, ha="right", rotation_mode="anchor", fontsize=tick_size)
    ax.set_xlim(-0.5, len(labels) - 0.5)
    if ylim is not None:
        ax.set_ylim(ylim)
    else:
        finite = numbers[np.isfinite(numbers)]
        if len(finite) and finite.min() >= 0:
            ax.set_ylim(0, max(float(finite.max()) * 1.08, 1e-12))
    ax.tick_params(axis="y", labelsize=fontsize * 0.8)
    if show_col_label_x:
        ax.set_xlabel("layer (forward order)", fontsize=fontsize)
    if show_col_label_y:
        ax.set_ylabel(stat_label(stat), fontsize=fontsize)
    if show_grid:
        ax.grid(True, alpha=0.35)
    ax.set_axisbelow(True)
    ax.set_title(title, fontsize=fontsize * 1.1)
    return ax


def draw_profiles(
    ax: Any,
    labels: Sequence[str],
    values: Mapping[str, Sequence[float]],
    stat: str,
    title: str,
    *,
    fontsize: float = 12,
    ylim: Optional[Tuple[float, float]] = (0.0, 1.0),
) -> Any:
    """Draw one statistic per layer for several modes (``{'train': values, 'eval': values}``) on one axes.

    Each mode gets its colour (:data:`MODE_COLORS`) and a legend entry; with a
    single mode a dashed line marks the mean over layers of saturation.
    """
    modes = list(values)
    for index, mode in enumerate(modes):
        numbers = np.asarray(values[mode], dtype=np.float64)
        if index == 0:
            draw_profile(ax, labels, numbers, stat, title, fontsize=fontsize, ylim=ylim,
                         color_line=MODE_COLORS.get(mode), mean_line=len(modes) == 1 and stat == "lsat"
                         and len(labels) > 1)
        else:
            positions = np.arange(len(labels))
            ax.plot(positions, numbers, alpha=0.6, color=MODE_COLORS.get(mode), linewidth=1.8, zorder=2, label=mode)
            ax.scatter(positions, numbers, color=MODE_COLORS.get(mode), s=36, zorder=3, clip_on=False,
                       marker="s")
            if ylim is None:
                finite = np.concatenate([np.asarray(v, dtype=np.float64) for v in values.values()])
                finite = finite[np.isfinite(finite)]
                if len(finite) and finite.min() >= 0:
                    ax.set_ylim(0, max(float(finite.max()) * 1.08, 1e-12))
    if all(is_integral(np.asarray(v, dtype=np.float64)) for v in values.values()):
        from matplotlib.ticker import MaxNLocator

        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if len(modes) > 1:
        ax.lines[0].set_label(modes[0])
        ax.legend(loc="best", fontsize=fontsize * 0.75, framealpha=0.8)
    return ax


def is_integral(values: np.ndarray) -> bool:
    """Whether every finite value is a whole number (and there is one)."""
    finite = values[np.isfinite(values)]
    return bool(len(finite)) and bool(np.all(finite == np.round(finite)))


def wrap_name(name: str, width: int) -> str:
    """Break a long layer name into lines of at most ``width`` characters, after ``-``, ``_`` or ``.``.

    Examples
    --------
    >>> print(wrap_name("encoder-layer_with-long_name", 14))
    encoder-layer_
    with-long_name
    """
    lines, current = [], ""
    for piece in re.findall(r"[^-_.]*[-_.]?", name):
        if current and len(current) + len(piece) > width:
            lines.append(current)
            current = ""
        current += piece
    return "\n".join(lines + [current]) if current else "\n".join(lines)


def draw_embedding(
    figure: Any, samples: Mapping[str, np.ndarray], title: str, color: Optional[str] = None
) -> List[Any]:
    """Scatter each layer's samples on its top two principal directions, one panel per layer."""
    count = len(samples)
    columns = min(4, count)
    rows = math.ceil(count / columns)
    axes = []
    for index, (layer, points) in enumerate(samples.items()):
        ax = figure.add_subplot(rows, columns, index + 1)
        array = np.asarray(points, dtype=np.float64).reshape(len(points), -1)
        second = array[:, 1] if array.shape[1] > 1 else np.zeros(len(array))
        ax.scatter(array[:, 0], second, s=10, alpha=0.6, color=color, edgecolors="none")
        ax.set_title(wrap_name(f"layer {layer}", 34), fontsize=10)
        if index + columns >= count:
            ax.set_xlabel("1st principal direction", fontsize=9)
        if index % columns == 0:
            ax.set_ylabel("2nd principal direction", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
        axes.append(ax)
    figure.suptitle(title, fontsize=13)
    figure.set_size_inches(3.6 * columns + 0.5, 3.3 * rows + 0.6)
    figure.subplots_adjust(wspace=0.3, hspace=0.5)
    return axes


# ---------------------------------------------------------------- 0.1.50 API
def metric_text(value: Any) -> str:
    """A user metric as shown in figures: floats to 4 significant digits, anything else as ``str``.

    Examples
    --------
    >>> metric_text(0.912345), metric_text(3)
    ('0.9123', '3')
    """
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def draw_metric(ax: Any, name: str, value: Any, loc: Tuple[float, float], fontsize: float) -> None:
    """Write ``name: value`` in a box at ``loc`` (axes coordinates)."""
    ax.text(*loc, f"{name}: {metric_text(value)}", transform=ax.transAxes, va="top", fontsize=fontsize,
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8, "edgecolor": "0.7"})


def _stat_columns(df: pd.DataFrame, stat: str, state_mode: str) -> List[str]:
    stat_name = STATMAP.get(stat, stat)
    columns = []
    for column in df.columns:
        head = str(column).partition("_")[0]
        if head.startswith(f"{state_mode}-") and stat_name in head:
            columns.append(column)
    return columns


def extract_layer_stat(
    df: pd.DataFrame,
    epoch: int = 19,
    primary_metric: Optional[str] = None,
    stat: str = "saturation",
    state_mode: str = "train",
) -> Tuple[pd.DataFrame, Optional[float]]:
    """One epoch's values of one statistic, per layer, from the CSV writer's table.

    Parameters
    ----------
    df : pandas.DataFrame
        The table of the CSV writer (``pandas.read_csv(path, sep=';', index_col=0)``).
    epoch : int
        The epoch (index value) to take; ``-1`` for the last one.
    primary_metric : str, optional
        Name of a column (``'test_accuracy'``) whose value at that epoch is returned too.
    stat : str
        The statistic's output name (``'saturation'``) or key (``'lsat'``).
    state_mode : str
        ``'train'`` or ``'eval'``.

    Returns
    -------
    pandas.DataFrame
        A single row with the columns ``'{state_mode}-{stat}_{layer}'``.
    float or None
        The primary metric at that epoch, ``None`` without ``primary_metric``.

    Raises
    ------
    ValueError
        If the table has no row for ``epoch``.

    Examples
    --------
    >>> table = pd.DataFrame({"train-saturation_fc1": [0.2, 0.4], "loss": [1.0, 0.5]})
    >>> row, loss = extract_layer_stat(table, epoch=1, primary_metric="loss")
    >>> row.to_dict("list"), loss
    ({'train-saturation_fc1': [0.4]}, 0.5)
    """
    if epoch == -1 and len(df.index):
        epoch = df.index.values[-1]
    if not np.any(df.index.values == epoch):
        raise ValueError(f"epoch={epoch!r} is not in the table; its epochs are {list(df.index.values)}")
    epoch_df = df[df.index.values == epoch]
    metric = None if primary_metric is None else epoch_df[primary_metric].values[0]
    if isinstance(metric, np.generic):
        metric = metric.item()
    return epoch_df[_stat_columns(df, stat, state_mode)], metric


def _png_path(savepath: str, stat: str, stat_mode: str, epoch: Any) -> str:
    if savepath.endswith(".csv"):
        return f"{savepath[:-4]}_{stat}_{stat_mode}_epoch_{epoch}.png"
    return savepath


def plot_stat(
    df: pd.DataFrame,
    stat: str,
    pm: Any = -1,
    savepath: str = "run.png",
    epoch: int = 0,
    primary_metric: Optional[str] = None,
    fontsize: float = 16,
    figsize: Optional[Tuple[float, float]] = None,
    line: bool = True,
    scatter: bool = True,
    ylim: Optional[Tuple[float, float]] = (0, 1.0),
    alpha_line: float = 0.6,
    alpha_scatter: float = 1.0,
    color_line: Optional[str] = None,
    color_scatter: Optional[str] = None,
    primary_metric_loc: Tuple[float, float] = (0.7, 0.8),
    show_col_label_x: bool = True,
    show_col_label_y: bool = True,
    show_grid: bool = True,
    save: bool = True,
    samples: bool = False,
    stat_mode: str = "train",
) -> Any:
    """Plot one row of per-layer values (as :func:`extract_layer_stat` returns it).

    Parameters
    ----------
    df : pandas.DataFrame
        A single row whose columns are ``'{mode}-{statistic}_{layer}'``; with
        ``samples=True`` each cell holds an ``(n, 2)`` array of embedded samples.
    stat : str
        Statistic key (``'lsat'``), used for the axis label and the file name.
    pm : float
        Value of the primary metric, written into the plot with ``primary_metric``.
    savepath : str
        A CSV path ``run.csv`` gives ``run_{stat}_{stat_mode}_epoch_{epoch}.png``
        beside it; any other path is used as it is.
    epoch : int
        Epoch shown in the title and file name; ``-1`` takes the row's index.
    primary_metric : str, optional
        Name of the primary metric; ``None`` leaves it out.
    fontsize, figsize, line, scatter, ylim, alpha_line, alpha_scatter, color_line, color_scatter
        Appearance, as in matplotlib.
    primary_metric_loc : tuple of float
        Where the primary metric goes, in axes coordinates.
    show_col_label_x, show_col_label_y, show_grid : bool
        Axis labels and grid.
    save : bool
        Write the PNG.
    samples : bool
        Draw the embedded samples of each column instead of a per-layer profile.
    stat_mode : str
        ``'train'`` or ``'eval'``, for the title, colour and file name.

    Returns
    -------
    matplotlib.axes.Axes
        The axes drawn on (of a figure outside pyplot). A row of NaN only is
        not drawn and not saved.
    """
    if epoch == -1 and len(df.index):
        epoch = df.index.values[-1]
    color = color_line or MODE_COLORS.get(stat_mode)
    if samples:
        cells = {str(column).partition("_")[2] or str(column): df[column].values[-1] for column in df.columns}
        figure = new_figure(6.4, 4.8)
        title = f"embedded samples ({stat_mode}), epoch {epoch}"
        axes = draw_embedding(figure, cells, title, color=color_scatter or color)
        if save and axes:
            save_figure(figure, _png_path(savepath, stat, stat_mode, epoch))
        return axes[0] if axes else figure.add_subplot(1, 1, 1)
    labels = [str(column).partition("_")[2] or str(column) for column in df.columns]
    values = np.asarray(df.values[0], dtype=np.float64) if len(df) else np.zeros(0)
    figure = new_figure(*profile_size(labels, figsize))
    ax = figure.add_subplot(1, 1, 1)
    if not len(values) or np.all(np.isnan(values)):
        return ax
    draw_profile(
        ax, labels, values, stat, f"{stat_label(stat)} per layer ({stat_mode}), epoch {epoch}",
        fontsize=fontsize, line=line, scatter=scatter, ylim=ylim, alpha_line=alpha_line,
        alpha_scatter=alpha_scatter, color_line=color, color_scatter=color_scatter,
        show_col_label_x=show_col_label_x, show_col_label_y=show_col_label_y, show_grid=show_grid,
    )
    if primary_metric is not None:
        draw_metric(ax, primary_metric, pm, primary_metric_loc, fontsize * 0.8)
    if save:
        save_figure(figure, _png_path(savepath, stat, stat_mode, epoch))
    return ax


def _split_stat(stat: str, stat_mode: str) -> Tuple[str, str]:
    if "_" in stat:
        stat, stat_mode = stat.split("_", 1)
    if stat not in STATMAP:
        raise ValueError(f"stat={stat!r} is not a statistic; choose from {', '.join(map(repr, STATMAP))}")
    return stat, stat_mode


def plot_stat_level_from_results(
    savepath: str,
    epoch: int,
    stat: str,
    primary_metric: Optional[str] = None,
    fontsize: float = 16,
    figsize: Optional[Tuple[float, float]] = None,
    line: bool = True,
    scatter: bool = True,
    ylim: Optional[Tuple[float, float]] = (0, 1.0),
    alpha_line: float = 0.6,
    alpha_scatter: float = 1.0,
    color_line: Optional[str] = None,
    color_scatter: Optional[str] = None,
    primary_metric_loc: Tuple[float, float] = (0.7, 0.8),
    show_col_label_x: bool = True,
    show_col_label_y: bool = True,
    show_grid: bool = True,
    save: bool = True,
    stat_mode: str = "train",
) -> Any:
    """Plot a statistic per layer for one epoch of a CSV written by the CSV writer.

    Parameters
    ----------
    savepath : str
        Path of the CSV (``<savefile>.csv``); the PNG goes beside it as
        ``<savefile>_{stat}_{stat_mode}_epoch_{epoch}.png``.
    epoch : int
        Epoch to plot; ``-1`` for the last one.
    stat : str
        Statistic key, optionally with the mode: ``'lsat'``, ``'idim_eval'``.
    primary_metric, fontsize, figsize, line, scatter, ylim, alpha_line, alpha_scatter, color_line,
    color_scatter, primary_metric_loc, show_col_label_x, show_col_label_y, show_grid, save, stat_mode
        As in :func:`plot_stat`; ``ylim`` applies to saturation only (the
        other statistics scale to their values).

    Returns
    -------
    matplotlib.axes.Axes
    """
    stat, stat_mode = _split_stat(stat, stat_mode)
    df = pd.read_csv(savepath, sep=";", index_col=0)
    if epoch == -1:
        epoch = df.index.values[-1]
    epoch_df, pm = extract_layer_stat(df, epoch=epoch, primary_metric=primary_metric, stat=STATMAP[stat],
                                      state_mode=stat_mode)
    return plot_stat(
        epoch_df, stat, pm=pm, savepath=savepath, epoch=epoch, primary_metric=primary_metric, fontsize=fontsize,
        figsize=figsize, line=line, scatter=scatter, ylim=ylim if stat == "lsat" else None, alpha_line=alpha_line,
        alpha_scatter=alpha_scatter, color_line=color_line, color_scatter=color_scatter,
        primary_metric_loc=primary_metric_loc, show_col_label_x=show_col_label_x,
        show_col_label_y=show_col_label_y, show_grid=show_grid, save=save, stat_mode=stat_mode,
    )


def plot_scatter_from_results(savepath: str, epoch: int, stat: str, df: pd.DataFrame) -> Any:
    """Scatter the embedded samples (statistic ``embed``) of each layer for one epoch.

    Parameters
    ----------
    savepath : str
        Path of the run's CSV; the PNG goes beside it as
        ``<savefile>_embed_{mode}_epoch_{epoch}.png``.
    epoch : int
        Row of ``df`` (its index value) to draw; ``-1`` for the last one.
    stat : str
        ``'embed'`` or ``'embed_eval'``.
    df : pandas.DataFrame
        Columns ``'{mode}-embedded-sample_{layer}'``, one row per epoch, each
        cell an ``(n, 2)`` array.

    Returns
    -------
    matplotlib.axes.Axes or None
        The first panel, or ``None`` for an empty table.
    """
    if len(df) == 0:
        return None
    stat, stat_mode = _split_stat(stat, "train")
    if epoch == -1:
        epoch = df.index.values[-1]
    row = df[df.index.values == epoch]
    columns = _stat_columns(row, stat, stat_mode)
    row = row[columns] if columns else row
    return plot_stat(row, stat, savepath=savepath, epoch=epoch, samples=True, ylim=None, stat_mode=stat_mode)


def group_by_stat(values: Mapping[str, Any]) -> Dict[Tuple[str, str], Dict[str, Any]]:
    """``{(stat, mode): {layer: value}}`` of the tracker's outputs in ``values``, layers in order."""
    grouped: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for name, value in values.items():
        parsed = parse_stat_name(name)
        if parsed is not None:
            grouped.setdefault((parsed.stat, parsed.mode), {})[parsed.layer] = value
    return grouped
