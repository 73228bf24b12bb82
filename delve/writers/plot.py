"""CSV plus plots (writer keys ``plot``, ``plotcsv``, ``csvplot``, ``csvplotting``).

Besides ``<savefile>.csv`` (see :class:`~delve.writers.CSVWriter`), every
:meth:`~CSVandPlottingWriter.save` writes PNGs into the run folder
``<savefile>/``, named after the run ``<run>`` = ``basename(savefile)``:

- ``<run>_<stat>_<mode>_epoch_<k>.png``: the statistic per layer, in forward
  order, for epoch ``k`` (the 0.1.50 file name, now inside the run folder);
- ``<run>_<stat>_<mode>_evolution.png``: a layers-by-epochs heatmap of the
  statistic over the whole run so far (saturation and intrinsic dimensionality);
- ``<run>_embed_<mode>_epoch_<k>.png``: the embedded samples of each layer
  (statistic ``embed``) on their top two principal directions.

A mode that did not run in an epoch gets no figure for it. Figures never go
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

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     writer = CSVandPlottingWriter(os.path.join(folder, "run"))
    ...     writer.add_scalars("", {"train-saturation_fc1": 0.5, "train-saturation_fc2": 0.25}, global_step=0)
    ...     writer.save()
    ...     sorted(os.listdir(os.path.join(folder, "run")))
    ['run_lsat_train_epoch_0.png', 'run_lsat_train_evolution.png']
    """

    def __init__(
        self,
        savepath: str,
        plot_manipulation_func: Optional[Callable[[Any], Any]] = None,
        primary_metric: Optional[str] = None,
        fontsize: float = 16,
        figsize: Optional[Tuple[float, float]] = None,
        **kwargs: Any,
    ) -> None:
        if plot_manipulation_func is not None and not callable(plot_manipulation_func):
            raise ValueError(
                f"plot_manipulation_func must be a function from Axes to Axes, got {plot_manipulation_func!r}"
            )
        import matplotlib  # noqa: F401  (checked here so the error comes at construction)

        super().__init__(savepath, **kwargs)
        self.folder = savepath
        self.run_name = os.path.basename(os.path.normpath(savepath))
        self.plot_man_func = plot_manipulation_func
        self.primary_metric = primary_metric
        self.fontsize = fontsize
        self.figsize = figsize
        self.samples: Dict[str, Any] = {}

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
        pattern = re.compile(rf"^{re.escape(self.run_name)}_[a-z]+_(train|eval)_epoch_(\d+)\.png$")
        for file_name in os.listdir(self.folder):
            match = pattern.match(file_name)
            if match and int(match.group(2)) >= initial_epoch:
                os.unlink(os.path.join(self.folder, file_name))

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

    def _path(self, stat: str, mode: str, suffix: str) -> str:
        return os.path.join(self.folder, f"{self.run_name}_{stat}_{mode}_{suffix}.png")

    def save(self) -> None:
        """Append the epoch's CSV row, then draw this epoch's figures."""
        from delve.writers import plotting

        epoch, row = self.epoch, dict(self.current)
        samples, self.samples = self.samples, {}
        super().save()
        os.makedirs(self.folder, exist_ok=True)
        for (stat, mode), per_layer in plotting.group_by_stat(row).items():
            values = np.asarray([_to_float(value) for value in per_layer.values()])
            if not np.isfinite(values).any():
                continue
            self._plot_profile(stat, mode, epoch, list(per_layer), values, row)
            if stat in EVOLUTION_STATS:
                self._plot_evolution(stat, mode)
        for mode, per_layer in _embeddings_by_mode(samples).items():
            figure = plotting.new_figure(6.4, 4.8)
            title = f"{self.run_name}: embedded samples ({mode}), epoch {epoch}"
            plotting.draw_embedding(figure, per_layer, title, color=plotting.MODE_COLORS[mode])
            plotting.save_figure(figure, self._path("embed", mode, f"epoch_{epoch}"))

    def _plot_profile(self, stat: str, mode: str, epoch: int, layers: list, values: np.ndarray,
                      row: Mapping[str, Any]) -> None:
        from delve.writers import plotting

        figure = plotting.new_figure(*plotting.profile_size(layers, self.figsize))
        ax = figure.add_subplot(1, 1, 1)
        title = f"{self.run_name}: {plotting.stat_label(stat)} per layer ({mode}), epoch {epoch}"
        metric = row.get(self.primary_metric) if self.primary_metric else None
        if metric is not None:
            title += f" ({self.primary_metric} {plotting.metric_text(metric)})"
        plotting.draw_profile(ax, layers, values, stat, title, fontsize=self.fontsize,
                              ylim=(0.0, 1.0) if stat == "lsat" else None,
                              color_line=plotting.MODE_COLORS[mode], mean_line=stat == "lsat" and len(layers) > 1)
        if self.plot_man_func is not None:
            ax = self.plot_man_func(ax) or ax
        plotting.save_figure(ax.figure, self._path(stat, mode, f"epoch_{epoch}"))

    def _plot_evolution(self, stat: str, mode: str) -> None:
        from delve.writers import plotting

        columns = [column for column in self.columns
                   if (parsed := parse_stat_name(column)) and (parsed.stat, parsed.mode) == (stat, mode)]
        layers = [column.partition("_")[2] for column in columns]
        epochs = [epoch for epoch, _ in self.rows]
        matrix = np.array([[_to_float(values.get(column, math.nan)) for _, values in self.rows]
                           for column in columns]).reshape(len(columns), len(epochs))
        figure = plotting.new_figure(*plotting.evolution_size(layers, epochs))
        plotting.draw_evolution(figure, layers, epochs, matrix, stat,
                                f"{self.run_name}: {plotting.stat_label(stat)} over training ({mode})",
                                fontsize=self.fontsize)
        plotting.save_figure(figure, self._path(stat, mode, "evolution"))


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
