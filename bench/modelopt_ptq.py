"""INT8 Q/DQ post-training quantization with NVIDIA ModelOpt's ONNX PTQ, and a census of what it quantized.

Standalone: imports only onnx, numpy, onnxruntime and modelopt (not trt_prune), so it runs in a throwaway venv
that keeps ModelOpt's ``[onnx]`` extra (onnx~=1.21, onnxruntime-gpu, cupy) out of the project's environment.
Setup (CPU only; same onnx/onnxruntime/numpy as the project venv; torch is a CPU wheel, used by ModelOpt only
for fp8 but imported unconditionally)::

    python3 -m venv /tmp/modelopt-venv
    P=/tmp/modelopt-venv/bin/pip
    $P install --no-deps nvidia-modelopt==0.47.0
    $P install onnx==1.23.2 onnxruntime==1.32.0 numpy==2.4.6 ml_dtypes==0.7.0 protobuf==7.36.2 \\
        onnx_graphsurgeon==0.6.1 onnxslim==0.1.98 onnxscript==0.7.2 onnx-ir==1.1.0 packaging tqdm \\
        nvidia-ml-py lief
    $P install /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl   # any CPU torch>=2.8 wheel

Run (``--calib`` takes an N×C×H×W float32 .npy; ``--random N`` draws seeded uniform [0, 1] inputs instead)::

    /tmp/modelopt-venv/bin/python bench/modelopt_ptq.py --onnx a.onnx [--onnx b.onnx] \\
        (--calib calib.npy | --random 32) [--method entropy|max] --out-dir DIR --json results.json

Settings are ModelOpt's TensorRT defaults (int8, per-channel symmetric weights, symmetric per-tensor activations,
no bias quantization, Q+DQ pairs on fp32 weights, its placement rules, rest of the graph in ``--high-precision``,
default fp16 as ModelOpt's own); only calibration is forced onto ONNX Runtime's CPU provider.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shutil
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
NOTE_RE = re.compile(r"exclud|unsupported|Found Conv with|Skipped quantizing|GEMV|Quantizable op types|"
                     r"nodes to quantize:|- WARNING -", re.IGNORECASE)
SETTINGS = {
    "quantize_mode": "int8", "calibration_eps": ["cpu"], "per_channel_weights": True,
    "ort_extra_options (ModelOpt configure_ort)": {
        "ActivationSymmetric": True, "QuantizeBias": False, "AddQDQPairToWeight": True,
        "QDQDisableWeightAdjustForInt32Bias": True},
    "passes": ["concat_elimination"], "placement": "ModelOpt default (pattern-based, no autotune)",
}


def input_shape(model: onnx.ModelProto) -> tuple[str, list[int]]:
    inits = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in inits]
    if len(inputs) != 1:
        sys.exit(f"expected one model input, got {[v.name for v in inputs]}")
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
            for d in inputs[0].type.tensor_type.shape.dim]
    return inputs[0].name, dims


def census(model: onnx.ModelProto) -> dict:
    """Q/DQ counts, which weighted ops read a DequantizeLinear on input 0, and how their weights are stored."""
    nodes = model.graph.node
    producer = {out: n for n in nodes for out in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    for n in nodes:  # Constant nodes count as initializers
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            inits[n.output[0]] = n.attribute[0].t
    quantized, floating, weight_storage = [], [], {}
    for n in nodes:
        if n.op_type not in WEIGHTED:
            continue
        src = producer.get(n.input[0])
        (quantized if src is not None and src.op_type == "DequantizeLinear" else floating).append(n.name)
        w = producer.get(n.input[1]) if len(n.input) > 1 else None
        if w is None or w.op_type != "DequantizeLinear":
            kind = "float (no DQ)"
        elif w.input[0] in inits:
            kind = f"{onnx.helper.tensor_dtype_to_np_dtype(inits[w.input[0]].data_type)} initializer + DQ"
        elif (q := producer.get(w.input[0])) is not None and q.op_type == "QuantizeLinear":
            t = inits.get(q.input[0])
            dt = onnx.helper.tensor_dtype_to_np_dtype(t.data_type) if t is not None else "computed"
            kind = f"{dt} initializer + Q + DQ"
        else:
            kind = "other"
        weight_storage[kind] = weight_storage.get(kind, 0) + 1
    ops = [n.op_type for n in nodes]
    dq_out = {n.output[0] for n in nodes if n.op_type == "DequantizeLinear"}
    dq_consumers: dict[str, int] = {}
    for n in nodes:
        if any(i in dq_out for i in n.input):
            dq_consumers[n.op_type] = dq_consumers.get(n.op_type, 0) + 1
    return {
        "QuantizeLinear": ops.count("QuantizeLinear"), "DequantizeLinear": ops.count("DequantizeLinear"),
        "weighted_ops": len(quantized) + len(floating), "weighted_quantized": len(quantized),
        "weighted_float": len(floating), "weighted_float_names": floating, "weight_storage": weight_storage,
        "dq_consumer_op_types": dq_consumers,
        "nodes_total": len(ops), "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
    }


def quantize_one(path: Path, args, calib: np.ndarray | None) -> dict:
    from modelopt.onnx.quantization import quantize

    model = onnx.load(str(path), load_external_data=False)
    name, shape = input_shape(model)
    if calib is None:
        rng = np.random.default_rng(args.seed)
        calib = rng.uniform(0.0, 1.0, size=(args.random * shape[0], *shape[1:])).astype(np.float32)
    if list(calib.shape[1:]) != shape[1:]:
        sys.exit(f"{path}: calibration shape {calib.shape} does not match input {name} {shape}")
    out = args.out_dir / f"{path.stem}.int8.onnx"
    log = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp:  # ModelOpt/ORT write intermediates beside the input
        src = Path(tmp) / path.name
        shutil.copy(path, src)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            quantize(str(src), quantize_mode="int8", calibration_data=calib, calibration_method=args.method,
                     calibration_eps=["cpu"], output_path=str(out), high_precision_dtype=args.high_precision,
                     log_level="DEBUG")
        seconds = time.perf_counter() - t0
    text = log.getvalue()
    (args.out_dir / f"{path.stem}.modelopt.log").write_text(text)
    notes = [ln.split(" - ", 2)[-1] for ln in text.splitlines()
             if NOTE_RE.search(ln) and " - DEBUG - Selected" not in ln]
    result = {"onnx": str(path), "output": str(out), "input": {name: shape},
              "calibration_samples": int(calib.shape[0]), "seconds": round(seconds, 2)}
    result.update(census(onnx.load(str(out))))
    result["modelopt_notes"] = [n if len(n) < 600 else n[:600] + " ..." for n in notes]
    print(f"{path.name}: {seconds:.1f} s, Q {result['QuantizeLinear']} DQ {result['DequantizeLinear']}, "
          f"weighted ops quantized {result['weighted_quantized']}/{result['weighted_ops']}, "
          f"float {result['weighted_float_names']}, weights {result['weight_storage']}")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--onnx", action="append", required=True, type=Path, help="model to quantize (repeatable)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--calib", type=Path, help=".npy of N×C×H×W float32 calibration inputs")
    src.add_argument("--random", type=int, metavar="N", help="N seeded uniform [0, 1] batches of the input shape")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", choices=("entropy", "max"), default="entropy")
    ap.add_argument("--high-precision", choices=("fp16", "fp32"), default="fp16",
                    help="dtype of the non-quantized rest (ModelOpt's default: fp16)")
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    calib = np.load(args.calib).astype(np.float32) if args.calib else None
    import onnxruntime

    report = {"modelopt": version("nvidia-modelopt"), "onnx": onnx.__version__,
              "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "method": args.method,
              "high_precision_dtype": args.high_precision, "settings": SETTINGS,
              "calibration": str(args.calib) if args.calib else f"random uniform [0,1], seed {args.seed}",
              "models": [quantize_one(p, args, calib) for p in args.onnx]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
