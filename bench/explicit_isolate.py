"""Which Q/DQ pairs make TensorRT fail on a Q/DQ ONNX? Delta debugging on a GPU.

A Q/DQ model that TensorRT refuses to build (or builds into wrong outputs) is reduced to the
smallest set of Q/DQ *sites* that still shows the fault; every other site is taken out of the
graph the way `calibration.qdq` would never have placed it (an activation site: its
QuantizeLinear and DequantizeLinears bypassed; a weight site: the int8 initializer replaced by
its dequantized float values). Each probe is one TensorRT build of the edited ONNX with the
flags the project's explicit route sets (INT8, and FP16 for the float layers unless
``--no-fp16``). The fault is either a failed build (``--fault build``, the message must hold
``--match``) or outputs that disagree with onnxruntime's FP32 run of the original float ONNX
(``--fault accuracy``: top-1 agreement on ``--inputs`` below ``--min-agreement``).

Prints and writes (``--out``, JSON) the flags that show the fault, the minimal sites with their
node names, op types and consumers, and the number of builds. Needs TensorRT and a GPU; no torch.

    . /tmp/kit/env.sh && PYTHONPATH=$PWD $KITPY bench/explicit_isolate.py --qdq model.qdq.onnx \\
        --fault build --match chooseHigherPrecision --out $OUT/isolate.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration.qdq_patterns import dequantized  # noqa: E402


def sites(model: Any) -> list[dict[str, Any]]:
    """The Q/DQ sites of a Q/DQ model: one per QuantizeLinear (activations) and one per
    DequantizeLinear of an initializer (weights)."""
    inits = {i.name for i in model.graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    out = []
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
            dqs = [c for c in consumers.get(n.output[0], []) if c.op_type == "DequantizeLinear"]
            users = [u for d in dqs for u in consumers.get(d.output[0], [])]
            out.append({"kind": "activation", "tensor": n.input[0], "q": n.name, "dq": [d.name for d in dqs],
                        "consumers": [f"{u.name} ({u.op_type})" for u in users]})
        elif n.op_type == "DequantizeLinear" and n.input[0] in inits:
            users = consumers.get(n.output[0], [])
            out.append({"kind": "weight", "tensor": n.input[0], "dq": [n.name],
                        "consumers": [f"{u.name} ({u.op_type})" for u in users]})
    return out


def without(model: Any, remove: list[dict[str, Any]]) -> Any:
    """A copy of ``model`` with the given sites taken out (the float graph there)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    drop: set[str] = set()
    rename: dict[str, str] = {}
    new_inits = []
    by_name = {n.name: n for n in g.node}
    for s in remove:
        if s["kind"] == "activation":
            q = by_name[s["q"]]
            drop.add(q.name)
            for d in s["dq"]:
                drop.add(d)
                rename[by_name[d].output[0]] = q.input[0]
        else:
            d = by_name[s["dq"][0]]
            new_inits.append(numpy_helper.from_array(dequantized(d, inits), d.output[0]))
            drop.add(d.name)
    kept = [n for n in g.node if n.name not in drop]
    for n in kept:
        for i, t in enumerate(n.input):
            if t in rename:
                n.input[i] = rename[t]
    for o in g.output:
        if o.name in rename:  # a graph output behind a Q/DQ: an Identity keeps its name
            kept.append(onnx.helper.make_node("Identity", [rename[o.name]], [o.name], name=f"isolate_id_{o.name}"))
    del g.node[:]
    g.node.extend(kept)
    g.initializer.extend(new_inits)
    used = {t for n in g.node for t in n.input}
    keep_inits = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep_inits)
    return m


def dedicated_dq(model: Any) -> tuple[Any, int]:
    """A copy of ``model`` where every DequantizeLinear read by several nodes is cloned, one per reader
    (onnxruntime's quantizer calls this DedicatedQDQPair); the arithmetic is unchanged. Returns the copy
    and the number of DequantizeLinear nodes added."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    readers: dict[str, list[Any]] = {}
    for n in g.node:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    outputs = {o.name for o in g.output}
    nodes, added = [], 0
    for n in g.node:
        nodes.append(n)
        users = readers.get(n.output[0], []) if n.op_type == "DequantizeLinear" else []
        if len(users) < 2 or n.output[0] in outputs:
            continue
        for k, u in enumerate(users[1:], 1):
            clone = onnx.helper.make_node("DequantizeLinear", list(n.input), [f"{n.output[0]}_dedicated{k}"],
                                          name=f"{n.name}_dedicated{k}")
            clone.attribute.extend(n.attribute)
            nodes.append(clone)
            u.input[:] = [clone.output[0] if t == n.output[0] else t for t in u.input]
            added += 1
    del g.node[:]
    g.node.extend(nodes)
    return m, added


class Builder:
    """TensorRT builds of in-memory ONNX models with fixed flags; counts the builds."""

    def __init__(self, fp16: bool, batch: tuple[int, int, int], timing_cache: Optional[Path] = None) -> None:
        import tensorrt as trt

        self.trt, self.fp16, self.batch, self.builds = trt, fp16, batch, 0
        self.timing_cache = timing_cache  # read before and written after every build, when given
        self.logger = trt.Logger(trt.Logger.ERROR)
        self.last_error = ""

    def build(self, model: Any) -> Optional[bytes]:
        trt = self.trt
        self.builds += 1
        errors: list[str] = []

        class Log(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: Any, msg: str) -> None:
                if severity <= trt.ILogger.Severity.ERROR:
                    errors.append(msg)

        log = Log()
        builder = trt.Builder(log)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
        parser = trt.OnnxParser(network, log)
        if not parser.parse(model.SerializeToString()):
            self.last_error = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            return None
        config = builder.create_builder_config()
        config.set_flag(trt.BuilderFlag.INT8)
        if self.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            t = network.get_input(i)
            shape = list(t.shape)
            lo, opt, hi = ([self.batch[k] if d < 0 else d for d in shape] for k in range(3))
            profile.set_shape(t.name, lo, opt, hi)
        config.add_optimization_profile(profile)
        tc = self.timing_cache
        if tc is not None:
            config.set_timing_cache(config.create_timing_cache(tc.read_bytes() if tc.is_file() else b""), False)
        plan = builder.build_serialized_network(network, config)
        self.last_error = "; ".join(errors)
        if plan is not None and tc is not None:
            tc.write_bytes(bytes(config.get_timing_cache().serialize()))
        return None if plan is None else bytes(plan)


def ddmin(items: list[int], fails: Callable[[list[int]], bool], limit: int) -> list[int]:
    """Zeller's delta debugging: a 1-minimal subset of ``items`` for which ``fails`` holds."""
    n, probes = 2, 0
    while len(items) >= 2 and probes < limit:
        chunk = -(-len(items) // n)
        subsets = [items[i:i + chunk] for i in range(0, len(items), chunk)]
        reduced = False
        for s in subsets:
            probes += 1
            if fails(s):
                items, n, reduced = s, 2, True
                break
        if not reduced:
            for s in subsets:
                comp = [x for x in items if x not in s]
                probes += 1
                if comp and fails(comp):
                    items, n, reduced = comp, max(n - 1, 2), True
                    break
        if not reduced:
            if n >= len(items):
                break
            n = min(len(items), 2 * n)
    return items


def main() -> None:
    import onnx

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qdq", type=Path, required=True, help="the Q/DQ ONNX that shows the fault")
    ap.add_argument("--float-onnx", type=Path, help="--fault accuracy: the float ONNX it was made from")
    ap.add_argument("--inputs", type=Path, help="--fault accuracy: an .npy of model inputs (first input)")
    ap.add_argument("--fault", choices=("build", "accuracy"), default="build")
    ap.add_argument("--match", default="", help="--fault build: text the build error must hold")
    ap.add_argument("--min-agreement", type=float, default=0.5)
    ap.add_argument("--no-fp16", action="store_true", help="INT8 flag only (float layers in FP32)")
    ap.add_argument("--batch", default="1,8,32", help="min,opt,max of a dynamic batch dimension")
    ap.add_argument("--max-builds", type=int, default=80)
    ap.add_argument("--dedicated-dq", action="store_true",
                    help="first give every DequantizeLinear read by several nodes one copy per reader")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    model = onnx.load(str(a.qdq))
    dq_added = 0
    if a.dedicated_dq:
        model, dq_added = dedicated_dq(model)
    all_sites = sites(model)
    b = Builder(not a.no_fp16, tuple(int(v) for v in a.batch.split(",")))  # type: ignore[arg-type]
    t0 = time.monotonic()
    ref: Optional[np.ndarray] = None
    x: Optional[np.ndarray] = None
    if a.fault == "accuracy":
        import onnxruntime as ort

        x = np.load(a.inputs).astype(np.float32)
        s = ort.InferenceSession(str(a.float_onnx), providers=["CPUExecutionProvider"])
        ref = s.run(None, {s.get_inputs()[0].name: x})[0]

    def agreement_of(plan: bytes) -> float:
        from pipeline.runtime.trt_runner import TrtRunner

        import tempfile
        with tempfile.NamedTemporaryFile(suffix=".engine") as f:
            f.write(plan)
            f.flush()
            with TrtRunner(Path(f.name)) as r:
                outs = r.infer({r.input_names[0]: x})
                y = next(iter(outs.values()))
        return float(np.mean(np.argmax(y, -1) == np.argmax(ref, -1)))

    log: list[dict[str, Any]] = []

    def fails(keep: list[int]) -> bool:
        remove = [all_sites[i] for i in range(len(all_sites)) if i not in set(keep)]
        row_keep = sorted(keep)
        plan = b.build(without(model, remove))
        row: dict[str, Any] = {"sites_kept": len(keep), "kept": row_keep}
        if a.fault == "build":
            bad = plan is None and a.match in b.last_error
            row["error"] = b.last_error[:300] if plan is None else None
        else:
            agree = agreement_of(plan) if plan is not None else None
            bad = agree is not None and agree < a.min_agreement
            row["top1_agreement"] = agree
        row["fault"] = bad
        log.append(row)
        _save()  # after every probe: a call cut at its time limit keeps what it found
        detail = f": {row['error'][:120]}" if row.get("error") else ""
        if row.get("top1_agreement") is not None:
            detail = f": top-1 agreement {row['top1_agreement']:.3f}"
        print(f"[isolate] build {b.builds}: {len(keep)} site(s) kept -> {'FAULT' if bad else 'ok'}{detail}", flush=True)
        return bad

    result: dict[str, Any] = {"qdq": str(a.qdq), "fault": a.fault, "match": a.match, "fp16_flag": not a.no_fp16,
                              "sites": len(all_sites), "tensorrt": b.trt.__version__, "site_list": all_sites,
                              "dedicated_dq_added": dq_added}

    def _save() -> None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({**result, "builds": b.builds, "probes": log}, indent=2) + "\n")

    everything = list(range(len(all_sites)))
    result["full_model_fault"] = fails(everything)
    result["no_qdq_fault"] = fails([])
    if result["full_model_fault"] and not result["no_qdq_fault"]:
        minimal = ddmin(everything, fails, a.max_builds)
        result["minimal_sites"] = [all_sites[i] for i in minimal]
    result.update(builds=b.builds, seconds=round(time.monotonic() - t0, 1), probes=log)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "probes"}, indent=2))


if __name__ == "__main__":
    main()
