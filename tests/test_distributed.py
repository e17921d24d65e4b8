"""DDP over the reversible executor: 2 processes on gloo, no find_unused_parameters."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import revengine as rev


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(seed=0):
    torch.manual_seed(seed)

    def block():
        return torch.nn.Sequential(torch.nn.Linear(6, 24), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(24, 6))

    layers = [rev.AdditiveCoupling(block(), block()) for _ in range(6)]
    return torch.nn.Sequential(rev.Sequential(*layers, mode="reversible"), torch.nn.Linear(12, 1)).double()


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 12, generator=g, dtype=torch.float64), torch.randn(8, 1, generator=g, dtype=torch.float64)


def _worker(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(build(), find_unused_parameters=False)
        x, t = data()
        shard = slice(rank * 4, (rank + 1) * 4)
        for step in range(2):  # two steps: the second exercises DDP's bucket rebuild
            torch.manual_seed(100 + rank)  # per-rank dropout stream, replayed in the recompute
            model.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x[shard]), t[shard])
            loss.backward()
        if rank == 0:
            torch.save([p.grad for p in model.module.parameters()], out_path)
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_single_process(tmp_path):
    out = tmp_path / "grads.pt"
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    ddp_grads = torch.load(out, weights_only=True)

    # Single process, whole batch: the same per-shard dropout streams, loss averaged like DDP.
    model = build()
    x, t = data()
    model.zero_grad()
    for rank in range(2):
        shard = slice(rank * 4, (rank + 1) * 4)
        torch.manual_seed(100 + rank)
        (torch.nn.functional.mse_loss(model(x[shard]), t[shard]) / 2).backward()
    for a, b in zip(ddp_grads, (p.grad for p in model.parameters())):
        assert float((a - b).abs().max() / b.abs().max()) <= 1e-10
