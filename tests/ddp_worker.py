"""One rank of the DDP tests (spawned by test_distributed.py).

gloo on CPU tensors, or NCCL with one GPU per rank; each rank trains on its shard of one
global batch and rank 0 saves the final parameters.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import fused3d

GLOBAL_BATCH = 4
STEPS = 2


def build(seed: int, backend: str, device: str = "cpu") -> fused3d.FusedModel:
    torch.manual_seed(seed)
    model = fused3d.FusedModel(3, 5, 3, 2, 1, 1, (5, 1, 1, 1), backend=backend)
    return model.double().to(device)


def global_batch(seed: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(GLOBAL_BATCH, 3, 3, 4, 5, generator=generator, dtype=torch.float64)
    target = torch.randn(GLOBAL_BATCH, 5, 3, 4, 5, generator=generator, dtype=torch.float64)
    return x.to(device), target.to(device)


def train(model, x, target) -> None:
    """SGD on MSE; with DDP the gradient is the mean over ranks, i.e. the global batch's."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(STEPS):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), target).backward()
        optimizer.step()


def run_rank(rank: int, world_size: int, init_method: str, out_dir: str, seed: int,
             backend: str, dist_backend: str) -> None:
    device = f"cuda:{rank}" if dist_backend == "nccl" else "cpu"
    if device != "cpu":
        torch.cuda.set_device(device)
    dist.init_process_group(dist_backend, init_method=init_method, rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        model = build(seed, backend, device)
        ddp = DistributedDataParallel(model, device_ids=None if device == "cpu" else [rank])
        x, target = global_batch(seed, device)
        shard = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
        train(ddp, x[shard], target[shard])
        if rank == 0:
            state = {k: v.cpu() for k, v in model.state_dict().items()}
            torch.save(state, os.path.join(out_dir, "ddp.pt"))
        # DDP's reducer must go while its process group is alive: destroyed afterwards (when
        # this frame unwinds) its destructor hung about one run in ten.
        del ddp
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    # A hung rank prints where it is stuck and exits instead of waiting forever.
    faulthandler.dump_traceback_later(150, exit=True)
    rank, world_size, init_method, out_dir, seed, backend, dist_backend = sys.argv[1:]
    run_rank(int(rank), int(world_size), init_method, out_dir, int(seed), backend, dist_backend)
