r"""One set of statistics across every process of a ``torch.distributed`` job.

Under data parallelism (DDP, FSDP) each process sees only its share of the
data; under tensor parallelism the ranks of a tensor-parallel group split the
rows of each sharded layer's output between them (:mod:`delve.sharding`). Either
way every rank holds samples of its own. When a process group is initialised
(and has more than one process), :class:`~delve.SaturationTracker` calls
:func:`sync_accumulators` in :meth:`~delve.SaturationTracker.compute`, over
every rank or over the tracker's ``process_group``: every layer's state
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
3. three numbers per layer and mode (count and two random projections of the
   state) from every rank (one ``all_gather``): a state identical to a lower
   rank's holds the same samples (tensor-parallel ranks recording a
   replicated output) and is counted once;
4. counts, weighted means and skipped-batch counts of all layers (one ``SUM``);
5. one ``d x d`` ``SUM`` per layer and mode that holds data on some rank.

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
from delve.sharding import mesh_ranks
from delve.writers.base import AbstractWriter, NullWriter

Key = TypeVar("Key", bound=Hashable)
State = Dict[str, Any]

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


def resolve_group(process_group: Any) -> Optional[Any]:
    """The group a tracker merges over, from its ``process_group`` option.

    Parameters
    ----------
    process_group : None, ProcessGroup or DeviceMesh
        ``None``: every rank of the job. A ``ProcessGroup``: its ranks. A
        ``DeviceMesh``: every rank of the mesh, all its dimensions (pass the
        whole data x tensor mesh, not its data-parallel dimension: the
        tensor-parallel ranks split the rows of sharded layers between them).

    Returns
    -------
    ProcessGroup or None
        ``None`` stands for the default (world) group.

    Raises
    ------
    ValueError
        If ``process_group`` is of another type, or given before
        ``init_process_group``.

    Examples
    --------
    >>> resolve_group(None) is None
    True
    """
    if process_group is None:
        return None
    if not _initialized():
        raise ValueError(
            f"process_group={process_group!r} needs torch.distributed: create the tracker after "
            "init_process_group, or pass process_group=None"
        )
    dist = _dist()
    if isinstance(process_group, dist.ProcessGroup):
        return process_group
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(process_group, DeviceMesh):
        raise ValueError(
            "process_group must be None (every rank), a torch.distributed ProcessGroup or a DeviceMesh, "
            f"got {type(process_group).__name__}"
        )
    if process_group.ndim == 1:
        return process_group.get_group()
    ranks = sorted(mesh_ranks(process_group))
    if ranks == list(range(dist.get_world_size())):
        return None
    return dist.new_group(ranks, use_local_synchronization=True)


def check_row_meshes(row_meshes: Mapping[str, Any], group: Optional[Any]) -> None:
    """Refuse to merge over a group that lacks ranks holding rows of a tensor-parallel layer.

    Parameters
    ----------
    row_meshes : mapping of layer name to DeviceMesh
        Layers whose rows the ranks of a mesh split between them (see
        :mod:`delve.sharding`).
    group : ProcessGroup or None
        The group of the merge; ``None`` (every rank) always holds them.

    Raises
    ------
    ValueError
        Naming the layer, its mesh's ranks and what to pass instead.
    """
    if group is None or not row_meshes:
        return
    members = set(_dist().get_process_group_ranks(group))
    for name, mesh in row_meshes.items():
        ranks = mesh_ranks(mesh)
        if not members.issuperset(ranks):
            raise ValueError(
                f"the ranks {list(ranks)} split the rows of layer {name!r} between them (tensor parallelism), but "
                f"process_group holds only {sorted(members)}: pass the whole DeviceMesh (data x tensor), a group "
                "of all the ranks that train the model, or None"
            )


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


def _probe(dim: int, device: torch.device) -> torch.Tensor:
    """A fixed random vector of ``dim`` positive float64 weights, the same on every rank."""
    generator = torch.Generator().manual_seed(dim)
    return (torch.rand(dim, generator=generator, dtype=torch.float64) + 0.5).to(device)


def _copies(states: List[State], dims: List[int], device: torch.device, group: Optional[Any]) -> List[bool]:
    """Whether each state is a copy of one held by a lower rank of ``group``: the same samples, to count once.

    Ranks of a tensor-parallel group that record a replicated output hold
    identical states. Each state is summarised by its count and two random
    projections of its mean and second moments; the summaries of all ranks
    are gathered (``3`` numbers per layer and mode and rank) and compared bit
    for bit.
    """
    local = torch.zeros(len(states), 3, dtype=torch.float64, device=device)
    for index, (state, dim) in enumerate(zip(states, dims)):
        if "m2" in state:
            probe = _probe(dim, device)
            local[index, 0] = state["count"].to(device)
            local[index, 1] = state["mean"].to(device) @ probe
            local[index, 2] = probe @ (state["m2"].to(device) @ probe)
    dist = _dist()
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    rank = dist.get_rank(group)
    if rank == 0:
        return [False] * len(states)
    lower = torch.stack(gathered[:rank])
    copies = (lower == local).all(dim=-1).any(dim=0) & (local[:, 0] > 0)
    return copies.tolist()


def _local_moments(state: State, dim: int, device: torch.device) -> torch.Tensor:
    """``[count, count * mean, num_skipped]`` of one state, float64 on ``device``; zeros without data."""
    moments = torch.zeros(dim + 2, dtype=torch.float64, device=device)
    if "m2" in state:
        count = state["count"].to(device)
        moments[0] = count
        moments[1 : dim + 1] = state["mean"].to(device) * count
        moments[dim + 1] = state["num_skipped"].to(device)
    return moments


def _m2_contribution(state: State, global_mean: torch.Tensor) -> torch.Tensor:
    """This rank's :math:`M_{2,r} + n_r (\\mu_r - \\mu)(\\mu_r - \\mu)^T`, a new tensor beside ``global_mean``."""
    dim, device = global_mean.shape[0], global_mean.device
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
    fine. Ranks whose states of a key are identical (they recorded the same
    samples: tensor-parallel ranks with a replicated output, or ranks fed the
    same batches) count once.

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
        rank, each distinct state once (uninitialised if no rank saw any).
        Without a process group of more than one process, the given
        accumulators themselves.

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

    states = [acc.state_dict() for acc in local]
    # A copy of a lower rank's state (the same samples) takes part with nothing.
    states = [{} if copy else state for state, copy in zip(states, _copies(states, dims, device, group))]

    moments = [_local_moments(state, dim, device) for state, dim in zip(states, dims)]
    sums = _all_reduce(torch.cat(moments), "SUM", group)
    totals = sums.cpu()

    merged: Dict[Key, TorchCovarianceMatrix] = {}
    offset = 0
    for key, acc, state, dim in zip(keys, local, states, dims):
        count = sums[offset]
        has_data = bool(totals[offset] > 0)
        weighted_mean, num_skipped = sums[offset + 1 : offset + 1 + dim], sums[offset + 1 + dim]
        offset += dim + 2
        if dim == 0:
            merged[key] = _empty_like(acc)
        elif has_data:
            mean = weighted_mean / count
            m2 = _all_reduce(_m2_contribution(state, mean), "SUM", group)
            merged[key] = _merged_copy(acc, count, mean, m2, num_skipped)
        else:
            zeros = torch.zeros(dim, dim, dtype=torch.float64, device=device)
            merged[key] = _merged_copy(acc, count, weighted_mean, zeros, num_skipped)
    return merged

