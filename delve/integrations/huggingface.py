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

import io
import os
import warnings
from typing import TYPE_CHECKING, Any, Dict, Optional

import torch

from delve.integrations import TrackerDriver, announce_continuation
from delve.writers._files import atomic_write_bytes

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as error:
    raise ImportError(
        "delve.integrations.huggingface needs transformers; install it with `pip install delve[hf]` "
        "(or `pip install transformers accelerate`)"
    ) from error

if TYPE_CHECKING:
    from transformers import Trainer

#: Key that marks delve's entries in ``TrainerState.log_history`` and numbers its rows.
ROW_KEY = "delve_row"

#: File in a checkpoint folder holding what the tracker accumulated (with ``checkpoint_statistics``).
STATE_FILE = "delve_statistics.pt"


def _metric_prefix(metrics: Dict[str, float]) -> str:
    """The ``metric_key_prefix`` of an evaluation's metrics (``'eval_'`` unless the trainer chose another)."""
    for name in metrics:
        if name.endswith("_runtime"):
            return name[: -len("runtime")]
    return "eval_"


class SaturationCallback(TrainerCallback):
    """Run a :class:`~delve.tracker.SaturationTracker` inside a ``transformers`` ``Trainer.train``.

    The tracker starts at ``on_train_begin`` on the trainer's model (or on
    ``modules``). Training steps feed its ``train`` statistics and evaluation
    batches its ``eval`` statistics (the tracker tells them apart by
    ``module.training``). Rows:

    * ``every_n_steps=None``: one row per epoch with its training steps. An
      evaluation at the end of the epoch (``eval_strategy="epoch"``, or a
      ``"steps"`` evaluation on the epoch's last step) shares it; an
      evaluation in the middle of an epoch gets a row of its own with only its
      ``eval`` statistics.
    * ``every_n_steps=n``: a row every ``n`` optimizer steps, shared with an
      evaluation on that step; any other evaluation gets a row of its own.
    * When training ends, a last row holds the steps after the last row.

    No row is written when nothing was recorded since the previous one; rows
    are numbered in the order they are written.

    With ``log_to_trainer`` the row's scalar statistics are named ``log_prefix
    + name`` (``delve/train-saturation_<layer>``), those of the ``eval`` mode
    with the evaluation's metric prefix in front (``eval_delve/eval-saturation_<layer>``,
    as the trainer names its own evaluation values), and go

    * to ``Trainer.log`` when the callback knows the trainer
      (``trainer.add_callback(SaturationCallback(..., trainer=trainer))``):
      into ``state.log_history`` and to every ``report_to`` logger
      (TensorBoard, W&B, MLflow...) at ``state.global_step``, where they show
      up as ``train/delve/train-...`` and ``eval/delve/eval-...``. Without the
      trainer they go into ``state.log_history`` only: the loggers run before
      any user callback, so a callback cannot reach them otherwise (the
      callback warns when ``report_to`` names a logger);
    * for a row written at an evaluation, its ``eval`` values also into that
      evaluation's metrics, which ``Trainer.evaluate`` returns, the callbacks
      after this one receive, and ``metric_for_best_model`` reads:
      ``metric_for_best_model="delve/eval-saturation_<layer>"`` works, as the
      trainer adds ``eval_`` itself.

    Parameters
    ----------
    savefile : str
        Path of the run, as for :class:`~delve.tracker.SaturationTracker`.
    every_n_steps : int, optional
        Write a row every this many optimizer steps instead of once per epoch.
    log_prefix : str
        Prefix of the names given to the trainer.
    log_to_trainer : bool
        Give the statistics to the trainer too.
    checkpoint_statistics : bool, optional
        Store what the tracker accumulated since the last row in every
        checkpoint folder (file :data:`STATE_FILE`), so that a run resumed from
        a checkpoint taken mid-epoch (``save_strategy="steps"``) writes that
        epoch's row as if it had never stopped. Costs a float64 ``d x d``
        matrix per tracked layer and mode in every checkpoint; the default
        ``None`` stores them only with ``reset_covariance=False``, where the
        statistics span the whole run. Without them, the first row after a
        mid-epoch resume holds only the steps after the checkpoint.
    trainer : transformers.Trainer, optional
        The trainer this callback is added to, so that the rows go through
        ``Trainer.log`` to the ``report_to`` loggers.
    **options
        Keyword arguments of :class:`~delve.tracker.SaturationTracker`;
        ``save_to`` defaults to ``'csv'`` and ``modules`` to the trainer's model.

    Notes
    -----
    ``train()`` starts a new run: the tracker's ``initial_epoch`` is 0 (or the
    ``initial_epoch`` option), so an earlier run in ``savefile`` (also one
    written by this same callback in another ``Trainer``) is moved aside by
    the tracker, which says so. ``train(resume_from_checkpoint=...)``
    continues the checkpoint's run after its last row, and says so: the row
    numbers are read back from the log history (entries carrying
    :data:`ROW_KEY`), so resuming needs ``log_to_trainer=True``. The
    statistics file of ``checkpoint_statistics`` is looked up in
    ``output_dir/checkpoint-<step>``, where the trainer writes its
    checkpoints.
    """

    def __init__(
        self,
        savefile: str,
        every_n_steps: Optional[int] = None,
        log_prefix: str = "delve/",
        log_to_trainer: bool = True,
        checkpoint_statistics: Optional[bool] = None,
        trainer: Optional["Trainer"] = None,
        **options: Any,
    ) -> None:
        if trainer is not None:
            from transformers import Trainer  # loaded already when there is a trainer

            if not isinstance(trainer, Trainer):
                raise TypeError(f"trainer must be the transformers.Trainer the callback is added to, got {trainer!r}")
        self.driver = TrackerDriver(savefile, every_n_steps, log_prefix, options)
        self.savefile = savefile
        self.log_to_trainer = log_to_trainer
        if checkpoint_statistics is None:
            checkpoint_statistics = options.get("reset_covariance") is False
        self.checkpoint_statistics = bool(checkpoint_statistics)
        self.trainer = trainer

    @property
    def tracker(self) -> Any:
        """The running :class:`~delve.tracker.SaturationTracker`, ``None`` outside ``train``."""
        return self.driver.tracker

    # ---------------------------------------------------------------- rows
    def _is_eval(self, name: str) -> bool:
        return name[len(self.driver.log_prefix):].startswith(("eval-", "average-eval-"))

    def _write_row(self, state: TrainerState, metrics: Optional[Dict[str, float]] = None) -> None:
        """Write a row; give its values to the trainer, the ``eval`` ones with the evaluation's prefix."""
        row = self.driver.rows_written
        scalars = self.driver.write_row()
        if scalars is None or not self.log_to_trainer:
            return
        prefix = _metric_prefix(metrics) if metrics is not None else "eval_"
        named = {(prefix + name if self._is_eval(name) else name): value for name, value in scalars.items()}
        if metrics is not None:
            metrics.update((name, value) for name, value in named.items() if name.startswith(prefix))
        if self.trainer is not None:
            self.trainer.log(dict(named))  # log_history and the report_to loggers, at state.global_step
            state.log_history[-1][ROW_KEY] = row
        else:
            state.log_history.append({**named, ROW_KEY: row, "epoch": state.epoch, "step": state.global_step})

    def _row_boundary(self, state: TrainerState, control: TrainerControl, due: bool) -> None:
        # DefaultFlowCallback runs first, so should_evaluate already says whether an evaluation follows.
        if control.should_evaluate:
            if not due:
                self.driver.park_training()  # the evaluations' rows hold only their own batches
            # else the evaluation's statistics join this row, written by on_evaluate
        elif due:
            self.driver.restore_training()
            self._write_row(state)

    def _checkpoint_file(self, args: TrainingArguments, state: TrainerState) -> str:
        return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", STATE_FILE)

    # -------------------------------------------------------------- events
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        """Start the tracker: a new run, or the run of the checkpoint training resumes from."""
        if self.log_to_trainer and self.trainer is None and args.report_to:
            warnings.warn(
                f"delve's values reach the trainer's log history, but not the report_to loggers "
                f"{list(args.report_to)}: add the callback with "
                "trainer.add_callback(SaturationCallback(..., trainer=trainer)) for that",
                UserWarning,
                stacklevel=2,
            )
        written = [entry[ROW_KEY] for entry in state.log_history if ROW_KEY in entry]
        if written:
            row = max(written) + 1
            announce_continuation(self.savefile, row, "the run of the checkpoint")
            self.driver.start(model, continue_at=row)
        else:  # a new run, or a checkpoint taken before its first row
            self.driver.start(model)
        if self.checkpoint_statistics and state.global_step > 0:
            path = self._checkpoint_file(args, state)
            if os.path.exists(path):
                self.driver.load_statistics(torch.load(path, weights_only=True))
            else:
                warnings.warn(
                    f"delve found no statistics at {path}; the row in progress holds only the steps from now on",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Training steps set aside for the evaluations since the last step come back."""
        if self.driver.tracker is not None:
            self.driver.restore_training()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Count the step; a row is due at multiples of ``every_n_steps``, at the epoch's last step, at the end."""
        if self.driver.tracker is None:
            return
        self.driver.note_batch("train")
        every = self.driver.every_n_steps
        last = state.global_step >= state.max_steps
        if every is not None:
            due = state.global_step % every == 0 or last
        else:
            # state.epoch is a whole number exactly after the epoch's last step: an evaluation there
            # shares the epoch's row. Without an evaluation now, the row waits for on_epoch_end.
            due = control.should_evaluate and (float(state.epoch or 0).is_integer() or last)
        self._row_boundary(state, control, due)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Without ``every_n_steps``, the epoch's row is due (if not written at its last step)."""
        if self.driver.tracker is not None:
            self._row_boundary(state, control, due=self.driver.every_n_steps is None)

    def on_prediction_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Count the evaluation batch."""
        if self.driver.tracker is not None:
            self.driver.note_batch("eval")

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: Optional[Dict[str, float]] = None,
        **kwargs: Any,
    ) -> None:
        """Write the row of this evaluation (with the training steps due with it)."""
        if self.driver.tracker is not None:
            self._write_row(state, metrics)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """With ``checkpoint_statistics``, store what was recorded since the last row in the checkpoint."""
        if not (self.checkpoint_statistics and self.driver.tracker is not None and args.should_save):
            return
        path = self._checkpoint_file(args, state)
        if os.path.isdir(os.path.dirname(path)):
            buffer = io.BytesIO()
            torch.save(self.driver.state_dict(statistics=True), buffer)
            atomic_write_bytes(path, buffer.getvalue())

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Write the steps after the last row, then remove the hooks and close the writers."""
        self.driver.restore_training()
        self._write_row(state)
        self.driver.close()


__all__ = ["SaturationCallback", "ROW_KEY", "STATE_FILE"]
