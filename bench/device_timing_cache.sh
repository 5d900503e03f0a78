#!/usr/bin/env bash
# Timing-cache rebuild speedup on a GPU (bench/timing_cache_speedup.py): ResNet-50 exported
# with the device's python3 (torch), every build with the TensorRT kit, each in a fresh process.
#   usage: KITPY=... bench/device_timing_cache.sh OUT_DIR [PRECISIONS=fp32] [VARIANTS=default,fds-off]
set -euo pipefail
OUT=${1:?usage: device_timing_cache.sh OUT_DIR [PRECISIONS] [VARIANTS]}
PREC=${2:-fp32}; VARIANTS=${3:-default,fds-off}
: "${KITPY:?set KITPY (the TensorRT kit python)}"
ROOT=$(pwd); KIT_PATH=${PYTHONPATH:-}
mkdir -p "$OUT" /tmp/bench
[ -f /tmp/bench/resnet50.onnx ] || PYTHONPATH="$ROOT" python3 bench/export_torchvision.py /tmp/bench/resnet50.onnx
PYTHONPATH="$ROOT:$KIT_PATH" "$KITPY" bench/timing_cache_speedup.py /tmp/bench/resnet50.onnx \
  "$OUT/timing_cache_speedup_${PREC//,/_}.json" --precisions "$PREC" --variants "$VARIANTS"
