"""Lightning and Hugging Face callbacks, run in real trainers on a tiny model (CPU, no downloads).

The statistics in the CSV are checked against numpy on activations that an
independent forward hook collected during the same run.
"""
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

N_TRAIN, N_VAL, BATCH = 64, 32, 16


def reference_stats(outputs, threshold=0.99):
    """Trace and intrinsic dimensionality of the population covariance, numpy float64."""
    x = np.concatenate(outputs).astype(np.float64)
    cov = np.cov(x, rowvar=False, bias=True)
    values = np.clip(np.linalg.eigvalsh(cov)[::-1], 0, None)
    shares = np.cumsum(values) / values.sum()
    idim = int(np.argmax(shares >= threshold * (1 - 1e-10))) + 1
    return float(np.trace(cov)), idim


def synthetic(n, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return x, y


def read_csv(savefile):
    return pd.read_csv(f"{savefile}.csv", sep=";", index_col=0)


def check_saturation_columns(frame, layers, modes):
    for mode in modes:
        for layer in layers:
            column = f"{mode}-saturation_{layer}"
            assert column in frame.columns, f"missing {column} in {list(frame.columns)}"
            values = frame[column].dropna()
            assert len(values) and values.between(0, 1).all() and (values > 0).all()


def check_rows_against_numpy(frame, recorder, epochs=(0, 1), layer="net-0", width=8):
    """Each row's trace, intrinsic dimensionality and saturation of ``layer`` against numpy on the recorded outputs.

    Every epoch must have recorded exactly the training and validation samples (``N_TRAIN``, ``N_VAL``).
    """
    for epoch in epochs:
        for mode, samples in (("train", N_TRAIN), ("eval", N_VAL)):
            outputs = recorder.outputs[epoch, mode]
            assert sum(len(o) for o in outputs) == samples
            trace, idim = reference_stats(outputs)
            assert frame.loc[epoch, f"{mode}-covariance-trace_{layer}"] == pytest.approx(trace, rel=1e-5)
            assert frame.loc[epoch, f"{mode}-intrinsic-dimensionality_{layer}"] == idim
            assert frame.loc[epoch, f"{mode}-saturation_{layer}"] == pytest.approx(idim / width)


def test_core_import_does_not_load_frameworks():
    code = (
        "import sys, delve, delve.pca_layers; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'transformers') "
        "or m.startswith('delve.integrations')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_driver_uses_the_given_modules_and_numbers_rows_from_initial_epoch(tmp_path):
    from delve.integrations import TrackerDriver

    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    driver = TrackerDriver(str(tmp_path / "drv"), None, "", {"modules": model[2], "initial_epoch": 3})
    with pytest.warns(UserWarning, match="cannot resume"):  # no CSV of rows 0-2 to continue
        tracker = driver.start(model)
    assert list(tracker.layers) == ["Module-0-Linear"] and tracker.epoch == 3
    out = model(torch.randn(32, 6)).detach().numpy()
    _, idim = reference_stats([out])
    assert driver.write_row() == {"train-saturation_Module-0-Linear": idim / 3}
    assert driver.rows_written == 4
    driver.close()
    assert driver.tracker is None and read_csv(tmp_path / "drv").index.tolist() == [3]


# --------------------------------------------------------------------- Lightning
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


class OutputRecorder:
    """Independent record of a layer's outputs per (row key, mode), collected by a forward hook."""

    def __init__(self, layer, key):
        self.outputs = defaultdict(list)
        self.key = key
        layer.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        key = self.key()
        if key is not None:
            self.outputs[key, "train" if module.training else "eval"].append(output.detach().numpy().copy())


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


# ----------------------------------------------------------------- Hugging Face
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
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install delve[hf])")
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


def test_huggingface_rows_match_numpy_on_the_same_activations(tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed (pip install delve[hf])")
    from transformers import TrainerCallback

    from delve.integrations.huggingface import ROW_KEY, SaturationCallback

    class EpochCounter(TrainerCallback):
        def __init__(self):
            self.epoch = -1
            self.evaluations = []

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.epoch += 1

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self.evaluations.append(dict(metrics))

    counter = EpochCounter()
    savefile = str(tmp_path / "hf")
    model = TinyHFModel()
    recorder = OutputRecorder(model.net[0], lambda: counter.epoch)
    trainer = hf_trainer(tmp_path, [SaturationCallback(savefile, stats=["lsat", "idim", "trc"]), counter], model=model)
    trainer.train()

    frame = read_csv(savefile)
    assert list(frame.index) == [0, 1]
    check_saturation_columns(frame, ["net-0", "net-2"], ["train", "eval"])
    check_rows_against_numpy(frame, recorder)
    rows = [entry for entry in trainer.state.log_history if ROW_KEY in entry]
    assert [entry[ROW_KEY] for entry in rows] == [0, 1]
    for entry in rows:
        assert entry["delve/eval-covariance-trace_net-0"] == pytest.approx(
            frame.loc[entry[ROW_KEY], "eval-covariance-trace_net-0"], rel=1e-9
        )
    # The evaluation's metrics carry the row too (callbacks after delve's and Trainer.evaluate see them).
    assert [m["delve/eval-saturation_net-0"] for m in counter.evaluations] == frame["eval-saturation_net-0"].tolist()
    assert "eval_loss" in counter.evaluations[0]
    assert not any(type(h).__module__ == "delve.tracker" for h in model.net[0]._forward_hooks.values())


def test_huggingface_every_n_steps_and_evaluation_rows(tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed (pip install delve[hf])")
    from delve.integrations.huggingface import SaturationCallback

    savefile = str(tmp_path / "hf_steps")
    callbacks = [SaturationCallback(savefile, every_n_steps=3)]
    trainer = hf_trainer(tmp_path, callbacks, max_steps=6, eval_strategy="steps", eval_steps=2)
    trainer.train()
    frame = read_csv(savefile)
    # Steps 1..6: evaluations after steps 2, 4 and 6; step-rows due after 3 and 6 (6 shares the evaluation's row).
    has_eval = frame["eval-saturation_net-0"].notna().tolist()
    has_train = frame["train-saturation_net-0"].notna().tolist()
    assert has_eval == [True, False, True, True]
    assert has_train == [True, True, True, True]
    check_saturation_columns(frame, ["net-0", "net-2"], ["train", "eval"])


def test_huggingface_resume_continues_the_csv(tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed (pip install delve[hf])")
    from delve.integrations.huggingface import SaturationCallback

    savefile = str(tmp_path / "hf_resume")
    hf_trainer(tmp_path, [SaturationCallback(savefile)], num_train_epochs=1, save_strategy="epoch").train()
    before = read_csv(savefile)
    checkpoint = tmp_path / "hf_out" / "checkpoint-4"
    assert checkpoint.is_dir()
    resumed = hf_trainer(tmp_path, [SaturationCallback(savefile)], num_train_epochs=2)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    after = read_csv(savefile)
    assert list(after.index) == [0, 1]
    pd.testing.assert_frame_equal(after.loc[[0], before.columns], before)
    assert after.loc[1].notna().all()
