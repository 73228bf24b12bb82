"""Weights & Biases output (``save_to="wandb"``): every value in a W&B run, one panel section per statistic.

Keys: the output name ``train-saturation_features-0`` is logged as
``saturation/train/features-0``, so the W&B workspace shows a section
``saturation`` with a chart per mode and layer, another for
``intrinsic-dimensionality``, and so on. User scalars
(``accuracy``) and averages (``average-train-sat``) keep their names. A
covariance matrix (statistic ``cov``) is logged as a histogram of its
eigenvalues under ``covariance-eigenvalues/<mode>/<layer>``; embedded samples
(``embed``) are left to the plot and npy writers.

Every row carries ``delve/epoch``, the epoch (the ``global_step`` the tracker
passes; a callback's row number), and every key delve logs is charted against
it (``define_metric(key, step_metric="delve/epoch")``). W&B's own ``_step``
counts the run's rows, including those your code logs to the same run, which
is why delve never passes ``step=`` to ``run.log``: a W&B step lower than the
run's latest one is dropped.

When the writer is closed, the saturation profile of the last epoch goes to
``saturation-profile/<mode>``: a bar chart of saturation per layer, in forward
order, over a ``wandb.Table`` that also holds the layers' other statistics.
"""
from __future__ import annotations

import inspect
import os
import warnings
from typing import Any, Dict, Mapping, Optional

import numpy as np

from delve.writers._experiment import ExperimentWriter, covariance_spectrum, import_extra, metric_key
from delve.writers.base import MODES, STATMAP, parse_stat_name

#: The key of the x axis of every chart delve logs: the epoch.
STEP_KEY = "delve/epoch"
#: Section of the last epoch's saturation profile (``saturation-profile/train``).
PROFILE_KEY = "saturation-profile"
_ARRAY_STATS = ("cov", "embed")


class WandbWriter(ExperimentWriter):
    """Log every value to a Weights & Biases run: the given one, the active one, or one it starts.

    The run is looked up when the first epoch is saved, so a run started with
    ``wandb.init()`` after the tracker was built is found too. A run the writer
    starts itself is finished by :meth:`close`; another run is left open.
    Values are sent once per epoch (:meth:`save`), in one ``run.log`` call.

    Parameters
    ----------
    savepath : str, optional
        The tracker's ``savefile``; its last part names a run the writer
        starts, unless ``name`` is given.
    run : wandb.Run, optional
        The run to log to; by default ``wandb.run`` (the active run), else a
        new run from ``wandb.init``.
    **kwargs
        Keywords of ``wandb.init`` (``project``, ``name``, ``entity``,
        ``config``, ``dir``, ``mode``, ``id``, ``resume``...), used when the
        writer starts the run. Other keys are ignored: they belong to the
        other writers that ``save_to`` lists.

    Raises
    ------
    ImportError
        If wandb is not installed (``pip install 'delve[wandb]'``).
    TypeError
        If ``run`` is not a W&B run.

    Examples
    --------
    .. code-block:: python

        import wandb
        from delve import SaturationTracker

        with wandb.init(project="delve-demo"):
            with SaturationTracker("runs/mlp", save_to="wandb", modules=model) as tracker:
                for epoch in range(10):
                    train_one_epoch(model)
                    tracker.add_scalar("accuracy", evaluate(model))
                    tracker.add_saturations()
    """

    def __init__(self, savepath: Optional[str] = None, run: Any = None, **kwargs: Any) -> None:
        wandb = import_extra("wandb", "wandb")
        if run is not None and not isinstance(run, wandb.sdk.wandb_run.Run):
            raise TypeError(f"run must be a W&B run (what wandb.init() returns) or None, got {type(run).__name__}")
        super().__init__(savepath)
        accepted = inspect.signature(wandb.init).parameters
        self.init_args: Dict[str, Any] = {key: value for key, value in kwargs.items() if key in accepted}
        self.run: Any = run
        self._owns_run = False
        self._defined: set = set()
        self._warned = False

    # ----------------------------------------------------------------- run
    def _active_run(self) -> Any:
        import wandb

        if self.run is None:
            if wandb.run is not None:
                self.run = wandb.run
            else:
                args = dict(self.init_args)
                if self.savepath:
                    args.setdefault("name", os.path.basename(os.path.normpath(self.savepath)))
                self.run = wandb.init(**args)
                self._owns_run = True
        if STEP_KEY not in self._defined:
            self.run.define_metric(STEP_KEY, hidden=True)
            self._defined.add(STEP_KEY)
        return self.run

    def _log(self, data: Mapping[str, Any]) -> None:
        import wandb

        try:
            self.run.log(dict(data))
        except wandb.errors.UsageError as error:
            # The user's run was finished before the tracker: training goes on, delve says why its values stop.
            if not self._warned:
                self._warned = True
                warnings.warn(f"delve could not log to W&B ({error}); close the tracker before "
                              "finishing its run", RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------- logging
    def log_row(self, step: int, row: Mapping[str, Any]) -> None:
        """Log one epoch's values in one ``run.log`` call, with ``delve/epoch`` = ``step``."""
        data = {}
        for name, value in row.items():
            converted = _wandb_value(name, value)
            if converted is not None:
                data[metric_key(name)] = converted
        if not data:
            return
        run = self._active_run()
        for key in data:
            if key not in self._defined:
                run.define_metric(key, step_metric=STEP_KEY)
                self._defined.add(key)
        self._log({STEP_KEY: step, **data})

    def profile_charts(self) -> Dict[str, Any]:
        """The last epoch's saturation per layer as W&B bar charts, one per mode (empty before any epoch).

        Returns
        -------
        dict
            ``saturation-profile/<mode>`` to a ``wandb.plot.bar`` over a
            ``wandb.Table`` with a row per layer (forward order) and a column
            per scalar statistic.
        """
        import wandb

        from delve.writers.plotting import group_by_stat

        if self.last_statistics is None:
            return {}
        step, row = self.last_statistics
        grouped = group_by_stat(row)
        charts = {}
        for mode in MODES:
            saturation = grouped.get(("lsat", mode))
            if not saturation:
                continue
            stats = [stat for stat, each in grouped if each == mode and stat not in _ARRAY_STATS]
            table = wandb.Table(
                columns=["layer", *(STATMAP[stat] for stat in stats)],
                data=[[layer, *(grouped[(stat, mode)].get(layer) for stat in stats)] for layer in saturation],
            )
            charts[f"{PROFILE_KEY}/{mode}"] = wandb.plot.bar(
                table, "layer", STATMAP["lsat"], title=f"saturation per layer ({mode}), epoch {step}"
            )
        return charts

    def finish(self) -> None:
        """Log the last epoch's saturation profile, then finish the run if the writer started it."""
        if self.run is None:
            return
        try:
            charts = self.profile_charts()
            if charts:
                self._log({STEP_KEY: self.last_statistics[0], **charts})
        finally:
            if self._owns_run:
                self.run.finish()


def _wandb_value(name: str, value: Any) -> Any:
    """What W&B receives for a value: numbers and text as they are, arrays as histograms, ``None`` to skip."""
    import wandb

    parsed = parse_stat_name(name)
    if parsed is not None and parsed.stat == "embed":
        return None
    if parsed is not None and parsed.stat == "cov":
        matrix = np.asarray(value, dtype=np.float64)
        return wandb.Histogram(covariance_spectrum(matrix)) if np.isfinite(matrix).all() else None
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            return None
        finite = value[np.isfinite(value)].astype(np.float64)
        return wandb.Histogram(finite) if finite.size else None
    return value
