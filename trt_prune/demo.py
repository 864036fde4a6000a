"""``trt-prune demo``: the whole pipeline on ``builtin:demo-detector``, seven variants, one report.

dense → structured (about half the MACs) → 2:4 → structured + 2:4 (→ structured-gradual, pruned while
training); each scored (COCO mAP) before and after a short fine-tune, exported, cleaned, checked against torch,
timed in ONNX Runtime with the variants interleaved (this machine is noisy), and profiled per layer. Two INT8
variants have no torch model: ``int8`` and ``structured+sparse24+int8`` are the cleaned ONNX of ``dense`` and
``structured+sparse24`` quantized (:func:`trt_prune.quantize.quantize`, Q/DQ, calibrated on the builtin road
scenes' train split); they are scored (mAP of the QDQ model in ONNX Runtime), timed and profiled like the rest.
"""

from __future__ import annotations

import copy
import datetime as _dt
import platform
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .artifacts import OnnxArtifact, ensure_output_dir, write_json
from .errors import TrtPruneError

MODEL_SPEC = "builtin:demo-detector"


@dataclass(frozen=True)
class DemoSettings:
    eval_images: int
    finetune_steps: int
    finetune_batch: int
    finetune_img: int
    finetune_lr: float
    rounds: int
    iterations_per_round: int
    layer_runs: int
    target_macs: float = 0.5  # fraction of dense MACs the structured variant keeps
    round_to: int | None = None  # None: what this machine's kernels like (trt_prune.pruning.alignment)
    min_channels_24: int = 64  # below NVIDIA's ~256 on purpose: the demo shows 2:4's accuracy cost broadly
    bn_batches: int = 16  # batches of 16 training images that re-estimate BatchNorm statistics before fine-tuning
    gradual: bool = True  # also prune to target_macs *while* training the same steps (docs/training.md's best recipe)
    int8_calib_size: int = 256  # builtin road scenes (train split) the INT8 variants are calibrated on
    int8_method: str = "entropy"  # INT8 calibration method (trt_prune.quantize.METHODS)


QUICK = DemoSettings(eval_images=100, finetune_steps=40, finetune_batch=8, finetune_img=320, finetune_lr=4e-4,
                     rounds=8, iterations_per_round=10, layer_runs=10, int8_calib_size=32,
                     int8_method="percentile")  # entropy's threshold search alone takes ~70 s on 2 cores
FULL = DemoSettings(eval_images=500, finetune_steps=250, finetune_batch=8, finetune_img=320, finetune_lr=4e-4,
                    rounds=20, iterations_per_round=15, layer_runs=30)


# INT8 variant -> the variant whose cleaned ONNX it quantizes (in report order, after the float variants)
INT8_VARIANTS = {"int8": "dense", "structured+sparse24+int8": "structured+sparse24"}


def _onnx_name(name: str) -> str:
    return f"{name.replace('+', '_')}.onnx"


def _int8_summary(source: str, result) -> dict:
    """What a report row says about an INT8 variant: its placement, calibration and where its accuracy is from."""
    p = result.placement
    return {"source": source, "method": result.method, "calib_samples": result.calibration["samples"],
            "calib_source": result.calibration["source"], "calibration_seconds": result.calibration["seconds"],
            "quantize_seconds": result.seconds, "quantized_layers": len(p["quantized"]),
            "kept_layers": len(p["kept"]), "kept": p["kept"], "residual_pairs": len(p["residual"]),
            "qdq_pairs": result.qdq_pairs, "int8_weights": result.weights, "agreement": result.agreement,
            "bytes_before": result.bytes_before, "bytes_after": result.bytes_after,
            "accuracy": "onnxruntime"}  # mAP of the QDQ session in ONNX Runtime (CPU): there is no torch model


class _Log:
    """Progress lines on stderr (stdout stays clean for --json)."""

    def __init__(self, console=None):
        self.console = console
        self.start = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if self.console is not None:
            self.console.print(f"[dim]{time.perf_counter() - self.start:6.1f}s[/dim] {msg}")


@contextmanager
def _progress(console, label: str, total: int):
    """Yield an ``on_step(step, loss)`` callback that drives a transient progress bar (or does nothing)."""
    if console is None:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  TextColumn("loss {task.fields[loss]}"), console=console, transient=True) as bar:
        task = bar.add_task(label, total=total, loss="–")
        yield lambda step, loss: bar.update(task, completed=step, loss=f"{loss:.3f}")


def _masks_intact(variant: dict) -> bool | None:
    """After the fine-tune, every 2:4 layer still holds exactly the zeros its mask made (None: no masks)."""
    from .sparsity import holds_2of4

    masks = variant["masks"]
    if masks is None:
        return None
    modules = dict(variant["finetuned"].named_modules())
    return all(bool((modules[p].weight.detach()[~m] == 0).all()) and
               holds_2of4(modules[p].weight.detach().numpy(), axis=1) for p, m in masks.masks.items())


def _torch_predict(model):
    model.eval()

    def predict(images):
        with torch.no_grad():
            return model(images)

    return predict


def _session_predict(session, input_name: str, output_name: str):
    def predict(images):
        return session.run({input_name: images.numpy()})[output_name]

    return predict


def run_demo(out: str | Path = "out/demo", quick: bool = False, threads: int | None = None, console=None,
             settings: DemoSettings | None = None, exporter: str = "dynamo") -> dict:
    """Run the demo, write its artifacts to ``out`` and return the report (also ``out/report.json``)."""
    from .backends import BuildConfig
    from .data import RoadScenes
    from .demo_report import plot_latency, plot_slowest_layers, rich_table, write_html
    from .detection.metrics import evaluate
    from .finetune import finetune_detector, gradual_prune_detector, recalibrate_batchnorm
    from .models import load_model
    from .profiling.layers import build_module_map
    from .profiling.profile import interleaved_timings, machine_info
    from .profiling.stats import CV_THRESHOLD, cv_warning, summarize
    from .pruning import count_params, macs_of
    from .pruning.alignment import preferred_round_to
    from .quantize import quantize as quantize_int8
    from .sparsity.inspect import inspect_sparsity
    from .stages import build, prune, sparsify, to_onnx

    settings = settings or (QUICK if quick else FULL)
    log = _Log(console)
    out = ensure_output_dir(out)
    loaded = load_model(MODEL_SPEC)
    if loaded.meta.weights is None:
        raise TrtPruneError("the demo detector's shipped weights are missing from the package; "
                            "train them with: python bench/train_demo_detector.py")
    dense = loaded.model
    shape = loaded.input_shape
    val = RoadScenes("val", size=shape[-1])

    def score(predict) -> dict:
        return evaluate(predict, val, batch_size=16, limit=settings.eval_images)

    variants: dict[str, dict] = {}

    def add(name, model, masks=None, sparse_layers=0):
        variants[name] = {"name": name, "model": model, "masks": masks, "sparse_layers": sparse_layers}

    round_to = settings.round_to or preferred_round_to("onnxruntime")
    log(f"pruning: structured, keeping about {settings.target_macs:.0%} of MACs (channel counts rounded to "
        f"{round_to})")
    pruned = prune(dense, shape, target_macs=settings.target_macs, round_to=round_to)
    write_json(out / "recipe.json", pruned.recipe)
    add("dense", dense)
    add("structured", pruned.model)
    sp = sparsify(dense, min_channels=settings.min_channels_24)
    add("sparse24", sp.model, sp.masks, len(sp.sparse_layers))

    ft_info = {}
    for name in ("dense", "structured", "sparse24", "structured+sparse24"):
        if name == "structured+sparse24":
            # structured first, 2:4 second: start from the fine-tuned structured model
            both = sparsify(variants["structured"]["finetuned"], min_channels=settings.min_channels_24)
            add(name, both.model, both.masks, len(both.sparse_layers))
        v = variants[name]
        v["map_before"] = score(_torch_predict(v["model"]))
        log(f"{name}: mAP@[.5:.95] {v['map_before']['map50_95']:.3f} before fine-tune; fine-tuning "
            f"{settings.finetune_steps} steps")
        tuned = copy.deepcopy(v["model"])
        recalibrate_batchnorm(tuned, batches=settings.bn_batches, img_size=shape[-1])
        with _progress(console, f"fine-tuning {name}", settings.finetune_steps) as on_step:
            ft_info[name] = finetune_detector(tuned, settings.finetune_steps, settings.finetune_batch,
                                              settings.finetune_lr, settings.finetune_img, masks=v["masks"],
                                              on_step=on_step)
        tuned.eval()
        v["finetuned"] = tuned
        v["map_after"] = score(_torch_predict(tuned))
        log(f"{name}: mAP@[.5:.95] {v['map_after']['map50_95']:.3f} after fine-tune "
            f"({ft_info[name]['seconds']:.0f} s)")
    if settings.gradual:
        # the same steps, but pruning while training: masks settle by 40 % of them (none come back), the dense
        # model teaches; the best recipe bench/accuracy_recovery.py found (docs/training.md)
        name = "structured-gradual"
        log(f"{name}: pruning to {settings.target_macs:.0%} of MACs while training {settings.finetune_steps} steps")
        student = copy.deepcopy(dense)
        with _progress(console, f"training {name}", settings.finetune_steps) as on_step:
            report_step = None if on_step is None else (lambda step, loss, macs: on_step(step, loss))
            _, ft_info[name] = gradual_prune_detector(
                student, settings.target_macs, settings.finetune_steps, batch_size=settings.finetune_batch,
                lr=settings.finetune_lr, img_size=settings.finetune_img, distill=True, regrow=False,
                prune_share=0.4, round_to=round_to, on_step=report_step)
        student.eval()
        add(name, student)
        v = variants[name]
        v["finetuned"] = student
        v["map_before"] = {"map50_95": None, "map50": None}  # it was never pruned without training
        v["map_after"] = score(_torch_predict(student))
        log(f"{name}: mAP@[.5:.95] {v['map_after']['map50_95']:.3f} ({ft_info[name]['seconds']:.0f} s)")

    sessions, feeds, exports, cleans = {}, {}, {}, {}
    onnx_dir = ensure_output_dir(out / "onnx")

    def v_onnx(name: str) -> Path:
        return onnx_dir / _onnx_name(name)

    gen = torch.Generator().manual_seed(0)
    image = torch.rand(shape, generator=gen).numpy()

    def open_session(name: str) -> None:
        """Build ``name``'s ONNX in ONNX Runtime and score it through that session (``map_onnx``)."""
        sessions[name] = build(v_onnx(name), "onnxruntime",
                               BuildConfig(threads=threads, extra={"allow_spinning": False}))
        feeds[name] = {sessions[name].inputs[0].name: image}
        ins, outs = sessions[name].inputs[0].name, sessions[name].outputs[0].name
        variants[name]["map_onnx"] = score(_session_predict(sessions[name], ins, outs))

    try:
        with tempfile.TemporaryDirectory(prefix="trt_prune_demo_") as tmp:
            for name, v in variants.items():
                artifact = to_onnx(v["finetuned"], v_onnx(name), workdir=tmp, input_shape=shape, name=name,
                                   exporter=exporter)
                exports[name], cleans[name] = (next(s for s in artifact.steps if s["stage"] == stage)
                                               for stage in ("export", "clean"))
                log(f"{name}: exported ({exports[name]['exporter']}) and cleaned "
                    f"{cleans[name]['nodes_before']} → {cleans[name]['nodes_after']} nodes")
                open_session(name)
            # the INT8 variants: the source's cleaned ONNX as written above, quantized; no torch model, so no
            # fine-tune and no torch score: their accuracy is the QDQ session's in ONNX Runtime
            for name, source in INT8_VARIANTS.items():
                log(f"{name}: quantizing {source}'s ONNX to INT8 ({settings.int8_method} calibration on "
                    f"{settings.int8_calib_size} builtin road scenes)")
                result = quantize_int8(v_onnx(source), v_onnx(name), calib="builtin", method=settings.int8_method,
                                       calib_size=settings.int8_calib_size, calib_cache=False)
                # the copied provenance says export + clean of the source: add the step that made this file
                OnnxArtifact.read(v_onnx(source)).with_step(v_onnx(name), {
                    "stage": "quantize", "method": result.method, "calib": "builtin",
                    "calib_samples": result.calibration["samples"], "qdq_pairs": result.qdq_pairs}).stamp()
                add(name, None, None, variants[source]["sparse_layers"])
                v = variants[name]
                v["source"], v["finetuned"], v["int8"] = source, None, _int8_summary(source, result)
                v["map_before"] = v["map_after"] = {"map50_95": None, "map50": None}
                log(f"{name}: {v['int8']['quantized_layers']} layers INT8, {v['int8']['kept_layers']} kept in "
                    f"float, {result.qdq_pairs} Q/DQ pairs (calibration {result.calibration['seconds']:.0f} s)")
                open_session(name)
            log(f"timing {len(sessions)} variants interleaved: {settings.rounds} rounds × "
                f"{settings.iterations_per_round} iterations each")
            samples = interleaved_timings(sessions, feeds, rounds=settings.rounds,
                                          iterations_per_round=settings.iterations_per_round, warmup_s=1.0)
            import onnx

            for name, session in sessions.items():  # the INT8 variants too (Q/DQ nodes map to their neighbours)
                mapping = build_module_map(onnx.load(str(v_onnx(name))))
                variants[name]["per_layer"] = [r.to_dict() for r in
                                               session.profile_layers(feeds[name], runs=settings.layer_runs,
                                                                      module_map=mapping)]
            env = {**machine_info(), **sessions["dense"].env()}
    finally:
        for s in sessions.values():
            s.close()

    rows = []
    for name, v in variants.items():
        lat = summarize(samples[name])
        layers = sorted(v["per_layer"], key=lambda r: r["ms"], reverse=True)
        # an INT8 variant has no export of its own (no parity against torch: its agreement with the fp32 ONNX is
        # in "int8"), and the parameters and MACs of its source (the same weights, stored as INT8)
        parity = exports[name]["parity"].get(exports[name]["output_names"][0], {}) if name in exports else {}
        counted = v["finetuned"] if v["finetuned"] is not None else variants[v["source"]]["finetuned"]
        rows.append({
            "name": name,
            "params": count_params(counted),
            "macs": macs_of(counted, shape),
            "sparse_layers": v["sparse_layers"],
            "masks_intact": _masks_intact(v),
            "onnx_24_weights": sum(r.holds_24 for r in inspect_sparsity(v_onnx(name))),
            "map50_95": v["map_before"]["map50_95"],
            "map50": v["map_before"]["map50"],
            "map50_95_finetuned": v["map_after"]["map50_95"],
            "map50_finetuned": v["map_after"]["map50"],
            "map50_95_onnx": v["map_onnx"]["map50_95"],
            "map50_onnx": v["map_onnx"]["map50"],
            "latency_ms": {k: lat[k] for k in ("p50", "p90", "p95", "p99", "mean", "std", "min", "max", "cv")},
            "latency_samples_ms": [round(x, 4) for x in samples[name]],
            "cv_warning": cv_warning(lat),
            "throughput_ips": 1000.0 / lat["mean"],
            "onnx": str(v_onnx(name)),
            "parity": parity,
            "export": exports.get(name),
            "clean": cleans.get(name),
            "finetune": ft_info.get(name),
            "derived_from": v.get("source"),  # INT8 variants: the variant whose ONNX was quantized
            "int8": v.get("int8"),  # INT8 variants: placement, calibration, agreement; None for float variants
            "per_layer": [{"name": r["name"], "op": r["op"], "module": r.get("module"), "ms": r["ms"]}
                          for r in layers],
            "per_layer_sum_ms": sum(r["ms"] for r in layers),
        })
    dense_p50 = rows[0]["latency_ms"]["p50"]
    for r in rows:
        r["speedup_p50"] = dense_p50 / r["latency_ms"]["p50"]
    report = {
        "model": MODEL_SPEC,
        "backend": "onnxruntime",
        "batch": 1,
        "input_shape": list(shape),
        "quick": quick,
        "settings": {**asdict(settings), "round_to": round_to},
        "eval_images": settings.eval_images,
        "finetune_steps": settings.finetune_steps,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "env": {**env, "python": platform.python_version(), "torch": torch.__version__,
                "threads": env.get("threads") or threads},
        "prune": {k: pruned.report[k] for k in ("params_before", "params_after", "macs_before", "macs_after",
                                                  "effective_ratio", "groups_total", "groups_pruned")},
        "variants": rows,
        "notes": [
            f"structured: {pruned.report['groups_pruned']} of {pruned.report['groups_total']} channel groups "
            f"pruned (L1, channel ratio {pruned.report['effective_ratio']:.3f}, counts rounded to "
            f"{round_to}: the channel block of this CPU's ONNX Runtime kernels); outputs kept whole",
            f"fine-tune: BatchNorm statistics re-estimated on {16 * settings.bn_batches} training images, then "
            f"{settings.finetune_steps} AdamW steps of {settings.finetune_batch} images at lr "
            f"{settings.finetune_lr}, 2:4 masks re-applied after every step; the dense row gets the same "
            "schedule as a control",
            f"2:4 on conv layers with at least {settings.min_channels_24} input and output channels and input "
            "channels divisible by 4; ONNX Runtime on the CPU runs 2:4 weights dense, so 2:4 changes accuracy "
            "here, not speed (TensorRT's sparse kernels need a GPU)",
            "per-layer times come from a separate profiled run; their sum exceeds the end-to-end latency by "
            "the profiler's own overhead",
        ] + ([f"structured-gradual: pruned from the dense model to about {settings.target_macs:.0%} of MACs "
              f"while training the same {settings.finetune_steps} steps (accumulated Taylor importance on "
              "BatchNorm, masks settled by 40 % of the steps and never revived, the dense model as teacher); "
              "no 'before fine-tune' score"] if settings.gradual else [])
        + [f"{' and '.join(INT8_VARIANTS)}: the cleaned ONNX of {' and '.join(INT8_VARIANTS.values())} quantized to "
           f"INT8 Q/DQ (trt_prune.quantize: {settings.int8_method} calibration on "
           f"{settings.int8_calib_size} builtin road scenes of the train split, weights per output channel); "
           "no torch model, so no 'before' or 'ft' score: their mAP is the QDQ model's in ONNX Runtime (the ORT "
           "column), params and MACs are the source's, and their latency is ONNX Runtime's CPU INT8 kernels, "
           "not TensorRT's"],
    }
    unstable = [r for r in rows if r["cv_warning"]]
    if unstable:  # one line for the run, not one per variant: the advice is the same for all of them
        cvs = ", ".join(f"{r['name']} {r['latency_ms']['cv']:.1%}" for r in unstable)
        report["notes"].append(f"latency is unstable (coefficient of variation above {CV_THRESHOLD:.1%}): {cvs}; "
                               "the speed-ups compare medians of interleaved rounds, which such noise affects "
                               "least")
    images = [plot_latency(report, out / "latency.png"),
              plot_slowest_layers(rows[0]["per_layer"], rows[1]["per_layer"], out / "slowest_layers.png")]
    write_json(out / "report.json", report)
    write_html(report, out / "report.html", images)
    if console is not None:
        console.print(rich_table(report))
        console.print(f"wrote {out / 'report.json'}, {out / 'report.html'}, plots and ONNX files in {onnx_dir}")
    return report
