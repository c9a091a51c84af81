"""One rank of the DDP test (spawned by test_distributed.py): gloo, CPU, two processes."""

from __future__ import annotations

import datetime
import faulthandler
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import fused3d


def build(seed: int, backend: str) -> fused3d.FusedModel:
    torch.manual_seed(seed)
    return fused3d.FusedModel(3, 5, 3, 2, 1, 1, (5, 1, 1, 1), backend=backend).double()


def global_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(4, 3, 3, 4, 5, generator=generator, dtype=torch.float64)
    target = torch.randn(4, 5, 3, 4, 5, generator=generator, dtype=torch.float64)
    return x, target


def run_rank(rank: int, world_size: int, init_method: str, out_dir: str, seed: int,
             backend: str) -> None:
    dist.init_process_group("gloo", init_method=init_method, rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        model = DistributedDataParallel(build(seed, backend))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        x, target = global_batch(seed)
        shard = slice(rank * 2, rank * 2 + 2)
        for _ in range(2):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x[shard]), target[shard])
            loss.backward()
            optimizer.step()
        if rank == 0:
            torch.save(model.module.state_dict(), os.path.join(out_dir, "ddp.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    # A hung rank prints where it is stuck and exits instead of waiting forever.
    faulthandler.dump_traceback_later(150, exit=True)
    rank, world_size, init_method, out_dir, seed, backend = sys.argv[1:]
    run_rank(int(rank), int(world_size), init_method, out_dir, int(seed), backend)
