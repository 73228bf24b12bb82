"""Saturation of a model trained with tensor parallelism and FSDP2 on a data x tensor device mesh.

Launch it with torchrun, e.g. four processes as a 2 x 2 mesh::

    torchrun --nproc_per_node 4 examples/tensor_parallel.py --mesh 2x2

or plainly, ``python examples/tensor_parallel.py`` (``--quick`` for a few
seconds), which starts the processes of the mesh (default ``1x2``: one
tensor-parallel pair) on this machine with gloo. ``fc1`` is column-parallel and
``fc2`` row-parallel over the tensor dimension, every layer is sharded with
FSDP2 (``fully_shard``) over the data dimension, and each data-parallel rank
trains on its share of scikit-learn's digits.

The tracker needs nothing beyond what a DDP run needs: it reads each layer's
layout from its DTensor output, the ranks of a tensor-parallel pair split the
rows of ``fc1`` and ``fc2`` between them, the replicated ``classifier`` is
counted once, and ``add_saturations()`` gives every rank the statistics of the
whole layers over all the data. Only rank 0 writes ``runs/tensor_parallel.csv``.
"""
import argparse
import os
import tempfile
import warnings
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.datasets import load_digits
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from delve import SaturationTracker

# torch's FSDP2 warns that a row-parallel layer's local output is a view, against in-place ops on it (which
# this model does not do); it warns the same without delve.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


def digits(quick: bool) -> TensorDataset:
    """The 8x8 digits as 64 features in [0, 1]."""
    data = load_digits()
    features = torch.tensor(data.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(data.target)
    count = 400 if quick else len(labels)
    return TensorDataset(features[:count], labels[:count])


def mlp() -> nn.Module:
    return nn.Sequential(
        OrderedDict(fc1=nn.Linear(64, 128), relu1=nn.ReLU(), fc2=nn.Linear(128, 64), relu2=nn.ReLU(),
                    classifier=nn.Linear(64, 10))
    )


def train(mesh_shape: tuple, device_type: str, args: argparse.Namespace) -> None:
    """The training loop every process runs; the process group is already initialised."""
    mesh = init_device_mesh(device_type, mesh_shape, mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)  # the same full weights on every rank before they are sharded
    model = mlp().to(device_type)
    parallelize_module(model, mesh["tp"], {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    for layer in (model.fc1, model.fc2, model.classifier):
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    # The ranks of a tensor-parallel group see the same batches: the sampler follows the data dimension.
    train_set = digits(args.quick)
    sampler = DistributedSampler(train_set, num_replicas=mesh["dp"].size(), rank=mesh["dp"].get_local_rank(),
                                 shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(train_set, batch_size=32, sampler=sampler, drop_last=True)

    with SaturationTracker(args.savefile, save_to="csv", modules=model, stats=["lsat", "idim", "samples"],
                           average_sat=True) as tracker:
        for epoch in range(2 if args.quick else args.epochs):
            sampler.set_epoch(epoch)
            for features, labels in loader:
                optimizer.zero_grad()
                loss = loss_fn(model(features.to(device_type)), labels.to(device_type))
                loss.backward()
                optimizer.step()
            # A collective call: every rank gets the statistics of the whole layers over all the data.
            results = tracker.add_saturations()
            if dist.get_rank() == 0:
                print(f"epoch {epoch}: loss {loss.item():.3f}, train saturation {results['average-train-sat']:.3f}, "
                      f"fc1 saw {results['train-samples_fc1']} samples (each counted once)")
    if dist.get_rank() == 0:
        print(f"mesh {mesh_shape[0]} x {mesh_shape[1]} (data x tensor); rank 0 wrote {args.savefile}.csv")


def _spawned(rank: int, mesh_shape: tuple, rendezvous: str, args: argparse.Namespace) -> None:
    world_size = mesh_shape[0] * mesh_shape[1]
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        train(mesh_shape, "cpu", args)
        dist.barrier()  # without it, gloo on torch 2.13 aborts at shutdown about one run in five
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two epochs on a subset, a few seconds")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--mesh", default="1x2", help="data x tensor parallel sizes, e.g. 2x2")
    parser.add_argument("--savefile", default="runs/tensor_parallel")
    args = parser.parse_args()
    mesh_shape = tuple(int(size) for size in args.mesh.lower().split("x"))

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
        use_cuda = torch.cuda.is_available()
        dist.init_process_group("nccl" if use_cuda else "gloo")
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        try:
            train(mesh_shape, "cuda" if use_cuda else "cpu", args)
            dist.barrier()
        finally:
            dist.destroy_process_group()
    else:  # started plainly: run the processes of the mesh here, with gloo on the CPU
        with tempfile.TemporaryDirectory() as folder:
            mp.spawn(_spawned, args=(mesh_shape, os.path.join(folder, "rendezvous"), args),
                     nprocs=mesh_shape[0] * mesh_shape[1])


if __name__ == "__main__":
    main()
