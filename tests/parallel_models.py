"""Models, data and feeding for tests/test_distributed_parallel.py, on the ranks and in one process."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from delve import SaturationTracker

STATS = ["lsat", "idim", "trc", "cov", "samples"]
BATCH = 16
# Train batch sizes of each data-parallel rank of the 2 x 2 mesh: unequal shares (rows 0-65 and 65-115),
# batches of one row (fewer rows than tensor-parallel ranks), as many batches on each rank (FSDP needs that).
TRAIN_2 = {0: (16, 16, 16, 16, 1), 1: (16, 16, 16, 1, 1)}
EVAL_2 = {0: (115, 140), 1: (140, 150)}
# The same when all four ranks are data-parallel (rows 0-40, 40-65, 65-103, 103-115).
TRAIN_4 = {0: (16, 16, 8), 1: (16, 8, 1), 2: (16, 16, 6), 3: (8, 3, 1)}
EVAL_4 = {0: (115, 125), 1: (125, 140), 2: (140, 143), 3: (143, 150)}
# Sequences (batch, SEQ, features) of each data-parallel rank for the 3-D scenarios.
SEQ = 8
SEQUENCES_2 = {0: (0, 14), 1: (14, 24)}


class Mlp(nn.Module):
    """``up`` is made column-parallel, ``down`` row-parallel; ``head`` stays a plain layer."""

    def __init__(self, d_in: int = 6) -> None:
        super().__init__()
        self.up = nn.Linear(d_in, 16)
        self.down = nn.Linear(16, 10)
        self.head = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.down(torch.relu(self.up(x)))))


class SequenceBlock(nn.Module):
    """A pre-norm residual MLP; under sequence parallelism ``head`` sees this rank's positions only."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(6)
        self.up = nn.Linear(6, 12)
        self.down = nn.Linear(12, 6)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.down(torch.relu(self.up(self.norm(x)))))


class LocalShardLinear(nn.Linear):
    """A Linear with a DTensor weight whose forward computes on the local shards and returns a plain tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to_local()
        return F.linear(x, self.weight.to_local(), bias)


class PartialSumLinear(nn.Linear):
    """A Linear with a DTensor weight sharded on its inputs that returns its local partial sums."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = self.weight.to_local().shape[1]
        start = self.weight.device_mesh.get_local_rank() * width
        return F.linear(x[..., start : start + width], self.weight.to_local())


class ChannelShards(nn.Module):
    """Returns its input (channels first); with a mesh, as a DTensor of which each rank holds some channels."""

    def __init__(self, mesh=None) -> None:
        super().__init__()
        self.mesh = mesh

    def forward(self, x: torch.Tensor):
        if self.mesh is None:
            return x * 1.0
        from torch.distributed.tensor import DTensor, Shard

        local = x.chunk(self.mesh.size(), dim=1)[self.mesh.get_local_rank()]
        return DTensor.from_local(local, self.mesh, [Shard(1)], run_check=False)


class MislabelledLinear(nn.Linear):
    """Returns half of its features as a DTensor that claims to hold all of them on every rank of ``mesh``."""

    mesh = None

    def forward(self, x: torch.Tensor):
        from torch.distributed.tensor import DTensor, Replicate

        full = super().forward(x)
        return DTensor.from_local(full[:, :2], self.mesh, [Replicate()], run_check=False, shape=full.shape,
                                  stride=full.stride())


def make(model_type: type = Mlp) -> nn.Module:
    torch.manual_seed(0)
    return model_type()


def make_data() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    mixing = torch.randn(6, 6, generator=generator) * torch.tensor([3.0, 2.0, 1.0, 0.5, 0.1, 0.01])
    return torch.randn(150, 6, generator=generator) @ mixing + 5.0


def make_sequences() -> tuple:
    """Sequences of 6 features and padding masks (at least the first position of each sequence is kept)."""
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randn(24, SEQ, 6, generator=generator) * torch.tensor([3.0, 2.0, 1.0, 0.5, 0.2, 0.1]) + 1.0
    lengths = torch.randint(1, SEQ + 1, (24,), generator=generator)
    return tokens, torch.arange(SEQ) < lengths[:, None]


def train_rows(shares: dict, rank: int) -> slice:
    start = sum(sum(shares[other]) for other in shares if other < rank)
    return slice(start, start + sum(shares[rank]))


def feed(model: nn.Module, data: torch.Tensor, shares: dict, evaluate: dict, rank: int,
         backward: bool = False) -> None:
    """Rank ``rank``'s train batches (with backward passes if asked), then its eval batch."""
    model.train()
    for batch in data[train_rows(shares, rank)].split(shares[rank]):
        output = model(batch)
        if backward:
            output.square().mean().backward()
    model.eval()
    with torch.no_grad():
        model(data[slice(*evaluate[rank])])
    model.train()


def track(model: nn.Module, **options) -> SaturationTracker:
    options.setdefault("stats", STATS)
    return SaturationTracker("unused", save_to="csv", modules=model, nosave=True, **options)


def local_counts(tracker: SaturationTracker) -> dict:
    return {name: {mode: state.accumulator.count for mode, state in recorder.modes.items()}
            for name, recorder in tracker._recorders.items()}


def make_images() -> torch.Tensor:
    return torch.randn(12, 4, 5, 5, generator=torch.Generator().manual_seed(3)) * torch.tensor(
        [2.0, 1.0, 0.5, 0.1])[:, None, None] + 2.0
