#!/usr/bin/env bash
# Train builtin:demo-detector's shipped weights on a lent GPU (H100/H200), about 5 minutes of training.
# Usage on the GPU machine, from the repo root: OUT=/some/folder bash bench/gpu_train_demo.sh
# Then, here: copy $OUT/demo_detector.safetensors to trt_prune/models/weights/ and run
#   python bench/train_demo_detector.py --eval-weights trt_prune/models/weights/demo_detector.safetensors --update-metadata
set -euo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name())"
df -h /dev/shm | tail -1 || true
export PYTHONUNBUFFERED=1 PYTHONPATH=.
python3 bench/train_demo_detector.py --device cuda --batch 64 --workers "${WORKERS:-15}" \
  --time-limit-min "${MINUTES:-5}" --log-every 250 --no-eval --out "$OUT/demo_detector.safetensors" 2>&1 | tee "$OUT/train.log"
ls -la "$OUT"
