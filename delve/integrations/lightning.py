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

from typing import Any, Dict, Optional

from delve.integrations import TrackerDriver, announce_continuation, batch_labels

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
    ``module.training``). Rows:

    * ``every_n_steps=None``: one row per training epoch. When a validation
      runs at the end of the epoch (the default), the row is written when that
      validation ends and holds the epoch's training batches and the
      validation's batches. A validation in the middle of an epoch
      (``val_check_interval < 1``) gets a row of its own with only its
      ``eval`` statistics; the epoch's training batches go on into the epoch's
      row. An epoch without validation at its end gets its row at the end of
      the training epoch.
    * ``every_n_steps=n``: a row of training statistics every ``n`` optimizer
      steps, a row of ``eval`` statistics at the end of every validation, and
      a last row with the training steps after the last multiple of ``n`` when
      training ends.

    No row is written when nothing was recorded since the previous one. Rows
    are numbered in the order they are written.

    The scalar statistics also go to the trainer (``log_to_trainer``):

    * rows written at the end of a validation or of a training epoch through
      ``pl_module.log_dict(..., on_epoch=True)``: into
      ``trainer.callback_metrics``, where ``EarlyStopping`` and
      ``ModelCheckpoint`` can monitor them (also with ``val_check_interval <
      1``, since every validation writes its row before those callbacks look),
      and into ``trainer.loggers`` at the step Lightning logs that
      validation's own values at;
    * rows written every ``n`` steps (and the last one) straight to every
      logger in ``trainer.loggers`` at ``trainer.global_step - 1``, the step
      at which Lightning logs that batch's own values, once (not repeated at
      later logging steps); they also update ``trainer.callback_metrics``.

    The tracker's hooks are removed when ``fit`` ends or fails.

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
        Store what the tracker has accumulated since the last row in the
        trainer's checkpoints, so that a run resumed with ``ckpt_path`` goes on
        with the same statistics (the rows of ``reset_covariance=False`` or of
        a checkpoint taken mid-epoch come out as if the run had never stopped).
        Costs a float64 ``d x d`` matrix per tracked layer and mode in every
        checkpoint (150 MB for two modes of a 3072-wide layer), so the default
        ``None`` stores them only with ``reset_covariance=False``, where the
        statistics span the whole run.
    **options
        Keyword arguments of :class:`~delve.tracker.SaturationTracker`;
        ``save_to`` defaults to ``'csv'`` and ``modules`` to the LightningModule.

    Notes
    -----
    ``fit`` without ``ckpt_path`` starts a new run: the tracker's
    ``initial_epoch`` is 0 (or the ``initial_epoch`` option), so an earlier run
    in ``savefile`` (also one written by this same callback in another
    ``Trainer``) is moved aside by the tracker, which says so. ``fit(...,
    ckpt_path=...)`` continues the run of the checkpoint: the callback's
    ``state_dict`` in the checkpoint holds the number of rows written, the
    rows before it are kept and the callback says that it continues. A
    checkpoint taken when a validation ends (``ModelCheckpoint`` with
    ``val_check_interval < 1`` or ``save_on_train_epoch_end=False``) already
    holds that validation's row.
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
        self._checkpoint_state: Optional[Dict[str, Any]] = None

    @property
    def tracker(self) -> Any:
        """The running :class:`~delve.tracker.SaturationTracker`, ``None`` outside ``fit``."""
        return self.driver.tracker

    @property
    def state_key(self) -> str:
        return self._generate_state_key(savefile=self.savefile)

    # --------------------------------------------------------------- rows
    def _log_epoch_row(self, pl_module: "pl.LightningModule", scalars: Optional[Dict[str, float]]) -> None:
        """Through Lightning's logging of validation and epoch values (callback_metrics and loggers)."""
        if self.log_to_trainer and scalars:
            pl_module.log_dict(scalars, on_step=False, on_epoch=True, batch_size=1)

    def _log_step_row(
        self, trainer: "pl.Trainer", pl_module: Optional["pl.LightningModule"], scalars: Optional[Dict[str, float]]
    ) -> None:
        """Straight to the loggers at the row's last step, and (inside a batch hook) into callback_metrics."""
        if not self.log_to_trainer or not scalars:
            return
        if pl_module is not None:
            pl_module.log_dict(scalars, on_step=True, on_epoch=False, logger=False, batch_size=1)
        for logger in trainer.loggers:
            logger.log_metrics(dict(scalars), step=max(trainer.global_step - 1, 0))

    def _recording(self, trainer: "pl.Trainer") -> bool:
        return self.driver.tracker is not None and not trainer.sanity_checking

    # -------------------------------------------------------------- hooks
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Start the tracker: a new run, or the run of the checkpoint ``fit`` resumes from."""
        state, self._checkpoint_state = self._checkpoint_state, None
        row = None if state is None else int(state["rows_written"])
        if row is not None and row > self.driver.initial_epoch:
            announce_continuation(self.savefile, row, "the run of the checkpoint")
            self.driver.start(pl_module, continue_at=row)
        else:  # a new run, or a checkpoint taken before its first row
            self.driver.start(pl_module)
        if state is not None and self.checkpoint_statistics:
            self.driver.load_statistics(state)
        self._last_row_step = trainer.global_step

    def _hand_over_labels(self, batch: Any) -> None:
        """Give the tracker the batch's labels (for ``nc1`` / ``cdnv``), or forget the previous ones."""
        tracker = self.driver.tracker
        if tracker is not None and tracker.num_classes is not None:
            tracker.set_labels(batch_labels(batch))

    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        """Hand the batch's labels to the tracker before the forward pass."""
        self._hand_over_labels(batch)

    def on_validation_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Hand the batch's labels to the tracker before the forward pass."""
        self._hand_over_labels(batch)

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Count the batch; with ``every_n_steps``, write a row when the optimizer step count reaches a multiple."""
        if self.driver.tracker is None:
            return
        self.driver.note_batch("train")
        every = self.driver.every_n_steps
        step = trainer.global_step
        if every is not None and step != self._last_row_step and step % every == 0:
            self._last_row_step = step
            self._log_step_row(trainer, pl_module, self.driver.write_row())

    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Set the training batches aside unless this validation shares the epoch's row."""
        if not self._recording(trainer):
            return
        epoch_ends = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if self.driver.every_n_steps is not None or not epoch_ends:
            self.driver.park_training()

    def on_validation_batch_end(
        self,
        trainer: "pl.Trainer",
        pl_module: "pl.LightningModule",
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Count the validation batch."""
        if self._recording(trainer):
            self.driver.note_batch("eval")

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Write this validation's row, before checkpoints and early stopping look at the metrics."""
        if self._recording(trainer):
            scalars = self.driver.write_row()
            self.driver.restore_training()
            self._log_epoch_row(pl_module, scalars)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Without ``every_n_steps``, write the epoch's row if no validation at its end did."""
        if self.driver.every_n_steps is None:
            self._log_epoch_row(pl_module, self.driver.write_row())

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Write the steps after the last row, then remove the hooks and close the writers."""
        self._log_step_row(trainer, None, self.driver.write_row())
        self.driver.close()

    def on_exception(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException
    ) -> None:
        """Remove the hooks and close the writers when ``fit`` fails."""
        self.driver.close()

    # --------------------------------------------------------- checkpoint
    def state_dict(self) -> Dict[str, Any]:
        """Rows written so far and (with ``checkpoint_statistics``) the tracker's state, with a ``version`` key."""
        return {"version": _STATE_VERSION, **self.driver.state_dict(self.checkpoint_statistics)}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Keep the checkpoint's state for the run that ``fit`` resumes."""
        version = state_dict.get("version")
        if version != _STATE_VERSION:
            raise ValueError(
                f"unsupported SaturationCallback state version {version!r}; this delve reads version {_STATE_VERSION}"
            )
        self._checkpoint_state = dict(state_dict)


__all__ = ["SaturationCallback"]
