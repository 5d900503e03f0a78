#!/usr/bin/env bash
# Calibration fidelity on a GPU: our entropy calibration against TensorRT 8.6's own
# IInt8EntropyCalibrator2, on the same ONNX and the same batches.
#   usage: KITPY=... bench/device_fidelity.sh digits|resnet50 OUT_DIR     (TORCH_SITE: extra path for python3)
set -euo pipefail
WHAT=${1:?digits|resnet50}; OUT=${2:?OUT_DIR}
: "${KITPY:?set KITPY (the TensorRT kit python)}"
ROOT=$(pwd); KIT_PATH=${PYTHONPATH:-}; W=/tmp/fidelity-$WHAT
mkdir -p "$OUT" "$W"
torchpy() { PYTHONPATH="$ROOT:$ROOT/bench:${TORCH_SITE:-}" python3 "$@"; }
kitpy() { PYTHONPATH="$ROOT:$KIT_PATH" "$KITPY" "$@"; }
case "$WHAT" in
  digits)
    torchpy -m pipeline prepare --out "$W/prepare"
    torchpy -m pipeline export --checkpoint "$W/prepare/model.pt" --out "$W/export"
    ONNX=$W/export/model.onnx; CALIB=$W/prepare/calib.npy; N=320 ;;
  resnet50)
    torchpy bench/export_torchvision.py "$W/resnet50.onnx"
    torchpy -c "import sys, numpy as np; from calibration_vs_ort import _photo_samples; np.save(sys.argv[1], _photo_samples(256, 0))" "$W/photos.npy"
    ONNX=$W/resnet50.onnx; CALIB=$W/photos.npy; N=256 ;;
esac
for tf32 in on off; do
  [ "$WHAT" = resnet50 ] && [ "$tf32" = off ] && [ -z "${BOTH_TF32:-}" ] && continue
  flag=""; [ "$tf32" = off ] && flag=--no-tf32
  kitpy bench/calibration_fidelity.py run --onnx "$ONNX" --calib "$CALIB" --num-samples $N --batch-size 32 \
    --workdir "$W/tf32-$tf32" --out "$OUT/fidelity_${WHAT}_tf32-$tf32.json" $flag
  cp "$W/tf32-$tf32/calibrate/ranges.json" "$OUT/ranges_${WHAT}_tf32-$tf32.json"
  cp "$W/tf32-$tf32/build/calibration.cache" "$OUT/trt_${WHAT}_tf32-$tf32.cache"
done
