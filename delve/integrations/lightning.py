"""PyTorch Lightning callback that records layer saturation during ``Trainer.fit``.

Install with ``pip install delve[lightning]``. The callback subclasses
``lightning.pytorch.Callback`` when the ``lightning`` package is installed, and
``pytorch_lightning.Callback`` otherwise.

Examples
--------
.. code-block:: python

    import lightning.pytorch as pl
    from delve.integrations.lightning import SaturationCallback

    trainer = pl.Trainer(max_epochs=10, callbacks=[SaturationCallback("runs/lit", stats=["lsat", "idim"])])
    trainer.fit(model, train_loader, val_loader)
    # runs/lit.csv: one row per epoch with train-* and eval-* statistics of every layer
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, Optional

from delve.integrations import TrackerDriver

try:
    import lightning.pytorch as pl
except ImportError:
    try:
        import pytorch_lightning as pl
    except ImportError as error:
        raise ImportError(
            "delve.integrations.lightning needs PyTorch Lightning; install it with "
            "`pip install delve[lightning]` (or `pip install lightning`)"
        ) from error

_STATE_VERSION = 1


class SaturationCallback(pl.Callback):
    """Run a :class:`~delve.tracker.SaturationTracker` inside a Lightning ``Trainer.fit``.

    The tracker starts when training starts, so the sanity-check validation is
    never recorded. Training batches feed its ``train`` statistics and
    validation batches its ``eval`` statistics (the tracker tells them apart by
    ``module.training``). With ``every_n_steps=None`` it writes one row per epoch
    at the end of the training epoch, which Lightning calls after that epoch's
    validation, so the row holds both. With ``every_n_steps=n`` it writes a row
    every ``n`` optimizer steps and one at the end of every validation. The
    scalar statistics also go to the trainer's loggers through
    ``pl_module.log_dict`` (and so into ``trainer.callback_metrics``, where
    ``EarlyStopping`` or ``ModelCheckpoint`` can monitor them); rows written
    every ``n`` steps are logged with ``on_step=True`` and so reach the loggers
    at the pace of ``Trainer(log_every_n_steps=...)``. The tracker's hooks are
    removed when ``fit`` ends or fails.

    Parameters
    ----------
    savefile : str
        Path of the run, as for :class:`~delve.tracker.SaturationTracker`.
    every_n_steps : int, optional
        Write a row every this many optimizer steps instead of once per epoch.
    log_prefix : str
        Prefix of the names sent to the loggers.
    log_to_trainer : bool
        Send the statistics to the trainer's loggers too.
    checkpoint_statistics : bool, optional
        Store what the tracker has accumulated in the trainer's checkpoints, so
        that a run resumed with ``ckpt_path`` goes on with the same statistics
        (the rows of ``reset_covariance=False`` or of a checkpoint taken
        mid-epoch come out as if the run had never stopped). Costs a float64
        ``d x d`` matrix per tracked layer and mode in every checkpoint (150 MB
        for two modes of a 3072-wide layer), so the default ``None`` stores them
        only with ``reset_covariance=False``, where the statistics span the
        whole run.
    **options
        Keyword arguments of :class:`~delve.tracker.SaturationTracker`;
        ``save_to`` defaults to ``'csv'`` and ``modules`` to the LightningModule.

    Notes
    -----
    A run resumed with ``ckpt_path`` continues the same CSV instead of
    overwriting it: once per epoch, row ``k`` is epoch ``k`` (plus the tracker's
    ``initial_epoch``); with ``every_n_steps``, the number of rows written is
    part of the callback's ``state_dict`` in the checkpoint, and so (with
    ``checkpoint_statistics``) is the tracker's
    :meth:`~delve.tracker.SaturationTracker.state_dict`, loaded into the new
    tracker when training starts again.
    """

    def __init__(
        self,
        savefile: str,
        every_n_steps: Optional[int] = None,
        log_prefix: str = "delve/",
        log_to_trainer: bool = True,
        checkpoint_statistics: Optional[bool] = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.driver = TrackerDriver(savefile, every_n_steps, log_prefix, options)
        self.savefile = savefile
        self.log_to_trainer = log_to_trainer
        if checkpoint_statistics is None:
            checkpoint_statistics = options.get("reset_covariance") is False
        self.checkpoint_statistics = bool(checkpoint_statistics)
        self._last_row_step = -1
        self._restored_tracker_state: Optional[Dict[str, Any]] = None

    @property
    def tracker(self) -> Any:
        """The running :class:`~delve.tracker.SaturationTracker`, ``None`` outside ``fit``."""
        return self.driver.tracker

    @property
    def state_key(self) -> str:
        return self._generate_state_key(savefile=self.savefile)

    # --------------------------------------------------------------- rows
    def _write_row(self, pl_module: "pl.LightningModule", on_step: bool) -> None:
        scalars = self.driver.write_row()
        if self.log_to_trainer and scalars:
            pl_module.log_dict(scalars, on_step=on_step, on_epoch=not on_step, batch_size=1)

    # -------------------------------------------------------------- hooks
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Start the tracker (after any checkpoint was restored and after the sanity check)."""
        if self.driver.every_n_steps is None:
            # One row per epoch: the row number follows the epoch, also when resuming mid-epoch.
            self.driver.rows_written = self.driver.initial_epoch + trainer.current_epoch
        tracker = self.driver.start(pl_module)
        if self._restored_tracker_state is not None:
            try:
                tracker.load_state_dict(self._restored_tracker_state)
            except ValueError as error:
                warnings.warn(
                    f"delve could not restore the statistics stored in the checkpoint ({error}); "
                    "they start afresh",
                    RuntimeWarning,
                    stacklevel=2,
                )
            tracker.epoch = self.driver.rows_written
            self._restored_tracker_state = None
        self._last_row_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """With ``every_n_steps``, write a row when the optimizer step count reaches a multiple of it."""
        every = self.driver.every_n_steps
        step = trainer.global_step
        if every is not None and step != self._last_row_step and step % every == 0:
            self._last_row_step = step
            self._write_row(pl_module, on_step=True)

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """With ``every_n_steps``, write the validation's row."""
        if self.driver.every_n_steps is not None and not trainer.sanity_checking:
            self._write_row(pl_module, on_step=False)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Without ``every_n_steps``, write the epoch's row (training and its validation)."""
        if self.driver.every_n_steps is None:
            self._write_row(pl_module, on_step=False)

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Remove the hooks and close the writers."""
        self.driver.close()

    def on_exception(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException
    ) -> None:
        """Remove the hooks and close the writers when ``fit`` fails."""
        self.driver.close()

    # --------------------------------------------------------- checkpoint
    def state_dict(self) -> Dict[str, Any]:
        """Rows written so far and (with ``checkpoint_statistics``) the tracker's state, with a ``version`` key."""
        state: Dict[str, Any] = {"version": _STATE_VERSION, "rows_written": self.driver.rows_written}
        if self.checkpoint_statistics and self.driver.tracker is not None:
            state["tracker"] = self.driver.tracker.state_dict()
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Continue at the row after the checkpoint's last one."""
        version = state_dict.get("version")
        if version != _STATE_VERSION:
            raise ValueError(
                f"unsupported SaturationCallback state version {version!r}; this delve reads version {_STATE_VERSION}"
            )
        self.driver.rows_written = int(state_dict["rows_written"])
        if self.checkpoint_statistics:
            self._restored_tracker_state = state_dict.get("tracker")


__all__ = ["SaturationCallback"]
