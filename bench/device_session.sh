#!/usr/bin/env bash
# One lent-GPU session, phase by phase (each phase fits one device call, logs under OUT_DIR).
#   tests    pytest -m gpu tests/gpu with the kit's TensorRT ($KITPY)
#   histo    the calibration GPU histogram tests with the device's python3 (torch)
#   digits   the digits pipeline with backend tensorrt (torch stages on python3, TensorRT stages
#            on $KITPY): fp32/fp16/int8 built, evaluated, compared, published, verified; then
#            FP16 through the typed ONNX on 8.6 (build.fp16.source: typed_onnx), INT8 explicit,
#            an ampere_plus FP32 engine, `artifacts pull` + load of the pulled engine, a Triton
#            model repository, `trtpipe diagnose` for fp16 and int8
#   effnet   bench/tune_gpu.py on build/tune_bundle (EfficientNet-Lite0): VARIANTS (comma list)
#   detector the three-head detector (build/tune_detector): Q/DQ isolation of the explicit-route
#            build failure (bench/explicit_isolate.py), then bench/device_detector.sh
# usage: . /tmp/kit/env.sh; bench/device_session.sh PHASE OUT_DIR [args]
set -uo pipefail
PHASE=${1:?phase}; OUT=${2:?OUT_DIR}; shift 2
: "${KITPY:?set KITPY (. /tmp/kit/env.sh)}"
ROOT=$(pwd); KIT_PATH=${PYTHONPATH:-}
mkdir -p "$OUT"
if [ -d .whl ] && [ ! -d /tmp/site/pydantic ]; then
  env -u LD_LIBRARY_PATH python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
fi
export TORCH_SITE=/tmp/site
kitpy() { PYTHONPATH="$ROOT:$KIT_PATH" "$KITPY" "$@"; }
torchpy() { env -u LD_LIBRARY_PATH PYTHONPATH="$ROOT:/tmp/site" python3 "$@"; }
params() {  # params(OUT_FILE, dotted.key=value ...): params.yaml with overrides
  PYTHONPATH="$KIT_PATH" "$KITPY" - "$@" <<'PY'
import sys, yaml
out, pairs = sys.argv[1], sys.argv[2:]
d = yaml.safe_load(open("params.yaml"))
for p in pairs:
    key, v = p.split("=", 1)
    node = d
    *parents, leaf = key.split(".")
    for k in parents:
        node = node.setdefault(k, {})
    node[leaf] = {"true": True, "false": False}.get(v, v)
yaml.safe_dump(d, open(out, "w"))
PY
}
t0=$(date +%s)
case "$PHASE" in
  tests)
    kitpy -m pytest -m gpu tests/gpu -q -p no:cacheprovider -rs --durations=15 \
      --junitxml="$OUT/gpu_trt.xml" 2>&1 | tee "$OUT/gpu_trt.log" | tail -40 ;;
  histo)
    env -u LD_LIBRARY_PATH TRTPIPE_FIXTURE_DIR="$ROOT/.fixture" PYTHONPATH="$ROOT:/tmp/site" timeout 240 python3 \
      -m pytest -m gpu tests/calibration/test_gpu_histogram.py -q -rs 2>&1 | tee "$OUT/gpu_calibration.log" | tail -8 ;;
  digits)
    {
    P=$OUT/params-trt.yaml
    params "$P" build.backend=tensorrt
    params "$OUT/params-typed.yaml" build.backend=tensorrt build.fp16.source=typed_onnx
    params "$OUT/params-explicit.yaml" build.backend=tensorrt build.int8_route=explicit
    params "$OUT/params-ampere.yaml" build.backend=tensorrt build.hardware_compatibility=ampere_plus
    torchpy -m pipeline prepare --params "$P" --out artifacts/prepare
    torchpy -m pipeline export --params "$P" --checkpoint artifacts/prepare/model.pt --out artifacts/export
    torchpy -m pipeline validate --params "$P"
    kitpy -m pipeline calibrate --params "$P"
    for p in fp32 fp16 int8; do kitpy -m pipeline build --precision $p --params "$P" --timings "$OUT/build_$p.timings.json"; done
    for p in fp32 fp16 int8; do kitpy -m pipeline evaluate --precision $p --params "$P"; done
    torchpy -m pipeline compare --params "$P"
    kitpy -m pipeline publish --params "$P"
    kitpy -m pipeline artifacts verify
    kitpy -m pipeline build --precision fp16 --params "$OUT/params-typed.yaml" --out artifacts/build/fp16_typed
    kitpy -m pipeline evaluate --precision fp16 --params "$OUT/params-typed.yaml" --build-dir artifacts/build/fp16_typed --out artifacts/eval/fp16_typed.json
    kitpy -m pipeline build --precision int8 --params "$OUT/params-explicit.yaml" --out artifacts/build/int8_explicit
    kitpy -m pipeline evaluate --precision int8 --params "$OUT/params-explicit.yaml" --build-dir artifacts/build/int8_explicit --out artifacts/eval/int8_explicit.json
    kitpy bench/int8_routes.py --params "$P" --out "$OUT/int8_routes.json"
    kitpy -m pipeline build --precision fp32 --params "$OUT/params-ampere.yaml" --out artifacts/build/fp32_ampere
    kitpy -m pipeline evaluate --precision fp32 --params "$OUT/params-ampere.yaml" --build-dir artifacts/build/fp32_ampere --out artifacts/eval/fp32_ampere.json
    kitpy -m pipeline artifacts pull --to /tmp/pulled --json > "$OUT/pull.json"; echo "pull rc $?"
    kitpy - <<'PY'
import json, numpy as np
from pathlib import Path
from pipeline.registry import load
for prec in ("fp32", "fp16", "int8"):
    d = Path("/tmp/pulled") / prec
    m = json.loads((d / "manifest.json").read_text())
    r = load(d)
    from pipeline.config import load_config
    from pipeline.data import load_samples
    cfg = load_config(None, "params.yaml")
    x = load_samples(Path("artifacts/prepare/eval.npz"), cfg.model.inputs, cfg.data.labels_key).x
    out = r.infer({k: np.ascontiguousarray(v[:8]) for k, v in x.items()})
    print(f"pulled {prec}: {m['version']} ({m.get('precision')}, {m.get('backend')}) loaded and ran: "
          f"outputs {({k: list(v.shape) for k, v in out.items()})}; device {r.device() if hasattr(r, 'device') else '?'}")
PY
    kitpy -m pipeline artifacts export --triton /tmp/triton --json > "$OUT/triton.json"; echo "triton rc $?"
    (cd /tmp/triton && find . -name config.pbtxt -exec sh -c 'echo "== $1"; cat "$1"' _ {} \; ; find . -type f | sort) > "$OUT/triton_tree.txt"
    kitpy -m pipeline diagnose --precision int8 --params "$P" --out "$OUT/diagnose_int8.json"
    kitpy -m pipeline diagnose --precision fp16 --params "$P" --out "$OUT/diagnose_fp16.json"
    } 2>&1 | grep -v "TensorRT WARNING" | tee "$OUT/digits.log"
    cp artifacts/compare/compare.md artifacts/compare/compare.json "$OUT/" 2>/dev/null
    mkdir -p "$OUT/eval" "$OUT/build"; cp artifacts/eval/*.json "$OUT/eval/" 2>/dev/null
    for d in artifacts/build/*/; do cp "$d/build.json" "$OUT/build/$(basename "$d").json" 2>/dev/null; done ;;
  effnet)
    VARIANTS=${1:-}
    if [ -f build/tune_bundle/tune.json ]; then mkdir -p /tmp/tune_bundle && cp -r build/tune_bundle/. /tmp/tune_bundle/; fi
    timeout "${TUNE_GPU_TIMEOUT:-540}" env PYTHONPATH="$ROOT:$KIT_PATH" "$KITPY" bench/tune_gpu.py \
      --bundle /tmp/tune_bundle --phases "${PHASES:-main}" --out /tmp/tune_gpu_results/tune_gpu_main.json \
      --timing-cache /tmp/tune_timing.cache --only "$VARIANTS" --iterations 100 2>&1 | grep -v "TensorRT WARNING" | tee -a "$OUT/effnet.log"
    cp /tmp/tune_gpu_results/*.json "$OUT/" 2>/dev/null ;;
  detector)
    rm -rf /tmp/det && cp -r build/tune_detector /tmp/det
    timeout 200 env PYTHONPATH="$ROOT:$KIT_PATH" "$KITPY" bench/explicit_isolate.py \
      --qdq /tmp/det/artifacts/calibrate/model.qdq.onnx --fault build --match chooseHigherPrecision \
      --out "$OUT/isolate_detector.json" 2>&1 | tee "$OUT/isolate.log" | tail -40
    timeout 120 env PYTHONPATH="$ROOT:$KIT_PATH" "$KITPY" bench/explicit_isolate.py --no-fp16 \
      --qdq /tmp/det/artifacts/calibrate/model.qdq.onnx --fault build --match chooseHigherPrecision \
      --max-builds 0 --out "$OUT/isolate_detector_nofp16.json" 2>&1 | tail -12
    bash bench/device_detector.sh "$OUT/pipeline" ;;
  *) echo "unknown phase $PHASE"; exit 2 ;;
esac
echo "phase $PHASE: $(( $(date +%s) - t0 )) s"
