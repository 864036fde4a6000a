"""Decode + NMS in the graph (``export --nms``) against the torch post-processing, on RoadScenes validation images.

Exports builtin:demo-detector (shipped weights) with ``--nms`` (defaults: the mAP setting of
``trt_prune.detection.decode.postprocess``) and, from one decode graph, two more tails: class-agnostic NMS and
deployment thresholds. For every validation image it compares the graph's detections in ONNX Runtime with the
torch model's own post-processing (``postprocess``, or its mirror ``nms_reference`` for the class-agnostic
tail): detections paired by class, box (1e-3 px) and score (1e-4), the largest box and score differences, and
COCO mAP of both (pycocotools; for the default tail the torch number comes from
``trt_prune.detection.metrics.evaluate`` itself, fed the torch outputs). It also checks the NMS tail alone: the
graph against ``nms_reference`` on the ONNX decode graph's own boxes and scores.

Usage:
    python bench/nms_parity.py [--images 300] [--batch 16] [--exporter dynamo] [--json OUT.json]
Writes ``bench/results/nms_parity.{json,md}`` (or OUT.json and OUT.md beside it), stamped with commit, date and
machine by ``trt_prune.provenance.write_result``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import onnx
import torch
from _common import RESULTS, ort_session, save, stamp

from trt_prune.data import RoadScenes
from trt_prune.detection.metrics import coco_map, evaluate
from trt_prune.detection.nms_export import (
    DECODED_NAMES,
    DetectorDecode,
    NMSConfig,
    append_nms,
    compare_detections,
    export_detector_nms,
    nms_reference,
    reference_detections,
    unpad_detections,
)
from trt_prune.exporter import export_onnx
from trt_prune.models import load_model

VARIANTS = {
    "default (mAP setting)": NMSConfig(),
    "class-agnostic": NMSConfig(class_agnostic=True),
    "deployment (0.25 / 0.45 / K=100)": NMSConfig(score_threshold=0.25, iou_threshold=0.45),
}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo")
    parser.add_argument("--json", default=str(RESULTS / "nms_parity.json"),
                        help="result file; its Markdown table goes beside it (.md)")
    args = parser.parse_args(argv)

    loaded = load_model("builtin:demo-detector")
    model, shape = loaded.model, loaded.input_shape
    hw = tuple(shape[-2:])
    val = RoadScenes("val", size=hw[0])
    n = min(args.images, len(val))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_detector_nms(model, Path(tmp) / "demo_nms.onnx", shape, VARIANTS["default (mAP setting)"],
                                       exporter=args.exporter)
        decode_path = Path(tmp) / "decode.onnx"
        wrapper = DetectorDecode(model, hw)
        export_onnx(wrapper, decode_path, shape, exporter=args.exporter, output_names=DECODED_NAMES)
        decode_model = onnx.load(str(decode_path))
        num_anchors, num_classes = int(wrapper.points.shape[0]), int(model.num_classes)
        sessions = {name: ort_session(exported.path if i == 0 else
                                   append_nms(decode_model, cfg, num_anchors, num_classes))
                    for i, (name, cfg) in enumerate(VARIANTS.items())}
        decode_session = ort_session(decode_path)
        export_info = exported.to_dict()
        print(f"exported ({exported.decode.exporter}) in {time.perf_counter() - started:.1f} s; running {n} images",
              flush=True)

        raws, targets = [], []
        torch_dets = {name: [] for name in VARIANTS}
        onnx_dets = {name: [] for name in VARIANTS}
        tail_only = []  # default graph vs nms_reference on the decode graph's own outputs
        for start in range(0, n, args.batch):
            items = [val[i] for i in range(start, min(n, start + args.batch))]
            images = torch.stack([im for im, _ in items])
            targets.extend(t for _, t in items)
            with torch.no_grad():
                raw = model(images)
            raws.append(raw)
            feed = {"images": images.numpy()}
            for name, cfg in VARIANTS.items():
                torch_dets[name].extend(reference_detections(raw, hw, cfg))
                onnx_dets[name].extend(unpad_detections(sessions[name].run(None, feed)))
            boxes, scores = decode_session.run(None, feed)
            tail_only.append(compare_detections(onnx_dets["default (mAP setting)"][-len(items):],
                                                nms_reference(boxes, scores, hw, VARIANTS["default (mAP setting)"])))
            print(f"  {start + len(items)}/{n}", flush=True)

    # evaluate() itself on the torch outputs, replayed in order (postprocess with its defaults inside)
    replay = iter(raws)
    torch_eval = evaluate(lambda images: next(replay), val, batch_size=args.batch, limit=n)
    rows = []
    for name, cfg in VARIANTS.items():
        stats = compare_detections(onnx_dets[name], torch_dets[name], box_tol=1e-3, score_tol=1e-4)
        map_torch = coco_map(torch_dets[name], targets, RoadScenes.num_classes)
        map_onnx = coco_map(onnx_dets[name], targets, RoadScenes.num_classes)
        rows.append({"variant": name, "config": cfg.to_dict(), **stats, "map_torch": map_torch, "map_onnx": map_onnx})
    default_row = rows[0]
    if abs(torch_eval["map50_95"] - default_row["map_torch"]["map50_95"]) > 1e-12:
        raise SystemExit(f"evaluate() gives {torch_eval} but postprocess + coco_map {default_row['map_torch']}")
    tail = {key: sum(s[key] for s in tail_only) for key in ("images", "detections_expected", "paired",
                                                             "identical_images")}
    tail["max_box_diff"] = max(s["max_box_diff"] for s in tail_only)
    result = {
        "provenance": stamp(), "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
        "model": "builtin:demo-detector (shipped weights)", "input_shape": list(shape), "images": n,
        "exporter": exported.decode.exporter, "export": export_info, "torch_evaluate": torch_eval,
        "nms_tail_same_inputs": tail, "variants": rows, "seconds": round(time.perf_counter() - started, 1),
    }
    save(args.json, result, _markdown(result))
    print(_markdown(result))
    return result


def _markdown(r: dict) -> str:
    m = r["provenance"]["machine"]
    lines = [
        "# Decode + NMS in the graph: ONNX Runtime vs the torch post-processing",
        "",
        f"Machine: {m['cpu']}, {m['usable_cores']} usable cores (CPU only); torch {r['torch']}, onnxruntime "
        f"{r['onnxruntime']}. {r['model']}, input "
        f"{'x'.join(map(str, r['input_shape']))}, {r['images']} RoadScenes validation images, exporter "
        f"{r['exporter']} (`trt-prune export builtin:demo-detector --nms`), {r['seconds']} s in all.",
        "",
        "Torch reference: `trt_prune.detection.decode.postprocess` on the torch model's raw output (class-agnostic: "
        "the same steps with `torchvision.ops.nms`). Detections are paired by class, box within 1e-3 px and score "
        "within 1e-4; \"identical images\" have every detection paired both ways.",
        "",
        "| variant | images | identical images | detections torch / ONNX | paired | class agreement | max box Δ px "
        "| max score Δ | mAP50-95 torch / ONNX | mAP50 torch / ONNX |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["variants"]:
        mt, mo = row["map_torch"], row["map_onnx"]
        lines.append(f"| {row['variant']} | {row['images']} | {row['identical_images']} | "
                     f"{row['detections_expected']} / {row['detections_actual']} | {row['paired']} | "
                     f"{row['class_agreement']:.4f} | {row['max_box_diff']:.2e} | {row['max_score_diff']:.2e} | "
                     f"{mt['map50_95']:.4f} / {mo['map50_95']:.4f} | {mt['map50']:.4f} / {mo['map50']:.4f} |")
    t, e = r["nms_tail_same_inputs"], r["torch_evaluate"]
    p = r["export"]["parity"]
    lines += [
        "",
        f"`evaluate()` on the torch model (same images): mAP50-95 {e['map50_95']:.4f}, mAP50 {e['map50']:.4f}.",
        "",
        f"NMS tail alone (default graph vs `nms_reference` on the ONNX decode graph's own boxes and scores): "
        f"{t['identical_images']}/{t['images']} images identical, {t['paired']}/{t['detections_expected']} "
        f"detections paired, max box Δ {t['max_box_diff']:.2e} px.",
        "",
        "Decode part vs torch (export parity, random inputs, batch 1 and 2): "
        + ", ".join(f"{name} max |Δ| {v['max_abs']:.2e}" for name, v in p.items()) + ".",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
