"""fp16 ONNX accuracy: the demo detector's COCO mAP in ONNX Runtime, fp32 against fp16.

``builtin:demo-detector`` (its shipped weights) is exported with ``export_onnx`` (default exporter), cleaned with
``clean_onnx``, and converted with :func:`trt_prune.precision.to_fp16` twice: inputs/outputs fp32
(``keep_io_types=True``, the default) and fp16. Each model is scored the way ``trt-prune demo`` scores a session
(``trt_prune.detection.metrics.evaluate`` on the validation road scenes; the fp16-IO model gets fp16 images
and its fp16 output is decoded in fp32). Recorded: mAP@[.5:.95] and mAP@.5, the difference to fp32 (the target:
|Δ mAP@[.5:.95]| <= 0.002), the raw-output error on the validation images (max abs, max rel, and after decoding:
box corners in pixels and sigmoid scores), nodes, Casts, the fp16 block list, file sizes and evaluation
seconds. ONNX Runtime's CPU provider runs many fp16 kernels by upcasting to fp32, so the error measured here is
mostly that of fp16 weights and fp16 storage between kernels.

``--sweep DIR`` also converts every ``DIR/<model>/ours.onnx`` (the cleaned exports that
``bench/clean_vs_polygraphy.py --keep DIR`` leaves: the 35 coverage models, pruned, random weights) with the
default settings and records what was kept in fp32, the Casts, and the parity error against fp32 on seeded
random inputs: a check that the conversion and its block list hold up beyond the demo detector.

Usage:
    python bench/fp16_accuracy.py [--images 500] [--threads 2] [--sweep DIR] [--json OUT.json]
The result goes to ``bench/results/fp16_accuracy.{json,md}`` (or OUT.json and OUT.md beside it), stamped with
commit, date and machine by ``trt_prune.provenance.write_result``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

TARGET = 0.002  # allowed |mAP@[.5:.95] fp16 - fp32|


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _predictor(session, keep: list):
    """``predict(images)`` for ``evaluate``: feeds the input's dtype, keeps each raw output in ``keep``."""
    spec = session.get_inputs()[0]
    dtype = np.float16 if spec.type == "tensor(float16)" else np.float32
    output = session.get_outputs()[0].name

    def predict(images):
        raw = session.run([output], {spec.name: images.numpy().astype(dtype)})[0]
        keep.append(raw)
        return raw.astype(np.float32)

    return predict


def _nms_variants(model, shape, val, images: int, threads: int, tmp: Path, record: dict) -> dict:
    """The deployment graph of ``trt-prune export --nms``: decoding, sigmoid and NMS inside, fp32 vs fp16."""
    import onnx

    from trt_prune.cleaner import clean_onnx
    from trt_prune.detection.metrics import coco_map
    from trt_prune.detection.nms_export import NMSConfig, export_detector_nms, unpad_detections
    from trt_prune.precision import to_fp16

    export_detector_nms(model, tmp / "nms_raw.onnx", shape, NMSConfig())
    cleaned = clean_onnx(tmp / "nms_raw.onnx", tmp / "nms_fp32.onnx")
    record["nms_clean"] = {"nodes_before": cleaned.nodes_before, "nodes_after": cleaned.nodes_after}
    conversion = to_fp16(tmp / "nms_fp32.onnx", tmp / "nms_fp16.onnx")
    variants = {}
    for name in ("nms_fp32", "nms_fp16"):
        path = tmp / f"{name}.onnx"
        session = _session(path, threads)
        input_name = session.get_inputs()[0].name
        predictions, targets = [], []
        started = time.perf_counter()
        for start in range(0, images, 16):
            items = [val[i] for i in range(start, min(images, start + 16))]
            batch = np.stack([im.numpy() for im, _ in items])
            outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {input_name: batch}),
                               strict=True))
            predictions.extend(unpad_detections(outputs))
            targets.extend(t for _, t in items)
        scores = coco_map(predictions, targets, val.num_classes)
        seconds = time.perf_counter() - started
        graph = onnx.load(str(path))
        variants[name] = {
            "map50_95": scores["map50_95"], "map50": scores["map50"], "images": len(targets),
            "eval_seconds": round(seconds, 1), "nodes": len(graph.graph.node),
            "casts": sum(n.op_type == "Cast" for n in graph.graph.node), "file_bytes": path.stat().st_size,
            "io_types": {v.name: onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower()
                         for v in [*graph.graph.input, *graph.graph.output]},
        }
        print(f"{name:10s} mAP@[.5:.95] {scores['map50_95']:.4f}  mAP@.5 {scores['map50']:.4f}  "
              f"nodes {variants[name]['nodes']}  casts {variants[name]['casts']}  [{seconds:.0f} s]", flush=True)
    fp16 = variants["nms_fp16"]
    fp16["delta_map50_95"] = fp16["map50_95"] - variants["nms_fp32"]["map50_95"]
    fp16["delta_map50"] = fp16["map50"] - variants["nms_fp32"]["map50"]
    fp16["within_target"] = abs(fp16["delta_map50_95"]) <= TARGET
    fp16["conversion"] = conversion.to_dict()
    return variants


def _errors(raw16: list[np.ndarray], raw32: list[np.ndarray], input_hw) -> dict:
    import torch

    from trt_prune.detection.decode import decode
    from trt_prune.onnx_io import compare_outputs

    a = np.concatenate(raw16).astype(np.float32)
    b = np.concatenate(raw32)
    raw = compare_outputs(a, b, atol=0.0, rtol=0.0)
    boxes16, scores16 = decode(torch.from_numpy(a), input_hw)
    boxes32, scores32 = decode(torch.from_numpy(b), input_hw)
    return {"raw_max_abs": raw["max_abs"], "raw_max_rel": raw["max_rel"],
            "raw_mean_abs": float(np.abs(a - b).mean()),
            "box_max_abs_px": float((boxes16 - boxes32).abs().max()),
            "box_mean_abs_px": float((boxes16 - boxes32).abs().mean()),
            "score_max_abs": float((scores16 - scores32).abs().max())}


def environment() -> dict:
    from importlib import metadata

    from trt_prune.profiling.profile import machine_info

    versions = {d: metadata.version(d) for d in ("torch", "onnx", "onnxruntime", "onnx_graphsurgeon")}
    return {**machine_info(), "versions": versions, "load_avg": os.getloadavg()}


def run(images: int, threads: int) -> dict:
    import onnx

    from trt_prune.cleaner import clean_onnx
    from trt_prune.data import RoadScenes
    from trt_prune.detection.metrics import evaluate
    from trt_prune.exporter import export_onnx
    from trt_prune.models import load_model
    from trt_prune.precision import to_fp16

    loaded = load_model("builtin:demo-detector")
    if loaded.meta.weights is None:
        raise SystemExit("the demo detector's shipped weights are missing; train them first")
    shape = loaded.input_shape
    val = RoadScenes("val", size=shape[-1])
    record: dict = {"model": "builtin:demo-detector", "input_shape": list(shape), "images": images}
    with tempfile.TemporaryDirectory(prefix="fp16_accuracy_") as tmp:
        tmp = Path(tmp)
        exported = export_onnx(loaded.model, tmp / "raw.onnx", shape)
        cleaned = clean_onnx(tmp / "raw.onnx", tmp / "fp32.onnx")
        record["export"] = {"exporter": exported.exporter, "parity": exported.parity}
        record["clean"] = {"nodes_before": cleaned.nodes_before, "nodes_after": cleaned.nodes_after}
        conversions = {"fp16": to_fp16(tmp / "fp32.onnx", tmp / "fp16.onnx"),
                       "fp16_io16": to_fp16(tmp / "fp32.onnx", tmp / "fp16_io16.onnx", keep_io_types=False)}
        paths = {"fp32": tmp / "fp32.onnx", "fp16": tmp / "fp16.onnx", "fp16_io16": tmp / "fp16_io16.onnx"}
        raws: dict[str, list] = {}
        variants = {}
        for name, path in paths.items():
            model = onnx.load(str(path))
            raws[name] = []
            session = _session(path, threads)
            started = time.perf_counter()
            scores = evaluate(_predictor(session, raws[name]), val, batch_size=16, limit=images)
            seconds = time.perf_counter() - started
            variants[name] = {
                "map50_95": scores["map50_95"], "map50": scores["map50"], "images": scores["images"],
                "eval_seconds": round(seconds, 1),
                "nodes": len(model.graph.node),
                "casts": sum(n.op_type == "Cast" for n in model.graph.node),
                "file_bytes": path.stat().st_size,
                "io_types": {v.name: onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower()
                             for v in [*model.graph.input, *model.graph.output]},
            }
            print(f"{name:10s} mAP@[.5:.95] {scores['map50_95']:.4f}  mAP@.5 {scores['map50']:.4f}  "
                  f"nodes {variants[name]['nodes']}  casts {variants[name]['casts']}  "
                  f"{variants[name]['file_bytes'] / 1e6:.2f} MB  [{seconds:.0f} s]", flush=True)
        variants.update(_nms_variants(loaded.model, shape, val, images, threads, tmp, record))
        for name, result in conversions.items():
            v = variants[name]
            v["delta_map50_95"] = v["map50_95"] - variants["fp32"]["map50_95"]
            v["delta_map50"] = v["map50"] - variants["fp32"]["map50"]
            v["within_target"] = abs(v["delta_map50_95"]) <= TARGET
            v["val_errors"] = _errors(raws[name], raws["fp32"], shape[-2:])
            v["conversion"] = result.to_dict()
    record["variants"] = variants
    return record


def sweep(folder: Path) -> dict:
    """to_fp16 on every ``<folder>/<model>/ours.onnx``, default settings."""
    from collections import Counter

    from trt_prune.errors import TrtPruneError
    from trt_prune.precision import to_fp16

    rows = {}
    with tempfile.TemporaryDirectory(prefix="fp16_sweep_") as tmp:
        for src in sorted(folder.glob("*/ours.onnx")):
            name = src.parent.name
            started = time.perf_counter()
            try:
                result = to_fp16(src, Path(tmp) / "fp16.onnx")
                parity = list(result.parity.values())
                rows[name] = {"ok": True, "nodes_before": result.nodes_before, "nodes_after": result.nodes_after,
                              "casts": result.casts_after, "blocked": dict(Counter(b["op"] for b in result.blocked)),
                              "max_abs": max(p["max_abs"] for p in parity),
                              "max_rel": max(p["max_rel"] for p in parity),
                              "mb_before": result.bytes_before / 1e6, "mb_after": result.bytes_after / 1e6}
            except TrtPruneError as exc:
                rows[name] = {"ok": False, "error": " ".join(str(exc).split())[:300]}
            rows[name]["seconds"] = round(time.perf_counter() - started, 2)
            print(f"sweep {name:32s} {'ok' if rows[name]['ok'] else rows[name]['error']}", flush=True)
    return rows


def _sweep_markdown(rows: dict, folder: str) -> list[str]:
    ok = sum(r["ok"] for r in rows.values())
    lines = ["", f"## Sweep: the coverage models ({ok} of {len(rows)} converted and within the default tolerance)",
             "", f"Cleaned exports from `{folder}` (pruned 50%, random weights), `to_fp16` with its defaults "
             "(fp32 IO, atol = rtol = 1e-2 on seeded random inputs at batch 1 and 2). max rel is relative to "
             "each element but never to less than 0.1% of the output's largest magnitude.", "",
             "| model | nodes | Casts | kept fp32 | max abs | max rel | MB fp32 → fp16 | s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if not r["ok"]:
            lines.append(f"| {name} | ✗ {r['error'][:150].replace('|', '/')} | | | | | | {r['seconds']} |")
            continue
        kept = ", ".join(f"{op} {n}" for op, n in sorted(r["blocked"].items())) or "—"
        lines.append(f"| {name} | {r['nodes_before']} → {r['nodes_after']} | {r['casts']} | {kept} | "
                     f"{r['max_abs']:.2g} | {r['max_rel']:.2g} | {r['mb_before']:.1f} → {r['mb_after']:.1f} | "
                     f"{r['seconds']} |")
    return lines


def markdown(record: dict, env: dict, command: str) -> str:
    v = env["versions"]
    variants = record["variants"]
    lines = [
        "# fp16 accuracy: demo detector in ONNX Runtime, fp32 vs fp16",
        "",
        f"Machine: {env['cpu']}, {env['cpu_count']} cores ({env['usable_cores']} usable), {env['platform']}; "
        f"load average at start {env['load_avg'][0]:.1f}. Python {env['python']}, torch {v['torch']}, onnx "
        f"{v['onnx']}, onnxruntime {v['onnxruntime']} (CPUExecutionProvider), onnx-graphsurgeon "
        f"{v['onnx_graphsurgeon']}.",
        "",
        f"Model: `{record['model']}` with its shipped weights, input {record['input_shape']}, exported "
        f"({record['export']['exporter']}) and cleaned ({record['clean']['nodes_before']} → "
        f"{record['clean']['nodes_after']} nodes), then `trt_prune.precision.to_fp16`: `fp16` keeps fp32 inputs "
        "and outputs, `fp16_io16` has fp16 ones. `nms_*`: the deployment graph of `trt-prune export --nms` "
        "(decoding, sigmoid and NonMaxSuppression in the graph; default NMS settings), cleaned "
        f"({record['nms_clean']['nodes_before']} → {record['nms_clean']['nodes_after']} nodes), converted with "
        "fp32 IO. mAP: COCO mAP on the first "
        f"{record['images']} validation road scenes; the raw-output models scored as `trt-prune demo` scores a "
        "session, the NMS graphs from their own detections. Δ is against the fp32 model of the same kind. "
        f"Target: |Δ mAP@[.5:.95]| ≤ {TARGET}. Command: `{command}`",
        "",
        "| variant | IO | mAP@[.5:.95] | Δ | mAP@.5 | Δ | nodes | Casts | nodes kept fp32 | file MB | eval s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in variants.items():
        io = "/".join(sorted(set(r["io_types"].values())))
        d1 = f"{r['delta_map50_95']:+.4f}" if "delta_map50_95" in r else "—"
        d2 = f"{r['delta_map50']:+.4f}" if "delta_map50" in r else "—"
        blocked = str(len(r["conversion"]["blocked"])) if "conversion" in r else "—"
        lines.append(f"| {name} | {io} | {r['map50_95']:.4f} | {d1} | {r['map50']:.4f} | {d2} | {r['nodes']} | "
                     f"{r['casts']} | {blocked} | {r['file_bytes'] / 1e6:.2f} | {r['eval_seconds']} |")
    lines += ["", "Output error of fp16 against fp32 on the same validation images (raw-output models), and the "
              "conversion's own parity check (seeded random inputs; for the NMS graph on the decoded boxes and "
              "scores going into TopK/NMS, whose selection a tiny difference can reorder):", "",
              "| variant | raw max abs | raw max rel | raw mean abs | box max px | box mean px | score max abs | "
              "parity (max abs / max rel) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in variants.items():
        if "conversion" not in r:
            continue
        e = r.get("val_errors")
        cells = ([f"{e['raw_max_abs']:.3g}", f"{e['raw_max_rel']:.3g}", f"{e['raw_mean_abs']:.2g}",
                  f"{e['box_max_abs_px']:.3g}", f"{e['box_mean_abs_px']:.2g}", f"{e['score_max_abs']:.2g}"]
                 if e else ["—"] * 6)
        parity = "; ".join(f"{k}: {p['max_abs']:.3g} / {p['max_rel']:.3g}"
                           for k, p in r["conversion"]["parity"].items())
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {parity} |")
    for name in ("fp16", "nms_fp16"):
        conv = variants[name]["conversion"]
        kept = ", ".join(f"{b['node']} ({b['op']}: {b['reason']})" for b in conv["blocked"]) or "none"
        lines += ["", f"Kept fp32 in `{name}`: {kept}."]
    conv = variants["fp16"]["conversion"]
    inits = conv["initializers"]
    lines += ["", f"Block list (defaults): ops {', '.join(conv['block_list']['ops'])}; reductions over ≥ "
              f"{conv['block_list']['reduce_min_elements']} elements, and always "
              f"{', '.join(conv['block_list']['reduce_always'])}; score activations feeding outputs: "
              f"{conv['block_list']['head_activations']}. The raw-output graph has no softmax, normalisation or "
              "reduction (BatchNorm is folded into the convs at export; the class sigmoid is applied by the "
              "decoder, outside the graph), so nothing in it stays fp32.",
              "",
              f"Weights of `fp16`: {json.dumps(inits['by_dtype'])}; fp32 weight values beyond fp16's range: "
              f"{inits['clamped']}, in its subnormal range: {inits['subnormal']}.",
              "",
              "Summary: " + "; ".join(
                  f"{n} {r['map50_95']:.4f} (Δ {r['delta_map50_95']:+.4f}, "
                  f"{'within' if r['within_target'] else 'OUTSIDE'} ±{TARGET})"
                  for n, r in variants.items() if "delta_map50_95" in r)
              + f"; fp32 {variants['fp32']['map50_95']:.4f}, nms_fp32 {variants['nms_fp32']['map50_95']:.4f}."]
    if record.get("sweep"):
        lines += _sweep_markdown(record["sweep"], record["sweep_folder"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=500, help="validation images to score (default 500)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: usable cores)")
    p.add_argument("--sweep", type=Path, help="also convert every <DIR>/<model>/ours.onnx (clean_vs_polygraphy --keep)")
    p.add_argument("--json", type=Path, default=ROOT / "bench/results/fp16_accuracy.json",
                   help="result file; its Markdown goes beside it (.md)")
    args = p.parse_args(argv)
    if args.images < 1:
        p.error(f"--images must be at least 1, got {args.images}")
    from trt_prune.profiling.profile import machine_info
    from trt_prune.provenance import write_result

    threads = args.threads or machine_info()["usable_cores"]
    env = environment()
    command = "python bench/fp16_accuracy.py " + " ".join(argv)
    if args.sweep and not any(args.sweep.glob("*/ours.onnx")):
        p.error(f"--sweep: no <model>/ours.onnx under {args.sweep}; run bench/clean_vs_polygraphy.py --keep DIR")
    record = run(args.images, threads)
    record["threads"] = threads
    if args.sweep:
        record["sweep_folder"] = str(args.sweep)
        record["sweep"] = sweep(args.sweep)
    text = markdown(record, env, command)
    write_result(args.json.stem, {"environment": env, "command": command, "target_delta_map50_95": TARGET, **record},
                 text, results_dir=args.json.parent, folder=ROOT)
    print()
    print(text)


if __name__ == "__main__":
    main()
