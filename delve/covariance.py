r"""Streaming, mergeable covariance of a layer's outputs.

:class:`TorchCovarianceMatrix` keeps the number of samples :math:`n`, their
mean :math:`\mu` and the centered second moment
:math:`M_2 = \sum_i (a_i - \mu)(a_i - \mu)^T` in float64. The covariance is the
population covariance :math:`Q = M_2 / n` of every sample seen since the last
:meth:`~TorchCovarianceMatrix.reset` (eq. 1 of "Feature Space Saturation during
Training", arXiv 2006.08679).

How a batch gets in, cheaply and without losing precision:

1. A batch of at least ``d`` rows, unless it is small (at most ``2**16``
   values), is centered in the working precision (float32, or float64 for
   float64 activations) on a shift :math:`s_b`, the mean of its leading
   eighth, into a copy with one sample per column, and its Gram matrix
   :math:`G_b = \sum_i (a_i - s_b)(a_i - s_b)^T` is one GEMM. The exact float64
   mean :math:`\mu_b = s_b + e_b` follows from the sum of the centered
   columns, so any shift is exact; one close to the mean keeps the GEMM
   accurate (the mean of any :math:`m` of :math:`n` rows lies within
   :math:`\sigma\sqrt{(n - m) / m}` of theirs: :math:`\sqrt 7\,\sigma` here).
   Passes over the batch's values: an eighth of one read for the shift; one
   read of the batch and one write of the copy (for a convolution's
   ``(b, c, positions)`` output, straight into channel-major order); the
   GEMM's and one more read of the copy for its column sums.
2. Other batches are only copied into a staging buffer of ``max(d, 1024)``
   samples, one per column, and their norm is taken; when it is full, its
   samples are centered on their common mean and become one GEMM (a GEMM
   over few rows is slow, and a small batch then costs one copy).
3. The GEMMs go through :mod:`delve._gram`: oneDNN's inner product for
   float32 on the CPU (AVX-512 where MKL runs AVX2), ``addmm`` elsewhere.
   From ``256`` features on, a GEMM computes only the column blocks on and
   below the diagonal of the symmetric :math:`G`.
4. The Gram matrices of up to 16 GEMMs are summed in the working precision;
   then they are folded into the float64 state, exactly:

   .. math::

       M_{2,w} = G - \sum_b n_b\, e_b e_b^T
                 + \sum_b n_b (\mu_b - \mu_w)(\mu_b - \mu_w)^T,

   followed by Chan's parallel update
   :math:`M_2 \leftarrow M_2 + M_{2,w} + \tfrac{n\, n_w}{n + n_w}\,\delta\delta^T`,
   :math:`\delta = \mu_w - \mu`, where :math:`w` are the GEMMs folded. The
   rank-one terms go through one small float64 GEMM, so the float64 work on
   the :math:`d \times d` matrix is a few passes per 16 GEMMs.

Updates never synchronise with the device (unless ``device`` asks for the
state on the host while the activations live on a GPU: then each batch is
copied over and waited for). A batch holding NaN or Inf, or values whose
squares could overflow the working precision, is left out through a
device-side mask and counted in ``num_skipped_batches``; a staged batch,
which shares its GEMM with up to ``max(d, 1024)`` samples, is held to a
stricter bound (a root-mean-square norm of its rows up to about ``1e16`` in
float32).

Sampling (``sample_rows=m``) keeps ``m`` rows of each batch, drawn uniformly at
random without replacement, weighted by :math:`n_b / m`: the mean and the raw
second moment are then unbiased estimates of those of all rows, and the
covariance is off by no more than the variance of the estimated mean, a term of
order one over the number of rows kept. ``sample_rows=True`` keeps
:math:`\max(32, 2d)` rows (:func:`resolve_sample_rows`), so that the number of
samples per feature, and with it the estimate's error, does not depend on the
width.
"""
from __future__ import annotations

import contextlib
import math
import random
from typing import Any, ContextManager, Dict, List, Optional, Union

import torch

from delve._gram import symmetrize_
from delve._pending import PendingGram, fold_into, new_tensor, staging_rows

Device = Union[str, torch.device, None]

_STATE_VERSION = 1

#: Seed of the row sampling of every accumulator that is not given one.
DEFAULT_SAMPLE_SEED = 0

#: Fewest rows per batch that ``sample_rows=True`` keeps (see :func:`resolve_sample_rows`).
DEFAULT_SAMPLE_ROWS = 32

#: Rows per batch and feature that ``sample_rows=True`` keeps (see ``benchmarks/overhead.py`` for the error).
SAMPLE_ROWS_PER_FEATURE = 2

def _without_autocast(device_type: str) -> ContextManager[Any]:
    """Autocast switched off (GEMMs in the working precision); no context at all where it is off already."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        enabled = torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()
    return torch.autocast(device_type=device_type, enabled=False) if enabled else contextlib.nullcontext()


def num_samples(samples: torch.Tensor) -> int:
    """Rows of ``(n, d)`` samples or of ``(b, d, l)`` blocks (``b * l``), as ``update`` takes them."""
    return samples.shape[0] * samples.shape[2] if samples.ndim == 3 else samples.shape[0]


def as_rows(samples: torch.Tensor) -> torch.Tensor:
    """``(n, d)`` samples as they are, ``(b, d, l)`` blocks as an ``(b * l, d)`` matrix."""
    return samples.permute(0, 2, 1).reshape(-1, samples.shape[1]) if samples.ndim == 3 else samples


class CovarianceMemoryError(ValueError):
    """A layer's covariance would need more memory than the budget allows."""


def covariance_nbytes(dim: int, float64_input: bool = False) -> int:
    """Bytes one accumulator of ``dim`` features holds at most.

    That is the float64 ``M2`` (``8 d^2``), the working-precision Gram matrix
    (``4 d^2``) and staging buffer for small batches (``4 d max(d, 1024)``;
    twice both for float64 activations), and a few vectors. Scratch space the size of one
    batch of activations comes on top.

    Parameters
    ----------
    dim : int
        Number of features (columns of the samples).
    float64_input : bool
        Whether the activations are float64, which makes the Gram buffer float64 too.

    Returns
    -------
    int
        The number of bytes.

    Examples
    --------
    >>> covariance_nbytes(1024) / 2**20
    16.03...
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
        raise ValueError(f"dim must be an int >= 0, got {dim!r}")
    work_bytes = 8 if float64_input else 4
    return dim * dim * (8 + work_bytes) + dim * staging_rows(dim) * work_bytes + dim * 8 * 4


def format_bytes(nbytes: float) -> str:
    """``nbytes`` in B, KiB, MiB, GiB or TiB, three significant digits (``format_bytes(3 * 2**20) == '3 MiB'``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024:
            return f"{nbytes:.3g} {unit}"
        nbytes /= 1024
    return f"{nbytes:.3g} TiB"


def check_memory_budget(layer_name: str, dim: int, memory_budget: Optional[int]) -> int:
    """Bytes of one covariance of ``dim`` features; raise if they exceed ``memory_budget``.

    Parameters
    ----------
    layer_name : str
        Name of the layer, used in the error message.
    dim : int
        Number of features of the layer's samples.
    memory_budget : int or None
        Most bytes one layer may hold per mode; ``None`` for no limit.

    Returns
    -------
    int
        The bytes, as :func:`covariance_nbytes`.

    Raises
    ------
    CovarianceMemoryError
        (a ``ValueError``) naming the layer, its size and what to do instead.

    Examples
    --------
    >>> check_memory_budget("fc", 512, memory_budget=2**30)
    5259264
    """
    nbytes = covariance_nbytes(dim)
    if memory_budget is not None and nbytes > memory_budget:
        raise CovarianceMemoryError(
            f"layer {layer_name!r} has {dim} features: its covariance needs {format_bytes(nbytes)} "
            f"per mode, more than memory_budget={memory_budget} ({format_bytes(memory_budget)}). "
            "Use conv_method='channelwise' or 'mean' instead of 'flatten', set interpolation_strategy "
            "to shrink feature maps, leave the layer out (ignore_layer_names, layer_filter) or raise "
            "memory_budget."
        )
    return nbytes


def resolve_sample_rows(sample_rows: Union[None, bool, int], dim: Optional[int] = None) -> Union[None, bool, int]:
    """Validate a ``sample_rows`` setting; given the layer's width, turn it into rows per batch.

    Parameters
    ----------
    sample_rows : None, bool or int
        ``None`` or ``False``: keep every row (exact statistics). ``True``:
        keep rows in proportion to the layer's width, ``max(DEFAULT_SAMPLE_ROWS,
        SAMPLE_ROWS_PER_FEATURE * d)`` of each batch for ``d`` features. An int
        ``m >= 2``: keep ``m`` rows of each batch.
    dim : int, optional
        The layer's width ``d`` (known at its first batch).

    Returns
    -------
    None, bool or int
        Without ``dim``: the setting, checked (``None``, ``True`` or an int).
        With ``dim``: rows per batch, ``None`` for all of them.

    Raises
    ------
    ValueError
        For any other value, naming the valid choices.

    Examples
    --------
    >>> resolve_sample_rows(True), resolve_sample_rows(False), resolve_sample_rows(128)
    (True, None, 128)
    >>> resolve_sample_rows(True, dim=4), resolve_sample_rows(True, dim=100), resolve_sample_rows(128, dim=4)
    (32, 200, 128)
    """
    if sample_rows is None or sample_rows is False:
        return None
    if sample_rows is not True and (not isinstance(sample_rows, int) or sample_rows < 2):
        raise ValueError(
            "sample_rows must be None (every row), True (rows in proportion to the layer's width: "
            f"max({DEFAULT_SAMPLE_ROWS}, {SAMPLE_ROWS_PER_FEATURE} x features) per batch) or an int >= 2, "
            f"got {sample_rows!r}"
        )
    if dim is None or sample_rows is not True:
        return sample_rows
    return max(DEFAULT_SAMPLE_ROWS, SAMPLE_ROWS_PER_FEATURE * dim)


def _check_optional_int(name: str, value: Any, minimum: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ValueError(f"{name} must be None or an int >= {minimum}, got {value!r}")


class TorchCovarianceMatrix:
    """Accumulate the covariance of a stream of samples, batch by batch.

    Parameters
    ----------
    bias : bool
        Kept for compatibility with delve 0.1.50; the covariance is always the
        population covariance (divided by ``n``).
    device : str or torch.device, optional
        Where the state lives. ``None`` (the default) keeps it on the device of
        the first batch. delve 0.1.50 defaulted to ``'cuda:0'``.
    save_data : bool
        Keep up to ``max_saved_samples`` rows of the data (for the ``embed`` statistic).
    max_saved_samples : int
        How many rows ``save_data`` keeps.
    sample_rows : None, bool or int
        Keep only some rows of each batch, drawn uniformly at random without
        replacement and weighted so that the statistics stay unbiased (see the
        module docstring): an int ``m`` keeps ``m``, ``True`` keeps
        ``max(32, 2 d)`` for ``d`` features (see :func:`resolve_sample_rows`).
        ``None`` (the default) keeps every row and the statistics are exact.
    seed : int, optional
        Seed of the row sampling; ``None`` uses :data:`DEFAULT_SAMPLE_SEED`.
        The sampling never draws from torch's global random state.
    memory_budget : int, optional
        Most bytes the state may take (see :func:`check_memory_budget`),
        checked when the first batch fixes the feature dimension.
    name : str
        Name of the layer, for error messages.

    Examples
    --------
    >>> acc = TorchCovarianceMatrix()
    >>> acc.update(torch.tensor([[1.0, 0.0], [3.0, 0.0]]))
    >>> acc.update(torch.tensor([[2.0, 0.0]]))
    >>> acc.compute()[0, 0].item()
    0.666666666666...
    """

    def __init__(
        self,
        bias: bool = False,
        device: Device = None,
        save_data: bool = False,
        max_saved_samples: int = 1000,
        sample_rows: Union[None, bool, int] = None,
        seed: Optional[int] = None,
        memory_budget: Optional[int] = None,
        name: str = "",
    ) -> None:
        resolve_sample_rows(sample_rows)
        _check_optional_int("seed", seed, 0)
        _check_optional_int("memory_budget", memory_budget, 1)
        self.bias = bias
        self.device = torch.device(device) if device is not None else None
        self.save_data = save_data
        self.max_saved_samples = max_saved_samples
        self.sample_rows = resolve_sample_rows(sample_rows)
        self.seed = DEFAULT_SAMPLE_SEED if seed is None else seed
        self.memory_budget = memory_budget
        self.name = name
        self._count: Optional[torch.Tensor] = None
        self._mean: Optional[torch.Tensor] = None
        self._m2: Optional[torch.Tensor] = None
        self._num_skipped: Optional[torch.Tensor] = None
        self._pending: Optional[PendingGram] = None
        self._python_rng: Optional[random.Random] = None
        self._torch_rng: Optional[torch.Generator] = None
        self._saved: List[torch.Tensor] = []
        self._num_saved = 0

    # ------------------------------------------------------------------ state
    @property
    def is_initialized(self) -> bool:
        """Whether the state exists (a batch of known feature dimension was seen)."""
        return self._m2 is not None

    @property
    def dim(self) -> Optional[int]:
        """Feature dimension, ``None`` before the first batch."""
        return None if self._mean is None else self._mean.shape[0]

    @property
    def count(self) -> int:
        """Number of samples accumulated since the last reset (synchronises with the device)."""
        self._fold()
        return 0 if self._count is None else int(round(self._count.item()))

    @property
    def num_skipped_batches(self) -> int:
        """Number of batches left out because they held NaN or Inf (synchronises)."""
        self._fold()
        return 0 if self._num_skipped is None else int(self._num_skipped.item())

    @property
    def mean(self) -> Optional[torch.Tensor]:
        """Float64 mean of the accumulated samples."""
        self._fold()
        return self._mean

    @property
    def nbytes(self) -> int:
        """Bytes of device memory this accumulator holds: its float64 state and scratch buffers."""
        tensors = [self._count, self._mean, self._m2, self._num_skipped]
        state = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return state + (0 if self._pending is None else self._pending.nbytes)

    @property
    def saved_samples(self) -> Optional[torch.Tensor]:
        """Rows kept for the ``embed`` statistic, or ``None``."""
        return torch.cat(self._saved) if self._saved else None

    def _init_state(self, dim: int, device: torch.device) -> None:
        check_memory_budget(self.name, dim, self.memory_budget)
        self._count = new_tensor((), torch.float64, device, zero=True)
        self._mean = new_tensor((dim,), torch.float64, device, zero=True)
        self._m2 = new_tensor((dim, dim), torch.float64, device, zero=True)
        self._num_skipped = new_tensor((), torch.int64, device, zero=True)
        self._pending = None

    def reset(self) -> None:
        """Forget every sample; keeps the allocated state (and its device)."""
        if self._m2 is not None:
            self._count.zero_()
            self._mean.zero_()
            self._m2.zero_()
            self._num_skipped.zero_()
        if self._pending is not None:
            self._pending.clear()
        self._saved = []
        self._num_saved = 0

    # ----------------------------------------------------------------- update
    @torch.no_grad()
    def update(self, x: torch.Tensor, vae: bool = False, row_mask: Optional[torch.Tensor] = None) -> None:
        """Add a batch of samples.

        Parameters
        ----------
        x : torch.Tensor
            Either ``(n, d)``: ``n`` samples (rows) of ``d`` features, or
            ``(b, d, l)``: ``b`` blocks whose ``l`` columns are samples of ``d``
            features each (a convolution's output flattened over its positions,
            which avoids a transposed copy).
        vae : bool
            Ignored; kept for compatibility with delve 0.1.50.
        row_mask : torch.Tensor, optional
            For ``(n, d)`` samples: ``n`` flags (bool or 0/1, an attention
            mask), rows whose flag is 0 are left out. The rows are weighted on
            the device, without synchronising with it.
        """
        if x.ndim == 1:
            x = x.unsqueeze(0)
        if x.ndim not in (2, 3):
            raise ValueError(f"x must have shape (n, d) or (b, d, l), got {tuple(x.shape)}")
        if row_mask is not None and (x.ndim != 2 or tuple(row_mask.shape) != (x.shape[0],)):
            raise ValueError(
                f"row_mask must have one flag per row of (n, d) samples, got {tuple(row_mask.shape)} "
                f"for samples of shape {tuple(x.shape)}"
            )
        dim = x.shape[1]
        num_rows = num_samples(x)
        if num_rows == 0:
            return
        x = x.detach()
        if self.device is not None and x.device != self.device:
            # A non-blocking copy to the host could be read before it lands; only copies to a device are.
            x = x.to(self.device, non_blocking=self.device.type != "cpu")
        if row_mask is not None:
            row_mask = row_mask.detach().to(x.device) != 0
        if self._m2 is None:
            self._init_state(dim, x.device)
        elif dim != self._m2.shape[0]:
            raise ValueError(f"x has {dim} features, the accumulator holds {self._m2.shape[0]}")
        if self.save_data and self._num_saved < self.max_saved_samples:
            self._save_rows(x if row_mask is None else x[row_mask])
        work_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if self._pending is None or work_dtype != self._pending.dtype:
            self._fold()
            self._pending = PendingGram(dim, self._m2.device, work_dtype)
        weight = 1.0
        rows_kept = resolve_sample_rows(self.sample_rows, dim)
        if rows_kept is not None and num_rows > rows_kept:
            index = self._sample_index(x, num_rows, rows_kept)
            x = self._take(x, index)
            row_mask = None if row_mask is None else row_mask[index]
            weight = num_rows / rows_kept
        num_kept = num_samples(x)
        with _without_autocast(x.device.type):
            if row_mask is None:
                fold_due = self._pending.add(x, num_kept, num_rows, weight)
            else:
                fold_due = self._pending.add_masked(x, row_mask, weight)
            if fold_due:
                self._fold()

    def _sample_index(self, x: torch.Tensor, num_rows: int, rows_kept: int) -> torch.Tensor:
        """Indices of ``rows_kept`` of the ``num_rows`` rows of ``x``, uniformly without replacement."""
        if x.device.type == "cpu":
            if self._python_rng is None:
                self._python_rng = random.Random(self.seed)
            return torch.tensor(self._python_rng.sample(range(num_rows), rows_kept))
        if self._torch_rng is None:
            self._torch_rng = torch.Generator(device=x.device)
            self._torch_rng.manual_seed(self.seed)
        return torch.randperm(num_rows, device=x.device, generator=self._torch_rng)[:rows_kept]

    @staticmethod
    def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The rows ``index`` of ``x`` (of its ``(b * l, d)`` rows for blocks), as an ``(m, d)`` matrix."""
        index = index.to(x.device)
        if x.ndim == 2:
            return x.index_select(0, index)
        length = x.shape[2]
        return x[index // length, :, index % length]

    def _fold(self) -> None:
        """Fold the pending batches into the float64 state, exactly (see the module docstring)."""
        pending = None if self._pending is None else self._pending.take()
        if pending is not None:
            fold_into(self._count, self._mean, self._m2, self._num_skipped, pending)

    def flush(self) -> None:
        """Fold pending rows into the float64 state now; reading the state does this anyway."""
        self._fold()

    def _save_rows(self, x: torch.Tensor) -> None:
        rows = as_rows(x)
        rows = rows[: self.max_saved_samples - self._num_saved].to(torch.float32).clone()
        self._saved.append(rows)
        self._num_saved += rows.shape[0]

    def merge(self, other: "TorchCovarianceMatrix") -> "TorchCovarianceMatrix":
        """Fold another accumulator's samples into this one (exact, Chan's formula).

        Parameters
        ----------
        other : TorchCovarianceMatrix
            Accumulator over other samples of the same features; its statistics
            are left unchanged.

        Returns
        -------
        TorchCovarianceMatrix
            ``self``, now holding the samples of both.
        """
        other._fold()
        if other._m2 is None:
            return self
        self._fold()
        if self._m2 is None:
            device = other._m2.device if self.device is None else self.device
            self._init_state(other._m2.shape[0], device)
        elif self._m2.shape != other._m2.shape:
            raise ValueError(f"cannot merge accumulators of dimension {self.dim} and {other.dim}")
        device = self._m2.device
        count_b = other._count.to(device)
        total = self._count + count_b
        weight_b = torch.where(total > 0, count_b / total.clamp_min(1.0), 0.0)
        delta = other._mean.to(device) - self._mean
        self._m2.add_(other._m2.to(device)).add_(torch.outer(delta, delta) * (self._count * weight_b))
        self._mean.add_(delta * weight_b)
        self._count.copy_(total)
        self._num_skipped.add_(other._num_skipped.to(device))
        return self

    # ---------------------------------------------------------------- compute
    def compute(self) -> torch.Tensor:
        """Population covariance ``M2 / n`` (float64); NaN-filled when no sample was seen.

        Raises
        ------
        RuntimeError
            If no batch was ever given, so the feature dimension is unknown.
        """
        if self._m2 is None:
            raise RuntimeError("TorchCovarianceMatrix.compute() called before any update()")
        self._fold()
        return symmetrize_(torch.div(self._m2, self._count))

    def fix(self, center: bool = True) -> torch.Tensor:
        """Covariance matrix, as in delve 0.1.50; ``center=False`` gives the raw second moment."""
        cov = self.compute()
        if center:
            return cov
        return cov + torch.outer(self._mean, self._mean)

    # ------------------------------------------------------- (de)serialisation
    def state_dict(self) -> Dict[str, Any]:
        """Plain dict of the state (tensors are copies), with a ``version`` key.

        With ``sample_rows``, the state of the row sampler is included, so that a
        resumed run draws the same rows as an uninterrupted one.
        """
        self._fold()
        state: Dict[str, Any] = {"version": _STATE_VERSION}
        if self._python_rng is not None or self._torch_rng is not None:
            state["sampler"] = {
                "python": None if self._python_rng is None else self._python_rng.getstate(),
                "torch": None if self._torch_rng is None else self._torch_rng.get_state(),
                "torch_device": None if self._torch_rng is None else str(self._torch_rng.device),
            }
        if self._m2 is not None:
            state.update(
                count=self._count.clone(),
                mean=self._mean.clone(),
                m2=self._m2.clone(),
                num_skipped=self._num_skipped.clone(),
            )
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict` (on this accumulator's device)."""
        version = state.get("version")
        if version != _STATE_VERSION:
            raise ValueError(f"unsupported TorchCovarianceMatrix state version {version!r}")
        self.reset()
        self._load_sampler(state.get("sampler"))
        if "m2" not in state:
            self._count = self._mean = self._m2 = self._num_skipped = None
            return
        device = self.device if self.device is not None else state["m2"].device
        self._init_state(state["m2"].shape[0], device)
        self._count.copy_(state["count"])
        self._mean.copy_(state["mean"])
        self._m2.copy_(state["m2"])
        self._num_skipped.copy_(state["num_skipped"])

    def _load_sampler(self, sampler: Optional[Dict[str, Any]]) -> None:
        self._python_rng = self._torch_rng = None
        if not sampler:
            return
        if sampler.get("python") is not None:
            self._python_rng = random.Random()
            self._python_rng.setstate(sampler["python"])
        if sampler.get("torch") is not None:
            self._torch_rng = torch.Generator(device=sampler["torch_device"])
            self._torch_rng.set_state(sampler["torch"])
