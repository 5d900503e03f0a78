#!/usr/bin/env bash
# The digits pipeline with backend: tensorrt on a GPU, stage by stage in dvc.yaml's order
# (dvc itself is not installed on the lent GPU machine): prepare/export/validate/compare
# with a Python that has PyTorch ($TORCHPY), the TensorRT stages with the kit's ($KITPY).
# Then the explicit INT8 route (TensorRT builds the calibrate stage's Q/DQ ONNX).
#   usage: KITPY=... TORCHPY=... TORCH_SITE=/tmp/site bench/device_pipeline.sh OUT_DIR
set -euo pipefail
OUT=${1:?usage: device_pipeline.sh OUT_DIR}
mkdir -p "$OUT"
: "${KITPY:?set KITPY (the TensorRT kit python)}"
TORCHPY=${TORCHPY:-python3}
ROOT=$(pwd)
KIT_PATH=${PYTHONPATH:-}  # the kit's env.sh puts its site-packages here; the torch python must not see them
P=$OUT/params-tensorrt.yaml
with_build() {  # params.yaml with build.<key>: <value> overrides -> $1
  PYTHONPATH="$KIT_PATH" "$KITPY" - "$@" <<'PY'
import sys, yaml
out, pairs = sys.argv[1], sys.argv[2:]
d = yaml.safe_load(open("params.yaml"))
d.setdefault("build", {}).update(dict(p.split("=", 1) for p in pairs))
yaml.safe_dump(d, open(out, "w"))
PY
}
with_build "$P" backend=${BACKEND:-tensorrt}
torchpy() { PYTHONPATH="$ROOT:${TORCH_SITE:-}" "$TORCHPY" -m pipeline "$@" --params "$P"; }
kitpy() { PYTHONPATH="$ROOT:$KIT_PATH" "$KITPY" -m pipeline "$@" --params "$P"; }
t0=$(date +%s)
torchpy prepare --out artifacts/prepare
torchpy export --checkpoint artifacts/prepare/model.pt --out artifacts/export
torchpy validate
kitpy calibrate
for p in fp32 fp16 int8; do kitpy build --precision $p; done
for p in fp32 fp16 int8; do kitpy evaluate --precision $p; done
torchpy compare
kitpy publish
PYTHONPATH="$ROOT:$KIT_PATH" "$KITPY" -m pipeline artifacts verify
echo "pipeline wall seconds: $(( $(date +%s) - t0 ))"
cp artifacts/compare/compare.md artifacts/compare/compare.json "$OUT/"
# The explicit route: TensorRT builds the calibrate stage's Q/DQ ONNX.
with_build "$OUT/params-explicit.yaml" backend=tensorrt int8_route=explicit
PYTHONPATH="$ROOT:$KIT_PATH" "$KITPY" -m pipeline build --precision int8 --params "$OUT/params-explicit.yaml" --out artifacts/build/int8-explicit
