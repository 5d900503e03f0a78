#!/usr/bin/env bash
# On the lent GPU, after the kit's device-setup: the GPU tests in both Pythons.
#   TensorRT tests (tests/gpu) with the kit's $KITPY; the calibration GPU path
#   (tests/calibration/test_gpu_histogram.py) with the device's own python3 (torch, cupy),
#   pydantic from carried wheels in $TORCH_SITE.
#   usage: . /tmp/kit/env.sh; TORCH_SITE=/tmp/site bench/device_gpu_tests.sh OUT_DIR
set -uo pipefail
OUT=${1:?usage: device_gpu_tests.sh OUT_DIR}
mkdir -p "$OUT"
ROOT=$(pwd)
KIT_PATH=${PYTHONPATH:-}
PYTHONPATH="$ROOT:$KIT_PATH" timeout 420 "$KITPY" -m pytest -m gpu tests/gpu -q -p no:cacheprovider \
  --junitxml="$OUT/gpu_trt.xml" -rs 2>&1 | tee "$OUT/gpu_trt.log" | tail -25
# The TensorRT 8.6 fixture (carried in .fixture/: ../shared does not travel) for the GPU histogram path.
env -u LD_LIBRARY_PATH TRTPIPE_FIXTURE_DIR="$ROOT/.fixture" PYTHONPATH="$ROOT:${TORCH_SITE:-}" timeout 240 python3 -m pytest \
  -m gpu tests/calibration/test_gpu_histogram.py -q -rs 2>&1 | tee "$OUT/gpu_calibration.log" | tail -8
