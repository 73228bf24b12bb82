"""CSV plus plots (writer keys ``plot``, ``plotcsv``, ``csvplot``, ``csvplotting``).

Besides ``<savefile>.csv`` (see :class:`~delve.writers.CSVWriter`), the writer
puts PNGs into the run folder ``<savefile>/``, named after the run ``<run>`` =
``basename(savefile)``, with the epoch zero-padded to four digits so that the
files sort in epoch order:

- ``<run>_<stat>_evolution.png``: layers-by-epochs heatmaps of saturation and
  intrinsic dimensionality over the run, train and eval side by side on one
  colour scale;
- ``<run>_<stat>_epoch_<kkkk>.png``: the statistic per layer, in forward
  order, at epoch ``k``, train and eval on the same axes;
- ``<run>_embed_<mode>_epoch_<kkkk>.png``: the embedded samples of each layer
  (statistic ``embed``) on their top two principal directions; train and eval
  stay apart, since each mode has its own directions.

A figure costs about as much as a small model's epoch, so the writer draws
every ``plot_every`` epochs (default 10) and, when it closes, the last epoch
and the heatmaps if they are not drawn yet: a short run gets its figures once,
at the end. ``plot_every=1`` draws every epoch, as delve 0.1.50 did. A mode that
did not run in an epoch is left out of that epoch's figure. Figures never go
through pyplot: the user's backend and open figures are left alone.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from delve.writers.base import parse_stat_name
from delve.writers.csv import CSVWriter, _is_scalar

#: Statistics that also get a layers-by-epochs heatmap.
EVOLUTION_STATS = ("lsat", "idim")

#: Statistics without a per-layer profile figure: ``embed`` gets scatter plots, ``samples`` (a count, not a
#: property of the layer) stays in the CSV.
_NOT_PROFILED = ("embed", "samples")


class CSVandPlottingWriter(CSVWriter):
    """Write the CSV and, after each epoch, PNG figures of the statistics into the run folder.

    Parameters
    ----------
    savepath : str
        Path of the run (the tracker's ``savefile``): the CSV is
        ``savepath + '.csv'``, the figures go into the folder ``savepath``.
    plot_manipulation_func : callable, optional
        Called with the axes of every per-layer figure before it is saved;
        returns the axes (to add lines, change limits...).
    primary_metric : str, optional
        Name of a user scalar (``'test_accuracy'``) shown in the title of each
        per-layer figure.
    fontsize : float
        Size of axis labels (16, as in delve 0.1.50); titles are a little larger, tick labels smaller.
    figsize : tuple of float, optional
        Size of the per-layer figures in inches; by default it grows with the
        number of layers and the length of their names.
    plot_every : int, optional
        Draw the figures every this many epochs (default 10; 1 for every
        epoch); ``None`` draws them only when the writer closes. Closing
        always draws what is not drawn yet.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     with CSVandPlottingWriter(os.path.join(folder, "run")) as writer:
    ...         writer.add_scalars("", {"train-saturation_fc1": 0.5, "eval-saturation_fc1": 0.25}, global_step=0)
    ...         writer.save()
    ...         writer.add_scalars("", {"train-saturation_fc1": 0.4}, global_step=1)
    ...         writer.save()
    ...     sorted(os.listdir(os.path.join(folder, "run")))  # drawn at close: the last epoch and the heatmap
    ['run_lsat_epoch_0001.png', 'run_lsat_evolution.png']
    """

    def __init__(
        self,
        savepath: str,
        plot_manipulation_func: Optional[Callable[[Any], Any]] = None,
        primary_metric: Optional[str] = None,
        fontsize: float = 16,
        figsize: Optional[Tuple[float, float]] = None,
        plot_every: Optional[int] = 10,
        **kwargs: Any,
    ) -> None:
        if plot_manipulation_func is not None and not callable(plot_manipulation_func):
            raise ValueError(
                f"plot_manipulation_func must be a function from Axes to Axes, got {plot_manipulation_func!r}"
            )
        if plot_every is not None and (isinstance(plot_every, bool) or not isinstance(plot_every, int) or plot_every < 1):
            raise ValueError(f"plot_every must be None or an int >= 1 (1 draws every epoch), got {plot_every!r}")
        import matplotlib  # noqa: F401  (checked here so the error comes at construction)

        super().__init__(savepath, **kwargs)
        self.folder = savepath
        self.run_name = os.path.basename(os.path.normpath(savepath))
        self.plot_man_func = plot_manipulation_func
        self.primary_metric = primary_metric
        self.fontsize = fontsize
        self.figsize = figsize
        self.plot_every = plot_every
        self.samples: Dict[str, Any] = {}
        self._pending: Optional[Tuple[int, Dict[str, Any], Dict[str, Any]]] = None
        self._evolution_stale = False

    def add_scalar(self, name: str, value: Any, **kwargs: Any) -> None:
        """Keep a number for the CSV and the plots, or an embedding for its scatter plot."""
        parsed = parse_stat_name(name)
        if parsed is not None and parsed.stat == "embed" and not _is_scalar(value):
            self.samples[name] = np.asarray(value)
            return
        super().add_scalar(name, value, **kwargs)

    def previous_outputs(self) -> List[str]:
        figures = []
        if os.path.isdir(self.folder):
            figures = [
                os.path.join(self.folder, name)
                for name in sorted(os.listdir(self.folder))
                if name.startswith(f"{self.run_name}_") and name.endswith(".png")
            ]
        return super().previous_outputs() + figures

    def resume_from_saved_state(self, initial_epoch: int) -> None:
        """Keep the CSV rows and figures of epochs before ``initial_epoch``; delete later figures."""
        super().resume_from_saved_state(initial_epoch)
        if not os.path.isdir(self.folder):
            return
        pattern = re.compile(rf"^{re.escape(self.run_name)}_[a-z][a-z0-9]*(_train|_eval)?_epoch_(\d+)\.png$")
        for file_name in os.listdir(self.folder):
            match = pattern.match(file_name)
            if match and int(match.group(2)) >= initial_epoch:
                os.unlink(os.path.join(self.folder, file_name))
        self._pending, self._evolution_stale = None, bool(self.rows)

    def add_sample_scalar(self, name: str, value: Any, **kwargs: Any) -> None:
        """Keep an ``(n, 2)`` array of embedded samples for this epoch's scatter plot (0.1.50 API)."""
        self.samples[name] = np.asarray(value)

    def add_scalars(
        self,
        prefix: str,
        value_dict: Mapping[str, Any],
        sample_value_dict: Optional[Mapping[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        """Keep every value of ``value_dict`` (and, as in 0.1.50, of ``sample_value_dict``)."""
        for name, value in value_dict.items():
            self.add_scalar(prefix + name, value, **kwargs)
        for name, value in (sample_value_dict or {}).items():
            self.add_sample_scalar(prefix + name, value)

    def _path(self, *parts: str) -> str:
        return os.path.join(self.folder, "_".join((self.run_name, *parts)) + ".png")

    def save(self) -> None:
        """Append the epoch's CSV row; draw the figures if the epoch is a multiple of ``plot_every``."""
        epoch, row = self.epoch, dict(self.current)
        samples, self.samples = self.samples, {}
        super().save()
        self._pending, self._evolution_stale = (epoch, row, samples), True
        if self.plot_every is not None and (epoch + 1) % self.plot_every == 0:
            self.draw()

    def draw(self) -> None:
        """Draw the last saved epoch's figures and the heatmaps now, unless they are drawn already."""
        from delve.writers import plotting

        os.makedirs(self.folder, exist_ok=True)
        if self._pending is not None:
            (epoch, row, samples), self._pending = self._pending, None
            for stat, per_mode in _by_stat(plotting.group_by_stat(row)).items():
                self._plot_profile(stat, epoch, per_mode, row)
            for mode, per_layer in _embeddings_by_mode(samples).items():
                figure = plotting.new_figure(6.4, 4.8)
                title = f"{self.run_name}: embedded samples ({mode}), epoch {epoch}"
                plotting.draw_embedding(figure, per_layer, title, color=plotting.MODE_COLORS[mode])
                plotting.save_figure(figure, self._path("embed", mode, "epoch", f"{epoch:04d}"))
        if self._evolution_stale:
            self._plot_evolutions()

    def close(self) -> None:
        """Draw what is not drawn yet; a second call does nothing."""
        if self._pending is not None or self._evolution_stale:
            self.draw()
        super().close()

    def _plot_profile(self, stat: str, epoch: int, per_mode: Mapping[str, Mapping[str, float]],
                      row: Mapping[str, Any]) -> None:
        from delve.writers import plotting

        layers = list(dict.fromkeys(layer for values in per_mode.values() for layer in values))
        values = {mode: [values.get(layer, math.nan) for layer in layers] for mode, values in per_mode.items()}
        figure = plotting.new_figure(*plotting.profile_size(layers, self.figsize))
        ax = figure.add_subplot(1, 1, 1)
        title = f"{self.run_name}: {plotting.stat_label(stat)} per layer, epoch {epoch}"
        metric = row.get(self.primary_metric) if self.primary_metric else None
        if metric is not None:
            title += f" ({self.primary_metric} {plotting.metric_text(metric)})"
        plotting.draw_profiles(ax, layers, values, stat, title, fontsize=self.fontsize,
                               ylim=(0.0, 1.0) if stat == "lsat" else None)
        if self.plot_man_func is not None:
            ax = self.plot_man_func(ax) or ax
        plotting.save_figure(ax.figure, self._path(stat, "epoch", f"{epoch:04d}"))

    def _plot_evolutions(self) -> None:
        from delve.writers import heatmap, plotting

        self._evolution_stale = False
        epochs = [epoch for epoch, _ in self.rows]
        tables: Dict[str, Dict[str, Dict[str, np.ndarray]]] = {}
        for column in self.columns:
            parsed = parse_stat_name(column)
            if parsed is not None and parsed.stat in EVOLUTION_STATS:
                series = np.array([_to_float(values.get(column, math.nan)) for _, values in self.rows])
                tables.setdefault(parsed.stat, {}).setdefault(parsed.mode, {})[parsed.layer] = series
        for stat, per_mode in tables.items():
            layers = list(dict.fromkeys(layer for values in per_mode.values() for layer in values))
            matrices = {mode: np.array([values.get(layer, np.full(len(epochs), math.nan)) for layer in layers])
                        for mode, values in per_mode.items()}
            if not any(np.isfinite(matrix).any() for matrix in matrices.values()):
                continue
            widths = _widths(tables, layers) if stat == "idim" else None
            figure = plotting.new_figure(*heatmap.evolution_size(layers, epochs, len(matrices)),
                                         layout="constrained")
            heatmap.draw_evolution(figure, layers, epochs, matrices, stat,
                                    f"{self.run_name}: {plotting.stat_label(stat)} over training",
                                    widths=widths, fontsize=self.fontsize)
            plotting.save_figure(figure, self._path(stat, "evolution"))


def _to_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _embeddings_by_mode(samples: Mapping[str, np.ndarray]) -> Dict[str, Dict[str, np.ndarray]]:
    grouped: Dict[str, Dict[str, np.ndarray]] = {}
    for name, points in samples.items():
        parsed = parse_stat_name(name)
        if parsed is not None and points.ndim == 2 and len(points):
            grouped.setdefault(parsed.mode, {})[parsed.layer] = points
    return grouped


def _by_stat(grouped: Mapping[Tuple[str, str], Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """``{stat: {mode: {layer: value}}}`` from :func:`~delve.writers.plotting.group_by_stat`, modes with data only."""
    result: Dict[str, Dict[str, Dict[str, float]]] = {}
    for (stat, mode), per_layer in grouped.items():
        values = {layer: _to_float(value) for layer, value in per_layer.items()}
        if stat not in _NOT_PROFILED and np.isfinite(list(values.values())).any():
            result.setdefault(stat, {})[mode] = values
    return result


def _widths(tables: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]], layers: list) -> Optional[list]:
    """Each layer's width, intrinsic dimensionality over saturation (both logged), or ``None`` if one is unknown."""
    widths = []
    for layer in layers:
        ratios = [idim / sat for mode, values in tables.get("idim", {}).items()
                  for idim, sat in zip(values.get(layer, ()), tables.get("lsat", {}).get(mode, {}).get(layer, ()))
                  if np.isfinite(idim) and np.isfinite(sat) and sat > 0]
        if not ratios:
            return None
        widths.append(float(round(ratios[-1])))
    return widths
