r"""Streaming, mergeable covariance of a layer's outputs.

:class:`TorchCovarianceMatrix` keeps three pieces of state per layer and mode:
the number of samples :math:`n`, their mean :math:`\mu` and the centered second
moment :math:`M_2 = \sum_i (a_i - \mu)(a_i - \mu)^T`, all in float64. Each batch
is centered on its own mean before its Gram matrix is formed (in float32 for
float32/half activations, in float64 for float64 ones), and folded in with
Chan's parallel update

.. math::

    n = n_a + n_b,\quad
    \mu = \mu_a + \tfrac{n_b}{n}\,\delta,\quad
    M_2 = M_{2,a} + M_{2,b} + \tfrac{n_a n_b}{n}\,\delta\delta^T,\quad
    \delta = \mu_b - \mu_a,

so that activations with a large mean and a tiny spread keep their precision.
The covariance is the population covariance :math:`Q = M_2 / n` of every sample
seen since the last :meth:`~TorchCovarianceMatrix.reset`
(eq. 1 of "Feature Space Saturation during Training", arXiv 2006.08679).

Updates never synchronise with the device: a batch holding NaN or Inf is left
out through ``torch.where`` and counted in ``num_skipped_batches``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch

Device = Union[str, torch.device, None]

_STATE_VERSION = 1


def _chan_merge(
    count_a: torch.Tensor,
    mean_a: torch.Tensor,
    m2_a: torch.Tensor,
    count_b: torch.Tensor,
    mean_b: torch.Tensor,
    m2_b: torch.Tensor,
) -> None:
    """Fold (count_b, mean_b, m2_b) into (count_a, mean_a, m2_a) in place (Chan et al., 1979)."""
    total = count_a + count_b
    weight_b = torch.where(total > 0, count_b / total.clamp_min(1.0), torch.zeros_like(total))
    delta = mean_b - mean_a
    mean_a.add_(delta * weight_b)
    m2_a.add_(m2_b).add_(torch.outer(delta, delta) * (count_a * weight_b))
    count_a.copy_(total)


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

    Examples
    --------
    >>> acc = TorchCovarianceMatrix()
    >>> acc.update(torch.tensor([[1.0, 0.0], [3.0, 0.0]]))
    >>> acc.update(torch.tensor([[2.0, 0.0]]))
    >>> acc.compute()[0, 0].item()
    0.6666666666666666
    """

    def __init__(
        self,
        bias: bool = False,
        device: Device = None,
        save_data: bool = False,
        max_saved_samples: int = 1000,
    ) -> None:
        self.bias = bias
        self.device = torch.device(device) if device is not None else None
        self.save_data = save_data
        self.max_saved_samples = max_saved_samples
        self._count: Optional[torch.Tensor] = None
        self._mean: Optional[torch.Tensor] = None
        self._m2: Optional[torch.Tensor] = None
        self._num_skipped: Optional[torch.Tensor] = None
        self._saved: list[torch.Tensor] = []
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
        return 0 if self._count is None else int(self._count.item())

    @property
    def num_skipped_batches(self) -> int:
        """Number of batches left out because they held NaN or Inf (synchronises)."""
        return 0 if self._num_skipped is None else int(self._num_skipped.item())

    @property
    def mean(self) -> Optional[torch.Tensor]:
        """Float64 mean of the accumulated samples."""
        return self._mean

    @property
    def saved_samples(self) -> Optional[torch.Tensor]:
        """Rows kept for the ``embed`` statistic, or ``None``."""
        return torch.cat(self._saved) if self._saved else None

    def _init_state(self, dim: int, device: torch.device) -> None:
        # Created outside inference mode so that training after an inference_mode
        # forward can still update the state in place.
        with torch.inference_mode(False):
            self._count = torch.zeros((), dtype=torch.float64, device=device)
            self._mean = torch.zeros(dim, dtype=torch.float64, device=device)
            self._m2 = torch.zeros(dim, dim, dtype=torch.float64, device=device)
            self._num_skipped = torch.zeros((), dtype=torch.int64, device=device)

    def reset(self) -> None:
        """Forget every sample; keeps the allocated state (and its device)."""
        if self._m2 is not None:
            self._count.zero_()
            self._mean.zero_()
            self._m2.zero_()
            self._num_skipped.zero_()
        self._saved = []
        self._num_saved = 0

    # ----------------------------------------------------------------- update
    @torch.no_grad()
    def update(self, x: torch.Tensor, vae: bool = False) -> None:
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
        """
        if x.ndim == 1:
            x = x.unsqueeze(0)
        if x.ndim not in (2, 3):
            raise ValueError(f"x must have shape (n, d) or (b, d, l), got {tuple(x.shape)}")
        blocks = x.ndim == 3
        dim = x.shape[1]
        num_samples = x.shape[0] * x.shape[2] if blocks else x.shape[0]
        if num_samples == 0:
            return
        x = x.detach()
        if self.device is not None and x.device != self.device:
            x = x.to(self.device, non_blocking=True)
        if self._m2 is None:
            self._init_state(dim, x.device)
        elif dim != self._m2.shape[0]:
            raise ValueError(f"x has {dim} features, the accumulator holds {self._m2.shape[0]}")
        work_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(work_dtype)
            reduce_dims = (0, 2) if blocks else (0,)
            batch_mean = x.sum(dim=reduce_dims, dtype=torch.float64) / num_samples
            shift = batch_mean.to(work_dtype)
            if blocks:
                centered = x - shift[None, :, None]
                gram = torch.bmm(centered, centered.transpose(1, 2)).sum(0)
            else:
                centered = x - shift
                gram = centered.T @ centered
            shift_error = batch_mean - shift.to(torch.float64)
            batch_m2 = gram.to(torch.float64) - torch.outer(shift_error, shift_error) * num_samples
            finite = torch.isfinite(batch_mean).all() & torch.isfinite(batch_m2.diagonal()).all()
            zero = torch.zeros((), dtype=torch.float64, device=x.device)
            _chan_merge(
                self._count,
                self._mean,
                self._m2,
                torch.where(finite, zero + num_samples, zero),
                torch.where(finite, batch_mean, zero),
                torch.where(finite, batch_m2, zero),
            )
            self._num_skipped.add_((~finite).to(torch.int64))
        if self.save_data and self._num_saved < self.max_saved_samples:
            self._save_rows(x, blocks)

    def _save_rows(self, x: torch.Tensor, blocks: bool) -> None:
        rows = x.permute(0, 2, 1).reshape(-1, x.shape[1]) if blocks else x
        rows = rows[: self.max_saved_samples - self._num_saved].to(torch.float32).clone()
        self._saved.append(rows)
        self._num_saved += rows.shape[0]

    def merge(self, other: "TorchCovarianceMatrix") -> "TorchCovarianceMatrix":
        """Fold another accumulator's samples into this one (exact, Chan's formula).

        Parameters
        ----------
        other : TorchCovarianceMatrix
            Accumulator over other samples of the same features; left unchanged.

        Returns
        -------
        TorchCovarianceMatrix
            ``self``, now holding the samples of both.
        """
        if other._m2 is None:
            return self
        if self._m2 is None:
            self._init_state(other._m2.shape[0], other._m2.device if self.device is None else self.device)
        elif self._m2.shape != other._m2.shape:
            raise ValueError(f"cannot merge accumulators of dimension {self.dim} and {other.dim}")
        device = self._m2.device
        _chan_merge(
            self._count,
            self._mean,
            self._m2,
            other._count.to(device),
            other._mean.to(device),
            other._m2.to(device),
        )
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
        cov = self._m2 / self._count
        return 0.5 * (cov + cov.T)

    def fix(self, center: bool = True) -> torch.Tensor:
        """Covariance matrix, as in delve 0.1.50; ``center=False`` gives the raw second moment."""
        cov = self.compute()
        if center:
            return cov
        return cov + torch.outer(self._mean, self._mean)

    # ------------------------------------------------------- (de)serialisation
    def state_dict(self) -> Dict[str, Any]:
        """Plain dict of the state (tensors are copies), with a ``version`` key."""
        state: Dict[str, Any] = {"version": _STATE_VERSION}
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
        if "m2" not in state:
            self._count = self._mean = self._m2 = self._num_skipped = None
            return
        device = self.device if self.device is not None else state["m2"].device
        self._init_state(state["m2"].shape[0], device)
        self._count.copy_(state["count"])
        self._mean.copy_(state["mean"])
        self._m2.copy_(state["m2"])
        self._num_skipped.copy_(state["num_skipped"])
