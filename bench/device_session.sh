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
#   bigeval  explicit INT8 vs onnxruntime's simulation on 1024 crops; explicit vs implicit latency interleaved
#   ptq      a project's PTQ before -> after (EfficientNet-Lite1, all-MiniLM-L6-v2) on engines, explicit route
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
    node[leaf] = yaml.safe_load(v)  # true, 3, [fp32] ... as YAML reads them
yaml.safe_dump(d, open(out, "w"))
PY
}
t0=$(date +%s)
case "$PHASE" in
  tests)
    kitpy -m pytest -m gpu tests/gpu -q -p no:cacheprovider -rs --durations=15 \
      --junitxml="$OUT/gpu_trt.xml" 2>&1 | tee "$OUT/gpu_trt.log" | tail -40 ;;
  pytest)  # $@: test files or node ids of tests/gpu, run with the kit
    kitpy -m pytest -m gpu "$@" -q -p no:cacheprovider -rs 2>&1 | tee -a "$OUT/gpu_pytest.log" | tail -15 ;;
  histo)
    env -u LD_LIBRARY_PATH TRTPIPE_FIXTURE_DIR="$ROOT/.fixture" PYTHONPATH="$ROOT:/tmp/site" timeout 240 python3 \
      -m pytest -m gpu tests/calibration/test_gpu_histogram.py -q -rs 2>&1 | tee "$OUT/gpu_calibration.log" | tail -8 ;;
  digits)
    {
    P=$OUT/params-trt.yaml
    params "$P" build.backend=tensorrt
    params "$OUT/params-typed.yaml" build.backend=tensorrt build.fp16.source=typed_onnx
    params "$OUT/params-explicit.yaml" build.backend=tensorrt build.int8_route=explicit
    params "$OUT/params-ampere.yaml" build.backend=tensorrt build.hardware_compatibility=ampere_plus 'publish.precisions=[fp32]' 
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
    kitpy -m pipeline artifacts pull --to /tmp/pulled --json > "$OUT/pull.json"; echo "pull rc $?"
    # a hardware-compatible FP32 engine, built, evaluated and published beside the native one (Triton's default)
    kitpy -m pipeline build --precision fp32 --params "$OUT/params-ampere.yaml" --out /tmp/amp/build/fp32
    kitpy -m pipeline evaluate --precision fp32 --params "$OUT/params-ampere.yaml" --build-dir /tmp/amp/build/fp32 --out /tmp/amp/eval/fp32.json
    kitpy -m pipeline publish --params "$OUT/params-ampere.yaml" --build-root /tmp/amp/build --eval-dir /tmp/amp/eval --out /tmp/amp/publish
    cp /tmp/amp/build/fp32/build.json "$OUT/fp32_ampere.build.json"; cp /tmp/amp/eval/fp32.json "$OUT/fp32_ampere.eval.json"
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
    tar czf "$OUT/registry.tgz" artifacts/registry artifacts/publish/published.json 2>/dev/null
    tar czf "$OUT/diagnose.tgz" -C "$OUT" diagnose_int8.json diagnose_fp16.json 2>/dev/null
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
  probes)  # hypothesis probes on the explicit route's two failures (bench/explicit_probes.py), $1: effnet|detector|full
    WHICH=${1:-effnet}
    if [ -f build/tune_bundle/tune.json ] && [ ! -d /tmp/tune_bundle ]; then mkdir -p /tmp/tune_bundle && cp -r build/tune_bundle/. /tmp/tune_bundle/; fi
    case "$WHICH" in
      effnet) ARGS=(--tuned-bundle /tmp/tune_bundle --fused --probes "${PROBES:-asis,dedicated_dq,lone_add,drop:39,drop:40}") ;;
      full) ARGS=(--full-bundle /tmp/tune_bundle --fused --probes "${PROBES:-asis}") ;;
      detector) ARGS=(--qdq build/tune_detector/artifacts/calibrate/model.qdq.onnx
                      --float-onnx build/tune_detector/artifacts/export/model.onnx
                      --npz build/tune_detector/artifacts/prepare/eval.npz
                      --probes "${PROBES:-asis,dedicated_dq,gemm_per_tensor,gemm_as_matmul,no_gemm_wq}") ;;
    esac
    timeout "${PROBE_TIMEOUT:-540}" env PYTHONPATH="$ROOT:$KIT_PATH" "$KITPY" bench/explicit_probes.py "${ARGS[@]}" \
      ${NOFP16:+--no-fp16} --out "$OUT/probes_$WHICH.json" 2>&1 | grep -v "TensorRT WARNING" | tee "$OUT/probes_$WHICH.log" | tail -20 ;;
  effdiag)  # trtpipe build + diagnose on EfficientNet-Lite0 int8 (build/effnet_diag: a slim project made by
            # bench/effnet_diag_project.py), $1: tuned|full
    WHICH=${1:-tuned}
    rm -rf /tmp/effdiag && cp -r build/effnet_diag /tmp/effdiag && cd /tmp/effdiag
    TUNED=$([ "$WHICH" = tuned ] && echo true || echo false)
    params "params-$WHICH.yaml" build.backend=tensorrt build.int8_route=explicit build.int8_from_tune=$TUNED build.timing_cache=null
    {
    kitpy -m pipeline build --precision int8 --params "params-$WHICH.yaml" --out "artifacts/build/int8_$WHICH"
    kitpy -m pipeline diagnose --precision int8 --params "params-$WHICH.yaml" --build-dir "artifacts/build/int8_$WHICH" \
      --eval-data artifacts/prepare/eval16.npz --samples 8 --out "$OUT/diagnose_effnet_int8_$WHICH.json"
    } 2>&1 | grep -v "TensorRT WARNING" | tee "$OUT/effdiag_$WHICH.log" | tail -20
    cp "artifacts/build/int8_$WHICH/build.json" "$OUT/effdiag_build_$WHICH.json" 2>/dev/null; cd "$ROOT" ;;
  cliexp)  # the explicit route through `trtpipe build` on the two models it failed on, $1: effnet|detector.
           # effnet: build/effnet_diag's tuned Q/DQ ONNX (8.x: Q/DQ moved before the activation, build.json qdq_edit),
           # the engine against onnxruntime's simulation of the unedited ONNX on /tmp/tune_bundle's crops (probes phase
           # first); detector: build/tune_detector's Q/DQ ONNX (8.x: Gemm weights in float), then evaluate
    WHICH=${1:-effnet}
    if [ "$WHICH" = effnet ]; then
      rm -rf /tmp/effdiag && cp -r build/effnet_diag /tmp/effdiag && cd /tmp/effdiag
      params p-exp.yaml build.backend=tensorrt build.int8_route=explicit build.int8_from_tune=true build.timing_cache=null
      {
      kitpy -m pipeline build --precision int8 --params p-exp.yaml --out artifacts/build/int8_explicit
      kitpy "$ROOT/bench/engine_vs_sim.py" --engine artifacts/build/int8_explicit/model.engine \
        --qdq artifacts/tune/model.qdq.onnx --bundle /tmp/tune_bundle --samples "${SAMPLES:-256}" --out "$OUT/effnet_engine_vs_sim.json"
      } 2>&1 | grep -v "TensorRT WARNING" | tee "$OUT/cliexp_effnet.log" | tail -12
      cp artifacts/build/int8_explicit/build.json "$OUT/cliexp_effnet_build.json"; cd "$ROOT"
    else
      rm -rf /tmp/det && cp -r build/tune_detector /tmp/det && cd /tmp/det
      params p-exp.yaml override=true build.backend=tensorrt build.int8_route=explicit
      {
      PYTHONPATH="$ROOT:/tmp/det:$KIT_PATH" "$KITPY" -m pipeline build --precision int8 --params p-exp.yaml --out artifacts/build/int8_explicit
      PYTHONPATH="$ROOT:/tmp/det:$KIT_PATH" "$KITPY" -m pipeline evaluate --precision int8 --params p-exp.yaml \
        --build-dir artifacts/build/int8_explicit --out "$OUT/cliexp_detector_eval.json"
      } 2>&1 | grep -v "TensorRT WARNING" | tee "$OUT/cliexp_detector.log" | tail -12
      cp artifacts/build/int8_explicit/build.json "$OUT/cliexp_detector_build.json"; cd "$ROOT"
    fi ;;
  routes)  # TensorRT's routes side by side (issue 20), $1: comma list of bench/routes_projects.py projects, unpacked
           # under /tmp/routes: fp32, fp16 by the flag and from the typed ONNX, int8 implicit (calibrate's cache),
           # int8 explicit (calibrate's Q/DQ ONNX), and onnxruntime's Q/DQ simulation; each built and evaluated
    for NAME in ${1//,/ }; do
      cd "/tmp/routes/$NAME" || continue
      V="$OUT/routes/$NAME"; mkdir -p "$V"
      run() {  # run VARIANT PRECISION overrides...
        local var=$1 prec=$2; shift 2
        case ",${ROUTES_VARIANTS:-$var}," in *",$var,"*) ;; *) return 0 ;; esac  # ROUTES_VARIANTS=a,b: only those
        params "p-$var.yaml" override=true build.backend=tensorrt "$@"
        PYTHONPATH="$ROOT:/tmp/routes/$NAME:$KIT_PATH" "$KITPY" -m pipeline build -q --precision "$prec" --params "p-$var.yaml" \
          --out "artifacts/build/$var" && \
        PYTHONPATH="$ROOT:/tmp/routes/$NAME:$KIT_PATH" "$KITPY" -m pipeline evaluate -q --precision "$prec" --params "p-$var.yaml" \
          --build-dir "artifacts/build/$var" --out "$V/eval_$var.json"
        local rc=$?
        cp "artifacts/build/$var/build.json" "$V/build_$var.json" 2>/dev/null
        echo "[$NAME] $var: rc $rc at $(( $(date +%s) - t0 )) s"
      }
      {
      run fp32 fp32
      run fp16_flag fp16 build.fp16.source=flag
      run fp16_typed fp16 build.fp16.source=typed_onnx
      run int8_implicit int8 build.int8_route=implicit build.calibration_source=cache
      run int8_explicit int8 build.int8_route=explicit
      run int8_sim int8 build.backend=onnxruntime evaluate.latency.batch_sizes=[1] evaluate.latency.iterations=5
      } 2>&1 | grep -v "TensorRT WARNING" | tee "$V/routes.log" | grep -E "^\[|error" | tail -20
      cd "$ROOT"
    done ;;
  bigeval)  # explicit INT8 vs the Q/DQ simulation on BIGEVAL_N crops, explicit vs implicit latency interleaved
            # (bench/routes_bigeval.py); $1: comma list of projects under /tmp/routes the routes phase built
    for NAME in ${1//,/ }; do
      C=/tmp/bigeval_crops_$NAME.npy
      [ -f "$C" ] || torchpy bench/routes_bigeval.py crops "$C" --project "/tmp/routes/$NAME" --n "${BIGEVAL_N:-1024}" \
        >> "$OUT/bigeval_crops.log" 2>&1
      PYTHONPATH="$ROOT:/tmp/routes/$NAME:$KIT_PATH" "$KITPY" bench/routes_bigeval.py run "/tmp/routes/$NAME" \
        --crops "$C" --out "$OUT/bigeval_$NAME.json" 2>&1 | grep -v "TensorRT WARNING" \
        | tee "$OUT/bigeval_$NAME.log" | tail -30
    done ;;
  ptq)  # issue 21's before -> after on engines: $1 a bench/routes_projects.py project unpacked under /tmp/routes
        # (efficientnet_lite1, minilm). "before" is calibrate's output as the project says; "after" is
        # artifacts/calibrate_after (made on the CPU) or, where absent (minilm: its Q/DQ ONNX is 58 MB), calibrated
        # here from the project's params-after.yaml (then "before" too). Each built through the explicit route and
        # evaluated beside fp32, fp16, implicit INT8 and onnxruntime's Q/DQ simulation of both
    NAME=${1:?project}; cd "/tmp/routes/$NAME" || exit 1
    V="$OUT/ptq/$NAME"; mkdir -p "$V"
    mp() { PYTHONPATH="$ROOT:/tmp/routes/$NAME:$KIT_PATH" "$KITPY" -m pipeline "$@"; }
    {
    if [ ! -d artifacts/calibrate_after ]; then
      mp calibrate -q; echo "[$NAME] calibrate: rc $? at $(( $(date +%s) - t0 )) s"
      mp calibrate -q --params params-after.yaml --out artifacts/calibrate_after
      echo "[$NAME] calibrate (params-after.yaml): rc $? at $(( $(date +%s) - t0 )) s"
    fi
    cp artifacts/calibrate/calibrate.json "$V/calibrate.json"; cp artifacts/calibrate_after/calibrate.json "$V/calibrate_after.json"
    one() {  # one VARIANT PRECISION CALIB_DIR overrides...
      local var=$1 prec=$2 cal=$3; shift 3
      case ",${PTQ_VARIANTS:-$var}," in *",$var,"*) ;; *) return 0 ;; esac
      params "p-$var.yaml" override=true build.backend=tensorrt "$@"
      mp build -q --precision "$prec" --params "p-$var.yaml" --calib-dir "$cal" --out "artifacts/build/$var" && \
      mp evaluate -q --precision "$prec" --params "p-$var.yaml" --build-dir "artifacts/build/$var" --out "$V/eval_$var.json"
      echo "[$NAME] $var: rc $? at $(( $(date +%s) - t0 )) s"
      cp "artifacts/build/$var/build.json" "$V/build_$var.json" 2>/dev/null
    }
    one fp32 fp32 artifacts/calibrate
    one fp16_flag fp16 artifacts/calibrate build.fp16.source=flag
    one int8_implicit int8 artifacts/calibrate build.int8_route=implicit build.calibration_source=cache
    one int8_explicit int8 artifacts/calibrate build.int8_route=explicit
    one int8_sim int8 artifacts/calibrate build.backend=onnxruntime evaluate.latency.batch_sizes=[1] evaluate.latency.iterations=5
    one int8_explicit_after int8 artifacts/calibrate_after build.int8_route=explicit
    one int8_sim_after int8 artifacts/calibrate_after build.backend=onnxruntime evaluate.latency.batch_sizes=[1] evaluate.latency.iterations=5
    } 2>&1 | grep -v "TensorRT WARNING" | tee "$V/ptq.log" | grep -E "^\[|rror" | tail -30
    cd "$ROOT" ;;
  calibgpu)  # calibration with the forward on the GPU against onnxruntime's (bench/calibration_gpu.py): the fixture's
             # ResNet-18 and images and a ResNet-50 made with python3 (torch, skimage), calibrated with the kit
    torchpy bench/calibration_gpu.py make /tmp/cg --fixture "$ROOT/.fixture" > "$OUT/calibration_gpu_make.log" 2>&1
    kitpy bench/calibration_gpu.py run /tmp/cg --fixture "$ROOT/.fixture" --out "$OUT/calibration_gpu.json" ${1:+--cases "$1"} \
      2>&1 | grep -v "TensorRT WARNING" | tee "$OUT/calibration_gpu.log" | tail -40 ;;
  fleet)  # the registry pulled by `dvc pull` into a fresh clone here (bench/fleet_dvc.sh, carried as build/pulled):
          # every version loads and runs on this GPU; on a stand-in compute capability it is refused in one line
    kitpy - build/pulled/artifacts/registry 2>&1 <<'PY' | tee "$OUT/fleet.log"
import sys, numpy as np
from pathlib import Path
from pipeline.compat import probe_here
from pipeline.errors import PipelineError
from pipeline.registry import load, version_dirs
from pipeline.manifest import read_manifest
reg = Path(sys.argv[1])
here = probe_here()
print("here:", {k: here.get(k) for k in ("tensorrt", "compute_capability", "gpu")})
for d in version_dirs(reg):
    m = read_manifest(d)
    if m["backend"] != "tensorrt":
        continue
    level = (m.get("settings") or {}).get("hardware_compatibility", "none")
    r = load(d, reg)
    x = np.random.default_rng(0).normal(size=[4] + [int(v) for v in m["io"]["inputs"][0]["shape"][1:]]).astype(np.float32)
    out = r.infer({m["io"]["inputs"][0]["name"]: x})
    print(f"{m['version']} ({level}): loaded and ran on {here.get('gpu')}: {({k: list(v.shape) for k, v in out.items()})}")
    for cc in ("8.0", "8.6", "7.5"):
        try:
            load(d, reg, here={**here, "compute_capability": cc, "gpu": f"stand-in sm{cc.replace('.', '')}"})
            print(f"  on a stand-in {cc}: accepted")
        except PipelineError as e:
            print(f"  on a stand-in {cc}: refused: {e}")
PY
    ;;
  *) echo "unknown phase $PHASE"; exit 2 ;;
esac
echo "phase $PHASE: $(( $(date +%s) - t0 )) s"
