"""``export --nms`` for torchvision's RetinaNet, FCOS, SSD300 and SSDlite cores, against torchvision's own
post-processing, on RoadScenes validation images.

Each core is built as torchvision builds it (91 classes, its default input size) with random weights, and its
BatchNorm statistics are measured on 8 road scenes (``calibrate_batchnorm``): without that, random-weight heads
score every box the same and "the same detections" means nothing. The score threshold is the detector's own
when its head gives candidates above it; RetinaNet's and FCOS's untrained classifiers sit at their prior
(0.01) and below their own thresholds (0.05, 0.2), so for them the threshold is the 99.9th percentile of the
scores of one calibration scene (stated in the table). Every other setting is the detector's own (IoU,
detections per image, top-k candidates per level or per class).

For every image, the graph's detections in ONNX Runtime are paired with those of the detector class's own
``postprocess_detections`` on torch's head outputs: same class, box within the tolerance, score within 1e-4.
Also reported: the NMS tail alone on identical decoded inputs (the export's own check), score ties that
swapped at a top-k boundary, and seconds per image for the graph in ONNX Runtime and for torch (model + its
post-processing), batch 1.

Usage:
    python bench/nms_cores.py [--images 50] [--box-tol 0.05] [--cores NAME ...] [--json OUT.json]
Writes ``bench/results/nms_cores.{json,md}`` (or OUT.json and OUT.md beside it), stamped with commit, date and
machine by ``trt_prune.provenance.write_result``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import RESULTS, ort_session, save, stamp

from trt_prune.detection.nms_export import (
    check_images,
    compare_detections,
    decode_plan,
    export_detector_nms,
)
from trt_prune.detection.torchvision_decode import KINDS, core_reference
from trt_prune.models.cores import CORES, calibrate_batchnorm, detection_core


def run_core(name: str, images: int, box_tol: float, folder: Path) -> dict:
    torch.manual_seed(0)
    size = CORES[name].input_size
    core = calibrate_batchnorm(detection_core(name), check_images((size, size), 8, seed=101))
    plan = decode_plan(core, (1, 3, size, size))
    own = plan.config()
    with torch.no_grad():
        _, scores = plan.module(check_images((size, size), 1, seed=102))
    threshold, source = own.score_threshold, "own"
    if float((scores > own.score_threshold).sum()) == 0:
        threshold, source = float(np.quantile(scores.numpy().ravel(), 0.999)), "99.9th percentile"
    config = plan.config(score_threshold=threshold)
    path = folder / f"{name}.onnx"
    started = time.perf_counter()
    result = export_detector_nms(core, path, (1, 3, size, size), config, atol=box_tol)
    export_s = time.perf_counter() - started

    session = ort_session(path)
    data = check_images((size, size), images, seed=7)
    stats, ort_s, torch_s = [], [], []
    for i in range(images):
        x = data[i:i + 1]
        t0 = time.perf_counter()
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"images": x.numpy()}),
                       strict=True))
        t1 = time.perf_counter()
        expected = core_reference(core, x, config)
        t2 = time.perf_counter()
        ort_s.append(t1 - t0)
        torch_s.append(t2 - t1)
        stats.append(compare_detections(got, expected, box_tol=box_tol))
    total = {k: sum(s[k] for s in stats) for k in ("images", "detections_expected", "detections_actual", "paired",
                                                   "identical_images", "tied_images", "tie_swaps")}
    total["max_box_diff"] = max(s["max_box_diff"] for s in stats)
    total["max_score_diff"] = max(s["max_score_diff"] for s in stats)
    larger = max(total["detections_expected"], total["detections_actual"])
    total["class_agreement"] = total["paired"] / larger if larger else 1.0
    return {
        "core": name, "input": [1, 3, size, size], "classes": plan.num_classes, "anchors": plan.num_anchors,
        "pre_nms_scope": plan.scope, "score_threshold": threshold, "threshold_source": source,
        "own_settings": {k: getattr(own, k) for k in ("score_threshold", "iou_threshold", "max_detections",
                                                       "pre_nms_topk")},
        "exporter": result.decode.exporter, "export_seconds": round(export_s, 2),
        "decode_parity": result.decode.parity, "nms_tail_parity": result.nms_parity, "vs_torchvision": total,
        "ms_per_image": {"onnxruntime_graph": round(1e3 * float(np.median(ort_s)), 1),
                         "torch_model_and_postprocess": round(1e3 * float(np.median(torch_s)), 1)},
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--box-tol", type=float, default=0.05, help="pixels; also the decode parity atol")
    parser.add_argument("--cores", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--json", default=str(RESULTS / "nms_cores.json"),
                        help="result file; its Markdown table goes beside it (.md)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cores:
            print(f"{name} …", file=sys.stderr, flush=True)
            rows.append(run_core(name, args.images, args.box_tol, Path(tmp)))
    result = {
        "provenance": stamp(), "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
        "torchvision": __import__("torchvision").__version__, "images": args.images,
        "box_tol": args.box_tol, "cores": rows,
    }
    save(args.json, result, _markdown(result))
    print(_markdown(result))
    return result


def _markdown(r: dict) -> str:
    m = r["provenance"]["machine"]
    lines = [
        "# `export --nms` on torchvision cores vs torchvision's own post-processing\n",
        f"Machine: {m['cpu']}, {m['usable_cores']} usable cores (CPU only); torch {r['torch']}, "
        f"torchvision {r['torchvision']}, "
        f"ONNX Runtime {r['onnxruntime']}. {r['images']} RoadScenes validation "
        f"images per core, batch 1; random weights with BatchNorm statistics from 8 scenes; box tolerance "
        f"{r['box_tol']} px. Rerun: `python bench/nms_cores.py`.\n",
        "| core | input | anchors × classes | pre-NMS top-k | score thr. | detections (torchvision) | paired | "
        "tie swaps | max box Δ px | max score Δ | NMS tail on same inputs | ORT graph ms | torch ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in r["cores"]:
        v, tail = c["vs_torchvision"], c["nms_tail_parity"]
        thr = f"{c['score_threshold']:.4g}" + (" (own)" if c["threshold_source"] == "own" else " (p99.9)")
        lines.append(
            f"| {c['core']} | {c['input'][2]}² | {c['anchors']} × {c['classes']} | {c['own_settings']['pre_nms_topk']}"
            f" per {c['pre_nms_scope']} | {thr} | {v['detections_expected']} | {v['paired']} | {v['tie_swaps']} | "
            f"{v['max_box_diff']:.1e} | {v['max_score_diff']:.1e} | {tail['paired']}/{tail['detections_expected']}"
            f"{' (+' + str(tail['tie_swaps']) + ' ties)' if tail['tie_swaps'] else ''} | "
            f"{c['ms_per_image']['onnxruntime_graph']} | {c['ms_per_image']['torch_model_and_postprocess']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
