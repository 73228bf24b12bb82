"""Spectral statistics: pure functions of a covariance matrix's eigenvalues.

Each function works on the shares :math:`p_i = \\lambda_i / \\sum_j \\lambda_j`
after eigenvalues at or below :data:`SPECTRUM_FLOOR` times the largest one are
set to 0, returns NaN when an eigenvalue is not finite, and has a documented
value for a zero spectrum (a layer whose outputs never vary). They are also
importable from :mod:`delve.metrics`, where the eigenvalues come from.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch

EigenvaluesLike = Union[torch.Tensor, np.ndarray, Sequence[float]]

#: Eigenvalues at or below this share of the largest one count as 0 in the spectral
#: statistics. The covariance of float32 activations (float32 GEMMs summed in float64)
#: carries round-off of a few 1e-8 of its largest eigenvalue, as often negative as
#: positive; 1e-6 stays well above it, so that directions the data never spanned count
#: as absent (a rank-one layer of 1024 float32 units has RankMe 1, not 1.16, and
#: condition number inf, not 1e15), while all the eigenvalues it leaves out weigh at
#: most ``d * 1e-6`` of the largest one.
SPECTRUM_FLOOR = 1e-6


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
