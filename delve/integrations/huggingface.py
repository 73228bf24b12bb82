"""Hugging Face ``transformers`` callback that records layer saturation during ``Trainer.train``.

Install with ``pip install delve[hf]``.

Examples
--------
.. code-block:: python

    from transformers import Trainer, TrainingArguments
    from delve.integrations.huggingface import SaturationCallback

    args = TrainingArguments("out", num_train_epochs=3, eval_strategy="epoch")
    trainer = Trainer(model, args, train_dataset=train, eval_dataset=val,
                      callbacks=[SaturationCallback("runs/hf", stats=["lsat", "idim"])])
    trainer.train()
    # runs/hf.csv: one row per epoch with train-* and eval-* statistics of every layer
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from delve.integrations import TrackerDriver

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as error:
    raise ImportError(
        "delve.integrations.huggingface needs transformers; install it with `pip install delve[hf]` "
        "(or `pip install transformers accelerate`)"
    ) from error

#: Key that marks delve's entries in ``TrainerState.log_history`` and numbers its rows.
ROW_KEY = "delve_row"


class SaturationCallback(TrainerCallback):
    """Run a :class:`~delve.tracker.SaturationTracker` inside a ``transformers`` ``Trainer.train``.

    The tracker starts at ``on_train_begin`` on the trainer's model (or on
    ``modules``). Training steps feed its ``train`` statistics and evaluation
    batches its ``eval`` statistics (the tracker tells them apart by
    ``module.training``). A row is written at the end of every epoch (or every
    ``every_n_steps`` optimizer steps) and after every evaluation; when the
    trainer evaluates right at that epoch end or step (``eval_strategy``), both
    share one row. The hooks are removed at ``on_train_end``.

    With ``log_to_trainer`` each row's scalar statistics are appended to
    ``state.log_history`` (as ``Trainer.log`` does, so they are saved in every
    checkpoint's ``trainer_state.json``), and those of a row written at an
    evaluation are also added to that evaluation's metrics (which
    ``Trainer.evaluate`` returns and the callbacks after this one receive).

    Parameters
    ----------
    savefile : str
        Path of the run, as for :class:`~delve.tracker.SaturationTracker`.
    every_n_steps : int, optional
        Write a row every this many optimizer steps instead of once per epoch.
    log_prefix : str
        Prefix of the names written to the trainer's log history.
    log_to_trainer : bool
        Record the statistics in the trainer's log history too.
    **options
        Keyword arguments of :class:`~delve.tracker.SaturationTracker`;
        ``save_to`` defaults to ``'csv'`` and ``modules`` to the trainer's model.

    Notes
    -----
    ``Trainer.train(resume_from_checkpoint=...)`` continues the same CSV after
    the checkpoint's last row: the row numbers are read back from the log
    history (entries carrying :data:`ROW_KEY`), so resuming needs
    ``log_to_trainer=True``. The ``report_to`` integrations (TensorBoard,
    W&B...) are called by the trainer before any user callback and do not see
    these entries; use delve's own ``save_to='tensorboard'`` for TensorBoard.
    """

    def __init__(
        self,
        savefile: str,
        every_n_steps: Optional[int] = None,
        log_prefix: str = "delve/",
        log_to_trainer: bool = True,
        **options: Any,
    ) -> None:
        self.driver = TrackerDriver(savefile, every_n_steps, log_prefix, options)
        self.log_to_trainer = log_to_trainer
        self._row_pending = False

    @property
    def tracker(self) -> Any:
        """The running :class:`~delve.tracker.SaturationTracker`, ``None`` outside ``train``."""
        return self.driver.tracker

    def _write_row(self, state: TrainerState) -> Dict[str, float]:
        self._row_pending = False
        row = self.driver.rows_written
        scalars = self.driver.write_row()
        if self.log_to_trainer:
            state.log_history.append({**scalars, ROW_KEY: row, "epoch": state.epoch, "step": state.global_step})
        return scalars

    def _row_due(self, state: TrainerState, control: TrainerControl) -> None:
        # DefaultFlowCallback runs first, so should_evaluate already says whether an
        # evaluation follows; its eval statistics then join this row.
        if control.should_evaluate:
            self._row_pending = True
        else:
            self._write_row(state)

    # -------------------------------------------------------------- events
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        """Start the tracker, numbering rows after those of a resumed checkpoint."""
        written = [entry[ROW_KEY] for entry in state.log_history if ROW_KEY in entry]
        self.driver.rows_written = max(written) + 1 if written else self.driver.initial_epoch
        self._row_pending = False
        self.driver.start(model)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """With ``every_n_steps``, a row is due at every multiple of it."""
        every = self.driver.every_n_steps
        if self.driver.tracker is not None and every is not None and state.global_step % every == 0:
            self._row_due(state, control)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Without ``every_n_steps``, a row is due at every epoch end."""
        if self.driver.tracker is not None and self.driver.every_n_steps is None:
            self._row_due(state, control)

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: Optional[Dict[str, float]] = None,
        **kwargs: Any,
    ) -> None:
        """Write the row of this evaluation (with the training rows due with it)."""
        if self.driver.tracker is None:
            return
        scalars = self._write_row(state)
        if self.log_to_trainer and metrics is not None:
            metrics.update(scalars)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Write a row still waiting for its evaluation, then remove the hooks and close the writers."""
        if self._row_pending and self.driver.tracker is not None:
            self._write_row(state)
        self.driver.close()


__all__ = ["SaturationCallback", "ROW_KEY"]
