#!/usr/bin/env bash
# The GPU part of `trtpipe tune` on EfficientNet-Lite0 (bench/tune_gpu.py), in a device call with the
# TensorRT kit ready (. /tmp/kit/env.sh). The bundle bench/tune_efficientnet.py wrote on a CPU travels
# as build/tune_bundle (run carry=["build/tune_bundle"]) and is copied to /tmp once per machine, so a
# later call on the same warm machine needs no carry. The timing cache and the results accumulate in
# /tmp between calls; each call copies the results so far to OUT_DIR, also when cut short.
#   usage: bench/device_tune.sh OUT_DIR [PHASES=main] [extra bench/tune_gpu.py args, e.g. --only fp16,int8]
set -uo pipefail
OUT=${1:?usage: device_tune.sh OUT_DIR [PHASES] [args]}
PHASES=${2:-main}
shift $(( $# >= 2 ? 2 : 1 ))
: "${KITPY:?set KITPY (. /tmp/kit/env.sh)}"
if [ -f build/tune_bundle/tune.json ]; then mkdir -p /tmp/tune_bundle && cp -r build/tune_bundle/. /tmp/tune_bundle/; fi
[ -f /tmp/tune_bundle/tune.json ] || { echo "no bundle: carry build/tune_bundle (bench/tune_efficientnet.py writes it)"; exit 2; }
RES=/tmp/tune_gpu_results
mkdir -p "$OUT" "$RES"
TAG=${PHASES//,/_}
timeout "${TUNE_GPU_TIMEOUT:-540}" env PYTHONPATH="$(pwd):${PYTHONPATH:-}" "$KITPY" bench/tune_gpu.py \
  --bundle /tmp/tune_bundle --phases "$PHASES" --out "$RES/tune_gpu_$TAG.json" --timing-cache /tmp/tune_timing.cache \
  "$@" 2>&1 | tee "$OUT/tune_gpu_$TAG.log"
rc=${PIPESTATUS[0]}
cp "$RES"/*.json "$OUT"/ 2>/dev/null
exit "$rc"
