r"""One set of statistics across every process of a ``torch.distributed`` job.

Under DistributedDataParallel each process sees only its share of the data. When
a process group is initialised (and has more than one process),
:class:`~delve.SaturationTracker` calls :func:`sync_accumulators` in
:meth:`~delve.SaturationTracker.compute`: every layer's state
:math:`(n_r, \mu_r, M_{2,r})` on rank :math:`r` is merged exactly with the
parallel (Chan) formula, in its all-ranks form

.. math::

    n = \sum_r n_r,\quad
    \mu = \frac{1}{n}\sum_r n_r \mu_r,\quad
    M_2 = \sum_r \Big(M_{2,r} + n_r (\mu_r - \mu)(\mu_r - \mu)^T\Big),

which needs one sum of :math:`[n_r, n_r\mu_r]` over the ranks and then a single
sum of the bracketed :math:`d \times d` matrices per layer and mode. The
collectives of one call are:

1. a check that every rank tracks the same layers (a tiny ``MAX`` reduction);
2. the feature dimension of every layer and mode (``MAX``, one small tensor for
   all of them), so that a rank on which a layer saw nothing still takes part;
3. counts, weighted means and skipped-batch counts of all layers (one ``SUM``);
4. one ``d x d`` ``SUM`` per layer and mode that holds data on some rank.

The merged states are new accumulators: the local ones are never modified, so
recording goes on undisturbed. Every rank gets the same merged statistics
(useful for early stopping); only rank 0 writes (the tracker gives the other
ranks a :class:`NullWriter`). Every rank must therefore call
``add_saturations()`` / ``compute()`` the same number of times. Create the
tracker after ``torch.distributed.init_process_group``: a tracker created
before builds its writers on every rank (which may create files there); from
its first ``add_saturations()`` on, ranks other than 0 drop them with a warning.

Collectives run on CPU for gloo and on this rank's GPU for nccl (the device of
the local state, else the current CUDA device: call ``torch.cuda.set_device``
as usual); the merged state is put back on the device of the local state.
"""
from __future__ import annotations

import warnings
import zlib
from typing import Any, Dict, Hashable, List, Mapping, Optional, TypeVar

import torch

from delve.covariance import TorchCovarianceMatrix
from delve.writers.base import AbstractWriter, NullWriter

Key = TypeVar("Key", bound=Hashable)

# Sent instead of -dim by a rank without state, so that MAX over -dim yields -(smallest known dim).
_NO_DIM = -(2**62)


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def _initialized() -> bool:
    """Whether this build has ``torch.distributed`` and a default process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_distributed(group: Optional[Any] = None) -> bool:
    """Whether a ``torch.distributed`` process group of more than one process is initialised.

    Parameters
    ----------
    group : ProcessGroup, optional
        The group to look at; the default (world) group when ``None``.

    Returns
    -------
    bool

    Examples
    --------
    >>> is_distributed()
    False
    """
    return _initialized() and _dist().get_world_size(group) > 1


def get_rank(group: Optional[Any] = None) -> int:
    """Rank of this process in ``group``; 0 when no process group is initialised.

    Parameters
    ----------
    group : ProcessGroup, optional
        The group; the default (world) group when ``None``.

    Returns
    -------
    int
    """
    return _dist().get_rank(group) if _initialized() else 0


def is_main_process(group: Optional[Any] = None) -> bool:
    """Whether this process writes files: rank 0, or any process outside ``torch.distributed``.

    Parameters
    ----------
    group : ProcessGroup, optional
        The group; the default (world) group when ``None``.

    Returns
    -------
    bool

    Examples
    --------
    >>> is_main_process()
    True
    """
    return get_rank(group) == 0


def writer_for_rank(writer: AbstractWriter, group: Optional[Any] = None) -> AbstractWriter:
    """``writer`` on rank 0 and outside ``torch.distributed``; a :class:`NullWriter` on the other ranks.

    A writer that a rank other than 0 built anyway (its tracker was created
    before ``init_process_group``) is closed, with a warning.

    Parameters
    ----------
    writer : AbstractWriter
        The writer this process holds.
    group : ProcessGroup, optional
        The group whose rank 0 writes; the default (world) group when ``None``.

    Returns
    -------
    AbstractWriter

    Examples
    --------
    >>> writer = NullWriter()
    >>> writer_for_rank(writer) is writer
    True
    """
    if is_main_process(group) or isinstance(writer, NullWriter):
        return writer
    warnings.warn(
        f"rank {get_rank(group)} holds a {type(writer).__name__} because its SaturationTracker was created "
        "before torch.distributed.init_process_group; only rank 0 writes, so this rank writes nothing. "
        "Create the tracker after init_process_group.",
        RuntimeWarning,
        stacklevel=3,
    )
    writer.close()
    return NullWriter()


def _collective_device(group: Optional[Any], accumulators: List[TorchCovarianceMatrix]) -> torch.device:
    """Device for the tensors of the collectives: of the kind ``group``'s backend needs, the same on every rank.

    For nccl it is this rank's GPU: that of the local state, else the current CUDA device.
    """
    dist = _dist()
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        for acc in accumulators:
            if acc.mean is not None and acc.mean.device.type == "cuda":
                return acc.mean.device
        return torch.device("cuda", torch.cuda.current_device())
    device_types = [torch.device(kind).type for kind in getattr(group or dist.group.WORLD, "_device_types", [])]
    if not device_types or "cpu" in device_types:
        return torch.device("cpu")
    kind = device_types[0]
    return torch.device(kind, getattr(torch, kind).current_device())


def _all_reduce(tensor: torch.Tensor, op: str, group: Optional[Any]) -> torch.Tensor:
    dist = _dist()
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op), group=group)
    return tensor


def _check_same_keys(keys: List[Hashable], device: torch.device, group: Optional[Any]) -> None:
    digest = zlib.crc32("\n".join(map(repr, keys)).encode())
    local = torch.tensor([len(keys), digest, -len(keys), -digest], dtype=torch.int64, device=device)
    reduced = _all_reduce(local, "MAX", group).tolist()
    if reduced[0] != -reduced[2] or reduced[1] != -reduced[3]:
        raise ValueError(
            "the ranks track different layers; build the tracker from the same model (same layer "
            "names, same layer_filter and ignore_layer_names) on every rank"
        )


def _agree_on_dims(
    accumulators: List[TorchCovarianceMatrix], keys: List[Hashable], device: torch.device, group: Optional[Any]
) -> List[int]:
    dims = [acc.dim or 0 for acc in accumulators]
    low = [-dim if dim else _NO_DIM for dim in dims]
    local = torch.tensor(dims + low, dtype=torch.int64, device=device)
    reduced = _all_reduce(local, "MAX", group).tolist()
    count = len(dims)
    agreed = reduced[:count]
    for key, largest, negated_smallest in zip(keys, agreed, reduced[count:]):
        if largest and -negated_smallest != largest:
            raise ValueError(
                f"{key!r} has {-negated_smallest} features on one rank and {largest} on another; "
                "every rank must feed the same model"
            )
    return agreed


def _local_moments(acc: TorchCovarianceMatrix, dim: int, device: torch.device) -> torch.Tensor:
    """``[count, count * mean, num_skipped]`` of one accumulator, float64 on ``device``; zeros without state."""
    moments = torch.zeros(dim + 2, dtype=torch.float64, device=device)
    if acc.mean is not None:
        count = acc.count
        moments[0] = count
        moments[1 : dim + 1] = acc.mean.to(device) * count
        moments[dim + 1] = acc.num_skipped_batches
    return moments


def _m2_contribution(acc: TorchCovarianceMatrix, global_mean: torch.Tensor) -> torch.Tensor:
    """This rank's :math:`M_{2,r} + n_r (\\mu_r - \\mu)(\\mu_r - \\mu)^T`, a new tensor beside ``global_mean``."""
    dim, device = global_mean.shape[0], global_mean.device
    state = acc.state_dict()
    if "m2" not in state:
        return torch.zeros(dim, dim, dtype=torch.float64, device=device)
    contribution = state["m2"].to(device)
    shift = state["mean"].to(device) - global_mean
    return contribution.add_(torch.outer(shift, shift) * state["count"].to(device))


def _empty_like(acc: TorchCovarianceMatrix) -> TorchCovarianceMatrix:
    return TorchCovarianceMatrix(
        bias=acc.bias, device=acc.device, save_data=acc.save_data, max_saved_samples=acc.max_saved_samples
    )


def _merged_copy(
    acc: TorchCovarianceMatrix,
    count: torch.Tensor,
    mean: torch.Tensor,
    m2: torch.Tensor,
    num_skipped: torch.Tensor,
) -> TorchCovarianceMatrix:
    """A new accumulator holding the merged state, on the device of ``acc``'s state; keeps its saved rows."""
    merged = _empty_like(acc)
    target = acc.device or (acc.mean.device if acc.mean is not None else mean.device)
    merged.load_state_dict(
        {
            "version": merged.state_dict()["version"],
            "count": count.reshape(()).to(target),
            "mean": mean.to(target),
            "m2": m2.to(target),
            "num_skipped": num_skipped.reshape(()).to(target, torch.int64),
        }
    )
    # The rows kept for the ``embed`` statistic stay per rank: rank 0 projects its own rows.
    merged._saved = list(acc._saved)
    merged._num_saved = acc._num_saved
    return merged


def sync_accumulators(
    accumulators: Mapping[Key, TorchCovarianceMatrix], group: Optional[Any] = None
) -> Dict[Key, TorchCovarianceMatrix]:
    """Merge accumulators across the ranks of a process group, exactly; a no-op outside ``torch.distributed``.

    A collective call: every rank of ``group`` must call it with the same keys in
    the same order. An accumulator that saw nothing on some (or every) rank is
    fine.

    Parameters
    ----------
    accumulators : mapping of key to TorchCovarianceMatrix
        This rank's accumulators, e.g. keyed by ``(layer, mode)``; left unchanged.
    group : ProcessGroup, optional
        The ranks to merge over; the default (world) group when ``None``.

    Returns
    -------
    dict
        The same keys; each value a new accumulator holding the samples of every
        rank (uninitialised if no rank saw any). Without a process group of
        more than one process, the given accumulators themselves.

    Raises
    ------
    ValueError
        On every rank, if the ranks hold different keys or a different feature
        dimension for the same key.

    Examples
    --------
    >>> acc = TorchCovarianceMatrix()
    >>> acc.update(torch.randn(8, 3))
    >>> sync_accumulators({"layer": acc})["layer"] is acc
    True
    """
    if not is_distributed(group):
        return dict(accumulators)
    keys = list(accumulators)
    local = [accumulators[key] for key in keys]
    device = _collective_device(group, local)
    _check_same_keys(keys, device, group)
    dims = _agree_on_dims(local, keys, device, group)

    sums = _all_reduce(torch.cat([_local_moments(acc, dim, device) for acc, dim in zip(local, dims)]), "SUM", group)
    totals = sums.cpu()

    merged: Dict[Key, TorchCovarianceMatrix] = {}
    offset = 0
    for key, acc, dim in zip(keys, local, dims):
        count = sums[offset]
        has_data = bool(totals[offset] > 0)
        weighted_mean, num_skipped = sums[offset + 1 : offset + 1 + dim], sums[offset + 1 + dim]
        offset += dim + 2
        if dim == 0:
            merged[key] = _empty_like(acc)
        elif has_data:
            mean = weighted_mean / count
            m2 = _all_reduce(_m2_contribution(acc, mean), "SUM", group)
            merged[key] = _merged_copy(acc, count, mean, m2, num_skipped)
        else:
            zeros = torch.zeros(dim, dim, dtype=torch.float64, device=device)
            merged[key] = _merged_copy(acc, count, weighted_mean, zeros, num_skipped)
    return merged

