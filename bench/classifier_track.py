"""The classifier track: Fashion-MNIST on a small ResNet, dense vs one-shot vs gradual(+distill) at equal steps.

A SmallResNet (``bench/fashion_mnist.py``) is trained from scratch for ``--dense-steps``; every row then starts
from that checkpoint and trains ``--steps`` more at the same learning rate and batch:

- ``dense``: no pruning (the control),
- ``oneshot``: L1 pruning to ``--target-macs`` of the MACs, then training,
- ``gradual``: :class:`trt_prune.pruning.gradual.ChannelPruner` (accumulated Taylor on BN γ/β) masking along the
  cubic schedule over the first 60 % of the steps,
- ``gradual+distill``: the same plus :func:`trt_prune.pruning.kl_logits` from the dense checkpoint (T = 4).

Top-1 on the 10,000 test images. Writes ``classifier_track.{json,md}`` (stamped) into ``--results``::

    python bench/classifier_track.py [--device cuda] [--dense-steps 1500] [--steps 1000] [--results bench/results]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fashion_mnist as fm  # noqa: E402

ROWS = ("dense", "oneshot", "gradual", "gradual+distill")
SHAPE = (1, 1, 28, 28)


def run(args) -> list[dict]:
    from trt_prune.pruning import count_params, kl_logits, macs_of, prune
    from trt_prune.pruning.gradual import ChannelPruner, Schedule

    torch.manual_seed(0)
    device = torch.device(args.device)
    train_loader, test_loader = fm.loaders(batch_size=args.batch, data_dir=args.data)
    base = fm.SmallResNet().to(device)
    started = time.perf_counter()
    fm.train(base, train_loader, args.dense_steps, lr=args.lr)
    base_top1 = fm.evaluate(base, test_loader)
    print(f"dense from scratch: {args.dense_steps} steps, top-1 {base_top1:.4f} "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    dense_macs = macs_of(base.cpu(), SHAPE)
    rows = []
    for method in ROWS:
        torch.manual_seed(1)
        model = copy.deepcopy(base).cpu()
        extra, after, pruner = None, None, None
        if method == "oneshot":
            model = prune(model, SHAPE, importance="l1", target_macs=args.target_macs, round_to=8).model
        elif method.startswith("gradual"):
            pruner = ChannelPruner(model, SHAPE, target_macs=args.target_macs,
                                   schedule=Schedule(steps=int(args.steps * 0.6)), round_to=8)
            model.to(device)
            pruner.prepare()
            teacher = copy.deepcopy(base).to(device).eval() if method.endswith("distill") else None

            def extra(m, images, labels, logits, teacher=teacher, pruner=pruner):
                loss = pruner.penalty()
                if teacher is not None:
                    with torch.no_grad():
                        reference = teacher(images)
                    loss = loss + kl_logits(logits, reference, temperature=4.0)
                return loss

            def after(step, pruner=pruner):
                pruner.step()
        model.to(device)
        t0 = time.perf_counter()
        stats = fm.train(model, train_loader, args.steps, lr=args.lr * args.finetune_lr_scale, extra_loss=extra,
                         after_step=after)
        if pruner is not None:
            pruner.squash()
        top1 = fm.evaluate(model, test_loader)
        model.cpu()
        row = {"method": method, "macs": macs_of(model, SHAPE) / dense_macs, "params": count_params(model),
               "top1": top1, "seconds": round(time.perf_counter() - t0, 1), "loss_last": stats["loss_last"]}
        rows.append(row)
        print(row, flush=True)
    return [{"method": "dense (checkpoint)", "macs": 1.0, "params": count_params(base), "top1": base_top1}] + rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dense-steps", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--finetune-lr-scale", type=float, default=0.4,
                        help="rows train from the checkpoint at this fraction of the from-scratch peak rate")
    parser.add_argument("--target-macs", type=float, default=0.5)
    parser.add_argument("--data", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", default="bench/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args)
    from trt_prune.provenance import write_result

    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    note = (f"Fashion-MNIST, SmallResNet trained from scratch for {args.dense_steps} steps (batch {args.batch}) on "
            f"{device}; each row then trains {args.steps} more steps from that checkpoint; top-1 on the 10,000 "
            f"test images; pruned rows target {args.target_macs:g} of the MACs.")
    lines = ["| method | MACs | params | top-1 | vs dense |", "|---|---|---|---|---|"]
    dense = next(r for r in rows if r["method"] == "dense")
    for r in rows:
        lines.append(f"| {r['method']} | {r['macs']:.3f} | {r['params'] / 1e3:.0f} k | {r['top1'] * 100:.2f} % | "
                     f"{(r['top1'] - dense['top1']) * 100:+.2f} pts |")
    write_result("classifier_track", {"rows": rows, "note": note, "args": vars(args)},
                 note + "\n\n" + "\n".join(lines) + "\n", results_dir=args.results)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
