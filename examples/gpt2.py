"""Saturation of a small GPT-2 from Hugging Face transformers, trained on padded synthetic text.

The model is built from a ``GPT2Config`` (randomly initialised, nothing is
downloaded): 4 blocks of width 64 and GPT-2's real vocabulary of 50257 tokens.
delve tracks every projection of every block: GPT-2 writes them as
``transformers.pytorch_utils.Conv1D`` (a Linear with a transposed weight),
``c_attn`` (query, key and value), ``c_proj`` (attention output), ``c_fc`` and
the MLP's ``c_proj``. ``lm_head`` would need a 50257 x 50257 covariance (37.6
GiB); delve leaves it out with one warning and goes on. ``blocks="GPT2Block"``
tracks the output of each whole block as well: the residual stream ("hidden
states") that layer-wise analyses of language models read.

The batches hold sequences of different lengths, padded and passed with an
``attention_mask``: delve keeps only the real tokens (``samples`` counts them).

Run ``python examples/gpt2.py`` (``--quick`` for a run of a few seconds). It
prints what is tracked (``tracker.summary()``) and writes ``runs/gpt2.csv`` and the
plots in ``runs/gpt2/``.
"""
import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from delve import SaturationTracker


def synthetic_batch(batch_size: int, max_length: int, generator: torch.Generator) -> dict:
    """Counting sequences ``a, a+k, a+2k, ...`` of random lengths, right-padded, with their mask and labels."""
    lengths = torch.randint(max_length // 2, max_length + 1, (batch_size,), generator=generator)
    starts = torch.randint(0, 1000, (batch_size, 1), generator=generator)
    steps = torch.randint(1, 5, (batch_size, 1), generator=generator)
    input_ids = starts + steps * torch.arange(max_length)
    attention_mask = (torch.arange(max_length) < lengths[:, None]).long()
    input_ids = input_ids * attention_mask
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps, for a smoke test")
    args = parser.parse_args()
    epochs, steps = (2, 2) if args.quick else (5, 20)

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    tracker = SaturationTracker(
        "runs/gpt2",
        save_to="plotcsv",
        modules=model,
        blocks="GPT2Block",
        stats=["lsat", "idim", "samples"],
    )
    print(tracker.summary())
    for epoch in range(epochs):
        model.train()
        for _ in range(steps):
            loss = model(**synthetic_batch(16, 32, generator)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            eval_loss = model(**synthetic_batch(32, 32, generator)).loss.item()
        tracker.add_scalar("eval_loss", eval_loss)
        results = tracker.add_saturations()
        stream = "  ".join(
            f"h{block}={results[f'train-saturation_transformer-h-{block}']:.2f}" for block in range(4)
        )
        print(f"epoch {epoch}: eval loss {eval_loss:.3f} | residual-stream saturation {stream}")
    tracker.close()
    print("wrote runs/gpt2.csv and runs/gpt2/")


if __name__ == "__main__":
    main()
