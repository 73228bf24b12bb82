"""The statistics a tracker can compute: one registry from ``stats`` key to output name and function.

Every statistic, built-in or registered with :func:`register_statistic`, is a
function of what one layer's accumulator holds. It names what it needs by its
parameter names, chosen from :data:`INPUTS`; a first parameter with another
name receives the eigenvalues. The tracker computes each input once per layer
and mode, and only when some requested statistic asks for it (eigenvalues of
all layers in one batched call).

========================= ======================================================
input                     what the function receives
========================= ======================================================
``eigenvalues``           float64 eigenvalues of the covariance, largest first
``covariance``            the float64 ``(d, d)`` covariance matrix
``mean``                  the float64 mean of the samples
``count``                 the number of samples behind the statistics
``threshold``             the tracker's ``sat_threshold``
``eigenvectors``          float64 eigenvectors, one column per eigenvalue
``samples``               rows kept for the ``embed`` statistic (or ``None``)
``classes``               per-class sums (:class:`delve.classes.ClassMoments`), or
                          ``None`` unless every sample had a label
========================= ======================================================
"""
from __future__ import annotations

import inspect
import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from delve import metrics
from delve.classes import ClassMoments, class_distance_normalized_variance, nc1
from delve.writers.base import MODES, STATMAP

#: Statistics that need the labels of the samples (``num_classes`` and ``set_labels``).
CLASS_STATISTICS = ("nc1", "cdnv")

#: Names a statistic function's parameters may have, and so the inputs it can ask for.
INPUTS = ("eigenvalues", "covariance", "mean", "count", "threshold", "eigenvectors", "samples", "classes")

#: The inputs a saved covariance matrix (and a threshold) determines: the npy writer keeps no mean, count or rows.
COVARIANCE_INPUTS = ("eigenvalues", "covariance", "threshold", "eigenvectors")


@dataclass(frozen=True)
class Statistic:
    """One registered statistic.

    Attributes
    ----------
    key : str
        The key users put in ``stats``.
    name : str
        The name in outputs (``'{mode}-{name}_{layer}'``).
    function : callable
        Computes the value from the inputs named in ``inputs``.
    inputs : tuple of str
        What ``function`` asks for, each one of :data:`INPUTS`.
    parameters : tuple of str
        The parameter of ``function`` that receives each of ``inputs``.
    array : bool
        Whether the value is an array (written by the npy writer), not a number.
    empty : float
        The value of a layer that saw no sample in a mode where others did.
    """

    key: str
    name: str
    function: Callable[..., Any]
    inputs: Tuple[str, ...]
    parameters: Tuple[str, ...]
    array: bool = False
    empty: float = float("nan")


_REGISTRY: Dict[str, Statistic] = {}
_KEY = re.compile(r"[a-z][a-z0-9]*")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")


def _function_inputs(key: str, function: Callable[..., Any]) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """What ``function`` asks for, and the parameter that receives each input."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return ("eigenvalues",), ()
    inputs: List[str] = []
    names: List[str] = []
    for position, parameter in enumerate(parameters):
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.name in INPUTS:
            inputs.append(parameter.name)
        elif position == 0:
            inputs.append("eigenvalues")
        elif parameter.default is parameter.empty:
            raise ValueError(
                f"statistic {key!r}: parameter {parameter.name!r} of its function is none of the inputs "
                f"{', '.join(INPUTS)} and has no default"
            )
        else:
            continue
        names.append(parameter.name)
    return tuple(inputs), tuple(names)


def register_statistic(
    key: str, output_name: str, function: Callable[..., Any], *, array: bool = False, empty: float = float("nan")
) -> Statistic:
    """Make ``key`` a valid entry of ``stats`` for every tracker created afterwards.

    Registering a key again replaces its statistic.

    Parameters
    ----------
    key : str
        What users put in ``stats``: lowercase letters and digits, starting
        with a letter (it also names the plot files).
    output_name : str
        Name in the outputs, ``'{mode}-{output_name}_{layer}'``: letters,
        digits, ``-`` and ``.``, no ``_`` (which separates the layer).
    function : callable
        Takes the eigenvalues (as its first parameter) and, if its parameters
        are so named, any other of :data:`INPUTS`; returns a number (or an
        array with ``array=True``). Parameters with other names need defaults.
    array : bool
        Whether the value is an array rather than a number.
    empty : float
        Value written for a layer without samples in a mode (NaN by default).

    Returns
    -------
    Statistic
        The registered entry.

    Raises
    ------
    ValueError
        If the key or name is malformed or taken by another statistic, the
        function is not callable or asks for an input that does not exist.

    Examples
    --------
    >>> entry = register_statistic("top", "top-eigenvalue", lambda eigenvalues: float(eigenvalues[0]))
    >>> entry.inputs
    ('eigenvalues',)
    >>> unregister_statistic("top")
    """
    if not isinstance(key, str) or not _KEY.fullmatch(key) or key in MODES:
        raise ValueError(
            f"key must be lowercase letters and digits starting with a letter (not 'train' or 'eval'), got {key!r}"
        )
    if not isinstance(output_name, str) or not _NAME.fullmatch(output_name) or output_name in MODES:
        raise ValueError(
            "output_name must be letters, digits, '-' and '.' (no '_', which separates the layer), "
            f"got {output_name!r}"
        )
    if key in _BUILTIN_KEYS:
        raise ValueError(f"key {key!r} is a built-in statistic; choose another key")
    owner = next((other for other, name in STATMAP.items() if name == output_name and other != key), None)
    if owner is not None:
        raise ValueError(f"output_name {output_name!r} is the name of statistic {owner!r}; choose another name")
    if not callable(function):
        raise ValueError(f"function must be callable, got {function!r}")
    if not isinstance(array, bool):
        raise ValueError(f"array must be True or False, got {array!r}")
    if isinstance(empty, bool) or not isinstance(empty, numbers.Real):
        raise ValueError(f"empty must be a number (the value of a layer without samples), got {empty!r}")
    entry = Statistic(key, output_name, function, *_function_inputs(key, function), array, empty)
    _REGISTRY[key] = entry
    STATMAP[key] = output_name
    return entry


def unregister_statistic(key: str) -> None:
    """Remove a statistic added with :func:`register_statistic` (built-ins stay)."""
    if key in _BUILTIN_KEYS:
        raise ValueError(f"{key!r} is a built-in statistic and cannot be removed")
    _REGISTRY.pop(key, None)
    STATMAP.pop(key, None)


def get_statistic(key: str) -> Statistic:
    """The registered statistic of ``key``; a ValueError naming the valid keys otherwise."""
    try:
        return _REGISTRY[key]
    except KeyError:
        raise ValueError(
            f"stats contains {key!r}, which is not a statistic; choose from {', '.join(map(repr, _REGISTRY))}"
        ) from None


def statistic_keys() -> Tuple[str, ...]:
    """Every key ``stats`` accepts now, built-ins first."""
    return tuple(_REGISTRY)


def from_covariance(statistic: Statistic) -> bool:
    """Whether ``statistic`` is a number a covariance matrix determines: its inputs are :data:`COVARIANCE_INPUTS`."""
    return not statistic.array and set(statistic.inputs) <= set(COVARIANCE_INPUTS)


class LayerInputs:
    """The inputs of one layer and mode, each computed on first use.

    Parameters
    ----------
    covariance : torch.Tensor
        The float64 covariance.
    mean : torch.Tensor or None
        The float64 mean (``None`` for a covariance read back from a file).
    count : int or None
        Number of samples (``None`` when unknown).
    threshold : float or None
        ``sat_threshold`` (``None`` when no statistic asks for it).
    samples : torch.Tensor, optional
        Rows kept for ``embed``.
    eigenvalues : torch.Tensor, optional
        Already computed eigenvalues (largest first), e.g. by a batched call.
    classes : ClassMoments, optional
        Per-class sums of the same samples, when every sample had a label.
    """

    def __init__(
        self,
        covariance: torch.Tensor,
        mean: Optional[torch.Tensor],
        count: Optional[int],
        threshold: Optional[float],
        samples: Optional[torch.Tensor] = None,
        eigenvalues: Optional[torch.Tensor] = None,
        classes: Optional[ClassMoments] = None,
    ) -> None:
        self.covariance = covariance
        self.classes = classes
        self.mean = mean
        self.count = count
        self.threshold = threshold
        self.samples = samples
        self._eigenvalues = eigenvalues
        self._eigenvectors: Optional[torch.Tensor] = None

    @property
    def eigenvalues(self) -> torch.Tensor:
        if self._eigenvalues is None:
            self._eigenvalues = metrics.eigenvalues(self.covariance)
        return self._eigenvalues

    @property
    def eigenvectors(self) -> torch.Tensor:
        if self._eigenvectors is None:
            values, vectors = torch.linalg.eigh(self.covariance.to(torch.float64))
            self._eigenvectors = vectors.flip(1)
            if self._eigenvalues is None:
                self._eigenvalues = values.flip(0).clamp_min(0.0)
        return self._eigenvectors

    def arguments(self, statistic: Statistic) -> Tuple[List[Any], Dict[str, Any]]:
        """Positional and keyword arguments of ``statistic.function`` (positional: a builtin without signature)."""
        values = [getattr(self, name) for name in statistic.inputs]
        if not statistic.parameters:
            return values, {}
        return [], dict(zip(statistic.parameters, values))


def needs_eigenvalues(statistics: Sequence[Statistic]) -> bool:
    """Whether any of ``statistics`` asks for the eigenvalues."""
    return any("eigenvalues" in statistic.inputs for statistic in statistics)


def evaluate(statistic: Statistic, inputs: LayerInputs) -> Any:
    """The value of ``statistic`` for one layer: a float (or int), or a numpy array for array statistics."""
    args, kwargs = inputs.arguments(statistic)
    value = statistic.function(*args, **kwargs)
    if statistic.array:
        return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    return float(value)


def _covariance_matrix(covariance: torch.Tensor) -> np.ndarray:
    return covariance.cpu().numpy()


def _embedded_sample(samples: Optional[torch.Tensor], mean: torch.Tensor, eigenvectors: torch.Tensor) -> np.ndarray:
    """Kept rows, centered, projected on the top two eigenvectors: ``(n, 2)``."""
    if samples is None:
        return np.zeros((0, 2))
    top = eigenvectors[:, :2].to(samples.device)
    centered = samples.to(torch.float64) - mean.to(samples.device)
    return (centered @ top).cpu().numpy()


def _samples(count: int) -> int:
    return count


def _finite(eigenvalues: torch.Tensor) -> bool:
    return bool(torch.isfinite(eigenvalues).all())


def _saturation(eigenvalues: torch.Tensor, threshold: float) -> float:
    return metrics.saturation_from_eigenvalues(eigenvalues, threshold) if _finite(eigenvalues) else math.nan


def _intrinsic_dimensionality(eigenvalues: torch.Tensor, threshold: float) -> Union[int, float]:
    if not _finite(eigenvalues):
        return math.nan
    return metrics.intrinsic_dimensionality_from_eigenvalues(eigenvalues, threshold)


def _determinant(covariance: torch.Tensor) -> float:
    return metrics.compute_cov_determinant(covariance)


def _trace(covariance: torch.Tensor) -> float:
    return metrics.compute_cov_trace(covariance)


def _nc1(covariance: torch.Tensor, mean: torch.Tensor, classes: Optional[ClassMoments]) -> float:
    return math.nan if classes is None else nc1(covariance, mean, classes)


def _cdnv(classes: Optional[ClassMoments]) -> float:
    return math.nan if classes is None else class_distance_normalized_variance(classes)


def _builtin(key: str, function: Callable[..., Any], array: bool = False, empty: float = math.nan) -> None:
    _REGISTRY[key] = Statistic(key, STATMAP[key], function, *_function_inputs(key, function), array, empty)


_builtin("lsat", _saturation)
_builtin("idim", _intrinsic_dimensionality)
_builtin("cov", _covariance_matrix, array=True)
_builtin("det", _determinant)
_builtin("trc", _trace)
_builtin("dtrc", metrics.diagonal_trace_from_eigenvalues)
_builtin("embed", _embedded_sample, array=True)
_builtin("samples", _samples, empty=0)
_builtin("nc1", _nc1)
_builtin("cdnv", _cdnv)
_builtin("erank", metrics.effective_rank)
_builtin("rankme", metrics.rankme)
_builtin("pr", metrics.participation_ratio)
_builtin("srank", metrics.stable_rank)
_builtin("cond", metrics.condition_number)
_builtin("entropy", metrics.matrix_entropy)
_builtin("alpha", metrics.power_law_exponent)
_BUILTIN_KEYS = frozenset(_REGISTRY)


def normalize_keys(stats: Any) -> List[str]:
    """Validate a tracker's ``stats``: a key or a list of keys, without repeats.

    0.1.50's per-mode spellings such as ``'lsat_eval'`` mean their base key.

    Raises
    ------
    ValueError
        Naming ``stats`` and the valid keys, for an empty list, a key that is
        not a statistic, or anything but a str or a list of them.

    Examples
    --------
    >>> normalize_keys("idim"), normalize_keys(["lsat", "lsat_eval", "trc"])
    (['idim'], ['lsat', 'trc'])
    """
    if isinstance(stats, str):
        requested = [stats]
    elif isinstance(stats, Iterable) and not isinstance(stats, Mapping):
        requested = list(stats)
    else:
        raise ValueError(f"stats must be a statistic key or a list of them (e.g. ['lsat', 'idim']), got {stats!r}")
    if not requested:
        raise ValueError(f"stats is empty: name at least one statistic, from {', '.join(map(repr, statistic_keys()))}")
    normalized: List[str] = []
    for stat in requested:
        base = stat
        if isinstance(stat, str) and stat not in STATMAP and stat.rsplit("_", 1)[-1] in MODES:
            base = stat.rsplit("_", 1)[0]
        get_statistic(base if isinstance(base, str) else repr(base))
        if base not in normalized:
            normalized.append(base)
    return normalized


def statistics_of(keys: Sequence[str]) -> List[Statistic]:
    """The registered entries of ``keys``, in order."""
    return [get_statistic(key) for key in keys]


def results_names(statistics: Sequence[Statistic], mode: str, layer: str) -> Mapping[str, str]:
    """Output name of each statistic for one layer and mode: ``'{mode}-{name}_{layer}'``."""
    return {statistic.key: f"{mode}-{statistic.name}_{layer}" for statistic in statistics}
