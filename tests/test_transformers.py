"""The models people train today, seen whole and measured right: Hugging Face models, padding, scale.

Models are built from small configs (no download). Every number is checked
against numpy float64 on the outputs the layers produced.
"""
import io
import warnings
from contextlib import redirect_stderr

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import delve.results
from delve import SaturationTracker
from reference import Capture, idim, population_cov

transformers = pytest.importorskip("transformers", reason="pip install 'delve[hf]'")
transformers.logging.set_verbosity_error()


def _rows(outputs):
    return torch.cat([output.reshape(-1, output.shape[-1]) for output in outputs]).numpy()


def _gpt2(**overrides):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, **overrides)
    return transformers.GPT2LMHeadModel(config)


def _bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    return transformers.BertModel(config).eval()


def _padded(sequences, length):
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
        mask[row, : len(sequence)] = 1
    return ids, mask


def test_gpt2_conv1d_layers_are_tracked_and_exact_and_lm_head_is_left_out(tmp_path):
    model = _gpt2()  # the real vocabulary: lm_head is 50257 wide, a 28 GiB covariance
    conv1d = {name: module for name, module in model.named_modules() if type(module).__name__ == "Conv1D"}
    assert len(conv1d) == 8
    captures = {name.replace(".", "-"): Capture(module) for name, module in conv1d.items()}
    with pytest.warns(RuntimeWarning, match=r"leaves out 1 layer.*lm_head \(\d+\.?\d* GiB\)"):
        tracker = SaturationTracker(str(tmp_path / "gpt2"), "csv", model, stats=["trc", "idim"])
    assert sorted(tracker.layers) == sorted(captures)
    ids = torch.randint(0, 1000, (3, 12))
    model(input_ids=ids)
    model(input_ids=ids[:2, :7])
    results = tracker.add_saturations()
    for name, capture in captures.items():
        cov = population_cov(_rows(capture.outputs))
        assert results[f"train-covariance-trace_{name}"] == pytest.approx(np.trace(cov), rel=1e-5), name
        assert results[f"train-intrinsic-dimensionality_{name}"] == idim(cov, 0.99), name
    assert tracker.layers["transformer-h-0-attn-c_attn"].nf == 96
    tracker.close()


def test_a_layer_named_explicitly_still_fails_its_budget(tmp_path):
    model = _gpt2()
    with pytest.raises(ValueError, match="Module-0-Linear.*50257 features.*memory_budget"):
        SaturationTracker(str(tmp_path / "head"), "csv", [model.lm_head])


def test_padding_never_enters_the_statistics(tmp_path):
    model = _bert()
    torch.manual_seed(1)
    sequences = [torch.randint(1, 100, (length,)) for length in (5, 9, 12, 16)]
    ids, mask = _padded(sequences, 16)
    options = {"stats": ["trc", "idim", "samples"], "nosave": True}

    def run(feed, **extra):
        tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, **options, **extra)
        with torch.no_grad():
            feed()
        results = tracker.add_saturations()
        tracker.close()
        return results

    padded = run(lambda: model(input_ids=ids, attention_mask=mask))
    one_by_one = run(lambda: [model(input_ids=sequence[None]) for sequence in sequences])
    unmasked = run(lambda: model(input_ids=ids, attention_mask=mask), mask_padding=False)
    token_layers = [name for name in padded if name.startswith("eval-samples_encoder")]
    assert token_layers and all(padded[name] == 42 == one_by_one[name] for name in token_layers)
    for name, value in one_by_one.items():
        assert padded[name] == pytest.approx(value, rel=1e-5, abs=1e-9), name
    assert unmasked["eval-samples_encoder-layer-0-output-dense"] == 64
    assert unmasked["eval-covariance-trace_encoder-layer-0-output-dense"] != pytest.approx(
        padded["eval-covariance-trace_encoder-layer-0-output-dense"], rel=1e-3
    )


def test_a_mask_by_hand_for_loops_without_attention_mask(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3))
    capture = Capture(model[2])
    x = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, stats=["trc", "samples"])
    with tracker.padding_mask(mask):
        model(x)
    model(x[:1, :2])  # outside the block: every position counts
    results = tracker.add_saturations()
    kept = torch.cat([capture.outputs[0][mask], capture.outputs[1].reshape(-1, 3)]).numpy()
    assert results["train-samples_2"] == 9 + 2
    assert results["train-covariance-trace_2"] == pytest.approx(np.trace(population_cov(kept)), rel=1e-6)
    with pytest.raises(ValueError, match="mask"):
        with tracker.padding_mask(torch.ones(5)):
            pass
    tracker.close()


def test_encoder_decoder_layers_use_their_own_mask(tmp_path):
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
    model = transformers.T5ForConditionalGeneration(config).eval()
    sources = [torch.randint(2, 100, (length,)) for length in (4, 7)]
    targets = [torch.randint(2, 100, (length,)) for length in (3, 6)]
    ids, mask = _padded(sources, 7)
    decoder_ids, decoder_mask = _padded(targets, 7)  # as long as the sources: shapes alone cannot tell
    options = {"stats": ["trc", "samples"], "nosave": True, "layer_filter": lambda layers: {
        name: layer for name, layer in layers.items() if name != "lm_head"}}
    tracker = SaturationTracker(str(tmp_path / "a"), "csv", model, **options)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask)
    padded = tracker.add_saturations()
    tracker.close()
    tracker = SaturationTracker(str(tmp_path / "b"), "csv", model, **options)
    with torch.no_grad():
        for source, target in zip(sources, targets):
            model(input_ids=source[None], decoder_input_ids=target[None])
    alone = tracker.add_saturations()
    tracker.close()
    assert padded["eval-samples_encoder-block-0-layer-1-DenseReluDense-wo"] == 11
    assert padded["eval-samples_decoder-block-0-layer-2-DenseReluDense-wo"] == 9
    assert padded["eval-samples_decoder-block-0-layer-1-EncDecAttention-q"] == 9
    assert padded["eval-samples_decoder-block-0-layer-1-EncDecAttention-k"] == 11
    for name, value in alone.items():
        assert padded[name] == pytest.approx(value, rel=1e-5, abs=1e-9), name


def test_blocks_track_the_residual_stream(tmp_path):
    model = _gpt2(vocab_size=64).eval()
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, blocks="GPT2Block", stats=["trc", "idim"])
    assert "transformer-h-0" in tracker.layers and "transformer-h-0-mlp-c_fc" in tracker.layers
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    results = tracker.add_saturations()
    cov = population_cov(hidden[1].reshape(-1, 32).numpy())  # the output of block 0
    assert results["eval-covariance-trace_transformer-h-0"] == pytest.approx(np.trace(cov), rel=1e-5)
    assert results["eval-intrinsic-dimensionality_transformer-h-0"] == idim(cov, 0.99)
    tracker.close()


def test_blocks_of_a_cnn_are_reduced_like_convolutions(tmp_path):
    torch.manual_seed(0)

    class Stage(nn.Sequential):
        pass

    model = nn.Sequential(Stage(nn.Conv2d(3, 4, 3), nn.ReLU()), Stage(nn.Conv2d(4, 5, 3), nn.ReLU()))
    capture = Capture(model[1])
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, blocks=[Stage], stats=["trc"])
    model(torch.randn(2, 3, 8, 8))
    results = tracker.add_saturations()
    channelwise = capture.outputs[0].permute(0, 2, 3, 1).reshape(-1, 5).numpy()
    assert results["train-covariance-trace_1"] == pytest.approx(np.trace(population_cov(channelwise)), rel=1e-6)
    assert set(tracker.layers) == {"0", "0-0", "1", "1-0"}
    with pytest.raises(ValueError, match="blocks"):
        SaturationTracker(str(tmp_path / "bad"), "csv", model, blocks=[3])
    tracker.close()


def test_too_few_samples_warn_once_per_layer_with_the_bound(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 1024), nn.ReLU(), nn.Linear(1024, 8))
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, stats=["lsat", "samples"])
    model(torch.randn(64, 16))
    with pytest.warns(RuntimeWarning, match=r"'0' \(64 samples in train mode, 1024 features: at most 0.0625\)") as caught:
        results = tracker.add_saturations()
    assert len([w for w in caught if "fewer samples" in str(w.message)]) == 1
    assert results["train-samples_0"] == 64 and results["train-saturation_0"] <= 64 / 1024
    model(torch.randn(64, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracker.add_saturations()
    tracker.close()
    frame = pd.read_csv(tmp_path / "run.csv", sep=";", index_col=0)
    assert frame["train-samples_2"].tolist() == [64, 64]


def test_summary_says_what_is_tracked(tmp_path, capsys):
    model = _gpt2()
    with pytest.warns(RuntimeWarning, match="lm_head"):
        tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, verbose=True)
    printed = capsys.readouterr().out
    assert "transformer-h-1-mlp-c_proj" in printed and "Conv1D" in printed and "lm_head" in printed
    frame = tracker.summary(as_frame=True)
    assert list(frame.columns) == ["layer", "type", "features", "rows per forward", "memory per mode"]
    row = frame.set_index("layer").loc["transformer-h-0-mlp-c_fc"]
    assert row["features"] == 128 and row["memory per mode"] == delve.covariance.covariance_nbytes(128)
    text = tracker.summary()
    assert "8 layer(s) tracked" in text and "left out by memory_budget: lm_head" in text
    tracker.close()


def test_progress_bar_only_when_slow(tmp_path, monkeypatch):
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, nosave=True)
    for delay, expected in ((2.0, False), (0.0, True)):
        monkeypatch.setattr(delve.results, "PROGRESS_DELAY_S", delay)
        model(torch.randn(16, 8))
        err = io.StringIO()
        with redirect_stderr(err):
            tracker.add_saturations()
        assert ("delve: eigendecompositions" in err.getvalue()) is expected
    tracker.close()


def test_transformer_encoder_layers_are_seen_in_eval(tmp_path):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    capture = Capture(layer.linear2)
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", nn.Sequential(layer), stats=["trc"])
    with torch.no_grad():
        layer(torch.randn(3, 5, 16))
    results = tracker.add_saturations()
    rows = capture.outputs[0].reshape(-1, 16).numpy()
    assert results["eval-covariance-trace_0-linear2"] == pytest.approx(np.trace(population_cov(rows)), rel=1e-6)
    tracker.close()
