# The device call that wrote fp16_latency.log (ResNet-50 project of bench/routes_projects.py, fp16_typed built
# earlier in the same machine; bench/routes_bigeval.py's LATENCY_PAIRS now times this pair the same way):
. /tmp/kit/env.sh && ROUTES_VARIANTS=fp16_flag bash bench/device_session.sh routes $OUT/r resnet50
cd /tmp/routes/resnet50 && PYTHONPATH=/work/main:$PYTHONPATH $KITPY - <<'PY'
import numpy as np, json
from pipeline.stages.evaluate import load_variant
r = {v: load_variant(f"artifacts/build/{v}")[0] for v in ("fp16_typed", "fp16_flag")}
out = {}
for bs in (1, 32):
    x = {"input": np.random.default_rng(0).standard_normal((bs, 3, 224, 224)).astype(np.float32)}
    per = {v: [] for v in r}
    for _ in range(5):
        for v, run in r.items():
            per[v].append(float(np.median(run.time(x, 20, 200, mode="plain")["gpu_times_ms"])))
    med = {v: float(np.median(m)) for v, m in per.items()}
    out[f"b{bs}"] = {"rounds": per, "median_ms": med, "typed_over_flag": med["fp16_typed"] / med["fp16_flag"]}
print(json.dumps(out))
PY
