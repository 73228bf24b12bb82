r"""Layers whose outputs are spread over ranks: tensor and sequence parallelism.

Under tensor parallelism (:func:`torch.distributed.tensor.parallel.parallelize_module`,
or any layer whose parameters are :class:`~torch.distributed.tensor.DTensor`\ s)
a layer's output is a ``DTensor`` on a device mesh, and delve's forward hook
sees it before the parallel style's output hook turns it into a local tensor
(global forward hooks run before a module's own). Its placements say what each
rank holds:

- ``Shard(-1)`` (``ColwiseParallel``): every row, a slice of the features;
- ``Partial()`` (the raw output of ``RowwiseParallel``): a summand of every value;
- ``Replicate()``: everything, the same on every rank;
- ``Shard(0)`` or ``Shard(1)`` (batch, or sequence parallelism): some of the
  rows with every feature.

For a layer whose samples are the positions of its output (Linear, Hugging
Face's Conv1D, token-shaped blocks), :func:`local_output` redistributes the
output so that each rank of the mesh holds *different rows with every
feature*: ``Shard(-1)`` becomes ``Shard(0)`` (an all-to-all; gloo does it as an
all-gather), ``Partial()`` becomes ``Shard(0)`` (a reduce-scatter),
``Replicate()`` becomes ``Shard(0)`` (each rank keeps its chunk, no
communication) and row shardings stay. The ranks of the mesh thus split the
rows of every recorded forward pass between them: each one accumulates (and
computes the Gram matrix of) its share only, and
:func:`delve.distributed.sync_accumulators` merges the shares exactly, as it
merges the data of data-parallel ranks. The padding mask is cut like the
rows. Any other layer type gets the whole output on every rank
(``full_tensor()``); identical states on several ranks are then counted once at
the merge.

A layer whose weight is a ``DTensor`` sharded on its output dimension but whose
``forward`` returns a plain local tensor (it calls ``to_local()`` itself) is
read as a feature shard on the weight's mesh. A layer with a sharded weight
and a plain output that is no such shard (a row-parallel layer that returns
partial sums, say) raises :class:`ShardingError`: delve cannot tell what its
output holds, so the recorder leaves the layer out, with a warning, instead of
recording wrong numbers. So does a ``DTensor`` output whose local tensor is
not what its placements say.

Nothing here imports ``torch.distributed.tensor`` unless the process already
did: without it no ``DTensor`` exists, and :func:`local_output` returns
``None`` after one dictionary lookup.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
from torch import nn

from delve.adapters import LayerAdapter, block_samples, first_tensor, linear_samples


class ShardingError(ValueError):
    """A layer's output is spread over ranks in a way delve cannot tell."""


def dtensor_type() -> Optional[type]:
    """The ``DTensor`` class once ``torch.distributed.tensor`` is imported, else ``None`` (no DTensor exists then).

    Examples
    --------
    >>> import torch.distributed.tensor
    >>> dtensor_type().__name__
    'DTensor'
    """
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


@dataclass(frozen=True)
class LocalOutput:
    """What this rank records of one forward pass of a layer whose output is a ``DTensor``.

    Attributes
    ----------
    output : torch.Tensor
        A plain tensor with every feature of the layer: this rank's share of
        the rows when ``group_rows`` is set, else all of them (the same on every
        rank of the mesh).
    mask : torch.Tensor or None
        The padding mask of those rows.
    group_rows : int or None
        Rows of the whole output, which the ranks of ``mesh`` split between
        them; ``None`` when every rank holds all of them.
    mesh : DeviceMesh
        The device mesh of the output.
    """

    output: torch.Tensor
    mask: Optional[torch.Tensor]
    group_rows: Optional[int]
    mesh: Any

    def rows(self, local_rows: int) -> int:
        """Rows that ``max_samples`` counts for this call: the same number on every rank of the mesh."""
        return local_rows if self.group_rows is None else self.group_rows

    def share(self, keep: int, local_rows: int) -> int:
        """Rows of its ``local_rows`` this rank keeps when the mesh keeps ``keep`` more (in all, at most ``keep``)."""
        return keep if self.group_rows is None else keep * local_rows // self.group_rows


def mesh_ranks(mesh: Any) -> Tuple[int, ...]:
    """Global ranks of a device mesh, in order."""
    return tuple(int(rank) for rank in mesh.mesh.flatten().tolist())


def local_output(
    module: nn.Module, output: Any, mask: Optional[torch.Tensor], adapter: LayerAdapter
) -> Optional[LocalOutput]:
    """This rank's rows of a layer's output, with every feature; ``None`` when nothing is sharded.

    A collective call over the output's device mesh when the output is a
    ``DTensor`` (every rank of the mesh records the same forward passes, so
    they all make it).

    Parameters
    ----------
    module : torch.nn.Module
        The layer.
    output : Any
        What its forward returned.
    mask : torch.Tensor or None
        The padding mask of the batch, ``(batch, sequence)``.
    adapter : LayerAdapter
        How the layer's outputs become samples; row splitting needs samples
        that are the positions of the output (Linear, blocks).

    Returns
    -------
    LocalOutput or None

    Raises
    ------
    ShardingError
        If the layer's weight is sharded but its plain output is no shard of
        its features, or if its DTensor output's local shape contradicts its
        placements.
    """
    dtensor = dtensor_type()
    if dtensor is None:
        return None
    head = first_tensor(output)
    if not isinstance(head, dtensor):
        head = _from_feature_shard(module, head, dtensor)
        if head is None:
            return None
    _check_local_shape(head)
    if head.ndim >= 2 and (adapter.samples is linear_samples or (adapter.samples is block_samples and head.ndim <= 3)):
        return _row_shards(head, mask)
    return LocalOutput(head.full_tensor(), mask, None, head.device_mesh)


def _check_local_shape(tensor: Any) -> None:
    """Refuse a DTensor whose local tensor is not what its placements say each rank holds.

    torch 2.13's convolution with a weight sharded on its output channels
    returns such a tensor: placed ``Replicate()``, locally a slice of the
    channels. Placements other than ``Shard``, ``Replicate`` and ``Partial``
    are not checked.
    """
    shape, mesh = list(tensor.shape), tensor.device_mesh
    coordinate = mesh.get_coordinate()
    for mesh_dim, placement in enumerate(tensor.placements):
        if placement.is_shard():
            if type(placement).__name__ != "Shard":
                return
            dim = placement.dim % tensor.ndim
            chunk = -(-shape[dim] // mesh.size(mesh_dim))
            shape[dim] = max(0, min(chunk, shape[dim] - coordinate[mesh_dim] * chunk))
    local = tuple(tensor.to_local().shape)
    if local != tuple(shape):
        raise ShardingError(
            f"its output is a DTensor placed as {tuple(tensor.placements)} with global shape "
            f"{tuple(tensor.shape)}, which gives this rank a local shape {tuple(shape)}, but its local tensor has "
            f"shape {local}; delve cannot tell what each rank holds (a sharding rule of torch that mislabels "
            "this layer's output?)"
        )


def _row_shards(tensor: Any, mask: Optional[torch.Tensor]) -> LocalOutput:
    """Redistribute so that every rank of the mesh holds different rows with all features."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh, last = tensor.device_mesh, tensor.ndim - 1
    features_sharded = [placement.is_shard() and placement.dim % tensor.ndim == last for placement in tensor.placements]
    if mesh.device_type == "cpu" and any(features_sharded):
        # gloo has no all-to-all: gather the features first (torch would do the same, with a warning per process)
        gathered = [Replicate() if sharded else kept for kept, sharded in zip(tensor.placements, features_sharded)]
        tensor = tensor.redistribute(mesh, gathered)
    placements = tuple(
        placement if placement.is_shard() and placement.dim % tensor.ndim < last else Shard(0)
        for placement in tensor.placements
    )
    local = tensor.redistribute(mesh, placements).to_local()
    if mask is not None and tensor.ndim == 3 and tuple(mask.shape) == tuple(tensor.shape[:2]):
        replicated = DTensor.from_local(mask.to(local.device), mesh, [Replicate()] * mesh.ndim, run_check=False)
        mask = replicated.redistribute(mesh, placements).to_local()  # chunks the local copy, no communication
    return LocalOutput(local, mask, math.prod(tensor.shape[:-1]), mesh)


def _weight_output_dim(module: nn.Module) -> Optional[int]:
    """Dimension of the layer's weight that indexes its output features (Linear 0, Hugging Face's Conv1D 1)."""
    if isinstance(module, nn.Linear):
        return 0
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return 1
    return None


def _from_feature_shard(module: nn.Module, tensor: Any, dtensor: type) -> Any:
    """A plain output of a layer with a sharded ``DTensor`` weight, as the ``DTensor`` of its feature shards.

    ``None`` when the weight is no sharded DTensor, or when the output has every
    feature already.
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, dtensor) or not isinstance(tensor, torch.Tensor) or tensor.ndim == 0:
        return None
    placements = weight.placements
    if all(placement.is_replicate() for placement in placements):
        return None
    out_dim, width = _weight_output_dim(module), tensor.shape[-1]
    feature_sharded = out_dim is not None and all(
        placement.is_replicate() or (placement.is_shard() and placement.dim % weight.ndim == out_dim)
        for placement in placements
    )
    if feature_sharded and width == weight.shape[out_dim]:
        return None
    if feature_sharded and width == weight.to_local().shape[out_dim]:
        from torch.distributed.tensor import Replicate, Shard

        shape = torch.Size((*tensor.shape[:-1], weight.shape[out_dim]))
        stride = tuple(math.prod(shape[index + 1 :]) for index in range(len(shape)))
        features = [Shard(tensor.ndim - 1) if placement.is_shard() else Replicate() for placement in placements]
        return dtensor.from_local(tensor, weight.device_mesh, features, run_check=False, shape=shape, stride=stride)
    raise ShardingError(
        f"its weight is a DTensor placed as {tuple(placements)} on {weight.device_mesh}, but its forward returns a "
        f"plain tensor of {width} features, so delve cannot tell what each rank holds (a row-parallel layer's "
        "local output is a partial sum). Let the layer return a DTensor, as the styles of "
        "torch.distributed.tensor.parallel do, or leave it out with ignore_layer_names"
    )


__all__ = ["LocalOutput", "ShardingError", "dtensor_type", "local_output", "mesh_ranks"]
