"""The rules behind :func:`delve.analysis.diagnose`: from a run's last epoch to findings with evidence.

Every rule looks at the layers' last-epoch numbers (width, samples, saturation,
intrinsic dimensionality) and compares a layer only with layers of its kind and
role. What each rule claims was checked by retraining (``benchmarks/advice.py``,
table in the docs' "Advice" page); the thresholds below are the ones that held.
"""
from __future__ import annotations

import math
import os
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from delve.analysis import (
    IDIM, MODES, SAMPLES, SATURATION, Finding, available_modes, csv_path, layer_table, load_run, tail_block,
)

RF_FILE = "receptive_fields.json"
PROBES_FILE = "probes.csv"

#: The width advised per dimension a layer uses (rounded up to a power of two); a layer at least twice as wide
#: as that is too wide.
WIDTH_FACTOR = 8
#: The layer before the classifier collapses to at most this many times the number of classes.
COLLAPSE = 2
#: Saturation from which a layer counts as using (nearly) all of its width.
FULL = 0.95
#: Train and eval saturation this far apart are reported.
GAP = 0.1
#: Probe accuracy (as a share) a block of layers must add to count as lifting it.
PROBE_LIFT = 0.005
#: Names that mark attention layers when no model is given.
_ATTENTION_NAME = re.compile(r"(^|[-_.])(self_attn|attn|attention|query|key|value|q_proj|k_proj|v_proj)($|[-_.])")
_INDEX = re.compile(r"(?<=-)\d+(?=-|$)")


@dataclass
class _Layer:
    name: str
    kind: str
    width: Optional[int]
    samples: Optional[float]
    saturation: Optional[float]
    idim: Optional[float]
    per_mode: Dict[str, Dict[str, Optional[float]]] = field(default_factory=dict)
    fan_in: Optional[int] = None

    @property
    def enough_samples(self) -> Optional[bool]:
        """Whether the layer saw at least as many samples as it has features; ``None`` when unknown."""
        if self.samples is None or self.width is None:
            return None
        return self.samples >= self.width

    def evidence(self) -> Dict[str, Any]:
        numbers: Dict[str, Any] = {"kind": self.kind, "width": self.width}
        for mode, values in self.per_mode.items():
            for statistic, value in values.items():
                numbers[f"{mode}-{statistic}"] = value
        return numbers


def _number(value: Any) -> Optional[float]:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _kind(module: Any) -> str:
    from torch import nn

    if isinstance(module, nn.MultiheadAttention) or "attention" in type(module).__name__.lower():
        return "attention"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return "recurrent"
    if isinstance(module, nn.Linear):
        return "linear"
    return type(module).__name__.lower()


def _fan_in(module: Any) -> Optional[int]:
    from torch import nn

    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels // module.groups * int(np.prod(module.kernel_size))
    return None


def role(name: str) -> str:
    """A layer's name with its block indices replaced by ``*``: layers of one role share it.

    Examples
    --------
    >>> role("encoder-layer-11-attention-self-query")
    'encoder-layer-*-attention-self-query'
    """
    return _INDEX.sub("*", name)


# ----------------------------------------------------------------------- inputs
def receptive_fields(run: Any, model: Any, input_size: Any, path: Optional[str] = None) -> Tuple[Any, Dict[str, Any]]:
    """``(spatial input size, {layer: LayerReceptiveField})`` from the model, a JSON, or the run folder."""
    from delve import receptive_field as rf

    if model is not None and input_size is not None:
        return rf.spatial_input_size(model, input_size), dict(rf.trace_receptive_fields(model, input_size))
    if path is None and isinstance(run, (str, os.PathLike)):
        candidate = os.path.join(csv_path(run)[: -len(".csv")], RF_FILE)
        path = candidate if os.path.exists(candidate) else None
    elif path is not None and not os.path.exists(path):
        raise FileNotFoundError(f"receptive_fields={path!r} does not exist")
    if path is None:
        return None, {}
    size, layers = rf.load_receptive_fields(path)
    return size, dict(layers)


def probe_frame(run: Any, probes: Any) -> Optional[pd.DataFrame]:
    """Probe accuracies as a frame indexed by layer, from what was given or the run folder's ``probes.csv``."""
    if probes is None:
        if not isinstance(run, (str, os.PathLike)):
            return None
        path = os.path.join(csv_path(run)[: -len(".csv")], PROBES_FILE)
        return pd.read_csv(path, index_col=0) if os.path.exists(path) else None
    if isinstance(probes, (str, os.PathLike)):
        return pd.read_csv(probes, index_col=0)
    if isinstance(probes, pd.DataFrame):
        return probes
    if isinstance(probes, Mapping):
        from delve.probes import probes_to_frame

        return probes_to_frame(probes)
    raise TypeError(f"probes must be None, a dict of ProbeResult, a DataFrame or a CSV path, got {type(probes).__name__}")


def _probe_accuracy(probes: Optional[pd.DataFrame]) -> Optional[pd.Series]:
    if probes is None:
        return None
    for column in ("test_accuracy", "train_accuracy"):
        if column in probes and probes[column].notna().any():
            return probes[column].astype(float)
    return None


# ------------------------------------------------------------------------ rules
@dataclass
class _Run:
    layers: "OrderedDict[str, _Layer]"
    mode: str
    modes: List[str]
    transformer: bool
    input_size: Optional[Tuple[int, ...]]
    fields: Dict[str, Any]
    probes: Optional[pd.Series]
    samples_known: bool
    ratio: float
    min_gap: float

    @property
    def names(self) -> List[str]:
        return list(self.layers)

    @property
    def classifier(self) -> Optional[_Layer]:
        return self.layers[self.names[-1]] if len(self.layers) >= 2 else None

    @property
    def feeding(self) -> Optional[_Layer]:
        """The layer that feeds the classifier (the last but one)."""
        return self.layers[self.names[-2]] if len(self.layers) >= 2 else None

    def evidence(self, names: Sequence[str], **extra: Any) -> Dict[str, Any]:
        return {"mode": self.mode, "layers": {n: self.layers[n].evidence() for n in names}, **extra}


def _collect(frame: pd.DataFrame, model: Any, mode: Optional[str]) -> Tuple[str, List[str], "OrderedDict[str, _Layer]"]:
    modes = available_modes(frame, SATURATION) or available_modes(frame, IDIM)
    if not modes:
        raise ValueError(
            "the run holds no saturation or intrinsic-dimensionality columns ('train-saturation_<layer>'); "
            "track with stats=['lsat', 'idim']"
        )
    mode = mode or modes[0]
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a mode; choose 'train' or 'eval'")
    if mode not in modes:
        raise ValueError(f"mode={mode!r} has no saturation in this run; choose one of {modes}")
    table = layer_table(frame, model)
    modules: Dict[str, Any] = {}
    if model is not None:
        from delve.layers import find_layers

        modules = dict(find_layers(model))
    layers: "OrderedDict[str, _Layer]" = OrderedDict()
    for name, row in table.iterrows():
        per_mode = {
            m: {s: _number(row.get(f"{m}-{s}")) for s in (SAMPLES, SATURATION, IDIM)} for m in modes
        }
        if all(v is None for v in per_mode[mode].values()):
            continue
        module = modules.get(name)
        width = _number(row["width"])
        layers[name] = _Layer(
            name, _kind(module) if module is not None else "unknown", None if width is None else int(width),
            per_mode[mode][SAMPLES], per_mode[mode][SATURATION], per_mode[mode][IDIM], per_mode,
            _fan_in(module) if module is not None else None,
        )
    return mode, modes, layers


def _is_transformer(model: Any, names: Sequence[str]) -> bool:
    if model is not None:
        return any(_kind(module) == "attention" for module in model.modules())
    return any(_ATTENTION_NAME.search(name) for name in names)


def _few_samples(run: _Run) -> List[Finding]:
    few = [n for n, layer in run.layers.items() if layer.enough_samples is False]
    if not few:
        return []
    return [Finding(
        "too-few-samples", "info", tuple(few),
        f"{_subject(few)} saw fewer samples than {_say(few, 'it has', 'they have')} features in {run.mode}, so "
        f"{_say(few, 'its', 'their')} saturation is capped by the samples and says nothing about "
        f"{_say(few, 'its', 'their')} width: no conclusion. Record more samples (a longer epoch, more data) to judge "
        f"{_say(few, 'it', 'them')}.",
        run.evidence(few),
    )]


def _unknown_samples(run: _Run) -> List[Finding]:
    if run.samples_known:
        return []
    return [Finding(
        "samples-unknown", "info", (),
        "The run does not record how many samples each layer saw, so a layer seen on fewer samples than its width "
        "cannot be told from an unsaturated one; the findings assume enough samples. Track the statistic "
        "'samples' to make them certain.",
        {"mode": run.mode, "layers": {}},
    )]


def _collapse(run: _Run) -> Tuple[List[Finding], Optional[str]]:
    """The layer feeding the classifier at about classes - 1 dimensions: expected, not waste."""
    classifier, feeding = run.classifier, run.feeding
    if classifier is None or classifier.width is None or feeding is None or feeding.idim is None:
        return [], None
    classes = classifier.width
    if classes < 2 or feeding.enough_samples is False or feeding.kind == "attention" or feeding.idim > COLLAPSE * classes:
        return [], None
    evidence = run.evidence([feeding.name, classifier.name], classes=classes)
    share = f" of its {feeding.width}" if feeding.width else ""
    return [Finding(
        "collapse-before-classifier", "ok", (feeding.name,),
        f"{_subject([feeding.name])} comes last before the classifier `{classifier.name}` ({classes} classes) and "
        f"uses {feeding.idim:g}{share} dimensions: trained networks compress the features before the classifier "
        f"toward {classes - 1} dimensions, one fewer than the classes, which is all it takes to separate them. Its "
        "low saturation is expected, not wasted width: keep it.",
        evidence,
    )], feeding.name


def _stack(run: _Run, skip: Sequence[str]) -> List[str]:
    """The sequential stack the tail rule judges: the layers of the main kind before the classifier."""
    names = [n for n in run.names[:-1] if n not in skip and run.layers[n].saturation is not None]
    kinds = Counter(run.layers[n].kind for n in names)
    if kinds.get("conv", 0) >= 3:
        return [n for n in names if run.layers[n].kind == "conv"]
    if not kinds:
        return []
    main = kinds.most_common(1)[0][0]
    return [n for n in names if run.layers[n].kind == main]


def _probe_lift(run: _Run, block: Sequence[str]) -> Optional[Tuple[float, float]]:
    """Best probe accuracy before ``block`` and within it, when probes cover both."""
    if run.probes is None:
        return None
    first = run.names.index(block[0])
    before = run.probes.reindex(run.names[:first]).dropna()
    inside = run.probes.reindex(list(block)).dropna()
    if before.empty or inside.empty:
        return None
    return float(before.max()), float(inside.max())


def _tail(run: _Run, skip: Sequence[str]) -> List[Finding]:
    if run.transformer:
        return []
    stack = _stack(run, skip)
    if len(stack) < 3:
        return []
    values = np.array([run.layers[n].saturation for n in stack], dtype=float)
    tail = tail_block(stack, values, run.ratio, run.min_gap)
    unproductive = [n for n, f in run.fields.items() if getattr(f, "unproductive", False) and n in run.layers]
    findings: List[Finding] = []
    if not tail:
        if unproductive:
            findings.append(Finding(
                "unproductive", "info", tuple(unproductive),
                f"{_subject(unproductive)} {_say(unproductive, 'receives an input that', 'receive inputs that')} "
                f"already {_say(unproductive, 'sees', 'see')} the whole {_size(run.input_size)} input (receptive "
                f"field of the input ≥ the input size), but the saturation shows no tail: "
                f"{_say(unproductive, 'it still uses', 'they still use')} most of {_say(unproductive, 'its', 'their')}"
                " width. Nothing to change on this evidence.",
                run.evidence(unproductive, input_size=run.input_size, receptive_fields=_fields(run, unproductive)),
            ))
        else:
            findings.append(Finding(
                "no-tail", "ok", (),
                "No tail: no run of final layers of the stack sits far below the others, so the depth suits this "
                "input." + ("" if run.fields else " (No receptive fields were given.)"),
                run.evidence(stack),
            ))
        return findings
    first = stack.index(tail[0])
    reference = float(np.median(values[:first]))
    lift = _probe_lift(run, tail)
    evidence = run.evidence(tail, peers=stack[:first], peer_median=reference, ratio=run.ratio,
                            min_gap=run.min_gap)
    if lift is not None:
        evidence.update(probe_before=lift[0], probe_tail=lift[1])
    low = max(run.layers[n].saturation for n in tail)
    numbers = (f"saturation at most {low:.2f} against a median of {reference:.2f} for "
               f"{_span(stack[:first])} before {_say(tail, 'it', 'them')}")
    probe_text = ""
    if lift is not None:
        lifts = lift[1] - lift[0] >= PROBE_LIFT
        probe_text = (
            f" Linear probes reach {lift[0]:.1%} before the tail and {lift[1]:.1%} within it: "
            + (f"{_say(tail, 'it still lifts', 'they still lift')} accuracy, so keep {_say(tail, 'it', 'them')}."
               if lifts else f"{_say(tail, 'it adds', 'they add')} no probe accuracy.")
        )
    covered = [n for n in tail if n in unproductive]
    if covered:
        size = _resolution_needed(run)
        evidence.update(input_size=run.input_size, receptive_fields=_fields(run, tail), needed=size)
        findings.append(Finding(
            "tail", "warn", tuple(tail),
            f"{_subject(tail)} {_say(tail, 'sits', 'sit')} far below the layers before "
            f"{_say(tail, 'it', 'them')} ({numbers}) and {_say(covered, 'its receptive field covers', 'their receptive fields cover')}"
            f" the whole {_size(run.input_size)} input: at this resolution {_say(tail, 'it has', 'they have')} no new"
            f" spatial context to integrate. Raise the input resolution to at least {size} px (or slow the receptive "
            f"field's growth, such as with fewer early poolings).{probe_text}",
            evidence, {"action": "raise-resolution", "input_size": size},
        ))
    else:
        cause = (
            f"{_say(tail, 'its receptive field still fits', 'their receptive fields still fit')} the "
            f"{_size(run.input_size)} input, so resolution is not the cause"
            if run.fields else "the run gives no receptive fields (pass model= and input_size=), so the cause is not shown"
        )
        findings.append(Finding(
            "tail", "info", tuple(tail),
            f"{_subject(tail)} {_say(tail, 'sits', 'sit')} far below the layers before {_say(tail, 'it', 'them')} "
            f"({numbers}); {cause}.{probe_text}",
            evidence,
        ))
    extra = [n for n in unproductive if n not in tail]
    if extra:
        findings.append(Finding(
            "unproductive", "info", tuple(extra),
            f"{_subject(extra)} already {_say(extra, 'sees', 'see')} the whole {_size(run.input_size)} input through "
            f"{_say(extra, 'its', 'their')} input, but {_say(extra, 'its', 'their')} saturation is not in the tail.",
            run.evidence(extra, receptive_fields=_fields(run, extra)),
        ))
    return findings


def _fields(run: _Run, names: Sequence[str]) -> Dict[str, Dict[str, float]]:
    return {
        n: {"input": max(run.fields[n].input_receptive_field), "output": max(run.fields[n].receptive_field)}
        for n in names if n in run.fields
    }


def _resolution_needed(run: _Run) -> int:
    """The smallest multiple of 8 pixels above every finite receptive field entering a layer."""
    inputs = [max(f.input_receptive_field) for f in run.fields.values() if not math.isinf(max(f.input_receptive_field))]
    largest = max(inputs) if inputs else max(run.input_size or (8,))
    return int(8 * math.floor(largest / 8) + 8)


def _model_width(run: _Run) -> Optional[int]:
    """The residual width of a transformer: the width of its attention layers (or their most common width)."""
    widths = [layer.width for layer in run.layers.values() if layer.kind == "attention" and layer.width]
    if not widths:
        widths = [layer.width for layer in run.layers.values() if layer.width]
    return Counter(widths).most_common(1)[0][0] if widths else None


def _too_wide(run: _Run, skip: Sequence[str]) -> List[Finding]:
    residual = _model_width(run) if run.transformer else None
    wide: Dict[str, int] = {}
    for name in run.names[:-1]:
        layer = run.layers[name]
        if name in skip or layer.kind in ("attention", "recurrent") or not layer.width or layer.enough_samples is False:
            continue
        if residual is not None and layer.width == residual:
            continue  # a transformer's residual width is one choice for all its blocks, not this layer's
        used = [v[IDIM] for v in layer.per_mode.values() if v[IDIM] is not None]
        if not used or max(used) < 1:
            continue
        target = 2 ** math.ceil(math.log2(WIDTH_FACTOR * max(used)))
        if 2 * target <= layer.width:
            wide[name] = int(target)
    if not wide:
        return []
    names = list(wide)
    change = ", ".join(f"`{n}` {run.layers[n].width} → {w}" for n, w in wide.items())
    return [Finding(
        "too-wide", "warn", tuple(names),
        f"{_subject(names)} {_say(names, 'uses', 'use')} at most 1/{WIDTH_FACTOR * 2} of {_say(names, 'its', 'their')}"
        f" width in train and eval (intrinsic dimensionality against width). Narrow {_say(names, 'it', 'them')} to "
        f"{WIDTH_FACTOR}× the dimensions used, rounded up to a power of two: {change}."
        + ("" if run.samples_known else " (Samples per layer unknown.)"),
        run.evidence(names, suggested=dict(wide), factor=WIDTH_FACTOR),
        {"action": "narrow", "widths": dict(wide)},
    )]


def _too_narrow(run: _Run, skip: Sequence[str]) -> List[Finding]:
    full = []
    for name in run.names[:-1]:
        layer = run.layers[name]
        if name in skip or layer.saturation is None or layer.saturation < FULL or layer.enough_samples is False:
            continue
        if layer.fan_in is not None and layer.width is not None and layer.fan_in <= layer.width:
            continue  # its input cannot give it more dimensions
        full.append(name)
    if not full:
        return []
    return [Finding(
        "too-narrow", "info", tuple(full),
        f"{_subject(full)} {_say(full, 'uses', 'use')} nearly all of {_say(full, 'its', 'their')} width "
        f"(saturation ≥ {FULL:g} in {run.mode}): {_say(full, 'it may be', 'they may be')} a bottleneck; "
        f"{_say(full, 'a wider layer', 'wider layers')} would show whether accuracy gains.",
        run.evidence(full),
    )]


def _roles(run: _Run, skip: Sequence[str]) -> List[Finding]:
    """In repeated blocks, a layer far below the other blocks' layers of the same role."""
    if not run.transformer:
        return []
    groups: Dict[str, List[str]] = {}
    for name in run.names[:-1]:
        if name not in skip and run.layers[name].saturation is not None:
            groups.setdefault(role(name), []).append(name)
    findings = []
    for template, members in groups.items():
        if len(members) < 3:
            continue
        values = np.array([run.layers[n].saturation for n in members])
        low = []
        for index, name in enumerate(members):
            others = float(np.median(np.delete(values, index)))
            if values[index] <= run.ratio * others and others - values[index] >= run.min_gap:
                low.append(name)
        if low:
            findings.append(Finding(
                "low-saturation", "info", tuple(low),
                f"{_subject(low)} {_say(low, 'sits', 'sit')} far below the other layers of {_say(low, 'its', 'their')}"
                f" role `{template}` (median {float(np.median(values)):.2f} over {len(members)} blocks).",
                run.evidence(members, role=template),
            ))
    return findings


def _gap(run: _Run) -> List[Finding]:
    if not {"train", "eval"} <= set(run.modes):
        return []
    gaps = {}
    for name, layer in run.layers.items():
        train, held_out = (layer.per_mode[m][SATURATION] for m in ("train", "eval"))
        few = any(
            layer.per_mode[m][SAMPLES] is not None and layer.width and layer.per_mode[m][SAMPLES] < layer.width
            for m in ("train", "eval")
        )
        if train is not None and held_out is not None and not few and abs(train - held_out) >= GAP:
            gaps[name] = held_out - train
    if not gaps:
        return []
    names = list(gaps)
    text = ", ".join(f"`{n}` {g:+.2f}" for n, g in gaps.items())
    return [Finding(
        "eval-train-gap", "info", tuple(names),
        f"Train and eval saturation differ by {GAP:g} or more ({text}, eval minus train): the held-out data "
        "spreads over a different share of these layers' feature spaces than the training data."
        + ("" if run.samples_known else " With few eval samples this gap can come from the sample count alone."),
        run.evidence(names, gaps=gaps),
    )]


_ORDER = {"warn": 0, "info": 1, "ok": 2}


def diagnose_run(run: Any, model: Any = None, input_size: Any = None, probes: Any = None,
                 mode: Optional[str] = None, receptive_fields_path: Optional[str] = None, ratio: float = 0.7,
                 min_gap: float = 0.2) -> List[Finding]:
    """See :func:`delve.analysis.diagnose`."""
    frame = load_run(run)
    mode, modes, layers = _collect(frame, model, mode)
    size, fields = receptive_fields(run, model, input_size, receptive_fields_path)
    state = _Run(
        layers, mode, modes, _is_transformer(model, list(layers)), size, fields,
        _probe_accuracy(probe_frame(run, probes)),
        any(layer.samples is not None for layer in layers.values()), ratio, min_gap,
    )
    few = [n for n, layer in layers.items() if layer.enough_samples is False]
    collapse, collapsed = _collapse(state)
    skip = few + ([collapsed] if collapsed else [])
    findings = (_few_samples(state) + _tail(state, skip) + _too_wide(state, skip) + _roles(state, skip)
                + _too_narrow(state, skip) + _gap(state) + collapse + _unknown_samples(state))
    return sorted(findings, key=lambda finding: (finding.kind == "samples-unknown", _ORDER[finding.severity]))


# ------------------------------------------------------------------------- text
def _size(size: Optional[Sequence[int]]) -> str:
    return "?" if not size else "×".join(str(s) for s in size) + " px"


def _span(names: Sequence[str]) -> str:
    quoted = [f"`{n}`" for n in names]
    if len(quoted) <= 5:
        return " and ".join(filter(None, (", ".join(quoted[:-1]), quoted[-1])))
    return f"{', '.join(quoted[:3])}, … and {quoted[-1]} ({len(quoted)} layers)"


def _subject(names: Sequence[str]) -> str:
    return ("Layer " if len(names) == 1 else "Layers ") + _span(names)


def _say(names: Sequence[str], one: str, many: str) -> str:
    return one if len(names) == 1 else many
