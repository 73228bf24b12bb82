"""diagnose(): every finding kind on small runs whose answer is known by construction."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from delve import SaturationTracker
from delve.__main__ import main
from delve.analysis import Finding, diagnose, layer_table
from delve.report import format_findings
from delve.probes import ProbeResult
from delve.receptive_field import save_receptive_fields


def frame(layers: dict, modes=("train",), samples: dict = None) -> pd.DataFrame:
    """A one-epoch run: ``layers`` maps name -> (width, intrinsic dimensionality) or, per mode, a dict of them."""
    row = {}
    for name, spec in layers.items():
        for mode in modes:
            width, idim = spec[mode] if isinstance(spec, dict) else spec
            row[f"{mode}-saturation_{name}"] = idim / width
            row[f"{mode}-intrinsic-dimensionality_{name}"] = idim
            if samples is not None:
                row[f"{mode}-samples_{name}"] = samples[name]
    return pd.DataFrame([row])


def kinds(findings) -> list:
    return [(f.kind, f.severity, f.layers) for f in findings if f.kind != "samples-unknown"]


def assert_evidence_names_every_layer(findings) -> None:
    """No finding names a layer without numbers for it, and every warn carries what to change."""
    for finding in findings:
        for name in finding.layers:
            numbers = finding.evidence["layers"][name]
            assert numbers["width"] and any(k.endswith("-saturation") for k in numbers), (finding.kind, name)
        if finding.severity == "warn":
            assert finding.suggestion and finding.suggestion["action"] in ("narrow", "raise-resolution")


# ------------------------------------------------------------------ the layer before a classifier
def test_layer_before_the_classifier_at_classes_minus_one_is_expected_not_waste() -> None:
    # The quickstart's numbers: fc1 64 wide at 9 dimensions before a 10-way classifier.
    run = frame({"conv1": (16, 7), "conv2": (32, 11), "fc1": (64, 9), "classifier": (10, 7)}, ("train", "eval"))
    findings = diagnose(run)
    assert kinds(findings) == [("collapse-before-classifier", "ok", ("fc1",))]
    assert findings[0].evidence["classes"] == 10
    assert findings[0].evidence["layers"]["fc1"]["width"] == 64
    assert not [f for f in findings if f.severity == "warn"]


def test_collapse_of_a_real_layer_fed_by_the_classes() -> None:
    # fc1 sees one-hot class codes: its outputs are 10 points, so its centred covariance has rank 10 - 1.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 10))
    labels = torch.randint(0, 10, (500,))
    codes = nn.functional.one_hot(labels, 10).float()
    rank = np.linalg.matrix_rank(np.cov(model[0](codes).detach().double().numpy().T), tol=1e-9)
    assert rank == 9
    with SaturationTracker("unused", save_to="csv", modules=model, nosave=True, stats=["lsat", "idim"]) as tracker:
        model(codes)
        tracker.add_saturations()
        findings = diagnose(tracker, model=model)
    assert ("collapse-before-classifier", "ok", ("0",)) in kinds(findings)
    assert findings[0].evidence["layers"]["0"]["train-intrinsic-dimensionality"] <= rank


# --------------------------------------------------------------------------------- too wide
def test_too_wide_layer_of_a_real_run_on_data_of_known_dimension(tmp_path) -> None:
    # Inputs span an 8-dimensional subspace of R^32, so fc1's outputs (a linear map of them) span 8 dimensions.
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 8))[0]
    inputs = torch.randn(2000, 8) @ basis.T
    assert np.linalg.matrix_rank(inputs.double().numpy(), tol=1e-3) == 8
    model = nn.Sequential(nn.Linear(32, 512), nn.ReLU(), nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 10))
    savefile = str(tmp_path / "run")
    with SaturationTracker(savefile, save_to="csv", modules=model, stats=["lsat", "idim"]) as tracker:
        model(inputs)
        tracker.add_saturations()
    findings = diagnose(savefile, model=model)
    wide = [f for f in findings if f.kind == "too-wide"]
    assert len(wide) == 1 and wide[0].severity == "warn" and wide[0].layers == ("0",)
    assert wide[0].evidence["layers"]["0"]["train-intrinsic-dimensionality"] == 8
    assert wide[0].suggestion == {"action": "narrow", "widths": {"0": 64}}  # 8 x 8 dimensions
    assert "512 → 64" in wide[0].message
    assert_evidence_names_every_layer(findings)


def test_too_wide_needs_sixteen_features_per_dimension_in_every_mode() -> None:
    base = {"a": (64, 30), "b": (256, 16), "c": (64, 30), "out": (10, 8)}
    assert kinds(diagnose(frame(base))) == [("too-wide", "warn", ("b",)), ("no-tail", "ok", ())]
    assert diagnose(frame(base))[0].suggestion["widths"] == {"b": 128}
    assert kinds(diagnose(frame({**base, "b": (256, 17)}))) == [("no-tail", "ok", ())]  # 8 x 17 -> 256: no gain
    # Eval using more dimensions than train counts too.
    both = {"a": (64, 30), "b": {"train": (256, 16), "eval": (256, 40)}, "c": (64, 30), "out": (10, 8)}
    assert kinds(diagnose(frame(both, ("train", "eval")))) == [("no-tail", "ok", ())]


# ---------------------------------------------------------------------------------- samples
def test_layers_with_fewer_samples_than_features_give_no_conclusion() -> None:
    layers = {"a": (64, 30), "b": (512, 8), "c": (64, 30), "out": (10, 8)}
    findings = diagnose(frame(layers, samples={"a": 10_000, "b": 300, "c": 10_000, "out": 10_000}))
    assert kinds(findings) == [("too-few-samples", "info", ("b",))]  # b would be too wide with enough samples
    assert findings[0].evidence["layers"]["b"]["train-samples"] == 300
    assert "no conclusion" in findings[0].message
    enough = diagnose(frame(layers, samples={"a": 10_000, "b": 10_000, "c": 10_000, "out": 10_000}))
    assert kinds(enough) == [("too-wide", "warn", ("b",)), ("no-tail", "ok", ())]
    assert "Samples per layer unknown" not in enough[0].message
    unknown = diagnose(frame(layers))
    assert [f.kind for f in unknown] == ["too-wide", "no-tail", "samples-unknown"]
    assert "Samples per layer unknown" in unknown[0].message
    counted = layer_table(frame(layers, samples={"a": 1, "b": 2, "c": 3, "out": 4}))
    assert counted["train-samples"].tolist() == [1, 2, 3, 4] and counted["width"].tolist() == [64, 512, 64, 10]


# ------------------------------------------------------------------------------------- tail
def cnn() -> nn.Sequential:
    """Receptive fields 3, 5, (6, j=2), 10, 14, 18, 22: at 8 px layers 4, 5 and 6 see the whole input."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )


# Layers 4 and 5 far below the rest; 6 feeds the 3-way classifier at 2 dimensions (its expected collapse).
TAIL = {"0": (4, 2), "1": (4, 3), "3": (8, 6), "4": (8, 1), "5": (8, 1), "6": (8, 2), "9": (3, 2)}


def test_tail_whose_receptive_fields_cover_the_input_advises_a_higher_resolution() -> None:
    findings = diagnose(frame(TAIL), model=cnn(), input_size=(1, 8, 8))
    tail, unproductive = findings[0], findings[1]
    assert (tail.kind, tail.severity, tail.layers) == ("tail", "warn", ("4", "5"))
    # Layer 6's input sees 18 px: above that every layer adds context; the next multiple of 8 is 24.
    assert tail.suggestion == {"action": "raise-resolution", "input_size": 24}
    assert tail.evidence["receptive_fields"]["5"] == {"input": 14.0, "output": 18.0}
    assert tail.evidence["peer_median"] == pytest.approx(np.median([2 / 4, 3 / 4, 6 / 8]))
    assert tail.evidence["peers"] == ["0", "1", "3"]
    assert "remove" not in tail.message.lower()
    assert (unproductive.kind, unproductive.severity, unproductive.layers) == ("unproductive", "info", ("6",))
    assert kinds(findings)[-1] == ("collapse-before-classifier", "ok", ("6",))
    assert_evidence_names_every_layer(findings)


def test_tail_without_receptive_field_evidence_names_no_cause_and_is_info() -> None:
    no_model = diagnose(frame(TAIL))
    assert kinds(no_model)[0] == ("tail", "info", ("4", "5"))
    assert "cause is not shown" in no_model[0].message and no_model[0].suggestion is None
    assert "receptive field" not in no_model[0].message.replace("no receptive fields", "")
    large = diagnose(frame(TAIL), model=cnn(), input_size=(1, 32, 32))
    assert kinds(large)[0] == ("tail", "info", ("4", "5"))
    assert "resolution is not the cause" in large[0].message


def test_probe_accuracy_outranks_saturation() -> None:
    lifting = {n: ProbeResult(n, 4, 0.9, 0.5 + 0.05 * i) for i, n in enumerate(TAIL)}
    tail = diagnose(frame(TAIL), model=cnn(), input_size=(1, 8, 8), probes=lifting)[0]
    assert tail.evidence["probe_before"] == pytest.approx(0.6) and tail.evidence["probe_tail"] == pytest.approx(0.7)
    assert "still lift accuracy, so keep them" in tail.message and "add nothing" not in tail.message
    flat = {n: ProbeResult(n, 4, 0.9, 0.9) for n in TAIL}
    tail = diagnose(frame(TAIL), model=cnn(), input_size=(1, 8, 8), probes=flat)[0]
    assert "they add no probe accuracy" in tail.message


def test_no_tail_is_ok_and_receptive_field_alone_is_info(tmp_path) -> None:
    flat = {"0": (4, 2), "1": (4, 3), "3": (8, 6), "4": (8, 6), "5": (8, 5), "6": (8, 7), "9": (3, 2)}
    assert kinds(diagnose(frame(flat))) == [("no-tail", "ok", ())]
    findings = diagnose(frame(flat), model=cnn(), input_size=(1, 8, 8))
    assert kinds(findings) == [("unproductive", "info", ("4", "5", "6"))]
    # The same from a receptive-field JSON in the run folder.
    frame(flat).to_csv(tmp_path / "run.csv", sep=";")
    (tmp_path / "run").mkdir()
    save_receptive_fields(str(tmp_path / "run" / "receptive_fields.json"), cnn(), (1, 8, 8))
    assert kinds(diagnose(str(tmp_path / "run"))) == [("unproductive", "info", ("4", "5", "6"))]


# ----------------------------------------------------------------------------- transformers
BERT = [f"bert-encoder-layer-{i}-{role}" for i in range(2) for role in (
    "attention-self-query", "attention-self-key", "attention-self-value", "attention-output-dense",
    "intermediate-dense", "output-dense")]


def test_repeated_blocks_get_no_tail_and_are_compared_within_their_role() -> None:
    # The Hugging Face example's layout: 12 Linear layers in 2 blocks, the second block far lower.
    layers = {name: (32, 24 if "-0-" in name else 4) for name in BERT}
    layers.update({"bert-pooler-dense": (32, 20), "classifier": (2, 1)})
    findings = diagnose(frame(layers))
    assert not [f for f in findings if f.kind == "tail"]  # would be layer-1 as a whole in a sequential stack
    assert not [f for f in findings if f.severity == "warn"]
    three = {f"encoder-layer-{i}-attention-self-query": (32, 4 if i == 2 else 24) for i in range(3)}
    three.update({"encoder-pooler": (32, 20), "classifier": (2, 1)})
    low = [f for f in diagnose(frame(three)) if f.kind == "low-saturation"]
    assert len(low) == 1 and low[0].layers == ("encoder-layer-2-attention-self-query",)
    assert low[0].evidence["role"] == "encoder-layer-*-attention-self-query"


def test_real_transformer_run_names_no_layer_without_evidence(tmp_path) -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=512, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Flatten(),
                          nn.Linear(16 * 6, 4))
    # Tokens from a 3-dimensional subspace: the feed-forward layers see 3 input directions.
    tokens = torch.randn(400, 6, 3) @ torch.randn(3, 16)
    savefile = str(tmp_path / "run")
    with SaturationTracker(savefile, save_to="csv", modules=model, stats=["lsat", "idim"]) as tracker:
        model(tokens)
        model.eval()
        with torch.no_grad():
            model(tokens[:200])
        tracker.add_saturations()
    findings = diagnose(savefile, model=model)
    assert not [f for f in findings if f.kind in ("tail", "unproductive", "no-tail")]
    assert_evidence_names_every_layer(findings)
    warnings = [f for f in findings if f.severity == "warn"]
    # Only the 512-wide feed-forward layers, never a layer of the residual width 16 (attention, linear2).
    assert [(f.kind, f.layers) for f in warnings] == [("too-wide", ("0-layers-0-linear1", "0-layers-1-linear1"))]
    for name, width in warnings[0].suggestion["widths"].items():
        assert width == 2 ** math.ceil(math.log2(8 * warnings[0].evidence["layers"][name]["train-intrinsic-dimensionality"]))


# ----------------------------------------------------------------------- other kinds, errors
def test_too_narrow_only_where_the_input_could_give_more() -> None:
    model = nn.Sequential(nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    run = frame({"0": (8, 8), "2": (16, 16), "4": (4, 3)})
    findings = diagnose(run, model=model)
    assert kinds(findings) == [("too-narrow", "info", ("0",))]  # layer 2 has only 8 inputs for its 16 features


def test_eval_train_gap() -> None:
    run = frame({"a": {"train": (10, 8), "eval": (10, 5)}, "b": (10, 6), "out": (4, 3)}, ("train", "eval"))
    gap = [f for f in diagnose(run) if f.kind == "eval-train-gap"]
    assert len(gap) == 1 and gap[0].layers == ("a",) and gap[0].evidence["gaps"] == {"a": pytest.approx(-0.3)}
    assert "eval-train-gap" in [kind for kind, _, _ in kinds(diagnose(run, mode="eval"))]


def test_bad_input_names_the_parameter(tmp_path) -> None:
    run = frame({"a": (10, 8), "out": (4, 3)})
    with pytest.raises(ValueError, match="mode"):
        diagnose(run, mode="test")
    with pytest.raises(ValueError, match="mode='eval'"):
        diagnose(run, mode="eval")
    with pytest.raises(ValueError, match="lsat"):
        diagnose(pd.DataFrame({"accuracy": [0.5]}))
    with pytest.raises(TypeError, match="probes"):
        diagnose(run, probes=3)
    with pytest.raises(FileNotFoundError, match="receptive_fields"):
        diagnose(run, receptive_fields=str(tmp_path / "missing.json"))


# ----------------------------------------------------------------------------- command line
def test_command_line_diagnose_text_json_and_trailing_separator(tmp_path, capsys) -> None:
    frame({"conv1": (16, 7), "conv2": (32, 11), "fc1": (64, 9), "classifier": (10, 7)}).to_csv(
        tmp_path / "run.csv", sep=";")
    assert main(["diagnose", str(tmp_path / "run") + "/"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("OK    collapse-before-classifier: fc1\n")
    assert "fc1  width 64 | train: sat. 0.141, idim 9, samples ?" in text.replace("\u00a0", " ")
    assert max(map(len, text.splitlines())) <= 100
    assert main(["diagnose", str(tmp_path / "run.csv"), "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert [entry["kind"] for entry in parsed] == ["collapse-before-classifier", "samples-unknown"]
    assert parsed[0]["evidence"]["layers"]["fc1"]["train-intrinsic-dimensionality"] == 9
    assert main(["diagnose", str(tmp_path / "missing")]) == 1
    assert "no run at" in capsys.readouterr().err
    finding = Finding("too-wide", "warn", ("a",), "Narrow `a`.", {"mode": "train", "layers": {}})
    assert format_findings([finding], width=60).splitlines() == ["WARN  too-wide: a", "      Narrow `a`."]
