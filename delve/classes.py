r"""Class-conditional statistics: per-class sums of a layer's samples, and neural collapse from them.

When the tracker knows the labels of a batch (``tracker.set_labels(y)``, or a
``labels`` keyword of the model call), a layer with one sample per input (a
Linear on vectors, a pooled convolution) also keeps, per class :math:`k`, the
count :math:`n_k`, the sum :math:`s_k = \sum_{i \in k} a_i` and the sum of
squared norms :math:`q_k = \sum_{i \in k} \lVert a_i \rVert^2`: a
:math:`K \times d` matrix and two :math:`K` vectors in float64, never :math:`K`
covariances. With the layer's covariance :math:`\Sigma` and mean :math:`\mu`
they give the between-class covariance

.. math::

    \Sigma_B = \sum_k \frac{n_k}{n} (\mu_k - \mu)(\mu_k - \mu)^T,
    \qquad \mu_k = s_k / n_k,

the within-class covariance :math:`\Sigma_W = \Sigma - \Sigma_B` (the law of
total covariance), and per class the variance
:math:`\sigma_k^2 = q_k / n_k - \lVert \mu_k \rVert^2`.

Cost per recorded batch: one :math:`K \times n` by :math:`n \times d` product
(the one-hot labels times the samples) and a row norm, on the device, without
synchronising. Memory: :math:`8 (K d + 2K)` bytes per layer and mode.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch

_STATE_VERSION = 1


class ClassMoments:
    """Per-class count, sum and sum of squared norms of a layer's samples, in float64.

    Parameters
    ----------
    num_classes : int
        Number of classes; labels outside ``[0, num_classes)`` (such as an
        ignore index of -100) are left out.

    Examples
    --------
    >>> moments = ClassMoments(2)
    >>> moments.update(torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0, 1]))
    >>> moments.counts.tolist(), moments.means()[0].tolist()
    ([2.0, 1.0], [2.0, 0.0])
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.counts: Optional[torch.Tensor] = None
        self.sums: Optional[torch.Tensor] = None
        self.squares: Optional[torch.Tensor] = None

    def _init_state(self, dim: int, device: torch.device) -> None:
        with torch.inference_mode(False):
            self.counts = torch.zeros(self.num_classes, dtype=torch.float64, device=device)
            self.sums = torch.zeros(self.num_classes, dim, dtype=torch.float64, device=device)
            self.squares = torch.zeros(self.num_classes, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, samples: torch.Tensor, labels: torch.Tensor) -> None:
        """Add ``(n, d)`` samples whose classes are the ``n`` integer ``labels``."""
        if self.sums is None:
            self._init_state(samples.shape[1], samples.device)
        labels = labels.to(self.sums.device).long()
        valid = (labels >= 0) & (labels < self.num_classes)
        one_hot = torch.nn.functional.one_hot(labels.clamp(0, self.num_classes - 1), self.num_classes)
        one_hot = (one_hot * valid[:, None]).to(torch.float64)
        rows = samples.detach().to(self.sums.device, torch.float64)
        self.counts.add_(one_hot.sum(dim=0))
        self.sums.addmm_(one_hot.T, rows)
        self.squares.add_(one_hot.T @ rows.square().sum(dim=1))

    @property
    def count(self) -> float:
        """Number of labelled samples (synchronises with the device)."""
        return 0.0 if self.counts is None else float(self.counts.sum())

    def means(self) -> torch.Tensor:
        """``(K, d)`` class means (NaN rows for classes without samples)."""
        return self.sums / self.counts[:, None]

    def merge(self, other: "ClassMoments") -> "ClassMoments":
        """Add another accumulator's samples (of the same classes and features) to this one."""
        if other.sums is None:
            return self
        if self.sums is None:
            self._init_state(other.sums.shape[1], other.sums.device)
        self.counts.add_(other.counts.to(self.counts.device))
        self.sums.add_(other.sums.to(self.sums.device))
        self.squares.add_(other.squares.to(self.squares.device))
        return self

    def reset(self) -> None:
        """Forget every sample; keeps the allocated state."""
        for tensor in (self.counts, self.sums, self.squares):
            if tensor is not None:
                tensor.zero_()

    def state_dict(self) -> Dict[str, Any]:
        """Plain dict of the state (copies), with a ``version`` key."""
        state: Dict[str, Any] = {"version": _STATE_VERSION, "num_classes": self.num_classes}
        if self.sums is not None:
            state.update(counts=self.counts.clone(), sums=self.sums.clone(), squares=self.squares.clone())
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state.get("version") != _STATE_VERSION or state.get("num_classes") != self.num_classes:
            raise ValueError(
                f"unsupported ClassMoments state (version {state.get('version')!r}, "
                f"num_classes {state.get('num_classes')!r}; expected {_STATE_VERSION}, {self.num_classes})"
            )
        if "sums" not in state:
            self.counts = self.sums = self.squares = None
            return
        self._init_state(state["sums"].shape[1], state["sums"].device)
        self.counts.copy_(state["counts"])
        self.sums.copy_(state["sums"])
        self.squares.copy_(state["squares"])


def between_class_covariance(moments: ClassMoments, mean: torch.Tensor) -> torch.Tensor:
    r""":math:`\Sigma_B = \sum_k \frac{n_k}{n} (\mu_k - \mu)(\mu_k - \mu)^T` over the classes with samples."""
    present = moments.counts > 0
    weights = moments.counts[present] / moments.counts.sum()
    centered = moments.means()[present] - mean.to(moments.sums.device, torch.float64)
    return (centered * weights[:, None]).T @ centered


def nc1(covariance: torch.Tensor, mean: torch.Tensor, moments: ClassMoments) -> float:
    r"""Neural collapse NC1: :math:`\operatorname{tr}(\Sigma_W \Sigma_B^+) / K`.

    Papyan, Han & Donoho, "Prevalence of neural collapse during the terminal
    phase of deep learning training", PNAS 2020. :math:`K` counts the classes
    with samples; :math:`\Sigma_B^+` is the pseudo-inverse (eigenvalues below
    ``1e-12`` of the largest treated as zero). It falls towards 0 as the samples
    of each class collapse onto their class mean. NaN with fewer than two
    classes.

    Examples
    --------
    >>> moments = ClassMoments(2)
    >>> x = torch.tensor([[0.0, 1.0], [0.0, -1.0], [4.0, 1.0], [4.0, -1.0]])
    >>> moments.update(x, torch.tensor([0, 0, 1, 1]))
    >>> cov = torch.cov(x.T.double(), correction=0)
    >>> round(nc1(cov, x.double().mean(0), moments), 6)  # within: var 1 along y; between: var 4 along x
    0.0
    """
    classes = int((moments.counts > 0).sum())
    if classes < 2:
        return math.nan
    between = between_class_covariance(moments, mean)
    within = covariance.to(between) - between
    return float(torch.trace(within @ torch.linalg.pinv(between, hermitian=True, rtol=1e-12)) / classes)


def class_distance_normalized_variance(moments: ClassMoments) -> float:
    r"""Class-distance normalized variance, averaged over pairs of classes.

    Galanti, György & Hutter, "On the role of neural collapse in transfer
    learning", ICLR 2022:
    :math:`\frac{\sigma_i^2 + \sigma_j^2}{2 \lVert \mu_i - \mu_j \rVert^2}` for
    classes :math:`i \ne j` with samples, where :math:`\sigma_k^2` is the mean
    squared distance of class :math:`k`'s samples to their mean. Small when
    classes are tight and far apart. NaN with fewer than two classes.

    Examples
    --------
    >>> moments = ClassMoments(2)
    >>> moments.update(torch.tensor([[0.0, 1.0], [0.0, -1.0], [4.0, 1.0], [4.0, -1.0]]), torch.tensor([0, 0, 1, 1]))
    >>> class_distance_normalized_variance(moments)  # (1 + 1) / (2 * 16)
    0.0625
    """
    present = moments.counts > 0
    if int(present.sum()) < 2:
        return math.nan
    counts = moments.counts[present]
    means = moments.sums[present] / counts[:, None]
    variances = (moments.squares[present] / counts - means.square().sum(dim=1)).clamp_min(0.0)
    distances = torch.cdist(means, means).square()
    pairs = torch.triu_indices(len(counts), len(counts), offset=1, device=counts.device)
    ratio = (variances[pairs[0]] + variances[pairs[1]]) / (2.0 * distances[pairs[0], pairs[1]])
    return float(ratio.mean())


def merged_across_ranks(
    moments: Dict[Any, ClassMoments], dims: Dict[Any, int], group: Any = None
) -> Dict[Any, ClassMoments]:
    """Per-class sums of every rank added up (one ``SUM`` all-reduce); the given ones outside torch.distributed.

    A collective call: every rank passes the same keys. ``dims`` gives each
    key's feature count (0 for a layer no rank saw), so that a rank whose
    layer saw no labelled sample still takes part. The local sums are left
    unchanged.
    """
    from delve import distributed

    if not distributed.is_distributed(group):
        return dict(moments)
    import torch.distributed as dist

    merged: Dict[Any, ClassMoments] = {}
    for key, local in moments.items():
        dim = dims[key]
        if not dim:
            merged[key] = ClassMoments(local.num_classes)
            continue
        classes = local.num_classes
        device = distributed._collective_device(group, [])
        flat = torch.zeros(classes * (dim + 2), dtype=torch.float64, device=device)
        if local.sums is not None:
            flat[:classes] = local.counts.to(device)
            flat[classes : classes * (dim + 1)] = local.sums.flatten().to(device)
            flat[classes * (dim + 1) :] = local.squares.to(device)
        dist.all_reduce(flat, group=group)
        total = ClassMoments(classes)
        total.load_state_dict(
            {
                "version": _STATE_VERSION,
                "num_classes": classes,
                "counts": flat[:classes],
                "sums": flat[classes : classes * (dim + 1)].reshape(classes, dim),
                "squares": flat[classes * (dim + 1) :],
            }
        )
        merged[key] = total
    return merged
