"""Two-process DDP training with a ChannelPruner on the gloo backend (CPU), run by ``test_gradual.py`` as
``python ddp_channel_worker.py OUT_DIR PORT``. Each rank trains on its own data; it saves the plan after every
pruning step, the masked and the squashed model's outputs on one fixed input, and the squashed state dict."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from trt_prune.pruning.gradual import ChannelPruner, Schedule  # noqa: E402


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def worker(rank: int, world: int, out_dir: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = build()
        pruner = ChannelPruner(model, (1, 3, 16, 16), target_macs=0.4, schedule=Schedule(steps=6, every=2),
                               round_to=4, global_pruning=True, sparsity="group_lasso", sparsity_weight=1e-3)
        pruner.prepare()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        gen = torch.Generator().manual_seed(100 + rank)  # every rank sees different data
        plans = []
        for _ in range(8):
            x = torch.randn(8, 3, 16, 16, generator=gen)
            y = torch.randint(0, 10, (8,), generator=gen)
            loss = nn.functional.cross_entropy(ddp(x), y) + pruner.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if pruner.step() is not None:
                plans.append({k: list(v) for k, v in sorted(pruner.plan.items())})
        probe = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(7))
        model.eval()
        with torch.no_grad():
            masked = model(probe)
        result = pruner.squash()
        with torch.no_grad():
            squashed = model(probe)
        torch.save({"plans": plans, "masked": masked, "squashed": squashed, "state": model.state_dict(),
                    "recipe": result.recipe}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    out = sys.argv[1]
    port = sys.argv[2] if len(sys.argv) > 2 else "29541"
    mp.spawn(worker, args=(2, out, port), nprocs=2, join=True)
