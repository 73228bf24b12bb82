"""Saturation of a DistributedDataParallel model: one set of statistics across all processes.

Launch it with torchrun, one process per GPU (nccl) or per CPU share (gloo)::

    torchrun --nproc_per_node 2 examples/distributed.py

or plainly, ``python examples/distributed.py`` (``--quick`` for a run of a few
seconds), which starts two gloo processes on this machine itself. Each process
trains on its share of scikit-learn's digits (``DistributedSampler``). Create the
tracker after ``init_process_group``: ``add_saturations()`` then merges every
layer's statistics across the processes, every process gets the same results
(used here to stop all of them at the same epoch), and only rank 0 writes
``runs/distributed.csv``. Every process passes a ``dist.barrier()`` before
``destroy_process_group()``: without it gloo (torch 2.13) aborts at shutdown
about one run in five. FSDP and tensor parallelism: ``examples/tensor_parallel.py``.
"""
import argparse
import os
import tempfile
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from delve import SaturationTracker


def digits(quick: bool) -> tuple[TensorDataset, TensorDataset]:
    """Train and test sets of the 8x8 digits as 64 features in [0, 1]."""
    data = load_digits()
    features = torch.tensor(data.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    if quick:
        train, test = train[:400], test[:200]
    return TensorDataset(features[train], labels[train]), TensorDataset(features[test], labels[test])


def mlp() -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(64, 128),
            relu1=nn.ReLU(),
            fc2=nn.Linear(128, 64),
            relu2=nn.ReLU(),
            classifier=nn.Linear(64, 10),
        )
    )


def train(rank: int, world_size: int, device: torch.device, args: argparse.Namespace) -> None:
    """The training loop every process runs; the process group is already initialised."""
    train_set, test_set = digits(args.quick)
    train_sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=0)
    test_sampler = DistributedSampler(test_set, num_replicas=world_size, rank=rank, shuffle=False)
    train_loader = DataLoader(train_set, batch_size=32, sampler=train_sampler)
    test_loader = DataLoader(test_set, batch_size=256, sampler=test_sampler)

    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    model = DistributedDataParallel(mlp().to(device), device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    epochs = 2 if args.quick else args.epochs

    # Layer names are those of the wrapped model (fc1, fc2, classifier): DDP adds no prefix.
    with SaturationTracker(
        args.savefile, save_to="csv", modules=model, stats=["lsat", "idim"], average_sat=True, device=device
    ) as tracker:
        previous = None
        for epoch in range(epochs):
            train_sampler.set_epoch(epoch)
            model.train()
            for features, labels in train_loader:
                optimizer.zero_grad()
                loss = loss_fn(model(features.to(device)), labels.to(device))
                loss.backward()
                optimizer.step()

            model.eval()
            correct = torch.zeros(2, dtype=torch.float64, device=device)
            with torch.no_grad():
                for features, labels in test_loader:
                    predicted = model(features.to(device)).argmax(dim=1)
                    correct[0] += (predicted == labels.to(device)).sum()
                    correct[1] += len(labels)
            dist.all_reduce(correct)
            tracker.add_scalar("accuracy", (correct[0] / correct[1]).item())  # a no-op on ranks > 0

            # A collective call: the statistics of the data of every process, on every process.
            results = tracker.add_saturations()
            saturation = results["average-train-sat"]
            if rank == 0:
                print(f"epoch {epoch}: accuracy {(correct[0] / correct[1]).item():.3f}, "
                      f"train saturation {saturation:.3f}, eval saturation {results['average-eval-sat']:.3f}")

            gathered = [None] * world_size
            dist.all_gather_object(gathered, saturation)
            if len(set(gathered)) != 1:
                raise RuntimeError(f"the ranks disagree on the saturation: {gathered}")
            # Every rank takes the same decision, so all of them leave the loop together.
            if previous is not None and abs(saturation - previous) < args.min_change:
                if rank == 0:
                    print(f"saturation changed by less than {args.min_change}: stopping")
                break
            previous = saturation
    if rank == 0:
        print(f"{world_size} processes agreed on every statistic; rank 0 wrote {args.savefile}.csv")


def _spawned(rank: int, world_size: int, rendezvous: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        train(rank, world_size, torch.device("cpu"), args)
        dist.barrier()  # without it, gloo on torch 2.13 aborts at shutdown about one run in five
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two epochs on a subset, a few seconds")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--min-change", type=float, default=0.005, help="stop when saturation changes less")
    parser.add_argument("--nprocs", type=int, default=2, help="processes to start without torchrun")
    parser.add_argument("--savefile", default="runs/distributed")
    args = parser.parse_args()

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
        use_cuda = torch.cuda.is_available()
        dist.init_process_group("nccl" if use_cuda else "gloo")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        try:
            train(dist.get_rank(), dist.get_world_size(), device, args)
            dist.barrier()
        finally:
            dist.destroy_process_group()
    else:  # started plainly: run the processes here, with gloo on the CPU
        with tempfile.TemporaryDirectory() as folder:
            mp.spawn(_spawned, args=(args.nprocs, os.path.join(folder, "rendezvous"), args), nprocs=args.nprocs)


if __name__ == "__main__":
    main()
