"""Layers-by-epochs heatmaps of one statistic: train and eval side by side on one colour scale.

Used by the plot writer (``<run>_<stat>_evolution.png``) and by the HTML report.
Saturation is drawn on 0..1; intrinsic dimensionality relative to each layer's
width when the widths are known (the colour is the share of the width, the
numbers are dimensions), else on one absolute scale with integer ticks.
"""
from __future__ import annotations

import math
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from delve.writers.plotting import MODE_COLORS, is_integral, stat_label, tick_fontsize


def draw_evolution(
    figure: Any,
    layers: Sequence[str],
    epochs: Sequence[int],
    matrices: Mapping[str, np.ndarray],
    stat: str,
    title: str,
    widths: Optional[Sequence[float]] = None,
    fontsize: float = 12,
) -> List[Any]:
    """Layers-by-epochs heatmaps of one statistic, one panel per mode, all on one colour scale.

    Parameters
    ----------
    figure : matplotlib.figure.Figure
        Where to draw (best with ``layout='constrained'``).
    layers : list of str
        Row labels, in forward order.
    epochs : list of int
        Column labels.
    matrices : dict of str to numpy.ndarray
        ``{mode: (layers, epochs) array}``; NaN cells (a mode that did not run) are grey.
    stat : str
        Statistic key: ``'lsat'`` is drawn on 0..1; ``'idim'`` relative to each
        layer's width when ``widths`` are given (the colour is the share of the
        width, the numbers are dimensions), else on one absolute scale.
    title : str
        Title above the panels.
    widths : list of float, optional
        Width of each layer, for ``idim``.
    fontsize : float
        Size of axis labels.

    Returns
    -------
    list of matplotlib.axes.Axes
        One per mode, in the order of ``matrices``.
    """
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    data = {mode: np.ma.masked_invalid(np.asarray(m, dtype=np.float64).reshape(len(layers), len(epochs)))
            for mode, m in matrices.items()}
    relative = stat == "idim" and widths is not None and np.all(np.isfinite(np.asarray(widths, dtype=float)))
    if stat == "lsat":
        colour, bounds, label = dict(data), (0.0, 1.0), stat_label(stat)
    elif relative:
        scale = np.asarray(widths, dtype=np.float64)[:, None]
        colour, bounds = {mode: m / scale for mode, m in data.items()}, (0.0, 1.0)
        label = "share of the layer's width"
    else:
        everything = np.ma.concatenate([m.ravel() for m in data.values()])
        high = float(everything.max()) if everything.count() else 1.0
        low = min(0.0, float(everything.min())) if everything.count() else 0.0
        colour, bounds, label = dict(data), (low, high if high > low else low + 1.0), stat_label(stat)
    integral = all(is_integral(np.ma.filled(m, np.nan)) for m in data.values())
    cmap = colormaps["viridis"].with_extremes(bad="#e6e6e6")
    axes = figure.subplots(1, len(data), sharey=True, squeeze=False)[0]
    row_labels = [f"{layer} ({width:g})" for layer, width in zip(layers, widths)] if relative else list(layers)
    step = max(1, math.ceil(len(epochs) / (20 if len(data) == 1 else 10)))
    ticks = np.arange(0, len(epochs), step)
    image = None
    for ax, mode in zip(axes, data):
        image = ax.imshow(colour[mode], aspect="auto", cmap=cmap, vmin=bounds[0], vmax=bounds[1],
                          interpolation="nearest", origin="upper")
        ax.set_title(mode, fontsize=fontsize, color=MODE_COLORS.get(mode, "black"))
        ax.set_yticks(np.arange(len(layers)))
        ax.set_yticklabels(row_labels, fontsize=tick_fontsize(len(layers), fontsize))
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(epochs[i]) for i in ticks], fontsize=fontsize * 0.8)
        ax.set_xlabel("epoch", fontsize=fontsize)
        if len(epochs) * len(data) <= 24 and len(layers) <= 30:
            _annotate(ax, data[mode], colour[mode], bounds, integral, fontsize)
    axes[0].set_ylabel("layer (forward order)", fontsize=fontsize)
    colorbar = figure.colorbar(image, ax=list(axes), fraction=0.04, pad=0.02)
    colorbar.set_label(label, fontsize=fontsize * 0.9)
    if integral and not relative and stat != "lsat":
        colorbar.locator = MaxNLocator(integer=True)
        colorbar.update_ticks()
    if relative:
        title += "\ncolour: share of each layer's width (in brackets); numbers: dimensions"
    figure.suptitle(title, fontsize=fontsize * 1.1)
    return list(axes)


def _annotate(ax: Any, values: np.ndarray, colour: np.ndarray, bounds: Tuple[float, float], integral: bool,
              fontsize: float) -> None:
    low, high = bounds
    for row in range(values.shape[0]):
        for column in range(values.shape[1]):
            if values[row, column] is np.ma.masked:
                continue
            value = float(values[row, column])
            share = 0.5 if high <= low else (float(colour[row, column]) - low) / (high - low)
            text = f"{value:.0f}" if integral else f"{value:.2f}" if abs(value) < 10 else f"{value:.3g}"
            ax.text(column, row, text, ha="center", va="center", fontsize=fontsize * 0.62,
                    color="black" if share > 0.6 else "white")


def evolution_size(layers: Sequence[str], epochs: Sequence[int], panels: int = 1) -> Tuple[float, float]:
    """Figure size of ``panels`` heatmaps side by side: taller with more layers, wider with more epochs."""
    label = 0.07 * max((len(layer) for layer in layers), default=0)
    width = min(max(4.0, 0.3 * len(epochs) + 1.8), 9.0) * panels + 1.5 + label
    return min(width, 20.0), min(max(3.2, 0.32 * len(layers) + 1.6), 40.0)
