"""The Hugging Face callback in real ``Trainer.train`` runs on a tiny model (CPU), rows checked against numpy."""
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from test_integrations import (
    BATCH,
    N_TRAIN,
    N_VAL,
    OutputRecorder,
    check_moved_aside,
    check_rows,
    check_saturation_columns,
    needs_fresh_run_rule,
    read_csv,
    synthetic,
)

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install delve[hf])")

from delve.integrations.huggingface import ROW_KEY, STATE_FILE, SaturationCallback  # noqa: E402

STEPS_PER_EPOCH = N_TRAIN // BATCH

class DictDataset(Dataset):
    def __init__(self, n, seed):
        self.x, self.y = synthetic(n, seed)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return {"x": self.x[index], "labels": self.y[index]}


class TinyHFModel(nn.Module):
    """A plain module with the Trainer's calling convention: keyword inputs, a dict with the loss."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x, labels=None):
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def hf_trainer(tmp_path, callbacks, model=None, **kwargs):
    options = dict(
        output_dir=str(tmp_path / "hf_out"),
        num_train_epochs=2,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH,
        learning_rate=0.1,
        eval_strategy="epoch",
        save_strategy="no",
        logging_strategy="epoch",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=0,
    )
    options.update(kwargs)
    torch.manual_seed(0)
    return transformers.Trainer(
        model=model if model is not None else TinyHFModel(),
        args=transformers.TrainingArguments(**options),
        train_dataset=DictDataset(N_TRAIN, 0),
        eval_dataset=DictDataset(N_VAL, 1),
        callbacks=callbacks,
    )


class Phase(transformers.TrainerCallback):
    """Counts epochs and evaluations; ``key()`` names the row the current batch of ``model`` belongs to."""

    def __init__(self, model, every_n_steps=None):
        self.model, self.every_n_steps = model, every_n_steps
        self.epoch, self.evaluations, self.state, self.metrics = -1, 0, None, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.state = state

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch += 1

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.evaluations += 1
        self.metrics.append(dict(metrics))

    def key(self):
        if not self.model.training:
            return ("eval", self.evaluations)
        if self.every_n_steps is None:
            return ("epoch", self.epoch)
        return ("steps", self.state.global_step // self.every_n_steps)


def delve_entries(trainer):
    return [entry for entry in trainer.state.log_history if ROW_KEY in entry]


def test_huggingface_rows_match_numpy_on_the_same_activations(tmp_path):
    savefile = str(tmp_path / "hf")
    model = TinyHFModel()
    phase = Phase(model)
    recorder = OutputRecorder(model.net[0], phase.key)
    callback = SaturationCallback(savefile, stats=["lsat", "idim", "trc"])
    trainer = hf_trainer(tmp_path, [callback, phase], model=model)
    trainer.train()

    frame = read_csv(savefile)
    check_saturation_columns(frame, ["net-0", "net-2"], ["train", "eval"])
    check_rows(frame, recorder, [{"train": (("epoch", e), N_TRAIN), "eval": (("eval", e), N_VAL)} for e in (0, 1)])
    rows = delve_entries(trainer)
    assert [entry[ROW_KEY] for entry in rows] == [0, 1]
    assert [entry["step"] for entry in rows] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    for entry in rows:
        assert entry["eval_delve/eval-covariance-trace_net-0"] == pytest.approx(
            frame.loc[entry[ROW_KEY], "eval-covariance-trace_net-0"], rel=1e-9
        )
    # The evaluation's metrics carry the row with the evaluation's prefix (callbacks after delve's see them).
    assert [m["eval_delve/eval-saturation_net-0"] for m in phase.metrics] == frame["eval-saturation_net-0"].tolist()
    assert "eval_loss" in phase.metrics[0]
    assert not any(type(h).__module__ == "delve.tracker" for h in model.net[0]._forward_hooks.values())


def test_huggingface_evaluation_on_the_epochs_last_step_shares_the_epochs_row(tmp_path):
    """eval_strategy="steps" evaluating on each epoch's last step: one full row per epoch, no empty rows."""
    savefile = str(tmp_path / "hf_last_step")
    model = TinyHFModel()
    phase = Phase(model)
    recorder = OutputRecorder(model.net[0], phase.key)
    callback = SaturationCallback(savefile, stats=["lsat", "idim", "trc"])
    trainer = hf_trainer(tmp_path, [callback, phase], model=model, eval_strategy="steps", eval_steps=STEPS_PER_EPOCH)
    trainer.train()

    check_rows(read_csv(savefile), recorder,
               [{"train": (("epoch", e), N_TRAIN), "eval": (("eval", e), N_VAL)} for e in (0, 1)])
    rows = delve_entries(trainer)
    assert [entry[ROW_KEY] for entry in rows] == [0, 1]
    assert all({"delve/train-saturation_net-0", "eval_delve/eval-saturation_net-0"} <= set(entry) for entry in rows)


def test_huggingface_mid_epoch_evaluations_get_rows_of_their_own(tmp_path):
    """Evaluations after steps 3 and 6 hold only their own batches; the epochs' rows hold all their steps.

    The evaluation the trainer forces at the last step (8) shares the last epoch's row.
    """
    savefile = str(tmp_path / "hf_mid")
    model = TinyHFModel()
    phase = Phase(model)
    recorder = OutputRecorder(model.net[0], phase.key)
    callback = SaturationCallback(savefile, stats=["lsat", "idim", "trc"])
    trainer = hf_trainer(tmp_path, [callback, phase], model=model, eval_strategy="steps", eval_steps=3)
    trainer.train()

    assert phase.evaluations == 3
    check_rows(read_csv(savefile), recorder, [
        {"eval": (("eval", 0), N_VAL)},
        {"train": (("epoch", 0), N_TRAIN)},
        {"eval": (("eval", 1), N_VAL)},
        {"train": (("epoch", 1), N_TRAIN), "eval": (("eval", 2), N_VAL)},
    ])


def test_huggingface_every_n_steps_rows_hold_their_own_batches(tmp_path):
    """Rows every 3 steps, evaluations every 2: an evaluation off a row's step gets an eval-only row.

    Steps 1..7: evaluations after steps 2, 4, 6 and the forced one after 7;
    step rows after 3 and 6 (6 shares the evaluation's row) and 7 (the last steps).
    """
    savefile = str(tmp_path / "hf_steps")
    model = TinyHFModel()
    phase = Phase(model, every_n_steps=3)
    recorder = OutputRecorder(model.net[0], phase.key)
    callback = SaturationCallback(savefile, every_n_steps=3, stats=["lsat", "idim", "trc"])
    trainer = hf_trainer(tmp_path, [callback, phase], model=model, max_steps=7, eval_strategy="steps", eval_steps=2)
    trainer.train()

    check_rows(read_csv(savefile), recorder, [
        {"eval": (("eval", 0), N_VAL)},
        {"train": (("steps", 0), 3 * BATCH)},
        {"eval": (("eval", 1), N_VAL)},
        {"train": (("steps", 1), 3 * BATCH), "eval": (("eval", 2), N_VAL)},
        {"train": (("steps", 2), BATCH), "eval": (("eval", 3), N_VAL)},
    ])


def test_huggingface_every_n_steps_writes_the_steps_after_the_last_multiple(tmp_path):
    savefile = str(tmp_path / "hf_leftover")
    model = TinyHFModel()
    phase = Phase(model, every_n_steps=3)
    recorder = OutputRecorder(model.net[0], phase.key)
    callback = SaturationCallback(savefile, every_n_steps=3, stats=["lsat", "idim", "trc"])
    trainer = hf_trainer(tmp_path, [callback, phase], model=model, max_steps=7, eval_strategy="no")
    trainer.train()

    expected = [{"train": (("steps", group), steps * BATCH)} for group, steps in ((0, 3), (1, 3), (2, 1))]
    check_rows(read_csv(savefile), recorder, expected)
    assert [entry["step"] for entry in delve_entries(trainer)] == [3, 6, 7]


@pytest.mark.parametrize("through_trainer", [True, False], ids=["trainer.log", "log_history"])
def test_huggingface_values_reach_report_to_loggers_and_metric_for_best_model(tmp_path, monkeypatch, through_trainer):
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator", reason="reading event files needs tensorboard"
    )
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    savefile = str(tmp_path / "hf_report")
    trainer = hf_trainer(
        tmp_path, [], report_to="tensorboard", save_strategy="epoch",
        metric_for_best_model="delve/eval-covariance-trace_net-0", greater_is_better=True,
    )
    if through_trainer:
        trainer.add_callback(SaturationCallback(savefile, trainer=trainer, stats=["lsat", "trc"]))
        trainer.train()
    else:
        trainer.add_callback(SaturationCallback(savefile, stats=["lsat", "trc"]))
        with pytest.warns(UserWarning, match=r"not the report_to loggers \['tensorboard'\]: .*trainer=trainer"):
            trainer.train()

    frame = read_csv(savefile)
    traces = frame["eval-covariance-trace_net-0"]
    assert trainer.state.best_metric == pytest.approx(traces.max(), rel=1e-9)
    best_step = STEPS_PER_EPOCH * (int(traces.to_numpy().argmax()) + 1)
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")
    assert [entry[ROW_KEY] for entry in delve_entries(trainer)] == [0, 1]
    events = accumulator.EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tag = "eval/delve/eval-covariance-trace_net-0"  # the trainer's TensorBoard logger turns eval_ into eval/
    if not through_trainer:
        assert tag not in events.Tags()["scalars"]
        return
    scalars = events.Scalars(tag)
    assert [event.step for event in scalars] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    np.testing.assert_allclose([event.value for event in scalars], traces, rtol=1e-6)
    assert "eval/loss" in events.Tags()["scalars"]  # the trainer's own values went to the same logger


@pytest.mark.parametrize("checkpoint_statistics", [True, False])
def test_huggingface_resume_from_a_mid_epoch_checkpoint(tmp_path, checkpoint_statistics):
    """Resumed after step 6 of 8: with the statistics in the checkpoint, epoch 1's row is that of a straight run."""
    options = dict(stats=["lsat", "trc"], checkpoint_statistics=checkpoint_statistics)
    straight = str(tmp_path / "straight")
    hf_trainer(tmp_path, [SaturationCallback(straight, **options)], output_dir=str(tmp_path / "out_straight")).train()
    resumed = str(tmp_path / "resumed")
    output = tmp_path / "out_resumed"
    hf_trainer(tmp_path, [SaturationCallback(resumed, **options)], output_dir=str(output), save_strategy="steps",
               save_steps=2).train()
    checkpoint = output / "checkpoint-6"
    assert (checkpoint / STATE_FILE).is_file() == checkpoint_statistics
    for later in ("checkpoint-8",):
        shutil.rmtree(output / later)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf_trainer(tmp_path, [SaturationCallback(resumed, **options)], output_dir=str(output)).train(
            resume_from_checkpoint=str(checkpoint)
        )
    assert [str(w.message) for w in caught if "delve continues" in str(w.message)] == [
        f"delve continues the run of the checkpoint in {resumed!r} at row 1 (the rows before it are kept)"
    ]
    expected, got = read_csv(straight), read_csv(resumed)
    assert list(got.index) == [0, 1]
    pd.testing.assert_frame_equal(got.loc[[0]], expected.loc[[0]])
    pd.testing.assert_series_equal(got["eval-covariance-trace_net-0"], expected["eval-covariance-trace_net-0"])
    same_train = np.isclose(got.loc[1, "train-covariance-trace_net-0"], expected.loc[1, "train-covariance-trace_net-0"])
    assert same_train == checkpoint_statistics  # without them, row 1 holds only steps 7-8


def test_huggingface_resume_continues_the_csv(tmp_path):
    savefile = str(tmp_path / "hf_resume")
    hf_trainer(tmp_path, [SaturationCallback(savefile)], num_train_epochs=1, save_strategy="epoch").train()
    before = read_csv(savefile)
    checkpoint = tmp_path / "hf_out" / f"checkpoint-{STEPS_PER_EPOCH}"
    assert checkpoint.is_dir()
    resumed = hf_trainer(tmp_path, [SaturationCallback(savefile)], num_train_epochs=2)
    with pytest.warns(UserWarning, match="delve continues the run of the checkpoint .* at row 1"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    after = read_csv(savefile)
    assert list(after.index) == [0, 1]
    pd.testing.assert_frame_equal(after.loc[[0], before.columns], before)
    assert after.loc[1].notna().all()


def test_huggingface_a_second_trainer_with_the_same_callback_is_a_new_run(tmp_path):
    savefile = str(tmp_path / "hf_twice")
    callback = SaturationCallback(savefile, stats=["trc"])
    hf_trainer(tmp_path, [callback], num_train_epochs=1).train()
    first = read_csv(savefile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf_trainer(tmp_path, [callback], num_train_epochs=1, learning_rate=0.5).train()
    assert not [w for w in caught if "delve continues" in str(w.message)]
    second = read_csv(savefile)
    assert list(second.index) == [0]
    assert not np.allclose(second.to_numpy(dtype=float), first.to_numpy(dtype=float))


def test_huggingface_a_new_run_moves_the_earlier_one_aside(tmp_path):
    needs_fresh_run_rule()
    savefile = str(tmp_path / "hf_again")
    hf_trainer(tmp_path, [SaturationCallback(savefile, stats=["trc"])], num_train_epochs=1).train()
    first = read_csv(savefile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf_trainer(tmp_path, [SaturationCallback(savefile, stats=["trc"])], num_train_epochs=1).train()
    check_moved_aside(savefile, caught, first)
    assert list(read_csv(savefile).index) == [0]


def test_huggingface_callback_rejects_bad_options(tmp_path):
    with pytest.raises(TypeError, match="sat_treshold"):
        SaturationCallback(str(tmp_path / "x"), sat_treshold=0.9)
    with pytest.raises(ValueError, match="every_n_steps"):
        SaturationCallback(str(tmp_path / "x"), every_n_steps=-1)
    with pytest.raises(TypeError, match="trainer must be the transformers.Trainer"):
        SaturationCallback(str(tmp_path / "x"), trainer="hf_trainer")
