"""Two-process DDP fine-tune of a 2:4-prepared model on the gloo backend (CPU), run by
``test_sparsity_lifecycle.py`` as ``python ddp_sparse_worker.py OUT_DIR``. Each rank trains on its own data and
saves its final (squashed) state dict and the masks it saw after every step."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from trt_prune.sparsity.lifecycle import Sparsifier  # noqa: E402
from trt_prune.sparsity.pattern import holds_2of4  # noqa: E402


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 8 * 8, 16))


def worker(rank: int, world: int, out_dir: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = build()
        sparsifier = Sparsifier(layers=["3", "6"])
        sparsifier.prepare(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        gen = torch.Generator().manual_seed(100 + rank)  # every rank sees different data
        held = []
        for _ in range(4):
            x = torch.randn(4, 8, 8, 8, generator=gen)
            y = torch.randn(4, 16, generator=gen)
            loss = nn.functional.mse_loss(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            held.append(all(holds_2of4(model.get_submodule(p).weight.detach().numpy(), axis=1)
                            for p in ("3", "6")))
        sparsifier.squash(model)
        torch.save({"state": model.state_dict(), "held": held}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    out = sys.argv[1]
    port = sys.argv[2] if len(sys.argv) > 2 else "29531"
    mp.spawn(worker, args=(2, out, port), nprocs=2, join=True)
