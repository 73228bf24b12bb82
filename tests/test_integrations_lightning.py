"""The Lightning callback in real ``Trainer.fit`` runs on a tiny model (CPU), rows checked against numpy."""
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from test_integrations import (
    BATCH,
    N_TRAIN,
    N_VAL,
    OutputRecorder,
    check_moved_aside,
    check_rows,
    check_rows_against_numpy,
    check_saturation_columns,
    needs_fresh_run_rule,
    read_csv,
    synthetic,
)


def lightning():
    """``lightning.pytorch``, else ``pytorch_lightning`` (as the callback does), else skip the test."""
    try:
        import lightning.pytorch as pl
    except ImportError:
        reason = "PyTorch Lightning is not installed (pip install delve[lightning])"
        pl = pytest.importorskip("pytorch_lightning", reason=reason)
    return pl


def lightning_module_class():
    pl = lightning()

    class TinyClassifier(pl.LightningModule):
        def __init__(self, lr=0.1):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
            self.lr = lr

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", nn.functional.cross_entropy(self(x), y), batch_size=len(x))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    return TinyClassifier


def lightning_loaders():
    train = DataLoader(TensorDataset(*synthetic(N_TRAIN, 0)), batch_size=BATCH)
    val = DataLoader(TensorDataset(*synthetic(N_VAL, 1)), batch_size=BATCH)
    return train, val


def lightning_trainer(tmp_path, callbacks, **kwargs):
    pl = lightning()
    options = dict(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=pl.loggers.CSVLogger(str(tmp_path), name="logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def test_lightning_rows_match_numpy_on_the_same_activations(tmp_path):
    lightning()
    from delve.integrations.lightning import SaturationCallback

    model = lightning_module_class()()
    savefile = str(tmp_path / "lit")
    callback = SaturationCallback(savefile, stats=["lsat", "idim", "trc"])
    trainer = lightning_trainer(tmp_path, [callback], num_sanity_val_steps=2)
    recorder = OutputRecorder(model.net[0], lambda: None if trainer.sanity_checking else trainer.current_epoch)
    trainer.fit(model, *lightning_loaders())

    frame = read_csv(savefile)
    assert list(frame.index) == [0, 1]
    check_saturation_columns(frame, ["net-0", "net-2"], ["train", "eval"])
    check_rows_against_numpy(frame, recorder)  # the sanity check is not part of any row
    # The same numbers reached the trainer's loggers.
    logged_last = trainer.callback_metrics["delve/eval-saturation_net-0"].item()
    assert logged_last == pytest.approx(frame.loc[1, "eval-saturation_net-0"])
    logged = pd.read_csv(tmp_path / "logs" / "version_0" / "metrics.csv")
    column = logged["delve/train-covariance-trace_net-0"].dropna()
    np.testing.assert_allclose(column.to_numpy(), frame["train-covariance-trace_net-0"].to_numpy(), rtol=1e-6)
    assert callback.tracker is None  # closed at the end of fit
    assert not any(type(h).__module__ == "delve.tracker" for h in model.net[0]._forward_hooks.values())


def test_lightning_every_n_steps_writes_step_rows_and_validation_rows(tmp_path):
    lightning()
    from delve.integrations.lightning import SaturationCallback

    savefile = str(tmp_path / "steps")
    callback = SaturationCallback(savefile, every_n_steps=2, modules=None)
    trainer = lightning_trainer(tmp_path, [callback], num_sanity_val_steps=0)
    trainer.fit(lightning_module_class()(), *lightning_loaders())
    frame = read_csv(savefile)
    # 4 steps per epoch: rows after steps 2 and 4, then the validation, twice.
    assert len(frame) == 6
    is_eval_row = frame["eval-saturation_net-0"].notna().to_numpy()
    assert is_eval_row.tolist() == [False, False, True, False, False, True]
    assert frame["train-saturation_net-0"].notna().to_numpy().tolist() == (~is_eval_row).tolist()
    check_saturation_columns(frame, ["net-0", "net-2"], ["train", "eval"])


def test_lightning_resume_continues_the_csv(tmp_path):
    lightning()
    from delve.integrations.lightning import SaturationCallback

    savefile = str(tmp_path / "resume")
    module_class = lightning_module_class()
    checkpoint = lightning().callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    first = SaturationCallback(savefile, every_n_steps=4)
    lightning_trainer(tmp_path, [first, checkpoint], max_epochs=1, enable_checkpointing=True).fit(
        module_class(), *lightning_loaders()
    )
    stored = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"][first.state_key]
    assert {key: stored[key] for key in ("version", "rows_written")} == {"version": 1, "rows_written": 2}
    assert "tracker" not in stored  # reset_covariance=True: nothing spans the checkpoint worth its size
    before = read_csv(savefile)
    second = SaturationCallback(savefile, every_n_steps=4)
    lightning_trainer(tmp_path, [second], max_epochs=2).fit(
        module_class(), *lightning_loaders(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    after = read_csv(savefile)
    assert list(after.index) == [0, 1, 2, 3]
    pd.testing.assert_frame_equal(after.loc[[0, 1], before.columns], before)


@pytest.mark.parametrize("checkpoint_statistics", [None, True, False])
def test_lightning_resume_goes_on_with_the_same_statistics(tmp_path, checkpoint_statistics):
    # reset_covariance=False: every row holds everything since the start, so a resumed run matches
    # an uninterrupted one only if the checkpoint carried the accumulated covariances.
    lightning()
    from delve.integrations.lightning import SaturationCallback

    module_class = lightning_module_class()
    options = dict(every_n_steps=4, reset_covariance=False, stats=["lsat", "trc"])
    torch.manual_seed(0)
    straight_module = module_class()
    torch.manual_seed(0)
    first_module = module_class()
    straight = str(tmp_path / "straight")
    lightning_trainer(tmp_path, [SaturationCallback(straight, **options)]).fit(straight_module, *lightning_loaders())

    resumed = str(tmp_path / "resumed")
    options["checkpoint_statistics"] = checkpoint_statistics
    checkpoint = lightning().callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    first = SaturationCallback(resumed, **options)
    lightning_trainer(tmp_path, [first, checkpoint], max_epochs=1, enable_checkpointing=True).fit(
        first_module, *lightning_loaders()
    )
    lightning_trainer(tmp_path, [SaturationCallback(resumed, **options)]).fit(
        module_class(), *lightning_loaders(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    expected, got = read_csv(straight), read_csv(resumed)
    assert list(got.index) == list(expected.index) == [0, 1, 2, 3]
    pd.testing.assert_frame_equal(got.loc[[0, 1]], expected.loc[[0, 1]])
    traces = [column for column in expected.columns if "trace" in column]
    assert traces
    got_traces, expected_traces = got[traces].to_numpy(dtype=float), expected[traces].to_numpy(dtype=float)
    same = np.allclose(got_traces, expected_traces, rtol=1e-6, equal_nan=True)
    assert same == (checkpoint_statistics is not False)  # None: stored, as reset_covariance=False


def test_lightning_callback_rejects_bad_options(tmp_path):
    lightning()
    from delve.integrations.lightning import SaturationCallback

    with pytest.raises(TypeError, match="sat_treshold"):
        SaturationCallback(str(tmp_path / "x"), sat_treshold=0.9)
    with pytest.raises(ValueError, match="every_n_steps"):
        SaturationCallback(str(tmp_path / "x"), every_n_steps=0)
    callback = SaturationCallback(str(tmp_path / "x"))
    with pytest.raises(ValueError, match="version 99; this delve reads version 1"):
        callback.load_state_dict({"version": 99, "rows_written": 3})
    callback.load_state_dict(callback.state_dict())


class Phase:
    """What the trainer runs: a validation (numbered from 0, sanity checks left out) or a training epoch."""

    def __init__(self):
        pl = lightning()
        phase = self
        self.validations = 0

        class Counter(pl.Callback):
            def on_validation_epoch_start(self, trainer, pl_module):
                if not trainer.sanity_checking:
                    phase.validations += 1

        self.callback = Counter()

    def key(self, trainer):
        if trainer.sanity_checking:
            return None
        return ("val", self.validations - 1) if trainer.validating else ("epoch", trainer.current_epoch)


@pytest.mark.parametrize(
    "trainer_options, checkpoint_options",
    [({"val_check_interval": 0.5}, {}), ({}, {"save_on_train_epoch_end": False})],
    ids=["val_check_interval=0.5", "save_on_train_epoch_end=False"],
)
def test_lightning_resume_from_a_checkpoint_taken_when_validation_ends(tmp_path, trainer_options, checkpoint_options):
    """Such a checkpoint already holds the validation's row: resuming writes every row as a straight run does."""
    pl = lightning()
    from delve.integrations.lightning import SaturationCallback

    module_class = lightning_module_class()
    options = dict(stats=["lsat", "idim", "trc"])
    straight = str(tmp_path / "straight")
    torch.manual_seed(0)
    lightning_trainer(tmp_path, [SaturationCallback(straight, **options)], **trainer_options).fit(
        module_class(), *lightning_loaders()
    )
    resumed = str(tmp_path / "resumed")
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, **checkpoint_options)
    torch.manual_seed(0)
    first = lightning_trainer(
        tmp_path, [SaturationCallback(resumed, **options), checkpoint], max_epochs=1, enable_checkpointing=True,
        **trainer_options,
    )
    first.fit(module_class(), *lightning_loaders())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lightning_trainer(tmp_path, [SaturationCallback(resumed, **options)], **trainer_options).fit(
            module_class(), *lightning_loaders(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
        )
    expected = read_csv(straight)
    pd.testing.assert_frame_equal(read_csv(resumed), expected)
    assert len(expected) == (4 if trainer_options else 2)  # a row per validation, see the test below
    row = len(expected) // 2
    message = f"delve continues the run of the checkpoint in {resumed!r} at row {row} (the rows before it are kept)"
    assert [str(w.message) for w in caught if "delve continues" in str(w.message)] == [message]


def test_lightning_every_validation_writes_its_row_before_monitors_look(tmp_path):
    """val_check_interval=0.5: EarlyStopping and ModelCheckpoint monitor delve keys at every validation.

    Each validation gets one eval value of its own; the epoch's training batches
    all go into the row of the validation that ends the epoch.
    """
    pl = lightning()
    from delve.integrations.lightning import SaturationCallback

    trace_key = "delve/eval-covariance-trace_net-0"

    class SeenByMonitors(pl.Callback):
        """Reads trainer.callback_metrics where EarlyStopping and ModelCheckpoint do."""

        def __init__(self):
            self.values = []

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                self.values.append(trainer.callback_metrics[trace_key].item())

    phase, seen = Phase(), SeenByMonitors()
    stopping = pl.callbacks.EarlyStopping(monitor="delve/eval-saturation_net-0", mode="max", patience=100)
    best = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "best"), monitor=trace_key, mode="max")
    savefile = str(tmp_path / "halves")
    callbacks = [stopping, seen, phase.callback, SaturationCallback(savefile, stats=["lsat", "idim", "trc"]), best]
    model = lightning_module_class()()
    trainer = lightning_trainer(tmp_path, callbacks, val_check_interval=0.5, enable_checkpointing=True)
    recorder = OutputRecorder(model.net[0], lambda: phase.key(trainer))
    trainer.fit(model, *lightning_loaders())

    frame = read_csv(savefile)
    check_rows(frame, recorder, [
        {"eval": (("val", 0), N_VAL)},
        {"train": (("epoch", 0), N_TRAIN), "eval": (("val", 1), N_VAL)},
        {"eval": (("val", 2), N_VAL)},
        {"train": (("epoch", 1), N_TRAIN), "eval": (("val", 3), N_VAL)},
    ])
    traces = frame["eval-covariance-trace_net-0"].tolist()
    assert seen.values == pytest.approx(traces, rel=1e-6)
    assert best.best_model_score.item() == pytest.approx(max(traces), rel=1e-6)
    logged = pd.read_csv(tmp_path / "logs" / "version_0" / "metrics.csv")
    np.testing.assert_allclose(logged[trace_key].dropna(), traces, rtol=1e-6)


def test_lightning_every_n_steps_rows_hold_their_own_batches(tmp_path):
    """Step rows hold training steps only, validation rows eval batches only, and the last steps get a row.

    Four steps per epoch, rows every 3 steps: after step 3, at validation 0,
    after step 6 (step 4 of epoch 0 and steps 5-6), at validation 1, and when
    training ends (steps 7-8). The loggers get each step row once, at the step
    Lightning logs that batch's values (one less than the optimizer steps taken).
    """
    from delve.integrations.lightning import SaturationCallback

    phase = Phase()
    savefile = str(tmp_path / "steps")
    callback = SaturationCallback(savefile, every_n_steps=3, stats=["lsat", "idim", "trc"])
    model = lightning_module_class()()
    trainer = lightning_trainer(tmp_path, [phase.callback, callback], num_sanity_val_steps=0, log_every_n_steps=1)

    def key():
        found = phase.key(trainer)
        return ("steps", trainer.global_step // 3) if found and found[0] == "epoch" else found

    recorder = OutputRecorder(model.net[0], key)
    trainer.fit(model, *lightning_loaders())

    frame = read_csv(savefile)
    check_rows(frame, recorder, [
        {"train": (("steps", 0), 3 * BATCH)},
        {"eval": (("val", 0), N_VAL)},
        {"train": (("steps", 1), 3 * BATCH)},
        {"eval": (("val", 1), N_VAL)},
        {"train": (("steps", 2), 2 * BATCH)},
    ])
    logged = pd.read_csv(tmp_path / "logs" / "version_0" / "metrics.csv")
    train = logged.dropna(subset=["delve/train-covariance-trace_net-0"])
    assert train["step"].tolist() == [2, 5, 7]
    np.testing.assert_allclose(
        train["delve/train-covariance-trace_net-0"], frame["train-covariance-trace_net-0"].dropna(), rtol=1e-6
    )
    assert logged["delve/eval-covariance-trace_net-0"].notna().sum() == 2


def test_lightning_a_second_fit_of_the_same_callback_is_a_new_run(tmp_path):
    from delve.integrations.lightning import SaturationCallback

    savefile = str(tmp_path / "twice")
    callback = SaturationCallback(savefile, every_n_steps=4, stats=["trc"])
    lightning_trainer(tmp_path, [callback], max_epochs=1).fit(lightning_module_class()(), *lightning_loaders())
    first = read_csv(savefile)
    assert len(first) == 2  # the row of steps 1-4 and that of the validation
    lightning_trainer(tmp_path, [callback], max_epochs=1).fit(lightning_module_class()(), *lightning_loaders())
    second = read_csv(savefile)
    assert list(second.index) == [0, 1]  # rows 0 and 1 of the second run, not rows 2 and 3 after the first
    assert not np.allclose(second.to_numpy(dtype=float), first.to_numpy(dtype=float), equal_nan=True)  # other weights


def test_lightning_a_new_run_moves_the_earlier_one_aside(tmp_path):
    needs_fresh_run_rule()
    from delve.integrations.lightning import SaturationCallback

    savefile = str(tmp_path / "again")
    callback = SaturationCallback(savefile, stats=["trc"])
    lightning_trainer(tmp_path, [callback], max_epochs=1).fit(lightning_module_class()(), *lightning_loaders())
    first = read_csv(savefile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lightning_trainer(tmp_path, [callback], max_epochs=1).fit(lightning_module_class()(), *lightning_loaders())
    check_moved_aside(savefile, caught, first)
    assert list(read_csv(savefile).index) == [0]
