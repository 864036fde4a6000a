"""INT8 post-training quantization (``trt_prune.quantize``): accuracy of the demo detector and CPU speed.

Four parts, all on this machine's ONNX Runtime (CPU):

- ``accuracy`` — ``builtin:demo-detector`` in three variants, each exported and cleaned to fp32 ONNX:
  ``dense`` (the shipped weights), ``structured`` (pruned to half the MACs, ``round_to`` 8, BatchNorm re-estimated
  and fine-tuned ``--steps``) and ``structured+sparse24`` (that model made 2:4 on layers with ≥ 64 channels and
  fine-tuned ``--steps`` again with the masks held), as ``trt-prune demo`` builds them. Each is quantized with
  every calibration method (entropy, minmax, percentile; ``--calib-size`` training road scenes) and scored
  (mAP@[.5:.95] on ``--images`` validation scenes) against its fp32 ONNX. The goal: INT8 within
  ``GOAL`` (1.0 mAP point) of fp32.
- ``recovery`` (after ``accuracy``, also run by it) — for each variant where a method misses the goal, the
  per-layer sensitivity: each quantized layer excluded (kept float) on its own, scored on
  ``--sensitivity-images`` scenes with the first missing method's ranges; then, for every missing method, the
  most-recovering layers are excluded together, one more at a time, through ``quantize(exclude=…)`` (the public
  path: recalibrated, written, read back) and scored on all images, until the goal is met or ``--max-exclude``
  layers are out.
- ``modelopt`` — with ``--modelopt-python`` (a venv holding NVIDIA ModelOpt, set up as bench/modelopt_ptq.py
  says, so its pins never touch ours): ModelOpt's ONNX PTQ and ours on the same fp32 files and calibration arrays
  (the dense demo detector, resnet50): Q/DQ pairs, weighted layers left in float, where DQs feed, demo mAP.
- ``speed`` — fp32 vs INT8 (entropy) p50 latency, interleaved (``--rounds`` × ``--iterations``, 2 threads,
  batch 1), for the dense demo detector and torchvision resnet50 (random weights, random calibration). ONNX
  Runtime runs TensorRT's placement with its own kernels: without a Q on the conv outputs it cannot fold
  DQ → Conv → Q into QLinearConv, so this measures what a CPU makes of a TensorRT-placed model, not TensorRT.

Fine-tuned variants and their ONNX files are kept in ``--work`` (default ``out/int8_bench``) and reused.

Usage::

    python bench/int8_accuracy.py [--part accuracy|speed|all] [--images 500] [--steps 250]
    # smoke run (tiny settings, results out of the way):
    python bench/int8_accuracy.py --images 16 --steps 2 --calib-size 8 --sensitivity-images 8 --max-exclude 1 \
        --rounds 2 --iterations 2 --work out/smoke/int8 --json out/smoke/int8_accuracy.json

Writes ``bench/results/int8_accuracy.{json,md}`` (stamped with commit, date and machine).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import RESULTS, save, stamp

DEMO = "builtin:demo-detector"
METHODS = ("entropy", "minmax", "percentile")
GOAL = 0.010  # INT8 within this of fp32 mAP@[.5:.95]
VARIANTS = ("dense", "structured", "structured+sparse24")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _session(path, threads: int = 2):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    source = path.SerializeToString() if hasattr(path, "SerializeToString") else str(path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def score(model_or_path, images: int, threads: int = 2) -> float:
    """mAP@[.5:.95] of an ONNX model (path or proto) on the first ``images`` validation scenes."""
    from trt_prune.data import RoadScenes
    from trt_prune.detection.metrics import evaluate

    session = _session(model_or_path, threads)
    spec = session.get_inputs()[0]
    fixed = spec.shape[0] if isinstance(spec.shape[0], int) else None
    out = session.get_outputs()[0].name

    def predict(batch):
        x = batch.numpy()
        if fixed:
            return np.concatenate([session.run([out], {spec.name: x[i:i + fixed]})[0]
                                   for i in range(0, len(x), fixed)])
        return session.run([out], {spec.name: x})[0]

    return float(evaluate(predict, RoadScenes("val", size=320), batch_size=16, limit=images)["map50_95"])


# ------------------------------------------------------------------------------------------------ variants
def variant_onnx(name: str, work: Path, steps: int) -> Path:
    """The cleaned fp32 ONNX of a demo variant, built (and fine-tuned) once into ``work``."""
    from trt_prune.cleaner import clean_onnx
    from trt_prune.exporter import export_onnx
    from trt_prune.finetune import finetune_detector, recalibrate_batchnorm
    from trt_prune.models import load_model
    from trt_prune.stages import prune, sparsify

    path = work / f"{name.replace('+', '_')}.s{steps}.onnx"
    if path.is_file():
        return path
    work.mkdir(parents=True, exist_ok=True)
    loaded = load_model(DEMO)
    dense, shape = loaded.model.eval(), loaded.input_shape
    if name == "dense":
        model = dense
    else:
        log(f"   {name}: pruning to half the MACs and fine-tuning {steps} steps")
        model = copy.deepcopy(prune(dense, shape, target_macs=0.5, round_to=8).model)
        recalibrate_batchnorm(model, img_size=shape[-1])
        finetune_detector(model, steps, 8, 4e-4, shape[-1])
        if name == "structured+sparse24":
            log(f"   {name}: 2:4 on layers with ≥ 64 channels, fine-tuning {steps} more steps")
            sp = sparsify(model.eval(), min_channels=64)
            model = sp.model
            finetune_detector(model, steps, 8, 4e-4, shape[-1], masks=sp.masks)
        model.eval()
    raw = work / f"{path.stem}.raw.onnx"
    export_onnx(model, raw, shape)
    clean_onnx(raw, path)
    raw.unlink()
    return path


def sensitivity(fp32: Path, variant: str, method: str, images: int, work: Path) -> list[dict]:
    """Per quantized layer: mAP with only that layer kept float (same ranges), best recovery first."""
    import onnx

    from trt_prune.precision import _constants_to_initializers, _name_nodes
    from trt_prune.quantize import place, quantize_model
    from trt_prune.quantize.calibrate import read_cache

    model = onnx.load(fp32)
    _constants_to_initializers(model.graph)
    _name_nodes(model.graph)
    path = work / f"{variant.replace('+', '_')}.{method}.int8.onnx.calib.json"  # written by the accuracy part
    ranges = read_cache(path, json.loads(path.read_text())["key"])
    full = place(model)
    base = score(quantize_model(model, full, ranges), images)
    rows = []
    for i, q in enumerate(full.nodes):
        excluded = place(model, exclude=[q.name])
        m = score(quantize_model(model, excluded, ranges), images)
        rows.append({"node": q.name, "module": _module(model, q.name), "map": m, "recovered": m - base})
        log(f"      [{i + 1}/{len(full.nodes)}] {q.name}: {m:.4f} ({(m - base) * 100:+.2f} pts)")
    return sorted(rows, key=lambda r: -r["recovered"])


def _module(model, name: str) -> str | None:
    from trt_prune.onnx_io import node_module

    return next((node_module(n) for n in model.graph.node if n.name == name), None)


def run_accuracy(args) -> dict:
    from trt_prune.quantize import quantize

    work = Path(args.work)
    rows = []
    for name in VARIANTS:
        log(f"== {name}")
        fp32 = variant_onnx(name, work, args.steps)
        t0 = time.perf_counter()
        base = score(fp32, args.images)
        row = {"variant": name, "fp32_map": base, "fp32_eval_seconds": round(time.perf_counter() - t0, 1),
               "methods": {}}
        log(f"   fp32 mAP {base:.4f}")
        for method in METHODS:
            dst = work / f"{name.replace('+', '_')}.{method}.int8.onnx"
            result = quantize(fp32, dst, calib="builtin", method=method, calib_size=args.calib_size)
            m = score(dst, args.images)
            row["methods"][method] = {
                "map": m, "delta": m - base, "within_goal": base - m <= GOAL, "qdq_pairs": result.qdq_pairs,
                "layers_int8": len(result.placement["quantized"]), "layers_float": len(result.placement["kept"]),
                "calibration_seconds": result.calibration["seconds"], "cached": result.calibration["cached"],
                "sqnr_db": {k: v["sqnr_db"] for k, v in result.agreement.items()}}
            log(f"   {method}: INT8 mAP {m:.4f} ({(m - base) * 100:+.2f} pts), calibration "
                f"{result.calibration['seconds']} s{' (cache)' if result.calibration['cached'] else ''}")
        rows.append(row)
    return {"model": DEMO, "images": args.images, "calib_size": args.calib_size, "steps": args.steps,
            "goal": GOAL, "rows": rows, "recovery": {}, "sensitivity_images": args.sensitivity_images,
            "provenance": stamp()}


def run_recovery(args, rec: dict) -> dict:
    """For every variant where a method misses the goal: the per-layer sensitivity (ranked once per variant,
    with the ranges of its first missing method), then the most-recovering layers excluded together, one more
    at a time, through ``quantize(exclude=…)``, for each missing method."""
    from trt_prune.quantize import quantize

    work = Path(args.work)
    recovery = {}
    for row in rec["rows"]:
        misses = [m for m in METHODS if not row["methods"][m]["within_goal"]]
        if not misses:
            continue
        name = row["variant"]
        fp32 = variant_onnx(name, work, rec["steps"])
        log(f"== sensitivity of {name} ({misses[0]} ranges): each layer kept float on its own, "
            f"{args.sensitivity_images} images")
        ranking = sensitivity(fp32, name, misses[0], args.sensitivity_images, work)
        for method in misses:
            tries = []
            for k in range(1, args.max_exclude + 1):
                exclude = [r["node"] for r in ranking[:k]]
                dst = work / f"{name.replace('+', '_')}.{method}.exclude{k}.int8.onnx"
                base = work / f"{name.replace('+', '_')}.{method}.int8.onnx.calib.json"  # same ranges, no recalibration
                quantize(fp32, dst, calib="builtin", method=method, calib_size=rec["calib_size"], exclude=exclude,
                         calib_cache=base)
                m = score(dst, rec["images"])
                tries.append({"exclude": exclude, "modules": [r["module"] for r in ranking[:k]], "map": m,
                              "delta": m - row["fp32_map"], "within_goal": row["fp32_map"] - m <= GOAL})
                log(f"   {name}/{method} excluding {k}: mAP {m:.4f} ({(m - row['fp32_map']) * 100:+.2f} pts)")
                if tries[-1]["within_goal"]:
                    break
            recovery[f"{name}/{method}"] = {"ranked_with": misses[0], "ranking": ranking, "tries": tries}
    rec = dict(rec, recovery=recovery, sensitivity_images=args.sensitivity_images, max_exclude=args.max_exclude)
    rec["recovery_provenance"] = stamp()
    return rec


# ------------------------------------------------------------------------------------------------ speed
def run_speed(args) -> dict:
    from trt_prune import stages
    from trt_prune.backends import BuildConfig
    from trt_prune.cleaner import clean_onnx
    from trt_prune.exporter import export_onnx
    from trt_prune.models import load_model
    from trt_prune.profiling.profile import interleaved_timings
    from trt_prune.quantize import quantize

    work = Path(args.work)
    out = {}
    for spec, shape in ((DEMO, (1, 3, 320, 320)), ("torchvision:resnet50", (1, 3, 224, 224))):
        key = spec.split(":")[-1]
        if spec == DEMO:
            fp32 = variant_onnx("dense", work, args.steps)
            calib = "builtin"
        else:
            fp32 = work / f"{key}.onnx"
            if not fp32.is_file():
                torch.manual_seed(0)
                export_onnx(load_model(spec).model.eval(), work / f"{key}.raw.onnx", shape)
                clean_onnx(work / f"{key}.raw.onnx", fp32)
            calib = np.random.default_rng(0).standard_normal((32, *shape[1:])).astype(np.float32)
        int8 = work / f"{key}.speed.int8.onnx"
        quantize(fp32, int8, calib=calib, method="entropy", calib_size=min(args.calib_size, 32))
        config = BuildConfig(threads=2)
        sessions = {"fp32": stages.build(str(fp32), "onnxruntime", config),
                    "int8": stages.build(str(int8), "onnxruntime", config)}
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        feeds = {n: {s.inputs[0].name: x} for n, s in sessions.items()}
        env = sessions["fp32"].env()
        log(f"== timing {spec}: fp32 vs int8, {args.rounds} rounds × {args.iterations}")
        try:
            samples = interleaved_timings(sessions, feeds, rounds=args.rounds, iterations_per_round=args.iterations,
                                          warmup_s=1.0)
        finally:
            for s in sessions.values():
                s.close()
        p50 = {n: float(np.median(v)) for n, v in samples.items()}
        out[key] = {"model": spec, "input_shape": list(shape), "fp32_p50_ms": p50["fp32"], "int8_p50_ms": p50["int8"],
                    "int8_speedup": p50["fp32"] / p50["int8"], "samples": len(samples["fp32"]), "env": env}
        log(f"   fp32 {p50['fp32']:.2f} ms, int8 {p50['int8']:.2f} ms ({p50['fp32'] / p50['int8']:.2f}×)")
    return {"rounds": args.rounds, "iterations": args.iterations, "models": out, "provenance": stamp()}


# ------------------------------------------------------------------------------------------------ ModelOpt
def run_modelopt(args) -> dict:
    """ModelOpt's ONNX PTQ (bench/modelopt_ptq.py, run by ``--modelopt-python``, a separate venv) and ours on the
    same fp32 files and the same calibration arrays: Q/DQ pairs, weighted layers left in float, demo mAP."""
    import subprocess

    import onnx

    from trt_prune.quantize import calibration_set, quantize

    work = Path(args.work)
    demo = variant_onnx("dense", work, args.steps)
    r50 = work / "resnet50.onnx"
    if not r50.is_file():
        run_speed(args)  # exports it
    arrays = {}
    data = calibration_set("builtin", onnx.load(demo), limit=args.calib_size)
    arrays["demo"] = np.concatenate([b[data.input_name] for b in data.batches()])
    arrays["resnet50"] = np.random.default_rng(0).standard_normal((32, 3, 224, 224)).astype(np.float32)
    rows = []
    for key, fp32 in (("demo", demo), ("resnet50", r50)):
        calib = work / f"{key}.calib.npy"
        np.save(calib, arrays[key])
        ours = quantize(fp32, work / f"{key}.ours.entropy.int8.onnx", calib=str(calib), method="entropy",
                        calib_size=len(arrays[key]))
        row = {"model": key, "calibration_samples": len(arrays[key]),
               "ours": {"qdq_pairs": ours.qdq_pairs, "weighted_int8": len(ours.placement["quantized"]),
                        "weighted_float": [k["node"] for k in ours.placement["kept"]],
                        "seconds": ours.calibration["seconds"]}}
        out_dir, js = work / "modelopt", work / f"modelopt_{key}.json"
        log(f"== ModelOpt ONNX PTQ on {key} ({args.modelopt_python})")
        done = subprocess.run([args.modelopt_python, str(Path(__file__).with_name("modelopt_ptq.py")), "--onnx",
                               str(fp32), "--calib", str(calib), "--method", "entropy", "--high-precision", "fp32",
                               "--out-dir", str(out_dir), "--json", str(js)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"modelopt_ptq.py failed:\n{done.stderr[-2000:]}")
        mo = json.loads(js.read_text())
        m = mo["models"][0]
        row["modelopt"] = {"version": mo["modelopt"], "qdq_pairs": m["QuantizeLinear"],
                           "weighted_int8": m["weighted_quantized"], "weighted_float": m["weighted_float_names"],
                           "dq_consumers": m.get("dq_consumer_op_types"), "seconds": m["seconds"]}
        if key == "demo":
            row["fp32_map"] = score(fp32, args.images)
            row["ours"]["map"] = score(ours.dst, args.images)
            row["modelopt"]["map"] = score(m["output"], args.images)
            log(f"   mAP fp32 {row['fp32_map']:.4f}, ours {row['ours']['map']:.4f}, "
                f"ModelOpt {row['modelopt']['map']:.4f}")
        rows.append(row)
    return {"images": args.images, "rows": rows, "provenance": stamp()}


def modelopt_markdown(rec: dict) -> str:
    v = rec["rows"][0]["modelopt"]["version"]
    lines = [f"### Side by side with NVIDIA ModelOpt {v} ONNX PTQ (entropy, rest fp32)", "",
             "Same fp32 files and calibration arrays (demo: its training road scenes; resnet50: 32 seeded normal "
             f"samples). ModelOpt ran in its own venv (bench/modelopt_ptq.py); mAP on {rec['images']} validation "
             "scenes in ONNX Runtime CPU.", "",
             "| model | tool | Q/DQ pairs | weighted layers INT8 | left in float | DQ feeds | mAP50-95 |",
             "|---|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        for tool in ("ours", "modelopt"):
            x = r[tool]
            feeds = ", ".join(f"{k} {n}" for k, n in (x.get("dq_consumers") or {}).items()) or "weighted layers, "\
                "residual Adds"
            mp = f"{x['map']:.3f} (fp32 {r['fp32_map']:.3f})" if "map" in x else "—"
            lines.append(f"| {r['model']} | {'trt_prune' if tool == 'ours' else 'ModelOpt'} | {x['qdq_pairs']} | "
                         f"{x['weighted_int8']} | {len(x['weighted_float'])} | {feeds} | {mp} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ report
def accuracy_markdown(rec: dict) -> str:
    lines = ["### Accuracy: builtin:demo-detector, fp32 vs INT8 (ONNX Runtime CPU)", "",
             f"mAP@[.5:.95] on {rec['images']} validation scenes; calibration on {rec['calib_size']} training scenes; "
             f"structured variants fine-tuned {rec['steps']} steps per stage as `trt-prune demo` does. Goal: INT8 "
             f"within {rec['goal'] * 100:.1f} mAP point of fp32.", "",
             "| variant | fp32 | " + " | ".join(f"INT8 {m} (Δ)" for m in METHODS) + " | INT8 layers / float |",
             "|---|---|" + "---|" * len(METHODS) + "---|"]
    for r in rec["rows"]:
        cells = []
        for m in METHODS:
            x = r["methods"][m]
            cells.append(f"{x['map']:.3f} ({x['delta'] * 100:+.2f}{'' if x['within_goal'] else ' ✗'})")
        x = r["methods"][METHODS[0]]
        lines.append(f"| {r['variant']} | {r['fp32_map']:.3f} | " + " | ".join(cells)
                     + f" | {x['layers_int8']} / {x['layers_float']} |")
    for key, rc in rec["recovery"].items():
        top = rc["ranking"][:5]
        lines += ["", f"**{key}: sensitivity** (each layer kept float alone with the {rc['ranked_with']} ranges, "
                      f"{rec['sensitivity_images']} scenes; most recovering first): "
                  + ", ".join(f"{r['module'] or r['node']} {r['recovered'] * 100:+.2f}" for r in top) + "."]
        for t in rc["tries"]:
            names = ", ".join(m or n for m, n in zip(t["modules"], t["exclude"], strict=True))
            met = " — goal met" if t["within_goal"] else ""
            lines.append(f"- `--exclude` {names}: mAP {t['map']:.3f} ({t['delta'] * 100:+.2f} pts){met}")
    return "\n".join(lines) + "\n"


def speed_markdown(rec: dict) -> str:
    lines = ["### CPU speed: fp32 vs INT8 (TensorRT placement, entropy) in ONNX Runtime", "",
             f"p50 of {rec['rounds']} interleaved rounds × {rec['iterations']} runs, batch 1, 2 threads.", "",
             "| model | fp32 p50 ms | INT8 p50 ms | INT8 speed-up |", "|---|---|---|---|"]
    for r in rec["models"].values():
        lines.append(f"| {r['model']} | {r['fp32_p50_ms']:.2f} | {r['int8_p50_ms']:.2f} | {r['int8_speedup']:.2f}× |")
    env = next(iter(rec["models"].values()))["env"]
    lines += ["", f"ONNX Runtime {env.get('backend_version')}, {env.get('threads')} threads, "
                  f"{rec['provenance'].get('machine', {}).get('cpu', 'this machine')}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("accuracy", "recovery", "speed", "modelopt", "all"), default="all")
    p.add_argument("--modelopt-python", default=None,
                   help="python of a venv with nvidia-modelopt (see bench/modelopt_ptq.py); the modelopt part "
                        "is skipped without it")
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--calib-size", type=int, default=256)
    p.add_argument("--sensitivity-images", type=int, default=200)
    p.add_argument("--max-exclude", type=int, default=6)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--iterations", type=int, default=15)
    p.add_argument("--work", default="out/int8_bench")
    p.add_argument("--json", default=str(RESULTS / "int8_accuracy.json"))
    args = p.parse_args(argv)
    path = Path(args.json)
    previous = json.loads(path.read_text()) if path.is_file() else {}
    record = {k: previous[k] for k in ("accuracy", "speed", "modelopt") if previous.get(k)}
    if args.part in ("accuracy", "all"):
        record["accuracy"] = run_accuracy(args)
    if args.part in ("accuracy", "recovery", "all"):
        if "accuracy" not in record:
            raise SystemExit("--part recovery needs the accuracy part's results in --json; run --part accuracy")
        record["accuracy"] = run_recovery(args, record["accuracy"])
        print(accuracy_markdown(record["accuracy"]))
    if args.part in ("speed", "all"):
        record["speed"] = run_speed(args)
        print(speed_markdown(record["speed"]))
    if args.part in ("modelopt", "all"):
        if args.modelopt_python:
            record["modelopt"] = run_modelopt(args)
            print(modelopt_markdown(record["modelopt"]))
        else:
            log("== modelopt part skipped: give --modelopt-python (a venv with nvidia-modelopt)")
    parts = []
    for key, render in (("accuracy", accuracy_markdown), ("speed", speed_markdown), ("modelopt", modelopt_markdown)):
        if key in record:
            when = record[key]["provenance"]
            parts.append(f"{render(record[key])}\n(this part: commit {when.get('commit')}, {when.get('date')})\n")
    save(args.json, record, "INT8 post-training quantization (`trt-prune quantize`); bench/int8_accuracy.py.\n\n"
         + "\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
