"""Class-conditional statistics inside the trainers: the callbacks hand the batch's labels over themselves."""
import numpy as np
import pytest
import torch
from torch import nn

from test_classes import _numpy_nc1_cdnv
from test_integrations import read_csv, synthetic


def test_batch_labels_finds_labels_in_common_batch_layouts():
    from delve.integrations import batch_labels

    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    assert batch_labels([x, y]) is y and batch_labels({"x": x, "target": y}) is y
    assert batch_labels((x, torch.randn(4))) is None  # regression targets are no labels
    assert batch_labels((x, torch.tensor([0, 1]))) is None  # not one label per input
    assert batch_labels({"x": x}) is None


def test_lightning_callback_gives_nc1_from_the_batches_labels(tmp_path):
    pl = pytest.importorskip("lightning.pytorch", reason="pip install delve[lightning]")
    from torch.utils.data import DataLoader, TensorDataset

    from delve.integrations.lightning import SaturationCallback

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
            self.seen = []

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            self.seen.append((self.current_epoch, logits.detach().double().clone(), y.clone()))
            return nn.functional.cross_entropy(logits, y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    model = Classifier()
    savefile = str(tmp_path / "lit")
    callback = SaturationCallback(savefile, stats=["nc1", "cdnv"], num_classes=3)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         callbacks=[callback], enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path))
    trainer.fit(model, DataLoader(TensorDataset(*synthetic(96, 0)), batch_size=32))
    frame = read_csv(savefile)
    for epoch in (0, 1):
        outputs = torch.cat([out for e, out, _ in model.seen if e == epoch]).numpy()
        labels = torch.cat([y for e, _, y in model.seen if e == epoch]).numpy()
        expected_nc1, expected_cdnv = _numpy_nc1_cdnv(outputs, labels)
        assert frame.loc[epoch, "train-nc1_net-2"] == pytest.approx(expected_nc1, rel=1e-4)
        assert frame.loc[epoch, "train-class-distance-normalized-variance_net-2"] == pytest.approx(
            expected_cdnv, rel=1e-4
        )


def test_huggingface_trainer_labels_reach_the_tracker_through_the_model_call(tmp_path):
    transformers = pytest.importorskip("transformers", reason="pip install delve[hf]")
    from torch.utils.data import Dataset

    from delve.integrations.huggingface import SaturationCallback

    class Rows(Dataset):
        def __init__(self):
            self.x, self.y = synthetic(64, 0)

        def __len__(self):
            return len(self.y)

        def __getitem__(self, index):
            return {"x": self.x[index], "labels": self.y[index]}

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
            self.seen = []

        def forward(self, x, labels=None):
            logits = self.net(x)
            self.seen.append((logits.detach().double().clone(), labels.clone()))
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    torch.manual_seed(0)
    model = Model()
    savefile = str(tmp_path / "hf")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), num_train_epochs=1, per_device_train_batch_size=16, learning_rate=0.1,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, dataloader_pin_memory=False,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(),
                                   callbacks=[SaturationCallback(savefile, stats=["nc1"], num_classes=3)])
    trainer.train()
    outputs = torch.cat([out for out, _ in model.seen]).numpy()
    labels = torch.cat([y for _, y in model.seen]).numpy()
    expected, _ = _numpy_nc1_cdnv(outputs, labels)
    assert read_csv(savefile).loc[0, "train-nc1_net-2"] == pytest.approx(expected, rel=1e-4)
    assert np.isfinite(read_csv(savefile).loc[0, "train-nc1_net-0"])
