"""MLflow output (``save_to="mlflow"``): metrics per epoch in an MLflow run, the table, plots and report as artifacts.

Metric names (:func:`mlflow_key`): the output name
``train-saturation_features-0`` is logged as ``saturation/train/features-0``,
so MLflow's chart view shows a section ``saturation`` with a chart per mode
and layer; user scalars and averages keep their names. MLflow rejects some
characters in a name, so each character other than a letter, a digit, ``_``,
``-``, ``.``, a space or ``/`` becomes ``_`` (``:`` too, which Windows stores
reject); empty ``/`` segments are dropped, a ``.`` or ``..`` segment becomes
``_`` or ``__``, and a name longer than 250 characters keeps its first 241
characters plus ``_`` and 8 hex digits of its hash. Two names that would
give the same metric name are told apart the same way (``_`` and 8 hex
digits). The step is the epoch (the ``global_step`` the tracker passes).
Arrays (``cov``, ``embed``, arrays of your own) and text are not metrics; they
are left out, except the last epoch's embedded samples, which get a figure.

When the writer is closed, these artifacts go under ``delve/`` in the run
(``run`` is the last part of the tracker's ``savefile``):

- ``<run>.csv``: every scalar of every epoch, as the CSV writer lays it out;
- ``<run>/<run>_<stat>_<mode>_epoch_<k>.png``: the statistics per layer of
  the last epoch ``k``, and ``<run>/<run>_<stat>_<mode>_evolution.png``, the
  layers-by-epochs heatmaps of saturation and intrinsic dimensionality (see
  :class:`~delve.writers.CSVandPlottingWriter`);
- ``<run>/report.html``: the report of :func:`delve.report.report`, when the
  run holds saturation.
"""
from __future__ import annotations

import hashlib
import numbers
import os
import re
import shutil
import tempfile
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional

import numpy as np

from delve.writers._experiment import ExperimentWriter, import_extra, metric_key
from delve.writers.base import parse_stat_name

#: Longest metric name MLflow accepts.
MAX_KEY_LENGTH = 250
_REJECTED = re.compile(r"[^\w\-. /]")


def mlflow_key(name: str) -> str:
    """The MLflow metric name of an output name: :func:`metric_key`, with what MLflow rejects replaced.

    Parameters
    ----------
    name : str
        A logged name.

    Returns
    -------
    str
        A name of at most 250 characters made of letters, digits, ``_``,
        ``-``, ``.``, spaces and ``/``, with no empty, ``.`` or ``..`` segment.

    Examples
    --------
    >>> mlflow_key("eval-saturation_encoder-layers-1")
    'saturation/eval/encoder-layers-1'
    >>> mlflow_key("top-1 acc (%)")
    'top-1 acc ___'
    >>> mlflow_key("/val//loss/../")
    'val/loss/__'
    """
    key = _REJECTED.sub("_", metric_key(name))
    segments = ["_" * len(part) if part in (".", "..") else part for part in key.split("/") if part]
    key = "/".join(segments) or "_"
    if len(key) > MAX_KEY_LENGTH:
        key = key[: MAX_KEY_LENGTH - 9] + "_" + _digest(name)
    return key


def _digest(name: str) -> str:
    return hashlib.sha1(name.encode("utf-8")).hexdigest()[:8]


def _is_metric(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, np.ndarray)


class MLflowWriter(ExperimentWriter):
    """Log metrics to an MLflow run (the given one, the active one, or one it starts) and artifacts at close.

    The run is chosen when the first epoch is saved: the run ``run_id``; else
    the active run (``mlflow.start_run()``) when ``tracking_uri`` is not given
    or is the active one's; else a new run in ``experiment_name`` of the store
    at ``tracking_uri`` (MLflow's default store and experiment when not given).
    Logging goes through an ``MlflowClient`` and changes no global MLflow
    setting. A run the writer started or continued from ``run_id`` is marked
    finished by :meth:`close`; the active run is left open. Metrics are sent
    once per epoch (:meth:`save`) in one ``log_batch`` call.

    Parameters
    ----------
    savepath : str, optional
        The tracker's ``savefile``: its last part names the artifacts and a
        run the writer starts.
    tracking_uri : str, optional
        The tracking store (``'sqlite:///mlflow.db'``, ``'http://host:5000'``).
    experiment_name : str, optional
        The experiment of a run the writer starts; created when missing.
    run_id : str, optional
        An existing run to log to, e.g. to continue it with ``initial_epoch``.
    run_name : str, optional
        Name of a run the writer starts; default: the last part of ``savepath``.
    artifact_path : str
        Folder of the artifacts inside the run.
    log_artifacts : bool
        Whether :meth:`close` uploads the table, the plots and the report.

    Raises
    ------
    ImportError
        If MLflow is not installed (``pip install 'delve[mlflow]'``).
    ValueError
        If an argument has the wrong type.

    Examples
    --------
    .. code-block:: python

        from delve import SaturationTracker

        tracker = SaturationTracker(
            "runs/mlp", save_to="mlflow", modules=model,
            writer_args={"tracking_uri": "sqlite:///mlflow.db", "experiment_name": "delve-demo"},
        )
        for epoch in range(10):
            train_one_epoch(model)
            tracker.add_scalar("accuracy", evaluate(model))
            tracker.add_saturations()
        tracker.close()  # uploads delve/mlp.csv, the plots and delve/mlp/report.html
    """

    def __init__(
        self,
        savepath: Optional[str] = None,
        tracking_uri: Optional[str] = None,
        experiment_name: Optional[str] = None,
        run_id: Optional[str] = None,
        run_name: Optional[str] = None,
        artifact_path: str = "delve",
        log_artifacts: bool = True,
        **kwargs: Any,
    ) -> None:
        import_extra("mlflow", "mlflow")
        for parameter, value in (("tracking_uri", tracking_uri), ("experiment_name", experiment_name),
                                 ("run_id", run_id), ("run_name", run_name)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{parameter} must be a string or None, got {value!r}")
        if not isinstance(artifact_path, str):
            raise ValueError(f"artifact_path must be a string (a folder inside the run), got {artifact_path!r}")
        if not isinstance(log_artifacts, bool):
            raise ValueError(f"log_artifacts must be True or False, got {log_artifacts!r}")
        super().__init__(savepath)
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_id = run_id
        self.run_name = run_name
        self.artifact_path = artifact_path
        self.log_artifacts = log_artifacts
        self.name = os.path.basename(os.path.normpath(savepath)) if savepath else "delve"
        self.client: Any = None
        self._owns_run = False
        self._keys: Dict[str, str] = {}
        self._names_of_keys: Dict[str, str] = {}
        #: Every epoch's scalars under their output names, for the table and the plots.
        self.history: Dict[int, Dict[str, Any]] = {}
        self._samples: Dict[str, np.ndarray] = {}

    # ----------------------------------------------------------------- run
    def _active_client(self) -> Any:
        if self.client is not None:
            return self.client
        import mlflow
        from mlflow.tracking import MlflowClient

        active = mlflow.active_run()
        if self.run_id is None and active is not None and self.tracking_uri in (None, mlflow.get_tracking_uri()):
            self.client, self.run_id = MlflowClient(), active.info.run_id
            return self.client
        client = MlflowClient(self.tracking_uri)
        if self.run_id is not None:
            run = client.get_run(self.run_id)
            self._owns_run = active is None or active.info.run_id != self.run_id
            if self._owns_run and run.info.status != "RUNNING":
                client.update_run(self.run_id, status="RUNNING")
        else:
            experiment_id = "0"
            if self.experiment_name is not None:
                experiment = client.get_experiment_by_name(self.experiment_name)
                experiment_id = (experiment.experiment_id if experiment is not None
                                 else client.create_experiment(self.experiment_name))
            run_name = self.run_name or (self.name if self.savepath else None)
            self.run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
            self._owns_run = True
        self.client = client
        return client

    def metric_name(self, name: str) -> str:
        """The MLflow metric name of an output name (:func:`mlflow_key`, kept apart from other names)."""
        if name not in self._keys:
            key = mlflow_key(name)
            if self._names_of_keys.get(key, name) != name:
                key = key[: MAX_KEY_LENGTH - 9] + "_" + _digest(name)
            self._keys[name] = key
            self._names_of_keys[key] = name
        return self._keys[name]

    # ------------------------------------------------------------- logging
    def log_row(self, step: int, row: Mapping[str, Any]) -> None:
        """Log one epoch's numbers in one ``log_batch`` call, at ``step``."""
        from mlflow.entities import Metric

        scalars = {name: value for name, value in row.items() if _is_metric(value)}
        self.history.setdefault(step, {}).update(scalars)
        samples = {name: value for name, value in row.items()
                   if (parsed := parse_stat_name(name)) is not None and parsed.stat == "embed"}
        if samples:
            self._samples = samples
        if not scalars:
            return
        client = self._active_client()
        timestamp = int(time.time() * 1000)
        client.log_batch(self.run_id, metrics=[
            Metric(self.metric_name(name), float(value), timestamp, step) for name, value in scalars.items()
        ])

    # ----------------------------------------------------------- artifacts
    def _download_earlier_table(self, folder: str) -> Optional[str]:
        """The table an earlier session of this run uploaded, downloaded into ``folder``; None without one."""
        if self.initial_epoch == 0:
            return None
        remote = f"{self.artifact_path}/{self.name}.csv" if self.artifact_path else f"{self.name}.csv"
        listed = self.client.list_artifacts(self.run_id, self.artifact_path or None)
        if remote not in [entry.path for entry in listed]:
            return None
        return self.client.download_artifacts(self.run_id, remote, folder)

    def write_artifacts(self, folder: str) -> List[str]:
        """Write the table, the last epoch's plots and the report into ``folder``; return the files written.

        When the writer continues a run (``run_id`` and ``initial_epoch``), the
        table starts with the rows before ``initial_epoch`` of the table an
        earlier session uploaded to the run.
        """
        from delve.writers.csv import CSVWriter

        base = os.path.join(folder, self.name)
        table = CSVWriter(base)
        with tempfile.TemporaryDirectory(prefix="delve-mlflow-") as download:
            earlier = self._download_earlier_table(download)
            if earlier is not None:
                os.replace(earlier, table.path)
                table.resume_from_saved_state(self.initial_epoch)
        for step in sorted(self.history):
            table.epoch = step
            table.add_scalars("", self.history[step])
            table.save()
        if self.last_statistics is not None:
            self._draw(table.path, base, self.last_statistics[0])
        if _has_saturation(table.columns):
            from delve.report import report

            report(base, output=os.path.join(base, "report.html"))
        return sorted(os.path.join(root, file) for root, _, files in os.walk(folder) for file in files)

    def _draw(self, table_path: str, folder: str, step: int) -> None:
        """Draw the figures of epoch ``step`` and the heatmaps up to it into ``folder``.

        A plot writer replays the table: it reads a copy of it back up to
        ``step``, then gets that epoch's row, as if the run had been written
        with ``save_to="plot"``.
        """
        from delve.writers.plot import CSVandPlottingWriter

        with tempfile.TemporaryDirectory(prefix="delve-mlflow-") as scratch:
            replay = os.path.join(scratch, self.name)
            shutil.copyfile(table_path, replay + ".csv")
            plots = CSVandPlottingWriter(replay, plot_every=1)
            plots.resume_from_saved_state(step)
            plots.add_scalars("", {**self.history[step], **self._samples})
            plots.save()
            shutil.copytree(replay, folder, dirs_exist_ok=True)

    def finish(self) -> None:
        """Upload the artifacts, then mark a run the writer started (or continued from ``run_id``) finished."""
        if self.client is None:
            return
        try:
            if self.log_artifacts and self.history:
                with tempfile.TemporaryDirectory(prefix="delve-mlflow-") as folder:
                    self.write_artifacts(folder)
                    self.client.log_artifacts(self.run_id, folder, self.artifact_path or None)
        finally:
            if self._owns_run:
                self.client.set_terminated(self.run_id)


def _has_saturation(names: Iterable[str]) -> bool:
    return any((parsed := parse_stat_name(name)) is not None and parsed.stat == "lsat" for name in names)
