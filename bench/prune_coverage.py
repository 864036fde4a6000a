"""Pruning coverage and speed: our engine and Torch-Pruning side by side (and ours on ONNX imports), per model.

For each model and engine: 50% of the channels of every prunable group, L1 magnitude, counts rounded to 8, the
output layers left alone. Torch-Pruning gets them as ``ignored_layers`` the way its users (and its own torchvision
benchmark) pass them: every Linear/conv writing the 1000 classes, attention ``out_proj`` layers, a detector's
output convs. Ours gets no ignore list: it pins the channels that reach a model output by itself, and its
``ignore=`` means more than Torch-Pruning's (it freezes every channel group the module reads *or* writes, so
ignoring ``fc`` would also freeze ResNet's last residual group). Recorded per pair: whether
pruning succeeded (else the error, one line), whether the pruned model runs and keeps its output shapes, ONNX
export and ONNX Runtime parity with the pruned torch model (max abs), params and MACs ratios, seconds to analyse
and prune, and how many Conv/Linear layers were left with a changed output width that is not a multiple of 8.

MACs are counted the same way for both engines: ``torch_pruning.utils.count_ops_and_params`` on the dense and
the pruned model (module hooks: conv, linear, norms, activations, pooling; functional matmuls such as attention
are not counted). Seconds: Torch-Pruning's is building the pruner (its dependency graph) plus ``step()``,
which cut the model in place and verify nothing; ours on the same footing is ``prune(model, inplace=True,
check=False)`` (trace, plan, cut), and ``seconds_full`` is the default ``prune()`` call (a copy, then a run
checking the output shapes). All are timed ``--repeats`` times on fresh copies of the dense model (the first
default run's result is the one checked); the table shows the fastest,
because this 2-core machine is shared and single timings are noisy.

Every model/engine pair runs in its own subprocess under a wall-clock timeout and an address-space cap
(``RLIMIT_AS``), so a blow-up is recorded as a failure instead of taking the machine down.

Engine ``onnx`` (issue 18; not in the default ``--engines``, main table only: ``--engines onnx`` runs the 35
main-table models and skips ``TIMM_MORE``): the model as a user who has only its ONNX file would prune it. The
dense model (same seed and input) is exported with the TorchScript exporter at opset ``ONNX_OPSET`` (17) with the
static input shape; :func:`trt_prune.onnx_import.import_onnx` converts it back (body to torch, checked against
ONNX Runtime; the record keeps the convert max abs, seconds, body/tail node counts); our engine prunes the
converted body with the settings of ``ours`` and no ignore list (MACs counted on the converted body before and
the pruned one after, same counter; params×; ops kept whole); :func:`trt_prune.onnx_import.prune_onnx`
re-exports it at the source opset and stitches the tail back. Parity, the criterion of ours' ONNX column:
``prune_onnx``'s export check passes (every element ``|onnx - torch| <= 1e-4 + 1e-3 * |torch|``, pruned ONNX
body vs pruned torch module, seeded input) and ONNX Runtime runs the whole stitched graph with the dense model's
outputs and shapes; the record also keeps the max abs and, because random weights leave some outputs tiny
(MobileNetV3 logits ~1e-11, where any atol passes), ``rel``: max abs over the pruned torch output's largest
magnitude. A record has a part per stage (``export``, ``convert``, ``prune``, ``parity``) with ``ok``, seconds
and, on failure, the one-line error; the first stage that failed is listed under the table.

Usage:
    python bench/prune_coverage.py [--models resnet18,swin_t] [--engines ours,tp[,onnx]] [--timeout 600]
        [--mem-gib 12] [--repeats 3] [--json OUT.json] [--update]

``--json`` writes the records (after every pair) and, at the end, the table beside them as ``OUT.md``, both
stamped with commit, date and machine by ``trt_prune.provenance.write_result``. ``--update`` starts from the
records already in ``--json`` and replaces only the pairs run now (e.g. rerun ``--engines ours`` after adding
channel rules); the file's ``runs`` list keeps every run's command, commit and load average, and each record
its own 1-min load average at start (``load_avg``).

``TIMM_MORE``: twenty more timm families (efficient/linear attention, cross-covariance attention, metaformers,
GRN, re-parameterisable blocks, LeViT, EfficientFormer, MobileNetV4, …), in a table of their own. For ours the
records there also say what was kept whole (``kept_whole_ops``/``kept_whole_groups`` and their first lines: the
ops our engine could not prune through, and the groups left unpruned for a reason other than an output, the
input, or size) and ``coverage``: the fraction of the MACs that 50 % channel pruning removes on a fully prunable
net (MACs× 0.25) actually removed, (1 - MACs×) / 0.75 capped at 1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RATIO, ROUND_TO, IMPORTANCE = 0.5, 8, "l1"
ENGINES = ("ours", "tp")  # the default --engines, side by side in every table
ALL_ENGINES = (*ENGINES, "onnx")  # "onnx": ONNX-import column of the main table (see the module docstring)
ONNX_OPSET, ONNX_ATOL, ONNX_RTOL = 17, 1e-4, 1e-3
TIMING_MODELS = ("resnet50", "densenet121", "retinanet_resnet50_fpn")


# ----------------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Entry:
    """A benchmark model: how to build it, its input shape, and the module paths to leave unpruned."""

    family: str
    build: Callable
    shape: tuple[int, ...]
    ignore: Callable | None = None  # model -> module paths for Torch-Pruning; None: the classifier rule
    tp_fixup: Callable | None = None  # what a Torch-Pruning user runs after step()
    table: str = "main"  # which table of the markdown it goes in: "main" or "timm_more"


TORCHVISION = ("resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_large",
               "efficientnet_b0", "efficientnet_v2_s", "regnet_y_800mf", "convnext_tiny", "densenet121",
               "shufflenet_v2_x1_0", "mnasnet1_0", "squeezenet1_1", "vgg16_bn", "googlenet", "vit_b_16", "swin_t",
               "maxvit_t")
# ten CNN families: ResNet-D, CSP, Ghost, ReXNet, DLA, HRNet, MobileViT (hybrid), RepVGG, Res2Net, DPN
TIMM = {"resnet26d": 224, "cspdarknet53": 224, "ghostnet_100": 224, "rexnet_100": 224, "dla34": 224,
        "hrnet_w18_small": 224, "mobilevitv2_050": 256, "repvgg_a0": 224, "res2net50_26w_4s": 224, "dpn68": 224}
# twenty more timm families (attention variants, metaformers, re-parameterisable blocks, mobile hybrids), each at
# its default input size (timm 1.0.31 ``pretrained_cfg["input_size"]``): name -> (family, input side)
TIMM_MORE = {
    "efficientvit_b0": ("EfficientViT-MIT: ReLU linear attention", 224),
    "efficientvit_m0": ("EfficientViT-MSRA: cascaded group attention", 224),
    "xcit_nano_12_p16_224": ("XCiT: cross-covariance attention", 224),
    "poolformer_s12": ("PoolFormer: metaformer, pooling mixer", 224),
    "poolformerv2_s12": ("PoolFormerV2: metaformer, pooling, StarReLU, scales", 224),
    "caformer_s18": ("CAFormer: metaformer, sep-conv + attention", 224),
    "convnextv2_atto": ("ConvNeXt-V2: GRN", 224),
    "fastvit_t8": ("FastViT: RepMixer, re-parameterisable", 256),
    "mobileone_s0": ("MobileOne: re-parameterisable branches", 224),
    "repghostnet_050": ("RepGhost: re-parameterised ghost modules", 224),
    "levit_128s": ("LeViT: attention with BN linears, shrink attention", 224),
    "efficientformer_l1": ("EfficientFormer: 4D pool + 3D attention", 224),
    "efficientformerv2_s0": ("EfficientFormerV2: 4D attention, local conv", 224),
    "mobilenetv4_conv_small": ("MobileNetV4: universal inverted bottleneck", 224),
    "mobilenetv4_hybrid_medium": ("MobileNetV4 hybrid: mobile MQA", 256),
    "edgenext_xx_small": ("EdgeNeXt: split depth-wise + transposed attention", 256),
    "tiny_vit_5m_224": ("TinyViT: MBConv + window attention", 224),
    "repvit_m1": ("RepViT: re-parameterised MobileNet-style ViT blocks", 224),
    "inception_next_tiny": ("InceptionNeXt: split inception depth-wise conv", 224),
    "fasternet_t0": ("FasterNet: partial convolution (channel split)", 224),
}
TIMM_MORE_TARGET = 0.25  # MACs× that 50 % channel pruning gives on a fully prunable net (both widths halved)


def _torchvision(name: str):
    def build():
        import torchvision

        kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
        return torchvision.models.get_model(name, weights=None, **kwargs)
    return build


def _vit_fixup(model) -> None:
    # torchvision's ViT reshapes with its stored hidden_dim; Torch-Pruning's benchmark resets it after step()
    if hasattr(model, "hidden_dim") and hasattr(model, "conv_proj"):
        model.hidden_dim = model.conv_proj.out_channels


def _timm(name: str):
    def build():
        import timm

        return timm.create_model(name, pretrained=False)
    return build


def _core(name: str):
    def build():
        from trt_prune.models.cores import detection_core

        return detection_core(name)
    return build


def _core_ignore(name: str):
    from trt_prune.models.cores import CORES

    return lambda model: list(CORES[name].output_layers)


def _demo_detector():
    from trt_prune.models import load_model

    return load_model("builtin:demo-detector").model


def _demo_ignore(model) -> list[str]:
    return [f"head.{i}.{branch}.2" for i in range(len(model.head)) for branch in ("box", "cls")]


def _registry(more: bool = False) -> dict[str, Entry]:
    """The benchmark models: the 35 of the main table, and with ``more`` the ``TIMM_MORE`` twenty after them
    (off by default: other bench scripts, e.g. ``clean_vs_polygraphy.py``, iterate over the main 35)."""
    from trt_prune.models.cores import CORES

    models = {n: Entry("torchvision", _torchvision(n), (1, 3, 224, 224),
                       tp_fixup=_vit_fixup if n == "vit_b_16" else None) for n in TORCHVISION}
    for n, spec in CORES.items():
        models[n] = Entry("detector core", _core(n), (1, 3, spec.input_size, spec.input_size), _core_ignore(n))
    models["builtin:demo-detector"] = Entry("builtin", _demo_detector, (1, 3, 320, 320), _demo_ignore)
    for n, size in TIMM.items():
        models[f"timm:{n}"] = Entry("timm", _timm(n), (1, 3, size, size))
    for n, (family, size) in TIMM_MORE.items() if more else ():
        models[f"timm:{n}"] = Entry(family, _timm(n), (1, 3, size, size), table="timm_more")
    return models


def classifier_ignore(model, num_classes: int = 1000) -> list[str]:
    """What Torch-Pruning users leave alone in a classifier: layers writing ``num_classes`` outputs (a Linear, or
    a 1x1 conv in SqueezeNet and DPN) and attention output projections."""
    from torch import nn

    paths = []
    for path, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.out_features == num_classes:
            paths.append(path)
        elif isinstance(m, nn.Conv2d) and m.out_channels == num_classes:
            paths.append(path)
        elif isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear):
            paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------------
# one pair, in a worker process
# ----------------------------------------------------------------------------------------------------------

def _one_line(exc: BaseException, limit: int = 300) -> str:
    from trt_prune.onnx_io import one_line

    return one_line(exc, limit, with_type=True)


def _flat_shapes(out) -> list[list[int]]:
    import torch

    if isinstance(out, torch.Tensor):
        return [list(out.shape)]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [s for o in out for s in _flat_shapes(o)]
    return []


def _flat_tensors(out) -> list:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat_tensors(o)]
    return []


def _widths(model) -> dict[str, int]:
    from torch import nn

    out = {}
    for path, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[path] = m.out_channels
        elif isinstance(m, nn.Linear):
            out[path] = m.out_features
    return out


def _count(model, example) -> tuple[int | None, str | None]:
    import torch_pruning as tp

    try:
        macs, _ = tp.utils.count_ops_and_params(model, example)
        return int(macs), None
    except Exception as exc:  # a counting failure must not hide the pruning result
        return None, _one_line(exc)


def _prune_ours(model, entry: Entry, record: dict, repeats: int):
    import copy

    from trt_prune.pruning import prune

    # on Torch-Pruning's footing: cut the given model in place, no verification run (its step() has neither)
    times = []
    for _ in range(repeats):
        spare = copy.deepcopy(model)
        started = time.perf_counter()
        prune(spare, entry.shape, ratio=RATIO, round_to=ROUND_TO, importance=IMPORTANCE, inplace=True, check=False)
        times.append(round(time.perf_counter() - started, 3))
        del spare
    # and the default call users make: a copy of the model, then a check that the pruned copy runs
    full = []
    for _ in range(repeats):  # prune() leaves the model alone: every repeat starts from the dense one
        started = time.perf_counter()
        res = prune(model, entry.shape, ratio=RATIO, round_to=ROUND_TO, importance=IMPORTANCE)
        full.append(round(time.perf_counter() - started, 3))
        if len(full) == 1:
            first = res
    record.update(seconds=min(times), seconds_runs=times, seconds_full=min(full), seconds_full_runs=full)
    res = first
    rep = res.report
    record["ours_graph_macs"] = [rep.get("macs_before"), rep.get("macs_after")]
    record["groups"] = {"total": rep.get("groups_total"), "pruned": rep.get("groups_pruned"),
                        "skipped": len(rep.get("skipped_groups", []))}
    record.update(kept_whole_summary(rep))
    return res.model


def where_it_fails(model, entry: Entry, example) -> dict | None:
    """When our pruned model no longer runs: cut a copy without the check, run it, and name the innermost module
    whose ``forward`` raised (path, class, source line), i.e. the module that computes a size the cut broke."""
    import linecache

    import torch
    from torch import nn

    from trt_prune.pruning import prune

    try:
        pruned = prune(model, entry.shape, ratio=RATIO, round_to=ROUND_TO, importance=IMPORTANCE, check=False).model
    except Exception as exc:  # a diagnosis must not replace the recorded error
        return {"error": _one_line(exc)}
    paths = {id(m): p for p, m in pruned.named_modules()}
    try:
        with torch.no_grad():
            pruned(example)
        return None
    except Exception as exc:  # the failure being diagnosed
        found, tb = None, exc.__traceback__
        while tb is not None:
            owner = tb.tb_frame.f_locals.get("self")
            if isinstance(owner, nn.Module) and paths.get(id(owner)):
                code = tb.tb_frame.f_code
                found = {"module": paths[id(owner)],
                         "type": f"{type(owner).__module__}.{type(owner).__qualname__}",
                         "line": f"{Path(code.co_filename).name}:{tb.tb_lineno}: "
                                 f"{linecache.getline(code.co_filename, tb.tb_lineno).strip()}"}
            tb = tb.tb_next
        return {**(found or {}), "error": _one_line(exc, 200)}


#: skipped-group reasons that are not "kept whole": what any pruner leaves alone by design
_BY_DESIGN = (("output", lambda r: r == "coupled to a model output"),
              ("input", lambda r: r == "input channels"),
              ("small", lambda r: "not above round_to" in r),
              ("ignored", lambda r: r.startswith("read or written by ignored module")))


def _reason_kind(reason: str) -> str:
    return next((kind for kind, match in _BY_DESIGN if match(reason)), "kept_whole")


def kept_whole_summary(report: dict, first: int = 8) -> dict:
    """What our engine kept whole, from its report: the ops it could not prune through (``kept_whole``: module,
    op, reason) and the channel groups left unpruned for any reason other than the by-design ones (coupled to a
    model output, input channels, too small to round, ignored). A group's reason joins every reason its channels
    were pinned for (``; ``); it counts as kept whole when one of them is not by design."""
    ops = report.get("kept_whole") or []
    by_kind: dict[str, int] = {}
    whole = []
    for g in report.get("skipped_groups") or []:
        kinds = {_reason_kind(r) for r in g["reason"].split("; ")}
        kind = "kept_whole" if "kept_whole" in kinds else sorted(kinds)[0]
        by_kind[kind] = by_kind.get(kind, 0) + 1
        if kind == "kept_whole":
            whole.append(g)
    return {
        "kept_whole_ops": len(ops),
        "kept_whole_op_lines": [" ".join(f"{k['op']} in '{k['module']}': {k['reason']}".split())[:300]
                                for k in ops[:first]],
        "kept_whole_groups": len(whole),
        "kept_whole_group_lines": [" ".join(f"{g['key']}: {g['reason']}".split())[:300] for g in whole[:first]],
        "skipped_by_kind": by_kind,
    }


def coverage(macs_ratio: float | None, target: float = TIMM_MORE_TARGET) -> float | None:
    """Fraction of the MACs that 50 % channel pruning removes on a fully prunable net (1 - ``target``) that were
    actually removed: (1 - MACs×) / (1 - target), capped at 1."""
    if macs_ratio is None:
        return None
    return max(0.0, min(1.0, (1.0 - macs_ratio) / (1.0 - target)))


def _tp_once(model, entry: Entry, ignore: list[str], example, record: dict) -> tuple[float, float]:
    import torch_pruning as tp

    modules = dict(model.named_modules())
    ignored = [modules[p] for p in ignore]
    started = time.perf_counter()
    record["phase"] = "graph"
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=RATIO, round_to=ROUND_TO, ignored_layers=ignored)
    graph_s = time.perf_counter() - started
    record["phase"] = "step"
    pruner.step()
    del record["phase"]
    total = time.perf_counter() - started
    if entry.tp_fixup is not None:
        entry.tp_fixup(model)
    return round(total, 3), round(graph_s, 3)


def _prune_tp(model, entry: Entry, ignore: list[str], example, record: dict, repeats: int):
    import copy

    spares = [copy.deepcopy(model) for _ in range(repeats - 1)]  # Torch-Pruning cuts in place
    runs = [_tp_once(model, entry, ignore, example, record)]
    for spare in spares:
        runs.append(_tp_once(spare, entry, ignore, example, {}))
        del spare
    best = min(runs)
    record.update(seconds=best[0], seconds_runs=[r[0] for r in runs],
                  seconds_detail={"graph": best[1], "step": round(best[0] - best[1], 3)})
    return model


def _onnx_fail(part: dict, exc: BaseException, started: float) -> None:
    part.update(ok=False, error=_one_line(exc), error_type=type(exc).__name__,
                seconds=round(time.perf_counter() - started, 2))


def run_onnx(name: str, record: dict, save: Callable[[], None]) -> None:
    """Worker body of engine "onnx" (main table only): export the dense model with the TorchScript exporter at
    opset ``ONNX_OPSET`` (static input shape), convert it back with :func:`trt_prune.onnx_import.import_onnx`,
    prune the converted body with our engine (same settings as "ours", no ignore list), and re-export it with
    the tail stitched back by :func:`trt_prune.onnx_import.prune_onnx`, whose check is the parity verdict.
    ``record`` gets a part per stage (``export``, ``convert``, ``prune``, ``parity``) and is saved after each."""
    import torch

    from trt_prune.exporter import export_onnx
    from trt_prune.onnx_import import import_onnx, prune_onnx
    from trt_prune.pruning import prune

    entry = _registry(more=True)[name]
    if entry.table != "main":
        record.update(stage="done", error=f"engine onnx covers the main table only; {name} is in {entry.table}")
        save()
        return
    torch.manual_seed(0)
    model = entry.build().eval()
    example = torch.rand(entry.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense_shapes = _flat_shapes(model(example))
    n_out = len(dense_shapes)
    names = ["output"] if n_out == 1 else [f"output{i}" for i in range(n_out)]
    record.update(family=entry.family, input_shape=list(entry.shape), output_shapes=dense_shapes,
                  params_dense=sum(p.numel() for p in model.parameters()), stage="export")
    save()

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "source.onnx"
        part = record["export"] = {"exporter": "torchscript", "opset": ONNX_OPSET}
        started = time.perf_counter()
        try:
            export_onnx(model, src, entry.shape, exporter="torchscript", opset=ONNX_OPSET, dynamic_batch=False,
                        output_names=names, check_parity=False)
            import onnx

            part.update(ok=True, nodes=len(onnx.load(str(src), load_external_data=False).graph.node),
                        seconds=round(time.perf_counter() - started, 2))
        except Exception as exc:
            _onnx_fail(part, exc, started)
            record["stage"] = "done"
            save()
            return
        del model
        record["stage"] = "convert"
        save()

        part = record["convert"] = {}
        started = time.perf_counter()
        try:
            imported = import_onnx(src, entry.shape)
        except Exception as exc:
            _onnx_fail(part, exc, started)
            record["stage"] = "done"
            save()
            return
        summary = imported.summary()
        part.update(ok=True, max_abs=max(imported.parity.values(), default=None),
                    seconds=round(time.perf_counter() - started, 2),
                    seconds_detail={k: round(v, 2) for k, v in imported.seconds.items()},
                    body_nodes=summary["body_nodes"], tail_nodes=summary["tail_nodes"],
                    tail_ops=summary["tail_ops"], own_converters=imported.own_converters,
                    fixed_modules=len(imported.fixed))
        record["stage"] = "prune"
        save()

        body = imported.module.eval()
        part = record["prune"] = {}
        params_before = sum(p.numel() for p in body.parameters())
        macs_before, macs_error = _count(body, example)
        part.update(params_before=params_before, macs_before=macs_before)
        started = time.perf_counter()
        try:
            res = prune(body, entry.shape, ratio=RATIO, round_to=ROUND_TO, importance=IMPORTANCE)
        except Exception as exc:
            _onnx_fail(part, exc, started)
            record["stage"] = "done"
            save()
            return
        part["seconds"] = round(time.perf_counter() - started, 2)
        pruned = res.model.eval()
        rep = res.report
        part.update(ok=True, params_after=sum(p.numel() for p in pruned.parameters()),
                    ours_graph_macs=[rep.get("macs_before"), rep.get("macs_after")],
                    groups={"total": rep.get("groups_total"), "pruned": rep.get("groups_pruned"),
                            "skipped": len(rep.get("skipped_groups", []))},
                    kept_whole=len(rep.get("kept_whole") or []), **kept_whole_summary(rep))
        part["params_ratio"] = part["params_after"] / params_before
        macs_after, err = _count(pruned, example)
        if macs_before and macs_after is not None:
            part.update(macs_after=macs_after, macs_ratio=macs_after / macs_before)
        elif macs_error or err:
            part["macs_error"] = macs_error or err
        try:
            with torch.no_grad():
                out = pruned(example)
            # random weights can make outputs tiny or huge: the scale says what a max abs means
            part["output_absmax"] = max((float(t.abs().max()) for t in _flat_tensors(out)), default=None)
        except Exception as exc:  # prune() checked it runs; a failure here is recorded, not fatal
            part["forward_error"] = _one_line(exc)
        record["stage"] = "parity"
        save()

        part = record["parity"] = {"atol": ONNX_ATOL, "rtol": ONNX_RTOL}
        started = time.perf_counter()
        try:
            written, parity, outputs = prune_onnx(imported, pruned, Path(tmp) / "pruned.onnx", atol=ONNX_ATOL,
                                                  rtol=ONNX_RTOL)
        except Exception as exc:
            _onnx_fail(part, exc, started)
            record["stage"] = "done"
            save()
            return
        part.update(ok=True, max_abs=max(parity.values(), default=None), outputs=outputs,
                    seconds=round(time.perf_counter() - started, 2))
        scale = record["prune"].get("output_absmax")
        if scale and part["max_abs"] is not None:
            part["rel"] = part["max_abs"] / scale
        try:  # the whole pruned graph, tail included, keeps the dense model's outputs and their shapes
            from trt_prune.onnx_io import run_onnxruntime

            got = run_onnxruntime(written, {imported.input_name: example.numpy()})
            part["shapes_unchanged"] = outputs == names and [list(got[n].shape) for n in outputs] == dense_shapes
        except Exception as exc:
            part.update(shapes_unchanged=False, shapes_error=_one_line(exc))
    record["stage"] = "done"
    save()


def run_pair(name: str, engine: str, result_path: Path, mem_gib: float, repeats: int = 1) -> None:
    """Worker: prune ``name`` with ``engine``, writing ``result_path`` after every stage (a timeout keeps what
    was reached)."""
    cap = int(mem_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    record: dict = {"model": name, "engine": engine, "stage": "build"}

    def save():
        result_path.write_text(json.dumps(record, indent=1))

    save()
    if engine == "onnx":
        run_onnx(name, record, save)
        return
    import torch

    torch.manual_seed(0)
    entry = _registry(more=True)[name]
    model = entry.build().eval()
    ignore = [] if engine == "ours" else entry.ignore(model) if entry.ignore else classifier_ignore(model)
    example = torch.rand(entry.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense_shapes = _flat_shapes(model(example))
    widths = _widths(model)
    params_before = sum(p.numel() for p in model.parameters())
    macs_before, macs_error = _count(model, example)
    record.update(family=entry.family, input_shape=list(entry.shape), ignored=ignore, output_shapes=dense_shapes,
                  params_before=params_before, macs_before=macs_before, stage="prune")
    save()

    try:
        pruned = _prune_ours(model, entry, record, repeats) if engine == "ours" else \
            _prune_tp(model, entry, ignore, example, record, repeats)
    except Exception as exc:
        where = f"TP {record.pop('phase')}: " if "phase" in record else ""
        record.update(stage="done", pruned=False, error=where + _one_line(exc), error_type=type(exc).__name__)
        if engine == "ours" and "no longer runs" in str(exc):
            record["stage"] = "diagnose"
            save()
            record["failed_in"] = where_it_fails(model, entry, example)
            record["stage"] = "done"
        save()
        return
    record.update(pruned=True, stage="forward")
    record["params_after"] = sum(p.numel() for p in pruned.parameters())
    record["params_ratio"] = record["params_after"] / params_before
    after = _widths(pruned)
    odd = sorted(p for p, w in after.items() if p in widths and w != widths[p] and w % ROUND_TO)
    record["unaligned"] = len(odd)
    record["unaligned_examples"] = [f"{p}: {widths[p]}->{after[p]}" for p in odd[:5]]
    save()

    pruned.eval()
    try:
        with torch.no_grad():
            out = pruned(example)
        shapes = _flat_shapes(out)
        record["forward"] = True
        # random weights can make outputs tiny: the scale says how much a small max_abs means
        record["output_absmax"] = max((float(t.abs().max()) for t in _flat_tensors(out)), default=None)
        record["shapes_unchanged"] = shapes == dense_shapes
        if shapes != dense_shapes:
            record["shapes_after"] = shapes
    except Exception as exc:
        record.update(stage="done", forward=False, error=f"forward: {_one_line(exc)}")
        save()
        return
    macs_after, err = _count(pruned, example)
    if macs_before and macs_after is not None:
        record["macs_after"] = macs_after
        record["macs_ratio"] = macs_after / macs_before
        if entry.table == "timm_more":
            record["coverage"] = coverage(record["macs_ratio"])
    elif macs_error or err:
        record["macs_error"] = macs_error or err
    record["stage"] = "onnx"
    save()

    from trt_prune.exporter import export_onnx

    n_out = len(dense_shapes)
    names = ["output"] if n_out == 1 else [f"output{i}" for i in range(n_out)]
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        try:
            res = export_onnx(pruned, Path(tmp) / "model.onnx", entry.shape, exporter="dynamo",
                              output_names=names, check_parity=True)
            record["onnx"] = {"ok": True, "exporter": res.exporter,
                              "max_abs": max(v["max_abs"] for v in res.parity.values()),
                              "max_rel": max(v["max_rel"] for v in res.parity.values()),
                              "fallback_reason": res.fallback_reason}
        except Exception as exc:
            record["onnx"] = {"ok": False, "error": _one_line(exc)}
        record["onnx"]["seconds"] = round(time.perf_counter() - started, 1)
    record["stage"] = "done"
    save()


# ----------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------

def spawn_worker(cmd: list[str], base: dict, timeout: float, tmp: Path, tail_chars: int = 200) -> dict:
    """Run ``cmd`` (a worker writing its record to ``tmp/result.json`` after every stage) in its own process
    group under ``timeout``; return its record, or ``base`` with ``stage`` "start", plus ``wall_s`` and, unless
    the worker reached stage "done", an ``error`` saying how it ended (timeout, signal, exit code, last log
    line)."""
    result_path, log_path = tmp / "result.json", tmp / "log.txt"
    result_path.unlink(missing_ok=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker's own process group: it and its children only
            proc.wait()
            rc = None
    wall = round(time.perf_counter() - started, 1)
    try:
        record = json.loads(result_path.read_text())
    except (OSError, json.JSONDecodeError):
        record = {**base, "stage": "start"}
    record["wall_s"] = wall
    if record.get("stage") != "done":
        tail = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()][-1:]
        if rc is None:
            why = f"timeout after {timeout:.0f} s during {record['stage']}"
        elif rc < 0:
            why = f"killed by signal {-rc} during {record['stage']}"
        else:
            why = f"worker exited {rc} during {record['stage']}"
        record["error"] = why + (f" ({' '.join(tail[0].split())[:tail_chars]})" if tail else "")
    return record


def _spawn(name: str, engine: str, timeout: float, mem_gib: float, repeats: int, tmp: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, engine, str(tmp / "result.json"),
           "--mem-gib", str(mem_gib), "--repeats", str(repeats)]
    record = spawn_worker(cmd, {"model": name, "engine": engine}, timeout, tmp)
    if "error" in record and record["stage"] in ("build", "prune", "start"):
        record["pruned"] = False
    return record


def green(r: dict | None) -> bool:
    """Pruned, runs, same output shapes, and ONNX export matches torch."""
    return bool(r and r.get("pruned") and r.get("forward") and r.get("shapes_unchanged")
                and (r.get("onnx") or {}).get("ok"))


def _status(r: dict | None) -> str:
    if r is None:
        return "—"
    if green(r):
        return f"ok (onnx {r['onnx']['max_abs']:.1e})"
    if not r.get("pruned"):
        why = r.get("error", "failed")
    elif not r.get("forward"):
        why = r.get("error", "forward failed")
    elif not r.get("shapes_unchanged"):
        why = f"output shapes changed {r.get('output_shapes')} -> {r.get('shapes_after')}"
    elif r.get("onnx") and not r["onnx"].get("ok"):
        why = "onnx: " + r["onnx"]["error"]
    else:
        why = r.get("error", f"stopped at {r.get('stage')}")
    why = why.replace("|", "/").replace("\n", " ")
    return "✗ " + (why if len(why) <= 110 else why[:107] + "...")


ONNX_STAGES = ("export", "convert", "prune", "parity")


def onnx_marks(r: dict | None) -> dict[str, bool]:
    """Engine "onnx": which of convert (export and import both), prune and parity a record passed. Parity: the
    pruned ONNX graph, tail stitched back, matches the pruned torch module (``prune_onnx``'s check, elementwise
    ``|onnx - torch| <= ONNX_ATOL + ONNX_RTOL * |torch|``, the check behind ours' ONNX column) and ONNX Runtime
    gives the dense model's outputs with their shapes."""
    r = r or {}
    ok = {stage: bool((r.get(stage) or {}).get("ok")) for stage in ONNX_STAGES}
    convert = ok["export"] and ok["convert"]
    prune = convert and ok["prune"]
    return {"convert": convert, "prune": prune,
            "parity": prune and ok["parity"] and bool(r["parity"].get("shapes_unchanged"))}


def onnx_failure(r: dict | None) -> str | None:
    """Where and why an "onnx" record stopped, one line (``None`` when all its stages passed)."""
    if r is None or onnx_marks(r)["parity"]:
        return None
    for stage in ONNX_STAGES:
        part = r.get(stage)
        if part is None:
            break
        if not part.get("ok"):
            return f"{stage}: {part.get('error', 'failed')}"
    if (r.get("parity") or {}).get("ok"):
        part = r["parity"]
        return "parity: " + part.get("shapes_error", f"pruned graph outputs {part.get('outputs')} differ from the "
                                                     f"dense {r.get('output_shapes')}")
    return r.get("error") or f"stopped at {r.get('stage')}"


def _onnx_cell(r: dict | None) -> str:
    if r is None:
        return "—"
    marks = onnx_marks(r)
    cell = " / ".join("✓" if marks[k] else "✗" for k in ("convert", "prune", "parity"))
    if not marks["parity"]:
        stage = next((s for s in ONNX_STAGES if not (r.get(s) or {}).get("ok")), "parity")
        cell += f" ({stage})"
    return cell


def _onnx_status(r: dict) -> str:
    why = onnx_failure(r)
    return f"{_onnx_cell(r)}" + (f": {why[:150]}" if why else
                                 f" (MACs× {_num((r.get('prune') or {}).get('macs_ratio'), '.2f')}, max abs "
                                 f"{_num((r.get('parity') or {}).get('max_abs'), '.1e')})")


def onnx_summary(results: dict) -> str:
    """The ONNX-import line under the main table: how many of the models with an "onnx" record convert, prune
    and keep parity."""
    rows = [per["onnx"] for per in results.values() if "onnx" in per]
    n = len(rows)
    marks = [onnx_marks(r) for r in rows]
    kept = [r["parity"] for r, m in zip(rows, marks, strict=True) if m["parity"]]
    worst = max((p.get("max_abs") for p in kept if p.get("max_abs") is not None), default=None)
    worst_rel = max((p["rel"] for p in kept if p.get("rel") is not None), default=None)
    return (f"ONNX import: {sum(m['convert'] for m in marks)}/{n} convert, {sum(m['prune'] for m in marks)}/{n} "
            f"prune, {sum(m['parity'] for m in marks)}/{n} keep parity (pruned ONNX vs pruned torch within "
            f"{ONNX_ATOL:g} + {ONNX_RTOL:g}·|torch| elementwise, outputs and shapes kept; worst max abs "
            f"{_num(worst, '.1e')}, worst max abs / output scale {_num(worst_rel, '.1e')}).")


def _num(v, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def environment(provenance: bool = True) -> dict:
    """Machine, package versions and load average; with ``provenance`` also ``commit`` and ``date``, for callers
    that still stamp by hand (results written through ``write_result`` get both from its stamp)."""
    from importlib import metadata

    from trt_prune.profiling.profile import machine_info

    info = machine_info()
    versions = {}
    for dist in ("torch", "torchvision", "timm", "torch-pruning", "onnx", "onnxruntime", "onnxscript"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    env = {**info, "versions": versions, "load_avg": os.getloadavg()}
    if provenance:
        from _common import commit

        env.update(commit=commit(), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    return env


def table_of(name: str) -> str:
    """The markdown table a result row goes in: "timm_more" for the twenty extra timm families, else "main"."""
    return "timm_more" if name.startswith("timm:") and name[5:] in TIMM_MORE else "main"


def _run_line(i: int, run: dict) -> str:
    env = run.get("environment") or {}
    prov = run.get("provenance") or {}
    load = env.get("load_avg") or [None]
    when = prov.get("date") or env.get("date") or "?"
    commit = prov.get("commit") or env.get("commit") or "?"
    n = len(run.get("models") or [])
    engines = ",".join(run.get("engines") or ENGINES)
    return (f"run {i}: {when}, commit {commit}, load average at start {_num(load[0], '.1f')}, {n} models x "
            f"{engines}: `{run.get('command', '?')}`")


def _loads(rows: list[dict]) -> str:
    loads = [r["load_avg"][0] for r in rows if r and r.get("load_avg")]
    return f"{min(loads):.1f}–{max(loads):.1f}" if loads else "—"


def _kept(r: dict | None) -> str:
    if not r or "kept_whole_ops" not in r:
        return "—"
    return f"{r['kept_whole_ops']} op / {r['kept_whole_groups']} gr"


def markdown(results: dict, env: dict, args_line: str, runs: list[dict] | None = None) -> str:
    v = env["versions"]
    runs = runs or [{"command": args_line, "environment": env, "models": list(results)}]
    lines = [
        "# Pruning coverage: trt_prune vs Torch-Pruning",
        "",
        f"Machine: {env['cpu']}, {env['cpu_count']} cores ({env['usable_cores']} usable), {env['platform']}. "
        f"Python {env['python']}, torch {v['torch']}, "
        f"torchvision {v['torchvision']}, timm {v['timm']}, torch-pruning {v['torch-pruning']}, onnx {v['onnx']}, "
        f"onnxruntime {v['onnxruntime']}.",
        "",
        "Runs (the rows of a model/engine pair come from the last run that included it; `--update` keeps the "
        "others): " + "; ".join(_run_line(i + 1, r) for i, r in enumerate(runs)) + ".",
        "",
        f"Settings: ratio {RATIO}, L1, round_to {ROUND_TO}, random weights; output layers left alone (TP: "
        "ignored_layers = classifier / detector output convs / attention out_proj; ours: pins output channels "
        "itself, no ignore list). "
        "MACs× and params× are pruned/dense, MACs counted with torch_pruning.utils.count_ops_and_params for both "
        "engines (module hooks: functional matmuls such as attention scores are not counted). s: seconds to "
        "analyse + prune in place, fastest of the repeats (ours: prune(inplace=True, "
        "check=False); TP: pruner construction + step(), which also cut in place and check nothing); s full: "
        "ours as users call it, prune() on a copy plus a run of the pruned model that checks its output shapes. "
        "Seconds were measured on a shared 2-core machine while other work ran on it: compare them within a run. "
        "ok = pruned, runs, same output shapes, ONNX Runtime matches the pruned torch model (max abs shown). "
        "unaligned: Conv/Linear layers whose output width changed to a non-multiple of 8 (ours/TP). "
        f"ONNX in (engine onnx): the dense model exported with the TorchScript exporter at opset {ONNX_OPSET}, "
        "static shape, then ✓/✗ for convert (trt_prune.onnx_import.import_onnx: body converted to torch, "
        "matching ONNX Runtime), prune (ours on the converted body, same settings, no ignore list) and parity "
        "(prune_onnx: pruned body re-exported at the source opset, tail stitched back, ONNX Runtime within "
        f"{ONNX_ATOL:g} + {ONNX_RTOL:g}·|torch| elementwise of the pruned torch module, same outputs and shapes); "
        "the stage that failed in brackets. Its MACs× is the pruned over the converted body, same counter; "
        "max abs: pruned ONNX vs pruned torch (the JSON also has it over the output scale, `parity.rel`).",
        "",
        "| model | ours | params× | MACs× | s | s full | TP | params× | MACs× | s | unaligned "
        "| ONNX in: convert / prune / parity | MACs× | max abs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    main_rows = {n: per for n, per in results.items() if table_of(n) == "main"}
    more_rows = {n: per for n, per in results.items() if table_of(n) == "timm_more"}
    for name, per in main_rows.items():
        o, t = per.get("ours"), per.get("tp")
        cells = [name]
        for r in (o, t):
            cells += [_status(r), _num((r or {}).get("params_ratio"), ".2f"),
                      _num((r or {}).get("macs_ratio"), ".2f"), _num((r or {}).get("seconds"), ".2f")]
            if r is o:
                cells.append(_num((r or {}).get("seconds_full"), ".2f"))
        cells.append("/".join(_num((r or {}).get("unaligned"), "d") for r in (o, t)))
        x = per.get("onnx")
        cells += [_onnx_cell(x), _num(((x or {}).get("prune") or {}).get("macs_ratio"), ".2f"),
                  _num(((x or {}).get("parity") or {}).get("max_abs"), ".1e")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", summary(main_rows)]
    if any("onnx" in per for per in main_rows.values()):
        lines += ["", onnx_summary(main_rows)]
        fails = [f"- {name}: {why}".replace("|", "/") for name, per in main_rows.items()
                 if (why := onnx_failure(per.get("onnx")))]
        if fails:
            lines += ["", "Where ONNX import stops (stage: error):", "", *fails]
    if more_rows:
        rows = [r for per in more_rows.values() for r in per.values()]
        lines += [
            "",
            "## Twenty more timm families",
            "",
            "Same settings and columns, each model at its default timm input size (input shape in the JSON); TP "
            "ignores the classifier layers (every Linear/conv writing 1000 classes, distillation heads included) as "
            "in the table above. 1-min load average at the start of each pair: " + _loads(rows) + ". "
            "kept whole (ours): `ops / gr` = ops our engine could not prune through and so kept the channels they "
            "read whole (report `kept_whole`), / channel groups left unpruned for a reason other than the by-design "
            "ones (coupled to a model output, input channels, too small to round, ignored), i.e. kept whole by "
            "those ops or by fixed slices/concats (report `skipped_groups`); the JSON records list them "
            "(`kept_whole_op_lines`, `kept_whole_group_lines`, `skipped_by_kind`). coverage (ours): fraction of "
            f"MACs actually removed toward the 50 %-channel target, (1 − MACs×) / (1 − {TIMM_MORE_TARGET}) capped at "
            f"1, where MACs× {TIMM_MORE_TARGET} is what halving every width gives on a fully prunable net "
            "(conv/linear MACs scale with input × output channels); module-hook MACs, so attention matmuls are not "
            "in either side. Why ours stops or keeps channels whole on these models, with minimal reproductions: "
            "`prune_coverage_timm_more_notes.md` beside this file.",
            "",
            "| model | family | ours | params× | MACs× | s | s full | kept whole | coverage | TP | params× | MACs× | s "
            "| unaligned |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, per in more_rows.items():
            o, t = per.get("ours"), per.get("tp")
            family = (o or t or {}).get("family") or TIMM_MORE.get(name[5:], ("",))[0]
            cells = [name, family.replace("|", "/"), _status(o), _num((o or {}).get("params_ratio"), ".2f"),
                     _num((o or {}).get("macs_ratio"), ".2f"), _num((o or {}).get("seconds"), ".2f"),
                     _num((o or {}).get("seconds_full"), ".2f"), _kept(o),
                     _num(coverage((o or {}).get("macs_ratio")), ".2f"),
                     _status(t), _num((t or {}).get("params_ratio"), ".2f"), _num((t or {}).get("macs_ratio"), ".2f"),
                     _num((t or {}).get("seconds"), ".2f"),
                     "/".join(_num((r or {}).get("unaligned"), "d") for r in (o, t))]
            lines.append("| " + " | ".join(cells) + " |")
        stops = []
        for name, per in more_rows.items():
            o = per.get("ours") or {}
            if green(o):
                continue
            f = o.get("failed_in") or {}
            if f.get("module"):
                stops.append(f"- {name}: the pruned model fails in `{f['module']}` ({f['type']}), "
                             f"`{f['line']}`: {f.get('error', '')}".replace("|", "/"))
            elif o.get("error"):
                stops.append(f"- {name}: {o['error']}".replace("|", "/"))
        big = []
        for name, per in more_rows.items():
            for engine, r in per.items():
                if (r.get("output_absmax") or 0) > 1e3:
                    onnx = r.get("onnx") or {}
                    parity = (f"ONNX max abs {onnx['max_abs']:.1e} = max rel {onnx['max_rel']:.1e}" if onnx.get("ok")
                              else f"ONNX check: {onnx.get('error', 'not run')[:160]}")
                    big.append(f"- {name} ({engine}): outputs reach {r['output_absmax']:.1e} with random weights "
                               f"(no pretrained weights, nothing normalises the logits); {parity}".replace("|", "/"))
        if big:
            lines += ["", "Large outputs (read the ONNX max abs against them):", "", *big]
        if stops:
            lines += ["", "Where ours stops (for a pruned model that no longer runs: the innermost module whose "
                      "forward raised, found by pruning again without the check):", "", *stops]
        covs = [coverage((per.get("ours") or {}).get("macs_ratio")) for per in more_rows.values()]
        low = [n for n, c in zip(more_rows, covs, strict=True) if c is None or c < 0.5]
        lines += ["", summary(more_rows) + f" Ours coverage ≥ 0.5 on {len(more_rows) - len(low)}/{len(more_rows)}"
                  + (f"; below 0.5 or failed: {', '.join(low)}." if low else ".")]
    return "\n".join(lines) + "\n"


def summary(results: dict) -> str:
    counts = {e: sum(green(per.get(e)) for per in results.values()) for e in ENGINES}
    ran = {e: sum(1 for per in results.values() if e in per) for e in ENGINES}
    parts = [f"green: ours {counts['ours']}/{ran['ours']}, TP {counts['tp']}/{ran['tp']}"]
    for m in TIMING_MODELS:
        per = results.get(m)
        if per:
            o, t = (per.get(e) or {} for e in ENGINES)
            ratio = o["seconds"] / t["seconds"] if o.get("seconds") and t.get("seconds") else None
            parts.append(f"{m} ours {_num(o.get('seconds'), '.3f')} s (full {_num(o.get('seconds_full'), '.3f')} s) "
                         f"vs TP {_num(t.get('seconds'), '.3f')} s = {_num(ratio, '.2f')}×")
    return "Summary: " + "; ".join(parts) + "."


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        p = argparse.ArgumentParser()
        p.add_argument("--worker", nargs=3, metavar=("MODEL", "ENGINE", "RESULT"))
        p.add_argument("--mem-gib", type=float, default=12.0)
        p.add_argument("--repeats", type=int, default=1)
        a = p.parse_args(argv)
        run_pair(a.worker[0], a.worker[1], Path(a.worker[2]), a.mem_gib, a.repeats)
        return

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", help="comma-separated subset (default: all); e.g. resnet50,timm:dla34")
    p.add_argument("--engines", default="ours,tp",
                   help="comma-separated: ours, tp, onnx (onnx: main-table models only, the others are skipped)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per model/engine pair")
    p.add_argument("--mem-gib", type=float, default=12.0, help="address-space cap per pair, GiB")
    p.add_argument("--repeats", type=int, default=3, help="timed pruning runs per pair (the fastest is shown)")
    p.add_argument("--json", type=Path, help="write the raw records here, and the table beside them (.md)")
    p.add_argument("--update", action="store_true", help="keep the records in --json, replace the pairs run now")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.update and not (args.json and args.json.is_file()):
        p.error("--update needs --json naming an existing results file")

    registry = _registry(more=True)
    names = list(registry) if not args.models else [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [n for n in names if n not in registry]
    if unknown:
        p.error(f"unknown model(s) {unknown}; valid: {', '.join(registry)}")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not engines or any(e not in ALL_ENGINES for e in engines):
        p.error(f"--engines takes a comma-separated subset of {', '.join(ALL_ENGINES)}, got {args.engines!r}")
    if engines == ["onnx"]:  # the ONNX-import column exists for the main table only
        names = [n for n in names if registry[n].table == "main"]

    from _common import save, stamp

    env = environment(provenance=False)
    provenance = stamp()
    v = env["versions"]
    print(f"# {env['cpu']}, {env['cpu_count']} cores, {env['platform']}, Python {env['python']}")
    print(f"# torch {v['torch']}, torchvision {v['torchvision']}, timm {v['timm']}, torch-pruning "
          f"{v['torch-pruning']}, onnx {v['onnx']}, onnxruntime {v['onnxruntime']}, commit {provenance['commit']}")
    args_line = "python bench/prune_coverage.py " + " ".join(argv)
    results: dict[str, dict] = {}
    runs: list[dict] = []  # every run whose rows the file holds, oldest first (--update appends)
    settings = {"ratio": RATIO, "round_to": ROUND_TO, "importance": IMPORTANCE,
                "timeout_s": args.timeout, "repeats": args.repeats, "mem_gib": args.mem_gib}
    if args.update:
        try:
            previous = json.loads(args.json.read_text())
            results = previous["results"]
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            p.error(f"--update: cannot read results from {args.json} ({exc})")
        runs = previous.get("runs") or [{  # a file from before the run history: its one run
            key: previous.get(key) for key in ("provenance", "environment", "command", "settings")}
            | {"models": list(results), "engines": list(ENGINES)}]
    runs.append({"provenance": provenance, "environment": env, "command": args_line, "settings": settings,
                 "models": names, "engines": engines})

    def record_of(results: dict) -> dict:
        return {"provenance": provenance, "environment": env, "command": args_line, "settings": settings,
                "runs": runs, "results": results}

    with tempfile.TemporaryDirectory(prefix="prune_coverage_") as tmp:
        for name in names:
            results.setdefault(name, {})
            for engine in engines:
                if engine == "onnx" and registry[name].table != "main":
                    continue
                load = os.getloadavg()  # the machine is shared: what else ran shows in the seconds
                record = _spawn(name, engine, args.timeout, args.mem_gib, args.repeats, Path(tmp))
                record["run_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
                record["load_avg"] = [round(x, 2) for x in load]
                results[name][engine] = record
                status = _onnx_status(record) if engine == "onnx" else _status(record)
                print(f"{name:32s} {engine:4s} {status}  [{record['wall_s']} s]", flush=True)
                if args.json:  # after every pair: a run cut short keeps what it measured
                    save(args.json, record_of(results))
    text = markdown(results, env, args_line, runs)
    if args.json:
        save(args.json, record_of(results), text)
    print()
    print(text)


if __name__ == "__main__":
    main()
