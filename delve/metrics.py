"""Pure functions from a covariance matrix (or its eigenvalues) to delve's statistics.

Every function takes a square covariance matrix as a :class:`torch.Tensor` or a
:class:`numpy.ndarray` and works in float64. Nothing here holds state or does I/O.

The intrinsic dimensionality at threshold :math:`\\delta` is the smallest :math:`k`
whose :math:`k` largest eigenvalues explain at least :math:`\\delta` of the total
variance,

.. math::

    \\operatorname{idim}_\\delta(Q) = \\min\\Big\\{k : \\sum_{i=1}^{k}\\lambda_i
    \\ge \\delta \\sum_{i=1}^{d}\\lambda_i\\Big\\},

and the saturation is :math:`\\operatorname{idim}_\\delta(Q) / d`.

The spectral statistics (:func:`effective_rank`, :func:`rankme`,
:func:`participation_ratio`, :func:`stable_rank`, :func:`condition_number`,
:func:`matrix_entropy`, :func:`power_law_exponent`) are functions of the
eigenvalues alone. Each works on the shares :math:`p_i = \\lambda_i / \\sum_j \\lambda_j`
after eigenvalues at or below :data:`SPECTRUM_FLOOR` times the largest one are
set to 0, returns NaN when an eigenvalue is not finite, and has a documented
value for a zero spectrum (a layer whose outputs never vary).
"""
from __future__ import annotations

import functools
import math
import numbers
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, List, Optional, Sequence, Union

import numpy as np
import torch

MatrixLike = Union[torch.Tensor, np.ndarray]
EigenvaluesLike = Union[torch.Tensor, np.ndarray, Sequence[float]]

#: A cumulative share within this distance below the threshold counts as reaching
#: it: about the resolution of float32 activations, so that round-off never flips
#: diag(.5, .4, .1) at .9 from 2 to 3, nor makes noise directions count at 1.0.
SHARE_TOLERANCE = 1e-6

#: Eigenvalues at or below this share of the largest one count as 0 in the spectral
#: statistics. The covariance of float32 activations (float32 GEMMs summed in float64)
#: carries round-off of a few 1e-8 of its largest eigenvalue, as often negative as
#: positive; 1e-6 stays well above it, so that directions the data never spanned count
#: as absent (a rank-one layer of 1024 float32 units has RankMe 1, not 1.16, and
#: condition number inf, not 1e15), while all the eigenvalues it leaves out weigh at
#: most ``d * 1e-6`` of the largest one.
SPECTRUM_FLOOR = 1e-6


def _as_float64(cov: MatrixLike) -> torch.Tensor:
    matrix = torch.as_tensor(cov)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"cov must be a square matrix, got shape {tuple(matrix.shape)}")
    return matrix.to(torch.float64)


def check_share(parameter: str, value: Any) -> float:
    """Check a share of the variance given to a constructor: a number in ``(0, 1]``.

    Parameters
    ----------
    parameter : str
        Name of the parameter, for the error message.
    value : numbers.Real
        The value given (Python or numpy int or float).

    Returns
    -------
    float
        ``value`` as a float.

    Raises
    ------
    ValueError
        If ``value`` is not a real number in ``(0, 1]`` (``bool`` is refused).

    Examples
    --------
    >>> check_share("thresh", 0.99)
    0.99
    >>> check_share("thresh", 1.5)
    Traceback (most recent call last):
    ...
    ValueError: thresh must be a number in (0, 1], got 1.5
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value <= 1.0:
        raise ValueError(f"{parameter} must be a number in (0, 1], got {value!r}")
    return float(value)


def _check_threshold(thresh: float) -> None:
    if not 0.0 < thresh <= 1.0:
        raise ValueError(f"thresh must lie in (0, 1], got {thresh!r}")


def eigenvalues(cov: MatrixLike) -> torch.Tensor:
    """Eigenvalues of a symmetric covariance matrix, largest first, negatives clipped to 0.

    Parameters
    ----------
    cov : torch.Tensor or numpy.ndarray
        Square symmetric matrix of shape ``(d, d)``.

    Returns
    -------
    torch.Tensor
        Float64 vector of length ``d`` sorted in descending order.

    Examples
    --------
    >>> eigenvalues(torch.diag(torch.tensor([0.1, 0.5, 0.4])))
    tensor([0.5000, 0.4000, 0.1000], dtype=torch.float64)
    >>> eigenvalues(torch.full((2, 2), float("nan")))
    tensor([nan, nan], dtype=torch.float64)
    """
    matrix = _as_float64(cov)
    if not bool(torch.isfinite(matrix).all()):
        # LAPACK answers zeros for a NaN matrix; NaN says what the statistics can make of it.
        return torch.full(matrix.shape[:1], math.nan, dtype=torch.float64, device=matrix.device)
    return torch.linalg.eigvalsh(matrix).flip(0).clamp_min(0.0)


#: Share-of-variance error of float32 eigenvalues, in units of ``eps32 sqrt(d) ||Q||_F / trace(Q)``:
#: eight times the largest measured on spectra from flat to low-rank, 128 to 2048 wide.
FLOAT32_SHARE_ERROR = 8.0


def eigenvalues_many(covs: Sequence[MatrixLike], thresh: Optional[float] = None) -> List[torch.Tensor]:
    """Eigenvalues of many covariance matrices, each as :func:`eigenvalues` gives it, in parallel.

    On the CPU the matrices are decomposed side by side, largest first, one per
    thread (as many as torch's intra-op threads, which are set to one meanwhile
    and restored after): LAPACK's eigensolvers gain little from several
    threads on one matrix, and a busy machine makes them lose. On a GPU,
    matrices of one size go in one batched call.

    With ``thresh``, each matrix is decomposed in float32 (about 2.5 times
    faster) and again in float64 only where float32 could change the
    intrinsic dimensionality at ``thresh``: where a cumulative share of the
    variance lies closer to the threshold than the float32 error bound
    (:data:`FLOAT32_SHARE_ERROR`). The saturation and intrinsic
    dimensionality at ``thresh`` are then those of float64; other statistics
    of the eigenvalues (their sum) are float32-accurate.

    Parameters
    ----------
    covs : sequence of torch.Tensor or numpy.ndarray
        Square symmetric matrices, of any sizes.
    thresh : float, optional
        The share of the variance whose intrinsic dimensionality must be exact.
        ``None`` (default): every matrix in float64.

    Returns
    -------
    list of torch.Tensor
        Float64 eigenvalues of each matrix, largest first, negatives clipped to
        0; NaN for a matrix that is not finite.

    Examples
    --------
    >>> values = eigenvalues_many([torch.diag(torch.tensor([1.0, 3.0])), torch.eye(3)], thresh=0.99)
    >>> [v.tolist() for v in values]
    [[3.0, 1.0], [1.0, 1.0, 1.0]]
    """
    matrices = [_as_float64(cov) for cov in covs]
    if thresh is not None:
        _check_threshold(thresh)
    results: List[Optional[torch.Tensor]] = [None] * len(matrices)
    for index, matrix in enumerate(matrices):
        if not bool(torch.isfinite(matrix).all()):  # as in eigenvalues(): NaN, not LAPACK's zeros
            results[index] = torch.full(matrix.shape[:1], math.nan, dtype=torch.float64, device=matrix.device)
    finite = [index for index, values in enumerate(results) if values is None]
    if thresh is not None:
        for index, values in zip(finite, _decompose([matrices[index] for index in finite], torch.float32)):
            if _float32_decides(matrices[index], values, thresh):
                results[index] = values
    again = [index for index, values in enumerate(results) if values is None]
    for index, values in zip(again, _decompose([matrices[index] for index in again], torch.float64)):
        results[index] = values
    return results  # type: ignore[return-value]


def _decompose(matrices: List[torch.Tensor], dtype: torch.dtype) -> List[torch.Tensor]:
    """Eigenvalues (float64, largest first, clipped) of each matrix, computed in ``dtype``."""

    def values_of(matrix: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigvalsh(matrix.to(dtype)).to(torch.float64).flip(-1).clamp_min(0.0)

    results: List[Optional[torch.Tensor]] = [None] * len(matrices)
    on_cpu = [index for index, matrix in enumerate(matrices) if matrix.device.type == "cpu"]
    groups: dict = {}
    for index, matrix in enumerate(matrices):
        if matrix.device.type != "cpu":
            groups.setdefault((matrix.device, matrix.shape[0]), []).append(index)
    for indices in groups.values():
        for index, values in zip(indices, values_of(torch.stack([matrices[index] for index in indices]))):
            results[index] = values
    threads = torch.get_num_threads()
    if len(on_cpu) < 2 or threads < 2:
        for index in on_cpu:
            results[index] = values_of(matrices[index])
        return results  # type: ignore[return-value]
    on_cpu.sort(key=lambda index: -matrices[index].shape[0])

    def single_threaded(index: int) -> torch.Tensor:
        # A new thread's OpenMP default is every core: LAPACK would run that many threads per worker.
        torch.set_num_threads(1)
        return values_of(matrices[index])

    try:
        with ThreadPoolExecutor(max_workers=min(threads, len(on_cpu))) as pool:
            for index, values in zip(on_cpu, pool.map(single_threaded, on_cpu)):
                results[index] = values
    finally:
        torch.set_num_threads(threads)
    return results  # type: ignore[return-value]


def _float32_decides(matrix: torch.Tensor, values: torch.Tensor, thresh: float) -> bool:
    """Whether float32 eigenvalues ``values`` of ``matrix`` give its float64 intrinsic dimensionality at ``thresh``.

    They do when the cumulative shares on both sides of the crossing lie
    farther from the threshold than the float32 error bound.
    """
    total = float(values.sum())
    if not math.isfinite(total) or total <= 0.0:
        return False
    eps = torch.finfo(torch.float32).eps
    bound = FLOAT32_SHARE_ERROR * eps * math.sqrt(matrix.shape[0]) * float(torch.linalg.matrix_norm(matrix)) / total
    shares = torch.cumsum(values, 0) / total
    level = thresh - SHARE_TOLERANCE
    crossing = int(torch.searchsorted(shares, torch.tensor([level], dtype=shares.dtype)))
    below = float(shares[crossing - 1]) if crossing > 0 else -math.inf
    above = float(shares[crossing]) if crossing < len(shares) else math.inf
    return level - below > bound and above - level > bound


def intrinsic_dimensionality_from_eigenvalues(eigvals: torch.Tensor, thresh: float = 0.99) -> int:
    """Smallest ``k`` whose ``k`` largest eigenvalues explain ``thresh`` of the variance.

    Parameters
    ----------
    eigvals : torch.Tensor
        Non-negative eigenvalues sorted in descending order (see :func:`eigenvalues`).
    thresh : float
        Share of the total variance to explain, in ``(0, 1]``.

    Returns
    -------
    int
        The intrinsic dimensionality; 0 when the total variance is 0 (a dead layer).
    """
    _check_threshold(thresh)
    values = torch.as_tensor(eigvals, dtype=torch.float64)
    total = float(values.sum())
    if not math.isfinite(total):
        raise ValueError("eigenvalues must be finite")
    if total <= 0.0:
        return 0
    shares = torch.cumsum(values, 0) / total
    reached = shares >= thresh - SHARE_TOLERANCE
    return int(torch.nonzero(reached)[0, 0]) + 1


def compute_intrinsic_dimensionality(cov: MatrixLike, thresh: float = 0.99) -> int:
    """Intrinsic dimensionality of a covariance matrix.

    Parameters
    ----------
    cov : torch.Tensor or numpy.ndarray
        Covariance matrix of shape ``(d, d)``.
    thresh : float
        Share of the total variance the kept eigendirections must explain.

    Returns
    -------
    int
        The smallest number of eigendirections that explain ``thresh`` of the
        variance; 0 for a zero matrix.

    Examples
    --------
    >>> compute_intrinsic_dimensionality(torch.diag(torch.tensor([.5, .4, .1])), thresh=.99)
    3
    >>> compute_intrinsic_dimensionality(torch.diag(torch.tensor([1., 0., 0.])))
    1
    """
    return intrinsic_dimensionality_from_eigenvalues(eigenvalues(cov), thresh)


def saturation_from_eigenvalues(eigvals: torch.Tensor, thresh: float = 0.99) -> float:
    """Intrinsic dimensionality divided by the number of eigenvalues (the feature dimension)."""
    return intrinsic_dimensionality_from_eigenvalues(eigvals, thresh) / len(eigvals)


def compute_saturation(cov: MatrixLike, thresh: float = 0.99) -> float:
    """Saturation: the share of eigendirections needed to explain ``thresh`` of the variance.

    Parameters
    ----------
    cov : torch.Tensor or numpy.ndarray
        Covariance matrix of shape ``(d, d)``.
    thresh : float
        Share of the total variance to explain.

    Returns
    -------
    float
        ``compute_intrinsic_dimensionality(cov, thresh) / d``, between 0 and 1.

    Examples
    --------
    >>> compute_saturation(torch.diag(torch.tensor([.5, .5, 0., 0.])))
    0.5
    """
    return saturation_from_eigenvalues(eigenvalues(cov), thresh)


def compute_cov_determinant(cov: MatrixLike) -> float:
    """Determinant of the covariance matrix (the generalized variance)."""
    return float(torch.linalg.det(_as_float64(cov)))


def compute_cov_trace(cov: MatrixLike) -> float:
    """Trace of the covariance matrix (the total variance)."""
    return float(torch.trace(_as_float64(cov)))


def diagonal_trace_from_eigenvalues(eigvals: torch.Tensor) -> float:
    """Sum of the (non-negative) eigenvalues, the trace of the diagonalised covariance."""
    return float(torch.as_tensor(eigvals, dtype=torch.float64).sum())


def compute_diag_trace(cov: MatrixLike) -> float:
    """Trace of the diagonalised covariance matrix: the sum of its non-negative eigenvalues.

    It equals :func:`compute_cov_trace` up to round-off and the clipping of
    eigenvalues that round-off made negative.
    """
    return diagonal_trace_from_eigenvalues(eigenvalues(cov))


def _of_shares(eigvals: EigenvaluesLike, function: Callable[[torch.Tensor], Any], zero_spectrum: float) -> float:
    """``function`` of the shares ``p`` (largest first, floor applied, zeros kept), as a float.

    NaN when an eigenvalue is not finite; ``zero_spectrum`` when all are 0 (or there are none).
    """
    values = torch.as_tensor(eigvals, dtype=torch.float64).flatten()
    if not bool(torch.isfinite(values).all()):
        return math.nan
    values = values.sort(descending=True).values.clamp_min(0.0)
    if not values.numel() or not bool(values[0] > 0):
        return zero_spectrum
    values = torch.where(values > values[0] * SPECTRUM_FLOOR, values, 0.0)
    return float(function(values / values.sum()))


def _shannon_entropy(shares: torch.Tensor) -> torch.Tensor:
    return torch.special.entr(shares).sum()


def effective_rank(eigvals: EigenvaluesLike) -> float:
    r"""Effective rank: the exponential of the Shannon entropy of the normalized eigenvalues.

    .. math::

        \operatorname{erank} = \exp\Big(-\sum_i p_i \log p_i\Big),
        \qquad p_i = \frac{\lambda_i}{\sum_j \lambda_j}

    Roy & Vetterli, "The effective rank: a measure of effective dimensionality",
    EUSIPCO 2007, applied to the covariance (whose singular values are its
    eigenvalues). It lies in ``[1, d]``: ``d`` for a flat spectrum, 1 for rank
    one; 0 for a zero spectrum.

    Parameters
    ----------
    eigvals : torch.Tensor, numpy.ndarray or sequence of float
        Eigenvalues of a covariance matrix, in any order.

    Returns
    -------
    float
        The effective rank; NaN if an eigenvalue is not finite.

    Examples
    --------
    >>> effective_rank([1.0, 1.0, 1.0, 1.0])
    4.0
    >>> round(effective_rank([3.0, 1.0, 0.0]), 4)
    1.7548
    """
    return _of_shares(eigvals, lambda shares: _shannon_entropy(shares).exp(), 0.0)


def rankme(eigvals: EigenvaluesLike) -> float:
    r"""RankMe: the effective rank of the outputs themselves, whose singular values are :math:`\sqrt{n\lambda_i}`.

    .. math::

        \operatorname{RankMe} = \exp\Big(-\sum_i q_i \log q_i\Big),
        \qquad q_i = \frac{\sqrt{\lambda_i}}{\sum_j \sqrt{\lambda_j}}

    Garrido et al., "RankMe: Assessing the downstream performance of pretrained
    self-supervised representations by their rank", ICML 2023, on the centered
    outputs and without their :math:`\epsilon = 10^{-7}` added to every
    :math:`q_i`. The square root flattens the spectrum, so RankMe is at least
    :func:`effective_rank`; it lies in ``[1, d]``, 0 for a zero spectrum.

    Parameters
    ----------
    eigvals : torch.Tensor, numpy.ndarray or sequence of float
        Eigenvalues of a covariance matrix, in any order.

    Returns
    -------
    float
        RankMe; NaN if an eigenvalue is not finite.

    Examples
    --------
    >>> round(rankme([4.0, 1.0]), 4)
    1.8899
    """
    return _of_shares(eigvals, lambda shares: _shannon_entropy(shares.sqrt() / shares.sqrt().sum()).exp(), 0.0)


def participation_ratio(eigvals: EigenvaluesLike) -> float:
    r"""Participation ratio: how many eigendirections share the variance, weighted by their squares.

    .. math::

        \operatorname{PR} = \frac{\big(\sum_i \lambda_i\big)^2}{\sum_i \lambda_i^2}
                          = \frac{1}{\sum_i p_i^2}

    Gao et al., "A theory of multineuronal dimensionality, dynamics and
    measurement", bioRxiv 2017 (and Recanatesi et al., "Dimensionality
    compression and expansion in deep neural networks", 2019). It lies in
    ``[1, d]`` (``d`` for a flat spectrum, 1 for rank one), never above
    :func:`effective_rank`; 0 for a zero spectrum.

    Parameters
    ----------
    eigvals : torch.Tensor, numpy.ndarray or sequence of float
        Eigenvalues of a covariance matrix, in any order.

    Returns
    -------
    float
        The participation ratio; NaN if an eigenvalue is not finite.

    Examples
    --------
    >>> participation_ratio([3.0, 1.0])
    1.6
    """
    return _of_shares(eigvals, lambda shares: 1.0 / shares.square().sum(), 0.0)


def stable_rank(eigvals: EigenvaluesLike) -> float:
    r"""Stable rank of the (centered) outputs: total variance over the largest eigenvalue.

    .. math::

        \operatorname{srank} = \frac{\|Z\|_F^2}{\|Z\|_2^2} = \frac{\sum_i \lambda_i}{\lambda_1}

    Rudelson & Vershynin, "Sampling from large matrices: an approach through
    geometric functional analysis", J. ACM 2007, for the matrix :math:`Z` of
    centered outputs. It lies in ``[1, d]`` (``d`` for a flat spectrum, 1 for
    rank one), never above :func:`participation_ratio`; 0 for a zero spectrum.

    Parameters
    ----------
    eigvals : torch.Tensor, numpy.ndarray or sequence of float
        Eigenvalues of a covariance matrix, in any order.

    Returns
    -------
    float
        The stable rank; NaN if an eigenvalue is not finite.

    Examples
    --------
    >>> stable_rank([4.0, 2.0, 2.0])
    2.0
    """
    return _of_shares(eigvals, lambda shares: 1.0 / shares[0], 0.0)


def condition_number(eigvals: EigenvaluesLike) -> float:
    r"""Condition number of the covariance: largest over smallest eigenvalue.

    .. math::

        \kappa = \frac{\lambda_1}{\lambda_d}

    (Golub & Van Loan, "Matrix Computations", 4th ed., 2013; the square of
    the condition number of the centered outputs). It is at least 1;
    ``inf`` when the smallest eigenvalue is at or below
    :data:`SPECTRUM_FLOOR` times the largest (the covariance is singular at the
    precision of float32 activations, so values beyond ``1e6`` are not told
    apart from singular); NaN for a zero spectrum.

    Parameters
    ----------
    eigvals : torch.Tensor, numpy.ndarray or sequence of float
        Eigenvalues of a covariance matrix, in any order.

    Returns
    -------
    float
        The condition number; NaN if an eigenvalue is not finite.

    Examples
    --------
    >>> condition_number([4.0, 2.0, 0.5])
    8.0
    >>> condition_number([1.0, 0.0])
    inf
    """
    return _of_shares(eigvals, lambda shares: shares[0] / shares[-1] if shares[-1] > 0 else math.inf, math.nan)


def _renyi_entropy(shares: torch.Tensor, order: float) -> float:
    if order == 1.0:
        return float(_shannon_entropy(shares))
    positive = shares[shares > 0]
    if math.isinf(order):
        return -math.log(float(positive[0]))
    return math.log(float(positive.pow(order).sum())) / (1.0 - order)


def matrix_entropy(eigvals: EigenvaluesLike, order: float = 1.0) -> float:
    r"""Matrix entropy of the covariance scaled to unit trace: von Neumann (order 1) or Rényi.

    .. math::

        S_1 = -\operatorname{tr}(\rho \log \rho) = -\sum_i p_i \log p_i,
        \qquad
        S_\alpha = \frac{1}{1 - \alpha} \log \sum_i p_i^\alpha,
        \qquad \rho = \frac{Q}{\operatorname{tr} Q}

    in nats. "Layer by Layer: Uncovering hidden representations in language
    models" (Skean et al., ICML 2025) uses this family on the Gram matrix of a
    layer's outputs, whose non-zero eigenvalues are those of their (uncentered)
    second-moment matrix; the matrix-based Rényi entropy is from Sanchez
    Giraldo, Rao & Principe (IEEE Trans. Inf. Theory 2015). It lies in
    ``[0, log d]``: ``log d`` for a flat spectrum, 0 for rank one, NaN for a
    zero spectrum. ``exp`` of orders 1, 2 and ``inf`` give
    :func:`effective_rank`, :func:`participation_ratio` and
    :func:`stable_rank`.

    Parameters
    ----------
    eigvals : torch.Tensor, numpy.ndarray or sequence of float
        Eigenvalues of a covariance matrix, in any order.
    order : float
        The Rényi order :math:`\alpha \ge 0`; 1 (default) is the von Neumann
        entropy, ``math.inf`` the min-entropy.

    Returns
    -------
    float
        The entropy; NaN if an eigenvalue is not finite.

    Raises
    ------
    ValueError
        If ``order`` is not a number at least 0.

    Examples
    --------
    >>> round(matrix_entropy([1.0, 1.0, 1.0, 1.0]), 6) == round(math.log(4), 6)
    True
    >>> matrix_entropy([2.0, 0.0, 0.0])
    0.0
    """
    if isinstance(order, bool) or not isinstance(order, numbers.Real) or not order >= 0:
        raise ValueError(f"order must be a number at least 0 (1 for the von Neumann entropy), got {order!r}")
    return _of_shares(eigvals, functools.partial(_renyi_entropy, order=float(order)), math.nan)


def _weighted_slope(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    x_mean = (weights * x).sum() / weights.sum()
    y_mean = (weights * y).sum() / weights.sum()
    return (weights * (x - x_mean) * (y - y_mean)).sum() / (weights * (x - x_mean).square()).sum()


def power_law_exponent(eigvals: EigenvaluesLike, first: int = 6, last: int = 100) -> float:
    r"""Decay exponent :math:`\alpha` of the eigenspectrum, :math:`\lambda_i \propto i^{-\alpha}`, as in alpha-ReQ.

    .. math::

        \alpha = -\operatorname*{arg\,min}_{s} \min_c \sum_{i=\text{first}}^{\text{last}}
        \frac{1}{i}\big(\log \lambda_i - s \log i - c\big)^2

    Agrawal et al., "alpha-ReQ: Assessing representation quality in
    self-supervised learning by measuring eigenspectrum decay", NeurIPS 2022:
    a least-squares line through :math:`(\log i, \log \lambda_i)`, weighted by
    :math:`1/i` (so that every decade of ranks weighs about the same) over the
    ranks 6 to 100, the defaults of the authors' implementation (reptrix's
    ``get_alpha``, after Stringer et al., Nature 2019). The first ranks are
    left out because the largest few eigenvalues are set by a handful of
    dominant directions, not the power-law bulk; the ranks past 100 because
    their eigenvalues are the most distorted by a finite number of samples.
    Eigenvalues at or below :data:`SPECTRUM_FLOOR` times the largest are left
    out of the fit. Larger :math:`\alpha` means faster decay (variance in
    fewer directions), smaller a flatter, more noise-like spectrum; Stringer
    et al. measured about 1 in visual cortex.

    Parameters
    ----------
    eigvals : torch.Tensor, numpy.ndarray or sequence of float
        Eigenvalues of a covariance matrix, in any order.
    first, last : int
        First and last rank (1-based, inclusive) of the fit.

    Returns
    -------
    float
        :math:`\alpha`; NaN when fewer than 3 ranks in ``[first, last]`` have an
        eigenvalue above the floor (a layer of fewer than 8 units), or an
        eigenvalue is not finite.

    Raises
    ------
    ValueError
        If ``first`` and ``last`` are not integers with ``1 <= first < last``.

    Examples
    --------
    >>> spectrum = [rank ** -1.5 for rank in range(1, 201)]
    >>> round(power_law_exponent(spectrum), 6)
    1.5
    >>> power_law_exponent([1.0, 0.5, 0.25])
    nan
    """
    if not all(isinstance(value, numbers.Integral) and not isinstance(value, bool) for value in (first, last)) \
            or not 1 <= first < last:
        raise ValueError(f"first and last must be integers with 1 <= first < last, got {first!r} and {last!r}")

    def fit(shares: torch.Tensor) -> float:
        ranks = torch.arange(1, shares.numel() + 1, dtype=torch.float64, device=shares.device)
        kept = (ranks >= first) & (ranks <= last) & (shares > 0)
        if int(kept.sum()) < 3:
            return math.nan
        return float(-_weighted_slope(ranks[kept].log(), shares[kept].log(), 1.0 / ranks[kept]))

    return _of_shares(eigvals, fit, math.nan)
