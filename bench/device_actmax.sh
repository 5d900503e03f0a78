#!/usr/bin/env bash
# Root-causing the digits calibration gap: max|x| per tensor from TensorRT's FP32 engine vs onnxruntime.
#   usage: KITPY=... TORCH_SITE=... bench/device_actmax.sh OUT_DIR
set -euo pipefail
OUT=${1:?OUT_DIR}; W=/tmp/actmax; ROOT=$(pwd); KIT_PATH=${PYTHONPATH:-}
mkdir -p "$OUT" "$W"
PYTHONPATH="$ROOT:${TORCH_SITE:-}" python3 -m pipeline prepare --out "$W/prepare"
PYTHONPATH="$ROOT:${TORCH_SITE:-}" python3 -m pipeline export --checkpoint "$W/prepare/model.pt" --out "$W/export"
PYTHONPATH="$ROOT:$KIT_PATH" "$KITPY" -m pipeline calibrate --onnx "$W/export/model.onnx" --calib-data "$W/prepare/calib.npy" --out "$W/cal"
PYTHONPATH="$ROOT:$KIT_PATH" "$KITPY" bench/trt_activation_max.py --onnx "$W/export/model.onnx" --calib "$W/prepare/calib.npy" \
  --ranges "$W/cal/ranges.json" --num-samples 320 --workdir "$W/trt" --out "$OUT/actmax_digits.json"
