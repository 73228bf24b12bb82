r"""The batches a :class:`~delve.covariance.TorchCovarianceMatrix` took in since its last fold into float64.

:class:`PendingGram` holds them in the working precision: the summed Gram
matrix of up to 16 GEMMs, each GEMM's count, shift and sum of centered samples,
and the staging buffer of small batches. :func:`fold_into` adds them to the
float64 state exactly (see :mod:`delve.covariance` for the arithmetic and the
passes over each batch).
"""
from __future__ import annotations

import math
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from delve._gram import add_gram_product, mirror_lower, uses_inner_product

#: Pending entries (GEMMs) summed in the working-precision Gram matrix before a fold into float64.
MAX_ENTRIES = 16

#: Samples the staging buffer holds at least.
MIN_STAGED_ROWS = 1024

#: Batches of fewer rows than features, or of at most this many values, are staged.
SMALL_BATCH_VALUES = 1 << 16

#: The shift a large batch is centered on is the mean of its leading ``1 / SHIFT_SUBSET``.
SHIFT_SUBSET = 8

#: Scratch views kept (one per slot and batch shape).
_MAX_VIEWS = 16

#: Elements per chunk when the working-precision Gram matrix is added to the float64 state.
_FOLD_CHUNK = 1 << 16


def staging_rows(dim: int) -> int:
    """Samples the staging buffer of a ``dim``-wide accumulator holds."""
    return max(dim, MIN_STAGED_ROWS)


def new_tensor(shape: tuple, dtype: torch.dtype, device: torch.device, zero: bool = False) -> torch.Tensor:
    """A state tensor made outside inference mode, so that training after an inference_mode
    forward can still update it in place."""
    with torch.inference_mode(False):
        return (torch.zeros if zero else torch.empty)(shape, dtype=dtype, device=device)


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device``, copied without waiting for the device's queue."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class Pending(NamedTuple):
    """Pending GEMMs, ready to fold: their summed Gram matrix and, per GEMM, float64 counts,
    shifts and sums of centered samples; and how many batches were skipped."""

    gram: torch.Tensor
    counts: torch.Tensor
    shifts: torch.Tensor
    offsets: torch.Tensor
    skipped: torch.Tensor


class PendingGram:
    """Batches of ``dim`` features on ``device`` not folded yet, in working precision ``dtype``."""

    def __init__(self, dim: int, device: torch.device, dtype: torch.dtype) -> None:
        self.dim, self.device, self.dtype = dim, device, dtype
        self._buffers: Dict[str, torch.Tensor] = {}
        self._views: Dict[Tuple[str, tuple], torch.Tensor] = {}
        self._num_staged = 0
        self._staged_batches: List[Tuple[int, float, torch.Tensor]] = []
        self._staged_entries: List[Tuple[torch.Tensor, ...]] = []
        self._direct_entries: List[Tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @property
    def nbytes(self) -> int:
        """Bytes of the scratch buffers (staging, Gram matrix, centered copy)."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    @property
    def num_entries(self) -> int:
        return len(self._staged_entries) + len(self._direct_entries)

    def clear(self) -> None:
        """Forget every pending batch (the buffers stay allocated)."""
        self._num_staged = 0
        self._staged_batches = []
        self._staged_entries = []
        self._direct_entries = []

    def add(self, x: torch.Tensor, num_kept: int, num_rows: int, weight: float) -> bool:
        """Take in ``x`` (``num_kept`` samples standing for ``num_rows``, each of weight ``weight``).

        Returns whether a fold is due (:data:`MAX_ENTRIES` GEMMs pending).
        """
        dim = self.dim
        if num_kept < dim or (num_kept <= staging_rows(dim) // 2 and num_kept * dim <= SMALL_BATCH_VALUES):
            self._stage(x, num_kept, weight)
        else:
            self._add_batch(x, num_kept, num_rows, weight)
        return self.num_entries >= MAX_ENTRIES

    def add_masked(self, x: torch.Tensor, row_mask: torch.Tensor, weight: float) -> bool:
        """Take in ``(n, d)`` samples of which only those flagged in ``row_mask`` count (padding is not).

        The flagged samples are centered on their mean and the others zeroed in a
        feature-major copy, one GEMM; their count stays on the device, so that
        nothing waits for it. Returns whether a fold is due.
        """
        self._close_staged()
        dim, dtype = self.dim, self.dtype
        count = row_mask.sum(dtype=torch.float64)
        shift = torch.where(row_mask[:, None], x, 0).sum(dim=0, dtype=dtype).div_(count.clamp_min(1.0).to(dtype))
        cols = self._buffer("centered", (dim, x.shape[0]))
        # Filled, not multiplied by the mask: padding may hold NaN (a fully masked attention row).
        cols.copy_(x.T).sub_(shift[:, None]).masked_fill_(~row_mask[None, :], 0.0)
        bad = self._add_checked_gram(cols, weight)
        offset = cols.sum(dim=1).mul_(weight)
        self._staged_entries.append((count.mul(weight).masked_fill_(bad, 0.0), shift, offset, bad.long()))
        return self.num_entries >= MAX_ENTRIES

    def take(self) -> Optional[Pending]:
        """Close the staging buffer and hand over every pending GEMM (``None`` if there is none).

        A large batch's count and skip flag follow from its size and whether its
        Gram matrix was finite; they are worked out here, once per fold, rather
        than per batch.
        """
        self._close_staged()
        if not self.num_entries:
            return None
        counts, shifts, offsets, skipped = [], [], [], []
        if self._direct_entries:
            bad = torch.stack([entry[3] for entry in self._direct_entries])
            host = torch.tensor([entry[0] for entry in self._direct_entries], dtype=torch.float64)
            counts.append(to_device(host, bad.device).masked_fill_(bad, 0.0))
            skipped.append(bad.sum())
        if self._staged_entries:
            counts.append(torch.stack([entry[0] for entry in self._staged_entries]))
            skipped.append(torch.stack([entry[3] for entry in self._staged_entries]).sum())
        for entry in self._direct_entries + self._staged_entries:
            shifts.append(entry[1])
            offsets.append(entry[2])
        self._direct_entries, self._staged_entries = [], []
        gram = self._buffer("gram", (self.dim, self.dim))
        mirror_lower(gram)
        return Pending(
            gram,
            torch.cat(counts),
            torch.stack(shifts).to(torch.float64),
            torch.stack(offsets).to(torch.float64),
            torch.stack(skipped).sum(),
        )

    def _buffer(self, slot: str, shape: tuple) -> torch.Tensor:
        """A contiguous scratch tensor of ``shape``, reused across batches (fresh large
        allocations cost page faults on CPU); it only grows. Views of the shapes asked
        for are kept, so that a batch of a known shape costs a dict lookup."""
        view = self._views.get((slot, shape))
        if view is not None:
            return view
        numel = math.prod(shape)
        flat = self._buffers.get(slot)
        if flat is None or flat.numel() < numel:
            flat = self._buffers[slot] = new_tensor((numel,), self.dtype, self.device)
            self._views = {key: value for key, value in self._views.items() if key[0] != slot}
        if len(self._views) >= _MAX_VIEWS:  # batches of ever new shapes (variable lengths)
            self._views = {}
        view = self._views[(slot, shape)] = flat[:numel].view(shape)
        return view

    def _stage(self, x: torch.Tensor, num_kept: int, weight: float) -> None:
        """Copy a small batch into the staging buffer, one column per sample, and take its norm."""
        dim = self.dim
        if self._num_staged + num_kept > staging_rows(dim):
            self._close_staged()
        cols = self._buffer("staged", (dim, staging_rows(dim)))[:, self._num_staged : self._num_staged + num_kept]
        if x.ndim == 3:
            cols.view(dim, x.shape[0], x.shape[2]).copy_(x.transpose(0, 1))
        else:
            # A transposing copy into a contiguous matrix is blocked (fast); into columns of a wider one it is not.
            cols.copy_(self._buffer("centered", (dim, num_kept)).copy_(x.T))
        norm = torch.linalg.vector_norm(x, dtype=self.dtype)
        self._num_staged += num_kept
        self._staged_batches.append((num_kept, weight, norm))

    def _close_staged(self) -> None:
        """The staged samples become one pending entry: batches that are not finite (or whose
        squares could overflow) are dropped, the rest centered on their mean, one GEMM.

        The GEMM runs over the whole buffer (unused columns are zeroed and weigh
        nothing), which keeps its operand contiguous for oneDNN.
        """
        if not self._staged_batches:
            return
        dim, used, capacity = self.dim, self._num_staged, staging_rows(self.dim)
        batches, self._staged_batches, self._num_staged = self._staged_batches, [], 0
        cols = self._buffer("staged", (dim, capacity))
        if used < capacity:
            cols[:, used:].zero_()
        # The group's weighted sum of squares must stay below max / (2 * MAX_ENTRIES): each batch may
        # hold its share, limit^2 per sample on average (a root-mean-square bound on its samples' norms).
        limit = math.sqrt(torch.finfo(cols.dtype).max / (2.0 * capacity * MAX_ENTRIES))
        host = torch.tensor(
            [
                [weight for _, weight, _ in batches] + [0.0],
                [limit * math.sqrt(size / weight) for size, weight, _ in batches] + [0.0],
                [size for size, _, _ in batches] + [capacity - used],
            ],
            dtype=torch.float64,
        )
        batch_weights, bounds, sizes = to_device(host, cols.device)
        sizes = sizes.long()
        batch_bad = ~(torch.stack([norm for _, _, norm in batches]).to(torch.float64) <= bounds[:-1])
        batch_weights[:-1].masked_fill_(batch_bad, 0.0)
        count = batch_weights @ sizes.to(torch.float64)
        dropped = torch.cat([batch_bad, batch_bad.new_zeros(1)]).repeat_interleave(sizes, output_size=capacity)
        cols.masked_fill_(dropped, 0.0)
        weights = batch_weights.to(cols.dtype).repeat_interleave(sizes, output_size=capacity)
        total = count.to(cols.dtype).clamp_min(1.0)
        rough = (cols @ weights).div_(total)
        cols.sub_(rough[:, None])
        # A float32 GEMV sums without care: far from zero, its mean can miss by several standard
        # deviations, which the GEMM would then square. The mean of the roughly centered samples is
        # accurate, and the difference of two close float32 shifts is exact.
        shift = rough + (cols @ weights).div_(total)
        roots = weights.sqrt_()
        cols.sub_((shift - rough)[:, None]).mul_(roots)
        add_gram_product(self._buffer("gram", (dim, dim)), cols, beta=1.0 if self.num_entries else 0.0)
        self._staged_entries.append((count, shift, cols @ roots, batch_bad.sum()))

    def _add_checked_gram(self, cols: torch.Tensor, weight: float) -> torch.Tensor:
        """Add ``weight`` times the Gram matrix of ``cols`` (one sample per column) to the pending one,
        unless it overflowed; returns whether it did (a 0-d bool tensor, left on the device).

        Called after :meth:`_close_staged`: the staging buffer is free, scratch for this Gram matrix.
        """
        dim = self.dim
        first = not self.num_entries
        gram = self._buffer("gram" if first else "staged", (dim, dim))
        add_gram_product(gram, cols, beta=0.0, alpha=weight)
        # A finite trace bounds every entry of a Gram matrix (and every partial sum of the GEMM).
        bad = (torch.trace(gram) <= torch.finfo(self.dtype).max / (2.0 * MAX_ENTRIES)).logical_not_()
        gram.masked_fill_(bad, 0.0)
        if not first:
            self._buffer("gram", (dim, dim)).add_(gram)
        return bad

    def _add_batch(self, x: torch.Tensor, num_kept: int, num_rows: int, weight: float) -> None:
        """A large batch: centered into a feature-major copy, one GEMM added to the pending Gram matrix."""
        self._close_staged()
        dim, dtype = self.dim, self.dtype
        # Any shift is exact (the fold corrects it with the sum of the centered samples); one close
        # to the mean keeps the float32 GEMM accurate.
        lead = x[: max(1, x.shape[0] // SHIFT_SUBSET)]
        if x.ndim == 3:
            shift = lead.mean(dim=(0, 2), dtype=dtype)
            work = self._buffer("centered", (dim, x.shape[0], x.shape[2]))
            cols = torch.sub(x.transpose(0, 1), shift[:, None, None], out=work).view(dim, num_kept)
        else:
            shift = lead.mean(dim=0, dtype=dtype)
            if uses_inner_product(x.device, dtype, dim, num_kept):
                # oneDNN takes one sample per column: a transposing copy, then centering in place.
                cols = self._buffer("centered", (dim, num_kept))
                cols.copy_(x.T).sub_(shift[:, None])
            else:
                cols = torch.sub(x, shift, out=self._buffer("centered", (num_kept, dim))).T
        offset = cols.sum(dim=1)
        bad = self._add_checked_gram(cols, weight)
        if weight != 1.0:
            offset.mul_(weight)
        self._direct_entries.append((float(num_rows), shift, offset, bad))


def fold_into(
    count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, num_skipped: torch.Tensor, pending: Pending
) -> None:
    """Add ``pending`` to the float64 state ``(count, mean, m2, num_skipped)`` in place, exactly.

    See the fold formula in :mod:`delve.covariance`: the pending Gram matrix,
    minus each GEMM's shift error, plus the spread of the GEMMs' means, then
    Chan's update against the state; the rank-one terms go through one GEMM.
    """
    counts = pending.counts
    good = (counts > 0)[:, None]
    errors = torch.where(good, pending.offsets / counts.clamp_min(1.0)[:, None], 0.0)
    means = torch.where(good, pending.shifts + errors, 0.0)
    new_count = counts.sum()
    new_mean = (counts @ means) / new_count.clamp_min(1.0)
    total = count + new_count
    new_weight = torch.where(total > 0, new_count / total.clamp_min(1.0), 0.0)
    delta = new_mean - mean
    roots = counts.sqrt()[:, None]
    # Rank-one terms, added (between entries; new vs. old) or removed (mean - shift), in one GEMM.
    added = torch.cat([roots * (means - new_mean), (count * new_weight).sqrt() * delta[None]])
    terms = torch.cat([added, roots * errors])
    signs = torch.ones(terms.shape[0], 1, dtype=terms.dtype, device=terms.device)
    signs[added.shape[0] :] = -1.0
    gram = pending.gram
    if gram.dtype == m2.dtype:
        m2.add_(gram)
    else:
        # Converting in small chunks keeps both the cast and the add vectorised.
        rows = max(1, _FOLD_CHUNK // m2.shape[1])
        for start in range(0, m2.shape[0], rows):
            m2[start : start + rows].add_(gram[start : start + rows].to(m2.dtype))
    m2.addmm_((terms * signs).T, terms)
    mean.add_(delta * new_weight)
    count.copy_(total)
    num_skipped.add_(pending.skipped)
