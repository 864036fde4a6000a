#!/usr/bin/env bash
# One prepared run for a lent GPU machine (H100/H200; torch there, nothing downloadable). From the repo root:
#   bash bench/gpu_check.sh            # results under $OUT (the device tool's folder) or bench/results/gpu
#   (the copy on the GPU machine may carry an older .git: name the commit sent, TRT_PRUNE_COMMIT=abc1234)
# 1. installs the wheels carried in .whl/ (the image lacks onnx-graphsurgeon, polygraphy, pycocotools and onnxslim;
#    fetch them here with the `pip download` line of the device tool's README and carry .whl); 2. runs the GPU tests (tests/gpu, and the real-CUDA variants of the TensorRT
#    backend's tests); 3. times 2:4 against dense per eligible GEMM layer (bench/gpu_sparse24_layers.py, issue
#    4's eligibility floor); 4. times dense / structured / 2:4 / structured+2:4 of the demo detector and resnet50
#    at 640x640, batch 1 and 8, on the torch backend (bench/gpu_torch_variants.py). Each step has its own time limit so one slow step cannot eat the rest;
#    the last lines printed are the summary tables.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${OUT:-bench/results/gpu}
mkdir -p "$RESULTS"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv | tee "$RESULTS/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$RESULTS/gpu.txt"
# tests/gpu, plus the TensorRT-backend tests whose CUDA side switches to the real cuda.bindings runtime where a
# GPU is visible (adapter, page-locked staging, events, graph capture; TensorRT itself stays emulated)
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu tests/cpu/test_tensorrt_logic.py \
  tests/cpu/test_backends.py 2>&1 | tee "$RESULTS/tests.txt"
timeout 180 python3 bench/gpu_sparse24_layers.py --model builtin:demo-detector,torchvision:resnet50 \
  --json "$RESULTS/gpu_sparse24_layers.json" 2>&1 \
  | tee "$RESULTS/sparse24_layers.txt"
timeout 240 python3 bench/gpu_torch_variants.py --seconds 1.5 --json "$RESULTS/gpu_torch_variants.json" 2>&1 \
  | tee "$RESULTS/torch_variants.txt"
echo "== summary"
tail -n 3 "$RESULTS/tests.txt"
tail -n 6 "$RESULTS/sparse24_layers.txt"
tail -n 18 "$RESULTS/torch_variants.txt"
