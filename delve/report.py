"""One self-contained HTML page that turns a run into architecture decisions, with their evidence.

:func:`report` reads ``<savefile>.csv`` and writes ``<savefile>/report.html``
with its figures embedded as PNG. The findings are exactly those of
:func:`delve.analysis.diagnose`, each with the numbers it rests on; then
saturation and intrinsic dimensionality per layer over epochs (train and eval
on one colour scale), the last epoch's profile, eval against train, the other
logged values, and a table of every layer's width, samples, saturation and
intrinsic dimensionality. Layers of a tail are marked; so is the
receptive-field border (:mod:`delve.receptive_field`) when the model and input
size are given, or a receptive-field JSON is passed or lies in the run folder
as ``receptive_fields.json``. Probe accuracies (:func:`delve.probes.linear_probes`)
are drawn over the profile when given, or when ``probes.csv`` lies in the run
folder.

Figures are :class:`matplotlib.figure.Figure` objects rendered by Agg; they
never enter pyplot's global registry and are released after rendering.
"""
from __future__ import annotations

import base64
import html
import math
import os
import re
import shutil
import textwrap
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from delve import _diagnosis
from delve._diagnosis import PROBES_FILE, RF_FILE  # noqa: F401  (the file names report() looks for)
from delve.analysis import (
    IDIM, MODES, SAMPLES, SATURATION, Finding, available_modes, csv_path, diagnose, last_epoch, layer_table, load_run,
    statistic_table,
)
from delve.writers.base import STATMAP, parse_stat_name
from delve.writers.plotting import MODE_COLORS

_STAT_PREFIXES = tuple(f"{mode}-" for mode in MODES) + ("average-",)
_TAIL_COLOR = "#d62728"
_BORDER_COLOR = "#ff7f0e"


@dataclass
class _Context:
    """Everything the figures and the text need, computed once."""

    name: str
    frame: pd.DataFrame
    modes: List[str]
    mode: str
    layers: List[str]
    table: pd.DataFrame
    findings: List[Finding]
    input_size: Optional[Tuple[int, ...]] = None
    path: str = ""
    fields: Dict[str, Any] = field(default_factory=dict)
    probes: Optional[pd.DataFrame] = None
    ratio: float = 0.7
    min_gap: float = 0.2
    statistics: List[str] = field(default_factory=list)

    @property
    def tail(self) -> List[str]:
        """Layers of the tail findings."""
        return [n for f in self.findings if f.kind == "tail" for n in f.layers]

    @property
    def unproductive(self) -> List[str]:
        """Layers whose input already sees the whole input."""
        return [n for n, f in self.fields.items() if f.unproductive and n in self.layers]

    @property
    def border(self) -> Optional[int]:
        """Index (in ``layers``) of the first unproductive layer."""
        positions = [self.layers.index(n) for n in self.unproductive]
        return min(positions) if positions else None


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
        if label.get_text().split(" (")[0] in ctx.tail:
            label.set_color(_TAIL_COLOR)
            label.set_fontweight("bold")


#: Statistics the report draws in sections of their own, or leaves to the layer table.
_OWN_SECTIONS = ("lsat", "idim", "samples", "cov", "embed")


def logged_statistics(frame: pd.DataFrame) -> List[str]:
    """Keys of the per-layer scalar statistics a run logged, other than saturation, idim and samples.

    Examples
    --------
    >>> frame = pd.DataFrame({"train-saturation_fc": [0.5], "train-effective-rank_fc": [3.2], "loss": [1.0]})
    >>> logged_statistics(frame)
    ['erank']
    """
    keys = []
    for column in frame.columns:
        parsed = parse_stat_name(str(column))
        if parsed is not None and parsed.stat not in _OWN_SECTIONS and parsed.stat not in keys:
            keys.append(parsed.stat)
    return keys


def _heatmap(ctx: _Context, stat: str) -> Optional[str]:
    """Layers-by-epochs heatmaps of the statistic ``stat`` (a key), train and eval on one colour scale."""
    from delve.writers.heatmap import draw_evolution, evolution_size

    name = STATMAP[stat]
    tables = {mode: statistic_table(ctx.frame, mode, name).reindex(columns=ctx.layers) for mode in ctx.modes}
    tables = {mode: table for mode, table in tables.items() if table.notna().any().any()}
    if not tables:
        return None
    epochs = list(ctx.frame.index)
    matrices = {mode: table.reindex(epochs).to_numpy(dtype=float).T for mode, table in tables.items()}
    widths = ctx.table["width"].to_numpy(dtype=float) if stat == "idim" else None
    figure = _figure(*evolution_size(ctx.layers, epochs, len(matrices)))
    label = name.replace("-", " ")
    axes = draw_evolution(figure, ctx.layers, epochs, matrices, stat, f"{label} per layer over epochs",
                          widths=widths, fontsize=10)
    for ax in axes:
        _mark_layer_labels(ax.get_yticklabels(), ctx)
        if ctx.border is not None:
            ax.axhline(ctx.border - 0.5, color=_BORDER_COLOR, linewidth=2.2, linestyle="--")
    return _png(figure)


def _profile(ctx: _Context) -> str:
    """The last epoch: saturation of every layer, train and eval side by side, idim on top, probes over it."""
    figure = _figure(11.5, 4.6)
    ax = figure.subplots()
    positions = np.arange(len(ctx.layers))
    width = 0.8 / len(ctx.modes)
    handles = []
    epochs = []
    for index, mode in enumerate(ctx.modes):
        values = ctx.table[f"{mode}-{SATURATION}"].to_numpy(dtype=float)
        offsets = positions + (index - (len(ctx.modes) - 1) / 2) * width
        edges = [_TAIL_COLOR if name in ctx.tail else "none" for name in ctx.layers]
        ax.bar(offsets, values, width=width * 0.95, color=MODE_COLORS[mode], edgecolor=edges, linewidth=1.8,
               zorder=2)
        for x, value, dims in zip(offsets, values, ctx.table[f"{mode}-{IDIM}"].to_numpy(dtype=float)):
            if np.isfinite(value) and np.isfinite(dims):  # inside the bar's top, clear of the probe lines
                inside = value > 0.12
                ax.text(x, value - 0.015 if inside else value + 0.01, f"{dims:.0f}", ha="center",
                        va="top" if inside else "bottom", fontsize=7, color="white" if inside else "#3e4c59")
        handles.append(_patch(MODE_COLORS[mode], mode))
        epochs.append(f"{mode} {last_epoch(ctx.frame, mode).name}")
    for start, stop in _runs([ctx.layers.index(n) for n in ctx.unproductive]):
        ax.axvspan(start - 0.5, stop + 0.5, color=_BORDER_COLOR, alpha=0.12, linewidth=0, zorder=0)
    if ctx.border is not None:
        ax.axvline(ctx.border - 0.5, color=_BORDER_COLOR, linestyle="--", linewidth=2)
        ax.text(ctx.border - 0.4, 1.03, f"receptive field ≥ input ({_size_text(ctx.input_size)}) →",
                color=_BORDER_COLOR, fontsize=9, fontweight="bold", va="bottom")
    ax.set_ylim(0, 1.12)
    ax.set_xlim(-0.6, len(ctx.layers) - 0.4)
    ax.set_ylabel(f"saturation (epoch: {', '.join(epochs)})")
    ax.set_xticks(positions, ctx.layers, rotation=55 if len(ctx.layers) > 6 else 0,
                  ha="right" if len(ctx.layers) > 6 else "center", fontsize=8)
    _mark_layer_labels(ax.get_xticklabels(), ctx)
    ax.grid(axis="y", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    if ctx.tail:
        handles.append(_patch("white", "tail (red edge)", edgecolor=_TAIL_COLOR))
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


def _patch(color: str, label: str, alpha: float = 1.0, edgecolor: Optional[str] = None) -> Any:
    from matplotlib.patches import Patch

    return Patch(facecolor=color, edgecolor=edgecolor or color, label=label, alpha=alpha)


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


def _field_text(value: Any) -> str:
    if value is None:
        return ""
    scalar = max(value)
    return "global" if math.isinf(scalar) else f"{scalar:g}"


def _code(text: str) -> str:
    """HTML of a plain-text message: escaped, with `names` in code spans."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))


def _number(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "?"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1:
        return f"{value:.0f}"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _value_text(value: Any) -> str:
    if isinstance(value, dict) and value and all(isinstance(v, dict) and set(v) == {"input", "output"}
                                                 for v in value.values()):
        return "; ".join(f"{k} {_number(v['input'])} → {_number(v['output'])} px" for k, v in value.items())
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_value_text(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_value_text(v) for v in value)
    return _number(value)


_NUMBERS = [("width", "width")] + [
    (f"{mode}-{statistic}", f"{mode} {label}")
    for mode in MODES for statistic, label in ((SAMPLES, "samples"), (SATURATION, "sat."), (IDIM, "idim"))
]


def _evidence_html(finding: Finding) -> str:
    """The numbers a finding rests on: the rule's own, then each named layer's."""
    extra = {k: v for k, v in finding.evidence.items() if k not in ("layers", "mode")}
    parts = [f"<span><b>{html.escape(k.replace('_', ' '))}</b> {html.escape(_value_text(v))}</span>"
             for k, v in extra.items()]
    if finding.suggestion:
        parts.append(f"<span><b>suggestion</b> {html.escape(_value_text(finding.suggestion))}</span>")
    layers = finding.evidence.get("layers", {})
    columns = [(key, label) for key, label in _NUMBERS if any(key in numbers for numbers in layers.values())]
    rows = "".join(
        f"<tr><td><code>{html.escape(name)}</code></td>"
        + "".join(f"<td class='num'>{_number(numbers.get(key))}</td>" for key, _ in columns) + "</tr>"
        for name, numbers in layers.items()
    )
    table = ("<table class='evidence'><thead><tr><th>layer</th>"
             + "".join(f"<th>{label}</th>" for _, label in columns) + f"</tr></thead><tbody>{rows}</tbody></table>"
             if rows else "")
    mode = finding.evidence.get("mode")
    head = f"<span><b>mode judged</b> {html.escape(str(mode))}</span>" if mode else ""
    return f"<div class='evidence'>{head}{''.join(parts)}</div>{table}"


def _finding_html(finding: Finding) -> str:
    label = {"warn": "change advised", "info": "worth knowing", "ok": "checked"}[finding.severity]
    return (f"<div class='rec {finding.severity}'><div class='kind'>{label} · {html.escape(finding.kind)}</div>"
            f"{_code(finding.message)}{_evidence_html(finding)}</div>")


def _layer_table(ctx: _Context) -> str:
    kinds: Dict[str, List[str]] = {}
    for finding in ctx.findings:
        for name in finding.layers:
            kinds.setdefault(name, []).append(finding.kind)
    header = ["layer", "width"] + [f"{mode} {label}" for mode in ctx.modes for label in ("samples", "sat.", "idim")]
    if ctx.fields:
        header += ["input RF", "RF"]
    if ctx.probes is not None:
        header += ["probe test acc."]
    header.append("findings")
    rows = []
    for name in ctx.layers:
        numbers = ctx.table.loc[name]
        cells = [f"<td><code>{html.escape(name)}</code></td>", f"<td class='num'>{_number(numbers['width'])}</td>"]
        for mode in ctx.modes:
            for statistic in (SAMPLES, SATURATION, IDIM):
                cells.append(f"<td class='num'>{_number(numbers.get(f'{mode}-{statistic}'))}</td>")
        info = ctx.fields.get(name)
        if ctx.fields:
            cells.append(f"<td class='num'>{_field_text(info.input_receptive_field) if info else ''}</td>")
            cells.append(f"<td class='num'>{_field_text(info.receptive_field) if info else ''}</td>")
        if ctx.probes is not None:
            value = ctx.probes["test_accuracy"].get(name, np.nan) if "test_accuracy" in ctx.probes else np.nan
            cells.append(f"<td class='num'>{'' if pd.isna(value) else f'{value:.1%}'}</td>")
        tags = [f"<span class='tag {'tail' if kind == 'tail' else 'rf' if kind == 'unproductive' else 'other'}'>"
                f"{html.escape(kind)}</span>" for kind in kinds.get(name, [])]
        cells.append(f"<td>{' '.join(tags)}</td>")
        rows.append(f"<tr{' class=flag' if tags else ''}>{''.join(cells)}</tr>")
    head = "".join(f"<th>{h}</th>" for h in header)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _layer_plain(name: str, numbers: dict) -> str:
    """``conv1  width 16 | train: sat. 0.438, idim 7, samples ? | eval: ...``; a label and its number never
    part at a line break (a no-break space joins them)."""
    parts = [f"width\u00a0{_number(numbers.get('width'))}"] + (
        [numbers["kind"]] if numbers.get("kind") not in (None, "unknown") else [])
    for mode in MODES:
        if f"{mode}-{SATURATION}" in numbers:
            parts.append(f"{mode}: sat.\u00a0{_number(numbers[f'{mode}-{SATURATION}'])}, "
                         f"idim\u00a0{_number(numbers.get(f'{mode}-{IDIM}'))}, "
                         f"samples\u00a0{_number(numbers.get(f'{mode}-{SAMPLES}'))}")
    return f"{name}  " + " | ".join(parts)


_CLI_LAYERS = 6


def format_findings(findings: Sequence[Finding], width: Optional[int] = None) -> str:
    """The findings as plain text for a terminal: severity and kind, the message, then its evidence
    (the numbers of at most six layers per finding).

    Parameters
    ----------
    findings : list of Finding
        What :func:`delve.analysis.diagnose` returns.
    width : int, optional
        Line width; default: the terminal's (at most 100 columns).

    Returns
    -------
    str
    """
    width = width or min(shutil.get_terminal_size((100, 20)).columns, 100)
    labels = {"warn": "WARN", "info": "INFO", "ok": "OK"}
    indent = " " * 6
    blocks = []
    for finding in findings:
        head = f"{labels[finding.severity]:<5} {finding.kind}"
        head += f": {', '.join(finding.layers)}" if finding.layers else ""
        lines = [head if len(head) <= width else head[: width - 2] + " …"]
        lines += textwrap.wrap(finding.message, width, initial_indent=indent, subsequent_indent=indent,
                               break_on_hyphens=False)
        extra = {k: v for k, v in finding.evidence.items() if k not in ("layers", "mode")}
        if extra:
            lines += textwrap.wrap("evidence: " + _value_text(extra), width, initial_indent=indent,
                                   subsequent_indent=indent + "  ", break_on_hyphens=False)
        layers = list(finding.evidence.get("layers", {}).items())
        for name, numbers in layers[:_CLI_LAYERS]:
            lines += textwrap.wrap(_layer_plain(name, numbers), width, initial_indent=indent + "  ",
                                   subsequent_indent=indent + "    ", break_on_hyphens=False)
        if len(layers) > _CLI_LAYERS:
            more = len(layers) - _CLI_LAYERS
            lines.append(f"{indent}  … {more} more layer{'s' if more > 1 else ''} (--json shows all)")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) if blocks else "no findings"


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
.tag.tail{background:#d62728}.tag.rf{background:#ff7f0e}.tag.other{background:#7b8794}
.rec .kind{font-size:11px;text-transform:uppercase;letter-spacing:.04em;color:#616e7c;margin-bottom:3px}
div.evidence{font-size:12.5px;color:#3e4c59;margin-top:6px}div.evidence span{margin-right:14px;display:inline-block}
table.evidence{width:auto;font-size:12px;margin-top:6px}table.evidence td,table.evidence th{padding:2px 8px}
code{font-family:SFMono-Regular,Consolas,monospace;font-size:90%;background:#eef1f4;padding:1px 4px;border-radius:4px}
.small{color:#616e7c;font-size:13px;line-height:1.5}
"""


def _figure_html(png: str, caption: str) -> str:
    return (f"<figure class='card'><img alt='{html.escape(caption)}' src='data:image/png;base64,{png}'>"
            f"<figcaption>{caption}</figcaption></figure>")


def render_html(ctx: _Context) -> str:
    """The report page for a prepared context."""
    epochs = len(ctx.frame.index)
    meta = [f"{epochs} epoch{'s' if epochs != 1 else ''}", f"{len(ctx.layers)} layers"]
    meta.append("modes: " + ", ".join(ctx.modes))
    if ctx.input_size:
        meta.append(f"input {_size_text(ctx.input_size)}")
    caption = ("Rows are layers in forward order" + ("; tail layers in red" if ctx.tail else "")
               + ("; the orange dashed line is the receptive-field border (below it, layers see more than the whole "
                  "input)" if ctx.border is not None else "") + ".")
    parts = [
        f"<h1>delve report · {html.escape(ctx.name)}</h1>",
        "<div class='meta'>" + "".join(f"<span>{m}</span>" for m in meta) + "</div>",
        "<h2>Findings</h2>", "".join(_finding_html(f) for f in ctx.findings),
        "<p class='small'>The findings of <code>delve.analysis.diagnose</code> (also "
        f"<code>python -m delve diagnose {html.escape(ctx.path or ctx.name)}</code>). A <b>change advised</b> was followed and "
        "retrained in delve's <code>benchmarks/advice.py</code> without costing accuracy; see the documentation's "
        "Advice page for every rule.</p>",
        "<h2>Saturation per layer over epochs</h2>", _figure_html(_heatmap(ctx, "lsat"), caption),
    ]
    idim = _heatmap(ctx, "idim")
    if idim:
        scale = ("the colour is their share of the layer's width (in brackets), one scale for train and eval"
                 if ctx.table["width"].notna().all() else "one colour scale for train and eval")
        parts += ["<h2>Intrinsic dimensionality per layer over epochs</h2>",
                  _figure_html(idim, f"Numbers are dimensions; {scale}. {caption}")]
    for stat in ctx.statistics:
        figure = _heatmap(ctx, stat)
        if figure:
            title = STATMAP[stat].replace("-", " ")
            parts += [f"<h2>{html.escape(title[:1].upper() + title[1:])} per layer over epochs</h2>",
                      _figure_html(figure, f"One colour scale for train and eval. {caption}")]
    parts += [
        "<h2>Last epoch</h2>",
        _figure_html(_profile(ctx), "Saturation of each layer at the last epoch, train and eval side by side; the "
                                    "number on a bar is the intrinsic dimensionality."),
    ]
    other = _other_values(ctx.frame)
    if other:
        parts += ["<h2>Other logged values</h2>", _figure_html(other, "Values logged with add_scalar.")]
    parts += [
        "<h2>Layers</h2>", f"<div class='card'>{_layer_table(ctx)}</div>",
        "<p class='small'>At the last epoch. <b>Width</b>: the layer's features; <b>samples</b>: how many rows "
        "its covariance was computed from (recorded with the statistic <code>samples</code>; ? when the run does "
        "not hold it); <b>sat.</b>: saturation, the share of the width needed to explain 99% of the variance; "
        "<b>idim</b>: that number of dimensions. The <b>tail</b> is the longest run of final layers of a sequential "
        f"stack whose saturation is at most {ctx.ratio:g} × the median of the layers before them and at least "
        f"{ctx.min_gap:g} below it. A layer is <b>unproductive</b> when the receptive field of its input is at "
        "least the input size and its own exceeds it (Richter et al., <i>Should You Go Deeper?</i>, 2021).</p>",
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
    statistics: Optional[Sequence[str]] = None,
) -> str:
    """Write the HTML report of a run and return its path.

    Parameters
    ----------
    run : str or os.PathLike
        The savefile given to the tracker (its CSV is ``run + '.csv'``) or the
        CSV's path; a trailing path separator is ignored.
    model : torch.nn.Module, optional
        The network: layer kinds and widths, and with ``input_size`` receptive fields.
    input_size : int or tuple of int, optional
        ``(channels, *spatial)`` of the inputs, to trace receptive fields.
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
        The tail rule's thresholds (see :func:`delve.analysis.find_tail`).
    statistics : list of str, optional
        Keys of further logged statistics (``'erank'``, ``'pr'``, ``'trc'``...)
        to draw as layers-by-epochs heatmaps besides saturation and intrinsic
        dimensionality; default: every one the run logged
        (:func:`logged_statistics`).

    Returns
    -------
    str
        The path of the written HTML file.

    Raises
    ------
    FileNotFoundError
        If the run's CSV (or the given receptive-field file) does not exist.
    ValueError
        If the run holds no saturation, or ``mode`` is not one of its modes.
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
    size, fields = _diagnosis.receptive_fields(path, model, input_size, receptive_fields)
    probe_table = _diagnosis.probe_frame(path, probes)
    findings = diagnose(path, model=model, input_size=input_size, probes=probe_table, mode=mode,
                        receptive_fields=receptive_fields, ratio=ratio, min_gap=min_gap)
    table = layer_table(frame, model)
    table = table[table[[c for c in table.columns if c != "width"]].notna().any(axis=1)]
    logged = logged_statistics(frame)
    if statistics is None:
        statistics = logged
    missing = [key for key in statistics if key not in logged]
    if missing:
        raise ValueError(f"statistics={missing} are not in this run; it logged {logged or 'none besides saturation'}")
    ctx = _Context(
        name=os.path.basename(savefile) or savefile, frame=frame, modes=modes, mode=mode, layers=list(table.index),
        table=table, findings=findings, input_size=size, path=savefile, fields=fields, probes=probe_table,
        ratio=ratio, min_gap=min_gap, statistics=list(statistics),
    )
    output = output or os.path.join(savefile, "report.html")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w", encoding="utf-8") as handle:
        handle.write(render_html(ctx))
    return output
