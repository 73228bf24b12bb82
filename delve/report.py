"""One self-contained HTML page that turns a run's saturation into architecture decisions.

:func:`report` reads ``<savefile>.csv`` and writes ``<savefile>/report.html``
with its figures embedded as PNG: saturation per layer over epochs (a
heatmap), the last epoch's profile, eval against train, the other logged
values, a table per layer, and recommendations in plain language. The
low-saturation tail (:func:`delve.analysis.find_tail`) is marked; so is the
receptive-field border (:mod:`delve.receptive_field`) when the model and
input size are given, or a receptive-field JSON is passed or lies in the run
folder as ``receptive_fields.json``. Probe accuracies
(:func:`delve.probes.linear_probes`) are drawn over the profile when given,
or when ``probes.csv`` lies in the run folder.

Figures are :class:`matplotlib.figure.Figure` objects rendered by Agg; they
never enter pyplot's global registry and are released after rendering.
"""
from __future__ import annotations

import base64
import html
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from delve.analysis import MODES, available_modes, csv_path, find_tail, last_epoch, load_run, statistic_table

RF_FILE = "receptive_fields.json"
PROBES_FILE = "probes.csv"
_STAT_PREFIXES = tuple(f"{mode}-" for mode in MODES) + ("average-",)
_TAIL_COLOR = "#d62728"
_BAR_COLOR = "#4c72b0"
_BORDER_COLOR = "#ff7f0e"
_EVAL_COLOR = "#55a868"


@dataclass
class _Context:
    """Everything the figures and the text need, computed once."""

    name: str
    frame: pd.DataFrame
    modes: List[str]
    mode: str
    layers: List[str]
    tail: List[str]
    input_size: Optional[Tuple[int, ...]] = None
    fields: Dict[str, Any] = field(default_factory=dict)
    unproductive: List[str] = field(default_factory=list)
    probes: Optional[pd.DataFrame] = None
    ratio: float = 0.7
    min_gap: float = 0.2

    @property
    def border(self) -> Optional[int]:
        """Index (in ``layers``) of the first unproductive layer."""
        positions = [self.layers.index(n) for n in self.unproductive if n in self.layers]
        return min(positions) if positions else None


# ----------------------------------------------------------------------- inputs
def _receptive_fields(
    run_folder: str, model: Any, input_size: Any, receptive_fields: Optional[str]
) -> Tuple[Optional[Tuple[int, ...]], Dict[str, Any]]:
    from delve import receptive_field as rf

    if model is not None:
        if input_size is None:
            raise ValueError("input_size is required with model= (such as (3, 32, 32)), to trace receptive fields")
        return rf.spatial_input_size(model, input_size), dict(rf.trace_receptive_fields(model, input_size))
    path = receptive_fields or os.path.join(run_folder, RF_FILE)
    if os.path.exists(path):
        size, layers = rf.load_receptive_fields(path)
        return size, dict(layers)
    if receptive_fields is not None:
        raise FileNotFoundError(f"receptive_fields={receptive_fields!r} does not exist")
    return None, {}


def _probe_frame(run_folder: str, probes: Any) -> Optional[pd.DataFrame]:
    if probes is None:
        path = os.path.join(run_folder, PROBES_FILE)
        return pd.read_csv(path, index_col=0) if os.path.exists(path) else None
    if isinstance(probes, (str, os.PathLike)):
        return pd.read_csv(probes, index_col=0)
    if isinstance(probes, pd.DataFrame):
        return probes
    from delve.probes import probes_to_frame

    return probes_to_frame(probes)


# ---------------------------------------------------------------------- figures
def _png(figure: Any) -> str:
    from delve.writers.plotting import png_bytes

    data = png_bytes(figure)
    figure.clear()
    return base64.b64encode(data).decode("ascii")


def _figure(width: float, height: float) -> Any:
    from delve.writers.plotting import new_figure

    return new_figure(width, height, layout="constrained")


def _mark_layer_labels(labels: Sequence[Any], ctx: _Context) -> None:
    for label in labels:
        if label.get_text() in ctx.tail:
            label.set_color(_TAIL_COLOR)
            label.set_fontweight("bold")


def _heatmap(ctx: _Context) -> str:
    width = min(4.8 + 1.1 * len(ctx.frame), 11.5) if len(ctx.modes) == 1 else 11.5
    figure = _figure(width, 1.6 + 0.26 * len(ctx.layers))
    axes = figure.subplots(1, len(ctx.modes), sharey=True, squeeze=False)[0]
    image = None
    for ax, mode in zip(axes, ctx.modes):
        table = statistic_table(ctx.frame, mode).reindex(columns=ctx.layers)
        image = ax.imshow(table.to_numpy(dtype=float).T, aspect="auto", cmap="viridis", vmin=0, vmax=1,
                          interpolation="nearest")
        ax.set_title(f"{mode} saturation", fontsize=11)
        ax.set_xlabel("epoch")
        epochs = list(table.index)
        step = max(1, len(epochs) // 12)
        ax.set_xticks(range(0, len(epochs), step), [str(e) for e in epochs[::step]])
        ax.set_yticks(range(len(ctx.layers)), ctx.layers, fontsize=8)
        _mark_layer_labels(ax.get_yticklabels(), ctx)
        if ctx.border is not None:
            ax.axhline(ctx.border - 0.5, color=_BORDER_COLOR, linewidth=2.2, linestyle="--")
    if ctx.border is not None:
        axes[-1].annotate(
            f"receptive field ≥ input ({_size_text(ctx.input_size)})", xy=(1.0, ctx.border - 0.5),
            xycoords=("axes fraction", "data"), xytext=(-4, 3), textcoords="offset points", ha="right",
            va="bottom", color=_BORDER_COLOR, fontsize=8, fontweight="bold",
            bbox=dict(facecolor="white", alpha=0.85, edgecolor="none", pad=1.5),
        )
    figure.colorbar(image, ax=list(axes), shrink=0.9, label="saturation")
    return _png(figure)


def _profile(ctx: _Context) -> str:
    values = last_epoch(ctx.frame, ctx.mode).reindex(ctx.layers)
    figure = _figure(11.5, 4.6)
    ax = figure.subplots()
    positions = np.arange(len(ctx.layers))
    colors = [_TAIL_COLOR if name in ctx.tail else _BAR_COLOR for name in ctx.layers]
    ax.bar(positions, values.to_numpy(dtype=float), color=colors, width=0.75, zorder=2)
    for start, stop in _runs([ctx.layers.index(n) for n in ctx.unproductive if n in ctx.layers]):
        ax.axvspan(start - 0.5, stop + 0.5, color=_BORDER_COLOR, alpha=0.12, linewidth=0, zorder=0)
    if ctx.border is not None:
        ax.axvline(ctx.border - 0.5, color=_BORDER_COLOR, linestyle="--", linewidth=2)
        ax.text(ctx.border - 0.4, 1.03, f"receptive field ≥ input ({_size_text(ctx.input_size)}) →",
                color=_BORDER_COLOR, fontsize=9, fontweight="bold", va="bottom")
    ax.set_ylim(0, 1.12)
    ax.set_ylabel(f"{ctx.mode} saturation (epoch {values.name})")
    ax.set_xticks(positions, ctx.layers, rotation=55, ha="right", fontsize=8)
    _mark_layer_labels(ax.get_xticklabels(), ctx)
    ax.grid(axis="y", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    handles = [_patch(_BAR_COLOR, "saturation")] + ([_patch(_TAIL_COLOR, "tail")] if ctx.tail else [])
    if ctx.probes is not None:
        probes = ctx.probes.reindex(ctx.layers)
        for column, style in (("test_accuracy", "-"), ("train_accuracy", ":")):
            if column in probes and probes[column].notna().any():
                (line,) = ax.plot(positions, probes[column].to_numpy(dtype=float), style, color="black", marker="o",
                                  markersize=3.5, label=f"probe {column.split('_')[0]} accuracy")
                handles.append(line)
    if ctx.unproductive:
        handles.append(_patch(_BORDER_COLOR, "unproductive (receptive field ≥ input)", alpha=0.25))
    ax.legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False,
              ncols=len(handles))
    return _png(figure)


def _integer_locator() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _patch(color: str, label: str, alpha: float = 1.0) -> Any:
    from matplotlib.patches import Patch

    return Patch(color=color, label=label, alpha=alpha)


def _runs(positions: Sequence[int]) -> List[Tuple[int, int]]:
    """Consecutive stretches of sorted positions as ``(first, last)`` pairs.

    Examples
    --------
    >>> _runs([1, 2, 3, 6, 8, 9])
    [(1, 3), (6, 6), (8, 9)]
    """
    stretches: List[Tuple[int, int]] = []
    for position in sorted(positions):
        if stretches and position == stretches[-1][1] + 1:
            stretches[-1] = (stretches[-1][0], position)
        else:
            stretches.append((position, position))
    return stretches


def _eval_vs_train(ctx: _Context) -> str:
    figure = _figure(11.5, 3.9)
    left, right = figure.subplots(1, 2, width_ratios=[1.6, 1])
    positions = np.arange(len(ctx.layers))
    colors = {"train": _BAR_COLOR, "eval": _EVAL_COLOR}
    for mode in ctx.modes:
        values = last_epoch(ctx.frame, mode).reindex(ctx.layers)
        left.plot(positions, values.to_numpy(dtype=float), marker="o", markersize=4, color=colors[mode],
                  label=f"{mode} (epoch {values.name})")
        table = statistic_table(ctx.frame, mode).dropna(how="all")
        right.plot(table.index, table.mean(axis=1), marker="o", markersize=3, color=colors[mode], label=mode)
    if ctx.border is not None:
        left.axvline(ctx.border - 0.5, color=_BORDER_COLOR, linestyle="--", linewidth=1.6)
    left.set_xticks(positions, ctx.layers, rotation=55, ha="right", fontsize=8)
    _mark_layer_labels(left.get_xticklabels(), ctx)
    left.set_ylim(0, 1.05)
    left.set_ylabel("saturation, last epoch")
    right.set_ylim(0, 1.05)
    right.set_xlabel("epoch")
    right.xaxis.set_major_locator(_integer_locator())
    right.set_ylabel("mean saturation over layers")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
        ax.spines[["top", "right"]].set_visible(False)
    return _png(figure)


def _other_values(frame: pd.DataFrame) -> Optional[str]:
    numeric = frame.apply(pd.to_numeric, errors="coerce")
    columns = [c for c in frame.columns if not c.startswith(_STAT_PREFIXES) and numeric[c].notna().any()][:8]
    if not columns:
        return None
    count = len(columns)
    per_row = min(count, 4)
    rows = math.ceil(count / per_row)
    figure = _figure(11.5, 2.6 * rows)
    axes = np.atleast_1d(figure.subplots(rows, per_row, squeeze=False)).ravel()
    for ax, column in zip(axes, columns):
        series = numeric[column].dropna()
        ax.plot(series.index, series.to_numpy(), marker="o", markersize=3, color="#8172b2")
        ax.set_title(column, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(_integer_locator())
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    for ax in axes[count:]:
        ax.set_visible(False)
    return _png(figure)


# ------------------------------------------------------------------------- text
def _size_text(size: Optional[Tuple[int, ...]]) -> str:
    return "?" if not size else "×".join(str(s) for s in size) + " px"


def _span(names: Sequence[str]) -> str:
    quoted = [f"<code>{html.escape(n)}</code>" for n in names]
    if len(quoted) <= 2:
        return " and ".join(quoted)
    return f"{quoted[0]} … {quoted[-1]} ({len(quoted)} layers)"


def _subject(names: Sequence[str]) -> str:
    return ("Layer " if len(names) == 1 else "Layers ") + _span(names)


def _say(names: Sequence[str], one: str, many: str) -> str:
    """``one`` for a single layer, ``many`` for several."""
    return one if len(names) == 1 else many


def _field_text(value: Any) -> str:
    if value is None:
        return ""
    scalar = max(value)
    return "global" if math.isinf(scalar) else f"{scalar:g}"


def recommendations(ctx: _Context) -> List[Tuple[str, str]]:
    """``(level, html)`` pairs: ``warn`` for a problem found, ``ok`` for good news, ``info`` otherwise."""
    items: List[Tuple[str, str]] = []
    values = last_epoch(ctx.frame, ctx.mode)
    both = [n for n in ctx.tail if n in ctx.unproductive]
    fitting = [n for n in ctx.tail if ctx.fields and n not in ctx.unproductive]
    rest = values.drop(ctx.tail, errors="ignore").dropna()
    head = f"{float(rest.median()):.2f}" if len(rest) else "?"
    if ctx.tail and not fitting:
        low = f"{float(values.reindex(ctx.tail).max()):.2f}"
        tail = ctx.tail
        if both:
            items.append(("warn", (
                f"{_subject(tail)} {_say(tail, 'adds', 'add')} nothing at this input size: "
                f"{_say(tail, 'its receptive field already covers', 'their receptive fields already cover')} the "
                f"{_size_text(ctx.input_size)} input (saturation at most {low} against a median of {head} for the "
                f"other layers). Increase the input resolution or remove {_say(tail, 'it', 'them')}; slowing the "
                f"receptive field's growth (fewer early downsampling layers) also makes {_say(tail, 'it', 'them')} "
                "useful again."
            )))
        else:
            # Without receptive fields (or for dense layers) nothing points at the input size.
            items.append(("warn", (
                f"{_subject(tail)} {_say(tail, 'adds', 'add')} little: {_say(tail, 'its', 'their')} saturation sits "
                f"far below the rest (at most {low} against a median of {head} for the other layers), so "
                f"{_say(tail, 'it uses', 'they use')} a small share of {_say(tail, 'its', 'their')} width. Make "
                f"{_say(tail, 'it', 'them')} narrower or remove {_say(tail, 'it', 'them')}; for convolutions, a "
                "receptive field that already covers the input is the usual cause, which a higher input resolution "
                "fixes."
            )))
    elif ctx.tail:
        if both:
            items.append(("warn", (
                f"{_subject(both)} {_say(both, 'adds', 'add')} nothing at this input size: "
                f"{_say(both, 'it sits', 'they sit')} in the saturation tail and "
                f"{_say(both, 'its receptive field already covers', 'their receptive fields already cover')} the "
                f"{_size_text(ctx.input_size)} input. Increase the input resolution or remove "
                f"{_say(both, 'it', 'them')}."
            )))
        low = f"{float(values.reindex(fitting).max()):.2f}"
        items.append(("info", (
            f"{_subject(fitting)} {_say(fitting, 'sits', 'sit')} far below the rest (at most {low} against a median "
            f"of {head}) although {_say(fitting, 'its receptive field still fits', 'their receptive fields still fit')}"
            f" the input, so resolution is not the cause: {_say(fitting, 'it uses', 'they use')} a small share of "
            f"{_say(fitting, 'its', 'their')} width (common for the last layer before global pooling). "
            f"{_say(fitting, 'It', 'They')} could be narrower; check the probe accuracies before removing "
            f"{_say(fitting, 'it', 'them')}."
        )))
    extra = [n for n in ctx.unproductive if n not in ctx.tail]
    if extra:
        items.append(("info", (
            f"{_subject(extra)} {_say(extra, 'receives an input that', 'receive inputs that')} already "
            f"{_say(extra, 'sees', 'see')} the whole {_size_text(ctx.input_size)} input (the receptive field of "
            f"{_say(extra, 'its', 'their')} input ≥ the input size), but {_say(extra, 'its', 'their')} saturation "
            f"shows no tail; {_say(extra, 'it is a candidate', 'they are candidates')} for removal if a longer run "
            f"shows {_say(extra, 'it', 'them')} dropping."
        )))
    spatial = [f for f in ctx.fields.values() if not math.isinf(max(f.input_receptive_field))]
    if ctx.unproductive and spatial:
        needed = max(max(f.input_receptive_field) for f in spatial)
        items.append(("info", (
            f"On inputs larger than {needed:g} px every layer would still add spatial context ({needed:g} px is the "
            "largest receptive field entering a layer). The receptive-field border is the orange dashed line."
        )))
    if ctx.tail and not ctx.fields:
        items.append(("info", (
            "Pass the model and input size (<code>report(run, model=..., input_size=...)</code>) or save "
            f"<code>{RF_FILE}</code> with <code>delve.receptive_field.save_receptive_fields</code> "
            "to check the tail against the receptive-field border."
        )))
    if ctx.tail and ctx.fields and not ctx.unproductive:
        items.append(("ok", (
            f"No layer is unproductive at this input size: the input of every layer sees less than the whole "
            f"{_size_text(ctx.input_size)} input, so depth and resolution match."
        )))
    if not ctx.tail and not ctx.unproductive:
        items.append(("ok", (
            "No tail: no run of final layers sits far below the others, so the depth suits this input size."
            + ("" if ctx.fields else " (No receptive-field information was given.)")
        )))
    if "train" in ctx.modes and "eval" in ctx.modes:
        gap = (last_epoch(ctx.frame, "train") - last_epoch(ctx.frame, "eval")).abs().dropna()
        if len(gap) and float(gap.mean()) > 0.1:
            items.append(("info", (
                f"Train and eval saturation differ by {float(gap.mean()):.2f} on average at the last epoch: "
                "the held-out data spreads over a different share of the feature space than the training data."
            )))
    if ctx.probes is not None and ctx.tail and "test_accuracy" in ctx.probes:
        probes = ctx.probes["test_accuracy"].reindex(ctx.layers).dropna()
        before = probes.reindex(ctx.layers[: ctx.layers.index(ctx.tail[0])]).dropna()
        inside = probes.reindex(ctx.tail).dropna()
        if len(before) and len(inside):
            start, best = float(before.max()), float(inside.max())
            verdict = (
                "the tail barely improves on the layers before it"
                if best - start < 0.02 else "the tail still improves the probes: remove its layers with care"
            )
            items.append(("info", (
                f"Probes: the best layer before the tail reaches {start:.1%} test accuracy, the tail "
                f"{best:.1%}; {verdict}."
            )))
    return items


def _layer_table(ctx: _Context) -> str:
    rows = []
    last = {mode: last_epoch(ctx.frame, mode) for mode in ctx.modes}
    for name in ctx.layers:
        cells = [f"<td><code>{html.escape(name)}</code></td>"]
        for mode in ctx.modes:
            value = last[mode].get(name, np.nan)
            cells.append(f"<td class='num'>{'' if pd.isna(value) else f'{value:.3f}'}</td>")
        info = ctx.fields.get(name)
        if ctx.fields:
            cells.append(f"<td class='num'>{_field_text(info.input_receptive_field) if info else ''}</td>")
            cells.append(f"<td class='num'>{_field_text(info.receptive_field) if info else ''}</td>")
        if ctx.probes is not None:
            value = ctx.probes["test_accuracy"].get(name, np.nan) if "test_accuracy" in ctx.probes else np.nan
            cells.append(f"<td class='num'>{'' if pd.isna(value) else f'{value:.1%}'}</td>")
        tags = []
        if name in ctx.tail:
            tags.append("<span class='tag tail'>tail</span>")
        if name in ctx.unproductive:
            tags.append("<span class='tag rf'>receptive field ≥ input</span>")
        cells.append(f"<td>{' '.join(tags)}</td>")
        rows.append(f"<tr{' class=flag' if tags else ''}>{''.join(cells)}</tr>")
    header = ["layer"] + [f"{mode} saturation" for mode in ctx.modes]
    if ctx.fields:
        header += ["input RF", "RF"]
    if ctx.probes is not None:
        header += ["probe test acc."]
    header.append("")
    head = "".join(f"<th>{h}</th>" for h in header)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


_CSS = """
body{font-family:-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:0;background:#f4f5f7;color:#1f2933}
main{max-width:1120px;margin:0 auto;padding:28px 32px 48px}
h1{font-size:26px;margin:0 0 4px}
h2{font-size:18px;margin:34px 0 10px;border-bottom:1px solid #d9dde3;padding-bottom:6px}
.meta{color:#616e7c;font-size:14px;margin-bottom:18px}.meta span{margin-right:18px}
.card{background:#fff;border-radius:10px;box-shadow:0 1px 3px rgba(0,0,0,.08);padding:16px 20px;margin:12px 0}
.rec{border-left:5px solid #9aa5b1;padding:10px 14px;margin:8px 0;background:#fff;border-radius:6px;font-size:15px;
line-height:1.45}
.rec.warn{border-color:#d62728;background:#fff5f5}
.rec.ok{border-color:#2f9e44;background:#f3fbf4}.rec.info{border-color:#4c72b0}
img{max-width:100%;display:block;margin:0 auto}
figcaption{color:#616e7c;font-size:13px;margin-top:6px;text-align:center}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{padding:5px 10px;border-bottom:1px solid #eceff3;text-align:left}
th{background:#f0f2f5;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}tr.flag{background:#fffaf3}
.tag{display:inline-block;border-radius:10px;padding:1px 8px;font-size:11px;color:#fff;margin-right:4px}
.tag.tail{background:#d62728}.tag.rf{background:#ff7f0e}
code{font-family:SFMono-Regular,Consolas,monospace;font-size:90%;background:#eef1f4;padding:1px 4px;border-radius:4px}
.small{color:#616e7c;font-size:13px;line-height:1.5}
"""


def _figure_html(png: str, caption: str) -> str:
    return (f"<figure class='card'><img alt='{html.escape(caption)}' src='data:image/png;base64,{png}'>"
            f"<figcaption>{caption}</figcaption></figure>")


def render_html(ctx: _Context) -> str:
    """The report page for a prepared context."""
    recs = "".join(f"<div class='rec {level}'>{text}</div>" for level, text in recommendations(ctx))
    epochs = len(ctx.frame.index)
    meta = [f"{epochs} epoch{'s' if epochs != 1 else ''}", f"{len(ctx.layers)} layers"]
    meta.append("modes: " + ", ".join(ctx.modes))
    if ctx.input_size:
        meta.append(f"input {_size_text(ctx.input_size)}")
    parts = [
        f"<h1>delve report · {html.escape(ctx.name)}</h1>",
        "<div class='meta'>" + "".join(f"<span>{m}</span>" for m in meta) + "</div>",
        "<h2>Recommendations</h2>", recs,
        "<h2>Saturation per layer over epochs</h2>",
        _figure_html(_heatmap(ctx), "Rows are layers in forward order" + ("; tail layers in red" if ctx.tail else "")
                     + ("; the orange dashed line is the receptive-field border (below it, layers see more than "
                        "the whole input)" if ctx.border is not None else "") + "."),
        "<h2>Last epoch</h2>",
        _figure_html(_profile(ctx), f"{ctx.mode} saturation of each layer at the last epoch."),
        "<h2>Eval vs train</h2>",
        _figure_html(_eval_vs_train(ctx), "Left: each layer at the last epoch. Right: mean over layers per epoch."),
    ]
    other = _other_values(ctx.frame)
    if other:
        parts += ["<h2>Other logged values</h2>", _figure_html(other, "Values logged with add_scalar.")]
    parts += [
        "<h2>Layers</h2>", f"<div class='card'>{_layer_table(ctx)}</div>",
        "<p class='small'>Saturation is the share of a layer's feature dimensions needed to explain 99% of the "
        "variance of its outputs. The <b>tail</b> is the longest run of final layers whose saturation is at most "
        f"{ctx.ratio:g} × the median of the layers before them and at least {ctx.min_gap:g} below it (the output "
        "layer may stand outside it; <code>delve.analysis.find_tail</code>). A "
        "layer is <b>unproductive</b> when the receptive field of its input is at least the input size and its own "
        "exceeds it (Richter et al., <i>Should You Go Deeper?</i>, 2021).</p>",
    ]
    body = "\n".join(parts)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>delve report · {html.escape(ctx.name)}"
            f"</title><style>{_CSS}</style></head><body><main>{body}</main></body></html>")


def report(
    run: Union[str, "os.PathLike[str]"],
    model: Any = None,
    input_size: Any = None,
    receptive_fields: Optional[str] = None,
    probes: Any = None,
    output: Optional[str] = None,
    mode: Optional[str] = None,
    ratio: float = 0.7,
    min_gap: float = 0.2,
) -> str:
    """Write the HTML report of a run and return its path.

    Parameters
    ----------
    run : str or os.PathLike
        The savefile given to the tracker (its CSV is ``run + '.csv'``) or the CSV's path.
    model : torch.nn.Module, optional
        The network, to trace receptive fields at ``input_size``.
    input_size : int or tuple of int, optional
        ``(channels, *spatial)`` of the inputs; required with ``model``.
    receptive_fields : str, optional
        A JSON written by :func:`delve.receptive_field.save_receptive_fields`;
        default: ``<run>/receptive_fields.json`` when it exists.
    probes : dict of ProbeResult, DataFrame or str, optional
        Probe accuracies (:func:`delve.probes.linear_probes`), a frame from
        :func:`delve.probes.probes_to_frame` or a CSV of it; default:
        ``<run>/probes.csv`` when it exists.
    output : str, optional
        Where to write; default ``<run>/report.html``.
    mode : str, optional
        ``'train'`` or ``'eval'`` for the tail and the profile; default train when recorded.
    ratio, min_gap : float
        Passed to :func:`delve.analysis.find_tail`.

    Returns
    -------
    str
        The path of the written HTML file.

    Raises
    ------
    FileNotFoundError
        If the run's CSV (or the given receptive-field file) does not exist.
    ValueError
        If the run holds no saturation, or ``model`` comes without ``input_size``.
    """
    path = csv_path(run)
    savefile = path[: -len(".csv")]
    frame = load_run(path)
    modes = available_modes(frame)
    if not modes:
        raise ValueError(f"{path} holds no saturation columns; track with stats=['lsat'] (the default)")
    mode = mode or modes[0]
    if mode not in modes:
        raise ValueError(f"mode={mode!r} has no saturation in this run; choose one of {modes}")
    layers: List[str] = []
    for each in modes:
        layers += [n for n in statistic_table(frame, each).columns if n not in layers]
    size, fields = _receptive_fields(savefile, model, input_size, receptive_fields)
    ctx = _Context(
        name=os.path.basename(savefile) or savefile, frame=frame, modes=modes, mode=mode, layers=layers,
        tail=find_tail(frame, mode=mode, ratio=ratio, min_gap=min_gap), input_size=size, fields=fields,
        unproductive=[n for n, f in fields.items() if f.unproductive and n in layers],
        probes=_probe_frame(savefile, probes), ratio=ratio, min_gap=min_gap,
    )
    output = output or os.path.join(savefile, "report.html")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w", encoding="utf-8") as handle:
        handle.write(render_html(ctx))
    return output
