#!/usr/bin/env bash
# The three-output digit detector (tests/models/digit_detector.py, trained on the digits) on a
# GPU: its prepare .. calibrate .. tune outputs from a CPU (bench/tune_detector.py writes them
# to build/tune_detector; carry it) are built as TensorRT engines by the pipeline's own
# commands: fp32, fp16, int8 implicit (calibrate's cache), int8 explicit (calibrate's Q/DQ
# ONNX) and int8 with tune's result; each evaluated on every output; compare with PyTorch's
# python (matplotlib).   usage: . /tmp/kit/env.sh; TORCH_SITE=/tmp/site bench/device_detector.sh OUT_DIR
set -uo pipefail
OUT=${1:?usage: device_detector.sh OUT_DIR}
: "${KITPY:?set KITPY (. /tmp/kit/env.sh)}"
REPO=$(pwd)
KIT_PATH=${PYTHONPATH:-}
mkdir -p "$OUT"
rm -rf /tmp/det && cp -r build/tune_detector /tmp/det && cd /tmp/det || exit 2
params() {  # params.yaml with build overrides -> $1
  PYTHONPATH="$KIT_PATH" "$KITPY" - "$@" <<'PY'
import sys, yaml
out, pairs = sys.argv[1], sys.argv[2:]
import os
build = {"backend": os.environ.get("BACKEND", "tensorrt")}
for p in pairs:
    k, v = p.split("=", 1)
    build[k] = {"true": True, "false": False}.get(v, v)
yaml.safe_dump({"config": "configs/model.yaml", "override": True, "build": build}, open(out, "w"))
PY
}
params p_trt.yaml
params p_explicit.yaml int8_route=explicit
params p_tuned.yaml int8_from_tune=true
kit() { PYTHONPATH="$REPO:/tmp/det:$KIT_PATH" "$KITPY" -m pipeline "$@"; }
t0=$(date +%s)
{
  for p in fp32 fp16 int8; do kit build --precision $p --params p_trt.yaml; done
  for p in fp32 fp16 int8; do kit evaluate --precision $p --params p_trt.yaml; done
  PYTHONPATH="$REPO:/tmp/det:${TORCH_SITE:-}" python3 -m pipeline compare --params p_trt.yaml
  kit build --precision int8 --params p_explicit.yaml --out artifacts/build/int8_explicit
  kit evaluate --precision int8 --params p_explicit.yaml --build-dir artifacts/build/int8_explicit --out artifacts/eval/int8_explicit.json
  kit build --precision int8 --params p_tuned.yaml --tune-dir artifacts/tune --out artifacts/build/int8_tuned
  kit evaluate --precision int8 --params p_tuned.yaml --build-dir artifacts/build/int8_tuned --out artifacts/eval/int8_tuned.json
  echo "wall seconds: $(( $(date +%s) - t0 ))"
} 2>&1 | grep -v "TensorRT WARNING" | tee "$OUT/detector.log"
cp artifacts/compare/compare.md artifacts/compare/compare.json "$OUT/" 2>/dev/null
mkdir -p "$OUT/eval" "$OUT/build" && cp artifacts/eval/*.json "$OUT/eval/" 2>/dev/null
for d in artifacts/build/*/; do cp "$d/build.json" "$OUT/build/$(basename "$d").json" 2>/dev/null; done
