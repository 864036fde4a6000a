#!/usr/bin/env bash
# One prepared run for a lent GPU machine (H100/H200; torch there, nothing downloadable). From the repo root:
#   bash bench/gpu_check.sh [all|check|latency|accuracy|int8|kernels]   # results under $OUT (the device tool's folder) or bench/results/gpu
#   (the copy on the GPU machine may carry an older .git: name the commit sent, TRT_PRUNE_COMMIT=abc1234)
# 1. installs the wheels carried in .whl/ (the image lacks onnx-graphsurgeon, polygraphy, pycocotools and onnxslim;
#    fetch them here with the `pip download` line of the device tool's README and carry .whl); 2. runs the GPU tests (tests/gpu, and the real-CUDA variants of the TensorRT
#    backend's tests); 3. times 2:4 against dense per eligible GEMM layer (bench/gpu_sparse24_layers.py, issue
#    4's eligibility floor); 4. times dense / structured / 2:4 / structured+2:4 of the demo detector and resnet50
#    at 640x640, batch 1 and 8, on the torch backend (bench/gpu_torch_variants.py). Each step has its own time limit so one slow step cannot eat the rest;
#    the last lines printed are the summary tables.
# Parts: `check` is steps 2-4 above; `accuracy` (issue 14) trains the rows of bench/accuracy_recovery.py (50 % of
# the MACs, and one-shot vs gradual+distill at 30 % and 70 %) and bench/classifier_track.py (Fashion-MNIST: carry
# the four IDX files in .data/fashion-mnist) all at once on the one GPU, each row its own process, and packs the row
# files into accuracy_rows.tgz; `merge` them on the CPU machine (p50 belongs there). ACC_ROWS (METHOD:TARGET[:STEPS]
# ...), ACC_STEPS, ACC_TIMEOUT, ACC_DEVICE and ACC_FASHION=0 override the rows, the step count (1000), the time
# allowed (450 s), the device (cuda) and skip the classifier track.
# `latency` (issue 15) measures the torch backend's fp16 latency table of the demo detector at 640x640 with 2:4
# times beside the dense ones, plans to 0.6x of the dense latency with 2:4 only where the table says it pays,
# and times dense / latency plan / latency plan + 2:4 / uniform L1 at the same predicted latency
# (bench/gpu_latency.py; the table and its plot stay in $RESULTS/latency_table).
# `int8` (issue 16) builds `trt-prune quantize`'s QDQ demo detector with TensorRT, strongly typed, and checks it
# against ONNX Runtime (tests/tensorrt -k int8); where TensorRT is not installed the line says so and why.
# `kernels` (issue 17) runs the Triton kernels' tests in real mode, bench/preprocess_speed.py (Triton vs torch ops
# on the GPU), the permutation search with the GPU scorer, and `profile --backend torch --e2e` (pre-processing +
# model + decode/NMS per frame, fp16, batch 8 at 640x640).

set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${OUT:-bench/results/gpu}
mkdir -p "$RESULTS"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
PARTS=${1:-all}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv | tee "$RESULTS/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$RESULTS/gpu.txt"
if [[ $PARTS == all || $PARTS == check ]]; then
# tests/gpu, plus the TensorRT-backend tests whose CUDA side switches to the real cuda.bindings runtime where a
# GPU is visible (adapter, page-locked staging, events, graph capture; TensorRT itself stays emulated)
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu tests/cpu/test_tensorrt_logic.py \
  tests/cpu/test_backends.py 2>&1 | tee "$RESULTS/tests.txt"
timeout 180 python3 bench/gpu_sparse24_layers.py --model builtin:demo-detector,torchvision:resnet50 \
  --json "$RESULTS/gpu_sparse24_layers.json" 2>&1 \
  | tee "$RESULTS/sparse24_layers.txt"
timeout 240 python3 bench/gpu_torch_variants.py --seconds 1.5 --json "$RESULTS/gpu_torch_variants.json" 2>&1 \
  | tee "$RESULTS/torch_variants.txt"
fi
if [[ $PARTS == all || $PARTS == latency ]]; then
  timeout 420 python3 bench/gpu_latency.py --table-dir "$RESULTS/latency_table" \
    --json "$RESULTS/gpu_latency.json" 2>&1 | tee "$RESULTS/latency.txt"
fi
if [[ $PARTS == all || $PARTS == accuracy ]]; then
  ACC=$(mktemp -d)/accuracy
  mkdir -p "$ACC"
  launch() {  # rows target steps
    python3 bench/accuracy_recovery.py train --rows "$1" --target-macs "$2" --steps "$3" --batch 8 \
      --workers 2 --threads 1 --device "${ACC_DEVICE:-cuda}" --eval-images "${ACC_EVAL:-500}" --out "$ACC" \
      >"$ACC/log_$1_$2_$3.txt" 2>&1 &
  }
  # one process per row (METHOD:TARGET[:STEPS]); ACC_ROWS replaces the list
  for spec in ${ACC_ROWS:-dense:0.5 oneshot:0.5 torch-pruning:0.5 gradual:0.5 gradual+distill:0.5 \
      sparse+gradual:0.5 oneshot:0.3 gradual+distill:0.3 oneshot:0.7 gradual+distill:0.7}; do
    IFS=: read -r rows target steps <<<"$spec"
    launch "$rows" "$target" "${steps:-${ACC_STEPS:-1000}}"
  done
  if [[ ${ACC_FASHION:-1} == 1 ]]; then
    FASHION_MNIST_DIR=.data/fashion-mnist python3 bench/classifier_track.py --device "${ACC_DEVICE:-cuda}" \
      --threads 1 ${ACC_FASHION_ARGS:-} --results "$ACC" >"$ACC/log_fashion.txt" 2>&1 &
  fi
  end=$((SECONDS + ${ACC_TIMEOUT:-450}))
  while [[ -n $(jobs -rp) ]] && ((SECONDS < end)); do sleep 5; done
  for pid in $(jobs -rp); do kill "$pid" 2>/dev/null; done
  tar czf "$RESULTS/accuracy_rows.tgz" -C "$(dirname "$ACC")" accuracy
fi
if [[ $PARTS == all || $PARTS == int8 ]]; then
  timeout 300 python3 -m pytest -q -rs -p no:cacheprovider tests/tensorrt -k int8 2>&1 | tee "$RESULTS/int8.txt"
fi
if [[ $PARTS == all || $PARTS == kernels ]]; then
  # issue 17: the Triton kernels in real mode (tests/gpu), then their timings against torch ops and numpy, and the
  # permutation search with the GPU scorer on ASP's matrix and a 2048-channel layer
  timeout 200 python3 -m pytest -q -rs -p no:cacheprovider tests/gpu/test_kernels_preprocess_gpu.py \
    tests/gpu/test_kernels_sparse24_gpu.py 2>&1 | tee "$RESULTS/kernels_tests.txt"
  timeout 150 python3 bench/preprocess_speed.py --json "$RESULTS/preprocess_speed.json" 2>&1 \
    | tee "$RESULTS/preprocess_speed.txt"
  timeout 150 python3 bench/permutation_search.py --scorer kernel --json "$RESULTS/permutation_kernel.json" 2>&1 \
    | tee "$RESULTS/permutation_kernel.txt"
  timeout 120 python3 -m trt_prune.cli profile builtin:demo-detector --backend torch --e2e --batch 8 --fp16 \
    --input-shape 1x3x640x640 --json > "$RESULTS/e2e_profile.json" 2> "$RESULTS/e2e_profile.txt"
fi
echo "== summary"
if [[ $PARTS == all || $PARTS == check ]]; then
  tail -n 3 "$RESULTS/tests.txt"
  tail -n 6 "$RESULTS/sparse24_layers.txt"
  tail -n 18 "$RESULTS/torch_variants.txt"
fi
if [[ $PARTS == all || $PARTS == latency ]]; then
  tail -n 8 "$RESULTS/latency.txt"
fi
if [[ $PARTS == all || $PARTS == int8 ]]; then
  tail -n 2 "$RESULTS/int8.txt"
fi
if [[ $PARTS == all || $PARTS == kernels ]]; then
  tail -n 2 "$RESULTS/kernels_tests.txt"
  tail -n 12 "$RESULTS/preprocess_speed.txt"
  tail -n 6 "$RESULTS/permutation_kernel.txt"
  python3 -c "import json,sys; p=json.load(open(sys.argv[1]))['pipeline']; print('e2e p50 ms', {k: round(v['p50_ms'], 3) for k, v in p['parts'].items()}, 'total', round(p['total']['p50_ms'], 3))" "$RESULTS/e2e_profile.json" || tail -n 3 "$RESULTS/e2e_profile.txt"
fi
if [[ $PARTS == all || $PARTS == accuracy ]]; then
  python3 - "$ACC" <<'PY'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("*@*.json")):
    r = json.loads(f.read_text())
    print(f"{f.stem:24} macs {r.get('macs') or 0:.3f} mAP {r.get('map') or 0:.3f} {r.get('seconds')} s {r.get('error', '')}")
PY
  tail -n 7 "$ACC/classifier_track.md" 2>/dev/null || tail -n 5 "$ACC/log_fashion.txt"
fi
