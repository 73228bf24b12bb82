"""Hugging Face ``Trainer``: record layer saturation with delve's ``SaturationCallback``.

Run ``python examples/huggingface_callback.py`` (``--quick`` for a two-epoch smoke run
on a few hundred sequences). A two-layer BERT built from a config (no download)
learns a synthetic task: does token 3 occur more often than token 5 in a random
sequence? Every Linear layer of the encoder is tracked, each token a sample. The
callback

* writes ``runs/huggingface_callback.csv``: one row per epoch with the training
  statistics (``train-saturation_bert-encoder-layer-0-attention-self-query``...)
  and those of the evaluation at the end of the epoch (``eval-...``);
* gives the same numbers to ``Trainer.log`` (the callback is added with
  ``trainer=trainer``), prefixed ``delve/`` and, for the evaluation's,
  ``eval_delve/``: they go into ``trainer.state.log_history`` (saved in each
  checkpoint's ``trainer_state.json``) and to the ``report_to`` loggers
  (``--report-to tensorboard`` writes them beside the loss, under
  ``runs/huggingface_trainer/runs/``), and the evaluation's values into the
  metrics ``Trainer.evaluate`` returns, so ``metric_for_best_model`` can name one.

Needs ``pip install delve[hf]``.
"""
import argparse

import torch
from torch.utils.data import Dataset
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from delve.integrations.huggingface import ROW_KEY, SaturationCallback

VOCAB, LENGTH = 16, 24


class CountingTask(Dataset):
    """Random token sequences labelled 1 when token 3 occurs more often than token 5."""

    def __init__(self, size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(1, VOCAB, (size, LENGTH), generator=generator)
        self.labels = ((self.tokens == 3).sum(1) > (self.tokens == 5).sum(1)).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.tokens[index], "labels": self.labels[index]}


def tiny_bert() -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=LENGTH,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="two epochs on 256 sequences, for smoke tests")
    parser.add_argument("--report-to", default="none", help="the Trainer's report_to, e.g. tensorboard")
    args = parser.parse_args()

    torch.manual_seed(0)
    sizes = (256, 128) if args.quick else (4000, 1000)
    train, test = CountingTask(sizes[0], seed=0), CountingTask(sizes[1], seed=1)
    training_args = TrainingArguments(
        output_dir="runs/huggingface_trainer",
        num_train_epochs=2 if args.quick else args.epochs,
        per_device_train_batch_size=64,
        per_device_eval_batch_size=128,
        learning_rate=1e-3,
        eval_strategy="epoch",
        logging_strategy="epoch",
        save_strategy="no",
        report_to=args.report_to,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(tiny_bert(), training_args, train_dataset=train, eval_dataset=test)
    trainer.add_callback(SaturationCallback("runs/huggingface_callback", trainer=trainer, stats=["lsat", "idim"]))
    trainer.train()
    last = [entry for entry in trainer.state.log_history if ROW_KEY in entry][-1]
    print(
        "last epoch, eval saturation:",
        {k.split("_", 2)[2]: round(v, 3) for k, v in last.items() if k.startswith("eval_delve/eval-saturation")},
    )
    print("written: runs/huggingface_callback.csv")


if __name__ == "__main__":
    main()
