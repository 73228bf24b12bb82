"""Post-hoc analysis of a run: tables, the low-saturation "tail", and a diagnosis.

A run is what a :class:`~delve.SaturationTracker` wrote, given as the path of
its CSV (``<savefile>.csv``) or of its savefile, as a DataFrame read from
that CSV, or as the live tracker itself. Columns of statistics are named
``{train|eval}-{statistic}_{layer}`` (``train-saturation_features-0``) and
appear in the order the layers run; :func:`tidy_frame` turns them into a long
table with one value per row.

"Feature Space Saturation during Training" (Shenk et al., arXiv 2006.08679)
and "Should You Go Deeper?" (Richter et al., arXiv 2106.12307) show that the
layers of a network deeper than its input resolution needs form a *tail*: a
run of final layers whose saturation sits far below the rest. Those layers
add little; :func:`find_tail` finds them. :func:`diagnose` turns a run into
findings with the evidence they rest on (see :doc:`advice`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from delve.metrics import check_share
from delve.writers.base import MODES, STATMAP

#: Output name of the saturation statistic, the default of the functions here.
SATURATION = STATMAP["lsat"]

Run = Union[str, "os.PathLike[str]", pd.DataFrame, Any]


def csv_path(run: Union[str, "os.PathLike[str]"]) -> str:
    """The CSV of a run given by its savefile or by the CSV's own path.

    Examples
    --------
    >>> csv_path("runs/digits")
    'runs/digits.csv'
    >>> csv_path("runs/digits.csv")
    'runs/digits.csv'
    >>> csv_path("runs/digits/")  # the run folder, as a shell completes it
    'runs/digits.csv'
    """
    path = os.fspath(run)
    separators = os.sep + (os.altsep or "")
    path = path.rstrip(separators) or path
    return path if path.endswith(".csv") else path + ".csv"


def load_run(run: Run, tidy: bool = False) -> pd.DataFrame:
    """A run as a DataFrame: one row per epoch, one column per logged name (or, tidy, one row per value).

    Parameters
    ----------
    run : str, os.PathLike, pandas.DataFrame or SaturationTracker
        The CSV's path or the savefile given to the tracker (a trailing path
        separator is ignored); a DataFrame (returned as is); or a tracker,
        whose ``last_results`` become a one-row frame (its CSV is read when it
        has no results yet).
    tidy : bool
        Return the long table of :func:`tidy_frame` instead: columns
        ``epoch, mode, statistic, layer, value``.

    Returns
    -------
    pandas.DataFrame

    Raises
    ------
    FileNotFoundError
        If the CSV does not exist.
    ValueError
        If a tracker has neither results nor a CSV, or ``run`` is of another type.
    """
    if tidy:
        return tidy_frame(load_run(run))
    if isinstance(run, pd.DataFrame):
        return run
    if isinstance(run, (str, os.PathLike)):
        path = csv_path(run)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no run at {path!r}: give the savefile passed to the tracker or its CSV")
        return pd.read_csv(path, sep=";", index_col=0)
    if hasattr(run, "last_results") and hasattr(run, "savefile"):
        scalars = {k: v for k, v in run.last_results.items() if np.ndim(v) == 0}
        if scalars:
            return pd.DataFrame([scalars], index=[max(getattr(run, "epoch", 1) - 1, 0)])
        if os.path.exists(csv_path(run.savefile)):
            return load_run(run.savefile)
        raise ValueError("the tracker has no results yet: call add_saturations() at least once")
    raise ValueError(
        f"run must be a CSV path, a savefile path, a pandas.DataFrame or a SaturationTracker, got {type(run).__name__}"
    )


#: Columns of the long table of :func:`tidy_frame`.
TIDY_COLUMNS = ("epoch", "mode", "statistic", "layer", "value")


def split_column(name: str) -> Tuple[str, str, str]:
    """``(mode, statistic, layer)`` of a column name; a user scalar gives ``('', name, '')``.

    A column ``{mode}-{statistic}_{layer}`` with mode ``train`` or ``eval`` is a
    statistic of a layer (any statistic, also ones registered later); the
    tracker's averages ``average-{mode}-sat`` keep their mode, with an empty
    layer; every other name is a user scalar.

    Examples
    --------
    >>> split_column("eval-intrinsic-dimensionality_encoder-layers-0-linear1")
    ('eval', 'intrinsic-dimensionality', 'encoder-layers-0-linear1')
    >>> split_column("average-train-sat"), split_column("test_accuracy")
    (('train', 'average-sat', ''), ('', 'test_accuracy', ''))
    """
    head, separator, layer = name.partition("_")
    mode, dash, statistic = head.partition("-")
    if separator and dash and layer and statistic and mode in MODES:
        return mode, statistic, layer
    parts = name.split("-")
    if len(parts) == 3 and parts[0] == "average" and parts[1] in MODES:
        return parts[1], f"average-{parts[2]}", ""
    return "", name, ""


def tidy_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A wide run (one row per epoch, columns ``{mode}-{statistic}_{layer}``) as a long table.

    The conversion is pure: it reads nothing but ``frame``. Non-numeric cells
    (arrays) and missing values (a mode that did not run in an epoch) give no
    row.

    Parameters
    ----------
    frame : pandas.DataFrame
        Rows are epochs (the index), columns the logged names, as
        :func:`load_run` returns them or as ``pandas.DataFrame([tracker.last_results])``.

    Returns
    -------
    pandas.DataFrame
        Columns ``epoch, mode, statistic, layer, value`` (:data:`TIDY_COLUMNS`),
        one row per value, ordered by epoch and then by the frame's columns;
        statistics carry their output names (``saturation``,
        ``intrinsic-dimensionality``); user scalars have an empty mode and layer.

    Examples
    --------
    >>> wide = pd.DataFrame({"train-saturation_fc1": [0.5, 0.4], "eval-saturation_fc1": [0.45, None],
    ...                      "test_accuracy": [0.9, 0.95]})
    >>> tidy_frame(wide)
       epoch   mode      statistic layer  value
    0      0  train     saturation   fc1   0.50
    1      0   eval     saturation   fc1   0.45
    2      0         test_accuracy         0.90
    3      1  train     saturation   fc1   0.40
    4      1         test_accuracy         0.95

    The plot users want, saturation of every layer over epochs::

        long = delve.analysis.load_run("runs/exp", tidy=True)
        seaborn.lineplot(long[long.statistic == "saturation"], x="epoch", y="value", hue="layer", style="mode")
    """
    names = [str(column) for column in frame.columns]
    values = frame.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    epochs = np.repeat(np.asarray(frame.index), len(names))
    parts = np.array([split_column(name) for name in names], dtype=object).reshape(len(names), 3)
    long = pd.DataFrame({
        "epoch": epochs,
        "mode": np.tile(parts[:, 0], len(frame)),
        "statistic": np.tile(parts[:, 1], len(frame)),
        "layer": np.tile(parts[:, 2], len(frame)),
        "value": values.reshape(-1),
    }, columns=list(TIDY_COLUMNS))
    return long[long["value"].notna()].reset_index(drop=True)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a mode; choose 'train' or 'eval'")


def available_modes(run: Run, statistic: str = SATURATION) -> List[str]:
    """The modes (``train``, ``eval``) for which the run holds ``statistic`` columns."""
    frame = load_run(run)
    return [mode for mode in MODES if any(c.startswith(f"{mode}-{statistic}_") for c in frame.columns)]


def statistic_table(run: Run, mode: str = "train", statistic: str = SATURATION) -> pd.DataFrame:
    """One statistic per layer over epochs.

    Parameters
    ----------
    run : str, os.PathLike, pandas.DataFrame or SaturationTracker
        See :func:`load_run`.
    mode : str
        ``'train'`` or ``'eval'``.
    statistic : str
        The statistic's output name, such as ``'saturation'`` or ``'intrinsic-dimensionality'``.

    Returns
    -------
    pandas.DataFrame
        Rows are epochs, columns the layer names in the order they run.

    Examples
    --------
    >>> frame = pd.DataFrame({"train-saturation_conv": [0.5, 0.6], "train-saturation_fc": [0.2, 0.3]})
    >>> statistic_table(frame).loc[1].to_dict()
    {'conv': 0.6, 'fc': 0.3}
    """
    _check_mode(mode)
    frame = load_run(run)
    prefix = f"{mode}-{statistic}_"
    columns = [c for c in frame.columns if c.startswith(prefix)]
    table = frame[columns].apply(pd.to_numeric, errors="coerce")
    table.columns = [c[len(prefix):] for c in columns]
    return table


def last_epoch(run: Run, mode: str = "train", statistic: str = SATURATION) -> pd.Series:
    """Each layer's ``statistic`` at the last epoch that recorded it in ``mode``.

    Returns
    -------
    pandas.Series
        Layer name to value, in layer order; named after the epoch. Empty when
        the run has no such values.
    """
    table = statistic_table(run, mode, statistic)
    recorded = table.dropna(how="all")
    if recorded.empty:
        return pd.Series(dtype=float)
    return recorded.iloc[-1]


#: Output names of the statistics :func:`layer_table` reads.
IDIM = STATMAP["idim"]
SAMPLES = "samples"


def layers_of(run: Run) -> List[str]:
    """The layers with any statistic in the run, in the order they run.

    Examples
    --------
    >>> layers_of(pd.DataFrame({"train-saturation_b": [1], "eval-saturation_a": [1], "loss": [1]}))
    ['b', 'a']
    """
    layers: List[str] = []
    for column in load_run(run).columns:
        layer = split_column(str(column))[2]
        if layer and layer not in layers:
            layers.append(layer)
    return layers


def layer_widths(run: Run, model: Any = None) -> pd.Series:
    """Feature width of each layer: intrinsic dimensionality / saturation, else what ``model`` tells.

    Saturation is the intrinsic dimensionality over the width of what was
    recorded, so a run that records both (``stats=['lsat', 'idim']``) holds
    every width, also for ``conv_method='flatten'``. Other layers take the
    width of the module in ``model``; a layer with neither gets ``NaN``.

    Examples
    --------
    >>> run = pd.DataFrame({"train-saturation_fc": [0.25], "train-intrinsic-dimensionality_fc": [16]})
    >>> layer_widths(run).to_dict()
    {'fc': 64.0}
    """
    frame = load_run(run)
    layers = layers_of(frame)
    widths = pd.Series(np.nan, index=layers, dtype=float)
    for mode in MODES:
        ratio = last_epoch(frame, mode, IDIM) / last_epoch(frame, mode, SATURATION)
        ratio = ratio[np.isfinite(ratio.to_numpy(dtype=float))].round()
        widths = widths.fillna(ratio.reindex(layers))
    if model is not None:
        from delve.adapters import AdapterOptions, feature_dimension
        from delve.layers import find_layers

        options = AdapterOptions()
        for name, module in find_layers(model).items():
            width = feature_dimension(module, options)
            if name in widths.index and width is not None and np.isnan(widths[name]):
                widths[name] = float(width)
    return widths


def layer_table(run: Run, model: Any = None) -> pd.DataFrame:
    """Per layer at the last epoch: width, and per mode the samples, saturation and intrinsic dimensionality.

    Parameters
    ----------
    run : str, os.PathLike, pandas.DataFrame or SaturationTracker
        See :func:`load_run`.
    model : torch.nn.Module, optional
        The network, for widths the run does not hold (see :func:`layer_widths`).

    Returns
    -------
    pandas.DataFrame
        Indexed by layer in forward order; columns ``width`` and, for each mode
        that ran, ``{mode}-samples``, ``{mode}-saturation`` and
        ``{mode}-intrinsic-dimensionality`` (``NaN`` where the run holds no
        such value: samples are only known when the run records them).

    Examples
    --------
    >>> run = pd.DataFrame({"train-saturation_fc": [0.5, 0.25], "train-intrinsic-dimensionality_fc": [32, 16]})
    >>> layer_table(run).loc["fc"].to_dict()
    {'width': 64.0, 'train-samples': nan, 'train-saturation': 0.25, 'train-intrinsic-dimensionality': 16.0}
    """
    frame = load_run(run)
    layers = layers_of(frame)
    table = pd.DataFrame({"width": layer_widths(frame, model)}, index=layers)
    for mode in available_modes(frame, SATURATION) or available_modes(frame, IDIM):
        for statistic in (SAMPLES, SATURATION, IDIM):
            table[f"{mode}-{statistic}"] = last_epoch(frame, mode, statistic).reindex(layers).astype(float)
    return table


def _default_mode(run: pd.DataFrame) -> str:
    modes = available_modes(run)
    if not modes:
        raise ValueError("the run holds no saturation columns ('train-saturation_<layer>'); track with stats=['lsat']")
    return modes[0]


def find_tail(
    run: Run,
    mode: Optional[str] = None,
    ratio: float = 0.7,
    min_gap: float = 0.2,
    skip_output: bool = True,
) -> List[str]:
    """The layers that form the low-saturation tail at the last epoch.

    The rule: take the saturations ``s_1 .. s_L`` of the last epoch in layer
    order (layers without a value are left out). A block of final layers
    ``s_t .. s_L`` (with at least one layer before it) is a tail when every
    layer in it is at most ``ratio`` times, and at least ``min_gap`` below,
    the median saturation of the layers before the block,
    ``m_t = median(s_1 .. s_{t-1})``:

    .. math::

        s_i \\le \\text{ratio} \\cdot m_t \\quad\\text{and}\\quad m_t - s_i \\ge \\text{min\\_gap}
        \\qquad \\text{for } t \\le i \\le L.

    The tail is the longest such block. With ``skip_output`` the output layer
    (the last one, whose width is set by the task rather than by depth) may
    stand outside the tail: when no block ends at ``L``, blocks ending at
    ``L - 1`` are tried. With no such block, the tail is empty.

    Parameters
    ----------
    run : str, os.PathLike, pandas.DataFrame or SaturationTracker
        See :func:`load_run`.
    mode : str, optional
        ``'train'`` or ``'eval'``; default: train when recorded, else eval.
    ratio : float
        How far below the median of the earlier layers a tail layer must sit, in (0, 1].
    min_gap : float
        The least absolute drop (saturation is a share, between 0 and 1).
    skip_output : bool
        Let the last layer stand outside the tail.

    Returns
    -------
    list of str
        Layer names of the tail in order; empty when there is none.

    Examples
    --------
    >>> sats = {"conv1": .45, "conv2": .7, "conv3": .75, "conv4": .28, "conv5": .15, "fc": .6}
    >>> find_tail(pd.DataFrame({f"train-saturation_{k}": [v] for k, v in sats.items()}))
    ['conv4', 'conv5']
    >>> find_tail(pd.DataFrame({f"train-saturation_{k}": [.5] for k in sats}))
    []
    """
    check_share("ratio", ratio)
    if isinstance(min_gap, bool) or not isinstance(min_gap, (int, float)) or not 0 <= min_gap <= 1:
        raise ValueError(f"min_gap must be a number in [0, 1], got {min_gap!r}")
    frame = load_run(run)
    mode = _default_mode(frame) if mode is None else mode
    _check_mode(mode)
    values = last_epoch(frame, mode).dropna()
    return tail_block(list(values.index), values.to_numpy(dtype=float), ratio, min_gap, skip_output)


def tail_block(
    names: Sequence[str], saturations: Sequence[float], ratio: float = 0.7, min_gap: float = 0.2,
    skip_output: bool = False,
) -> List[str]:
    """The tail rule of :func:`find_tail` on saturations given in layer order.

    Examples
    --------
    >>> tail_block(["a", "b", "c", "d"], [0.8, 0.75, 0.2, 0.1])
    ['c', 'd']
    """
    names, saturations = list(names), np.asarray(saturations, dtype=float)
    ends = [len(names)] + ([len(names) - 1] if skip_output and len(names) >= 3 else [])
    for end in ends:
        for start in range(1, end):
            reference = float(np.median(saturations[:start]))
            block = saturations[start:end]
            highest = float(block.max())
            if highest <= ratio * reference and reference - highest >= min_gap and math.isfinite(reference):
                return names[start:end]
    return []


@dataclass(frozen=True)
class Finding:
    """One conclusion of :func:`diagnose`.

    Attributes
    ----------
    kind : str
        What was found: ``tail``, ``unproductive``, ``no-tail``, ``too-wide``,
        ``too-narrow``, ``low-saturation``, ``too-few-samples``,
        ``samples-unknown``, ``eval-train-gap`` or ``collapse-before-classifier``.
    severity : str
        ``'warn'`` (a change is advised, and following it did not cost
        accuracy in ``benchmarks/advice.py``), ``'info'`` (worth knowing, no
        change advised) or ``'ok'`` (checked, nothing to change).
    layers : tuple of str
        The layers it is about, named as in the CSV columns.
    message : str
        The finding in plain language; layer names are in backticks.
    evidence : dict
        The numbers it rests on: ``mode`` (the mode judged), ``layers`` (per
        layer its kind, width and per mode its samples, saturation and
        intrinsic dimensionality) and the rule's own numbers (``peer_median``,
        ``classes``, ``receptive_fields``, ``probe_before``...).
    suggestion : dict, optional
        What to change, for ``warn`` findings: ``{'action': 'narrow', 'widths':
        {layer: width}}``, ``{'action': 'raise-resolution', 'input_size': px}``.
    """

    kind: str
    severity: str
    layers: Tuple[str, ...]
    message: str
    evidence: Dict[str, Any] = field(default_factory=dict)
    suggestion: Optional[Dict[str, Any]] = None

    def to_dict(self) -> Dict[str, Any]:
        """The finding as plain JSON-ready values."""
        return {"kind": self.kind, "severity": self.severity, "layers": list(self.layers), "message": self.message,
                "evidence": self.evidence, "suggestion": self.suggestion}


def diagnose(
    run: Run,
    model: Any = None,
    input_size: Any = None,
    probes: Any = None,
    mode: Optional[str] = None,
    *,
    receptive_fields: Optional[str] = None,
    ratio: float = 0.7,
    min_gap: float = 0.2,
) -> List[Finding]:
    """What a run's last epoch says about the architecture: findings with the evidence they rest on.

    Each layer is judged at the last epoch by its width, the samples it saw
    (when the run records the statistic ``samples``), its saturation and its
    intrinsic dimensionality in train and eval, and compared only with layers
    of its kind and role. The rules (see :doc:`advice` for each one and the
    retraining check behind it):

    - a layer seen on fewer samples than its width gives no conclusion
      (``too-few-samples``);
    - the layer feeding the classifier at about classes - 1 dimensions is the
      expected collapse, not waste (``collapse-before-classifier``, ``ok``);
    - in a sequential stack (not a transformer's repeated blocks), a run of
      final layers far below the layers before them is a ``tail``; it is a
      ``warn`` with the advice to raise the input resolution only when their
      receptive fields cover the input, else ``info``; linear probes, when
      given, say whether the tail still lifts accuracy and outrank saturation;
    - a layer with at least 16 features per dimension it uses in train and
      eval is ``too-wide``: narrow it to 8x those dimensions (``warn``); the
      layers of a transformer's residual width are left out;
    - layers at saturation 0.95 or more (``too-narrow``), far below the other
      blocks' layers of the same role (``low-saturation``) or with train and
      eval 0.1 apart (``eval-train-gap``) are ``info``.

    Parameters
    ----------
    run : str, os.PathLike, pandas.DataFrame or SaturationTracker
        See :func:`load_run`.
    model : torch.nn.Module, optional
        The network: layer kinds (convolution, linear, attention), widths and
        fan-in; with ``input_size``, receptive fields.
    input_size : int or tuple of int, optional
        ``(channels, *spatial)`` of the inputs, to trace receptive fields.
    probes : dict of ProbeResult, DataFrame or str, optional
        Linear-probe accuracies (:func:`delve.probes.linear_probes`, a frame of
        :func:`delve.probes.probes_to_frame` or its CSV); default:
        ``<run>/probes.csv`` when it exists.
    mode : str, optional
        ``'train'`` or ``'eval'``: which saturation the tail rule judges;
        default train when recorded.
    receptive_fields : str, optional
        A JSON of :func:`delve.receptive_field.save_receptive_fields`; default:
        ``<run>/receptive_fields.json`` when it exists (``model`` and
        ``input_size`` take precedence).
    ratio, min_gap : float
        The tail rule's thresholds, as in :func:`find_tail`.

    Returns
    -------
    list of Finding
        ``warn`` findings first, then ``info``, then ``ok``; ``samples-unknown`` last.

    Raises
    ------
    FileNotFoundError
        If the run (or the given receptive-field file) does not exist.
    ValueError
        If the run holds neither saturation nor intrinsic dimensionality, or
        ``mode`` is not one of its modes.

    Examples
    --------
    >>> run = pd.DataFrame({"train-saturation_fc1": [0.02], "train-intrinsic-dimensionality_fc1": [8],
    ...                     "train-saturation_fc2": [0.14], "train-intrinsic-dimensionality_fc2": [9],
    ...                     "train-saturation_out": [0.9], "train-intrinsic-dimensionality_out": [9]})
    >>> [(f.kind, f.severity, f.layers) for f in diagnose(run)]  # doctest: +NORMALIZE_WHITESPACE
    [('too-wide', 'warn', ('fc1',)), ('collapse-before-classifier', 'ok', ('fc2',)),
     ('samples-unknown', 'info', ())]
    >>> diagnose(run)[0].suggestion
    {'action': 'narrow', 'widths': {'fc1': 64}}
    """
    from delve._diagnosis import diagnose_run

    return diagnose_run(run, model, input_size, probes, mode, receptive_fields, ratio, min_gap)
