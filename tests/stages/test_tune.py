"""`trtpipe tune`: the fewest layers kept out of INT8 within an accuracy budget.

On real stage runs (prepare .. calibrate on the CPU): a small CNN with one planted layer
that INT8 breaks (an outlier channel in its input, tests/models/outlier_cnn.py) tunes to
exactly that layer, checked against an independent SNR computed here from onnxruntime's
outputs; a budget that cannot be met fails naming the best point after writing tune.json;
tune.json round-trips into build.layer_precisions and build@int8; a per-output budget on
the three-head model reads that output; and under DVC a budget change re-runs tune and the
int8 stages only. The search logic itself is also checked on synthetic layers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "tests" / "models"

OUTLIER_CONFIG = {
    "model": {"name": "outlier-cnn", "source": "factory", "arch": "outlier_cnn:make", "checkpoint": "weights.pt",
              "inputs": [{"name": "input", "shape": [1, 8, 8]}]},
    "data": {"source": "digits", "preprocess": {"scale": 0.0625, "mean": [0.5], "std": [0.5]}},
    # minmax: the outlier channel sets the range of the whole tensor, as max calibration does
    "calibration": {"method": "minmax", "num_samples": 128},
    "build": {"backend": "onnxruntime"},
    "evaluate": {"latency": {"warmup": 1, "iterations": 3, "batch_sizes": [1]}},
    "tune": {"budget": {"metric": "snr_db", "min": 20.0}, "search_samples": 128},
}


@contextlib.contextmanager
def _inside(path: Path) -> Iterator[None]:
    cwd = os.getcwd()
    os.chdir(path)
    sys.path.insert(0, str(path))
    try:
        yield
    finally:
        sys.path.remove(str(path))
        os.chdir(cwd)


def _snr_db(got: np.ndarray, ref: np.ndarray) -> float:
    """Independent of pipeline.metrics: 10 log10(sum ref^2 / sum (got - ref)^2)."""
    ref = ref.astype(np.float64)
    err = ((got.astype(np.float64) - ref) ** 2).sum()
    return float("inf") if err == 0 else float(10 * np.log10((ref**2).sum() / err))


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    from calibration.ort_session import make_session

    s = make_session(path)  # exact Q/DQ semantics on every CPU
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def _make_project(root: Path, config: dict[str, Any], module: str) -> Path:
    root.mkdir(parents=True)
    shutil.copy(MODELS / f"{module}.py", root / f"{module}.py")
    (root / "configs").mkdir()
    (root / "configs" / "model.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump({"config": "configs/model.yaml"}))
    return root


def _run_until_calibrate(cfg: Any) -> None:
    from pipeline.stages import calibrate, export, prepare, validate

    A = Path("artifacts")
    prepare.run(cfg, A / "prepare")
    export.run(cfg, A / "prepare" / "model.pt", A / "export")
    validate.run(cfg, A / "prepare" / "model.pt", A / "export" / "model.onnx", A / "prepare" / "eval.npz",
                 A / "validate")
    calibrate.run(cfg, A / "export" / "model.onnx", A / "prepare" / "calib.npz", A / "calibrate", progress=False)


def _tune(cfg: Any) -> Any:
    from pipeline.stages import tune

    A = Path("artifacts")
    return tune.run(cfg, A / "export" / "model.onnx", A / "calibrate", A / "prepare" / "eval.npz", A / "tune",
                    progress=False)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The outlier CNN through prepare .. calibrate and tune (budget: output SNR >= 20 dB)."""
    from pipeline.config import load_config

    root = _make_project(tmp_path_factory.mktemp("tune") / "planted", OUTLIER_CONFIG, "outlier_cnn")
    with _inside(root):
        from outlier_cnn import save  # type: ignore[import-not-found]

        save("weights.pt", planted=True)
        cfg = load_config(quiet=True)
        _run_until_calibrate(cfg)
        _tune(cfg)
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.mark.slow
def test_the_search_finds_exactly_the_planted_layer(planted: Path) -> None:
    import onnx

    rep = json.loads((planted / "artifacts/tune/tune.json").read_text())
    model = onnx.load(str(planted / "artifacts/export/model.onnx"))
    convs = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    target = [n for n in convs if n.endswith("/c3/Conv")]
    assert len(target) == 1 and len(convs) == 5
    # The planted conv's input really carries the outlier channel (independently of tune).
    with np.load(planted / "artifacts/prepare/eval.npz") as z:
        x = z["input"]
    node = next(n for n in model.graph.node if n.name == target[0])
    probe = onnx.load(str(planted / "artifacts/export/model.onnx"))
    probe.graph.output.append(onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None))
    import onnxruntime as ort

    act = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        [node.input[0]], {"input": x})[0]
    per_channel = np.abs(act).max(axis=(0, 2, 3))
    assert per_channel[0] > 100 * np.median(per_channel[1:])

    assert rep["met"] is True
    assert [k["layer"] for k in rep["kept"]] == target  # exactly the planted layer, by its ONNX name
    assert rep["sensitivity"][0]["layer"] == target[0] and rep["sensitivity"][0]["rank"] == 1
    assert {layer["name"] for layer in rep["layers"]} == set(convs)
    assert rep["search"]["candidates"] == len(rep["candidates"]) <= 2 * len(convs) + 6
    # Independent check: SNR of the tuned Q/DQ model and of full INT8 against FP32, on every eval sample.
    ref = _ort(planted / "artifacts/export/model.onnx", x)
    tuned = _snr_db(_ort(planted / "artifacts/tune/model.qdq.onnx", x), ref)
    full = _snr_db(_ort(planted / "artifacts/calibrate/model.qdq.onnx", x), ref)
    assert tuned >= 20.0 > full
    assert rep["reference_points"]["chosen"]["metric_full"] == pytest.approx(tuned, abs=0.01)
    assert rep["reference_points"]["full_int8"]["metric_full"] == pytest.approx(full, abs=0.01)
    # The tuned Q/DQ model leaves the planted conv float, every other layer reads a DequantizeLinear.
    qdq = onnx.load(str(planted / "artifacts/tune/model.qdq.onnx"))
    produced_by = {o: n for n in qdq.graph.node for o in n.output}
    for n in qdq.graph.node:
        if n.name in convs:
            reads_dq = produced_by.get(n.input[0]) is not None and produced_by[n.input[0]].op_type == "DequantizeLinear"
            assert reads_dq == (n.name != target[0]), n.name
    # The cost estimate (a roofline at H100 peaks): keeping one conv costs its FP16 time instead of its INT8 time
    # (each the longer of MACs at peak and bytes at 3.35 TB/s) plus the reformats at the two boundaries it makes.
    layers = {layer["name"]: layer for layer in rep["layers"]}
    order = sorted(layers.values(), key=lambda x: x["index"])
    mine = layers[target[0]]
    assert mine["macs"] == 16 * 64 * 16 * 9  # Cout * H * W * Cin * kh * kw
    assert (mine["in_elements"], mine["out_elements"], mine["weight_elements"]) == (16 * 64, 16 * 64, 16 * 16 * 9)
    elements = mine["in_elements"] + mine["out_elements"] + mine["weight_elements"]
    fp16 = max(mine["macs"] / 494.75e12, elements * 2 / 3.35e12)
    int8 = max(mine["macs"] / 989.5e12, elements * 1 / 3.35e12)
    i = order.index(mine)
    flips = ([order[i - 1]] if i > 0 else []) + ([mine] if i < len(order) - 1 else [])
    reformats = sum(x["out_elements"] * 3 / 3.35e12 for x in flips)
    chosen, base = rep["reference_points"]["chosen"]["cost"], rep["reference_points"]["full_int8"]["cost"]
    assert chosen - base == pytest.approx((fp16 - int8 + reformats) * 1e9, abs=2e-5)
    assert (planted / "artifacts/tune/tune.png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_budget_that_cannot_be_met_fails_naming_the_best_point(planted: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from tests._project import trtpipe

    root = _copy(planted, tmp_path / "p")
    params = {"config": "configs/model.yaml", "override": True,  # this budget wins over the config's, on purpose
              "tune": {"budget": {"metric": "top1", "min": 101.0}}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with _inside(root):
        capsys.readouterr()
        assert trtpipe("tune") == 1
        err = capsys.readouterr().err.strip()
        rep = json.loads(Path("artifacts/tune/tune.json").read_text())
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0]  # one line, after the progress bar and notes
    err = errors[0]
    assert err.startswith("trtpipe tune: error:") and "top1 >= 101 is not met (the budget cannot be met" in err
    assert "best point found: candidate" in err and "on the full evaluation set" in err
    assert rep["met"] is False and rep["budget"]["metric"] == "top1"
    best = next(c for c in rep["candidates"] if c["id"] == rep["chosen"])
    assert f"candidate {best['id']} keeping {len(best['kept'])} of 5 layers" in err
    full = [c["metric_full"] for c in rep["candidates"] if c["metric_full"] is not None]
    assert best["metric_full"] == max(full)  # the best point found, by the budget's metric
    assert "cannot be met" in rep["search"]["stop_reason"]


@pytest.mark.slow
def test_tune_json_round_trips_through_build_layer_precisions(planted: Path, tmp_path: Path) -> None:
    import onnx

    from pipeline.backends.trt_layers import match_layer_precisions
    from pipeline.config import BuildConfig, load_config
    from pipeline.fileio import sha256_file
    from pipeline.provenance import ProvenanceError, sha256_of
    from pipeline.reports import TuneReport, read_report
    from pipeline.stages import build
    from pipeline.stages.build_tune import apply_tune

    root = _copy(planted, tmp_path / "p")
    rep = read_report(root / "artifacts/tune/tune.json", TuneReport, "tune report", "tune")
    kept = [k["layer"] for k in rep.kept]
    nodes = [n.name for n in onnx.load(str(root / "artifacts/export/model.onnx")).graph.node]
    assign, _ = match_layer_precisions(nodes, rep.layer_precisions)
    expected = {n for k in rep.kept for n in k["nodes"]}
    assert set(assign) == expected and set(assign.values()) == {"fp16"} and kept[0] in assign
    assert json.loads((root / "artifacts/tune/layer_precisions.json").read_text()) == rep.layer_precisions
    assert BuildConfig(layer_precisions=rep.layer_precisions).layer_precisions == rep.layer_precisions

    params = {"config": "configs/model.yaml", "build": {"int8_from_tune": True, "layer_precisions": {"/inner/fc/*": "fp32"}}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with _inside(root):
        cfg = load_config(quiet=True)
        A = Path("artifacts")
        onnx_sha = sha256_of(A / "export/model.onnx")
        # implicit route: tune's pins after the user's own (the user's match first)
        cfg2, calib_dir, info = apply_tune(cfg, "implicit", A / "tune", A / "calibrate", onnx_sha)
        assert list(cfg2.build.layer_precisions)[0] == "/inner/fc/*"
        assert {k: v for k, v in cfg2.build.layer_precisions.items() if k != "/inner/fc/*"} == rep.layer_precisions
        assert calib_dir == A / "calibrate" and info["kept"] == kept
        # onnxruntime route: build@int8 runs tune's Q/DQ model, and build.json says so
        r = build.run(cfg, "int8", A / "export/model.onnx", A / "build/int8", calib_dir=A / "calibrate",
                      calib_data=A / "prepare/calib.npz", tune_dir=A / "tune")
        assert r.tune is not None and r.tune["applied"] and r.tune["kept"] == kept and r.tune["route"] == "onnxruntime"
        assert r.sha256 == rep.sha256["model.qdq.onnx"] == sha256_file(A / "tune/model.qdq.onnx")
        # a tuned model changed after tune ran is refused, naming it
        with open(A / "tune/model.qdq.onnx", "ab") as f:
            f.write(b"\0")
        with pytest.raises(ProvenanceError, match=r"model\.qdq\.onnx.*re-run tune"):
            build.run(cfg, "int8", A / "export/model.onnx", A / "build/int8b", calib_dir=A / "calibrate",
                      tune_dir=A / "tune")


# -- the search logic on synthetic layers (fast) ---------------------------------------------------
class _Synthetic:
    """Outputs = reference + independent noise per INT8 layer (layer i's noise power given); the
    cost is the estimate of pipeline.tuning.cost. Only for the search logic: no measurement."""

    backend, latency_kind = "synthetic", "estimate"

    def __init__(self, layers: list[Any], noise: dict[str, float], minmax_gain: dict[str, float]) -> None:
        self.layers, self.noise, self.minmax_gain = layers, noise, minmax_gain  # noise power x gain with max|x|

    def run(self, kept: frozenset, x: dict[str, np.ndarray], minmax: frozenset = frozenset()) -> dict[str, np.ndarray]:
        ref = x["ref"]
        out = ref + 1e-4 * np.random.default_rng(1000).standard_normal(ref.shape)  # the float layers' own rounding
        for layer in self.layers:
            if layer.name not in kept:
                rng = np.random.default_rng(layer.index)
                power = self.noise[layer.name] * (self.minmax_gain.get(layer.name, 1.0) if layer.name in minmax else 1.0)
                out = out + np.sqrt(power) * rng.standard_normal(ref.shape)
        return {"y": out}

    def cost(self, kept: Any, minmax: Any = ()) -> tuple[float, dict]:
        from pipeline.tuning.cost import estimated_cost

        return estimated_cost(self.layers, kept, "fp16"), {}

    def close(self) -> None:
        pass


def _tuner(noise: dict[str, float], min_snr: float, max_candidates: int = 100,
           minmax_gain: dict[str, float] = {}) -> Any:
    from pipeline.tuning.budget import Budget
    from pipeline.tuning.layers import Layer
    from pipeline.tuning.search import SampleSet, Tuner

    layers = [Layer(n, "Conv", i, (n,), 1000 * (i + 1)) for i, n in enumerate(noise)]
    ref = np.random.default_rng(99).standard_normal((200, 16))
    sets = {k: SampleSet({"ref": ref}, None, {"y": ref}) for k in ("full", "search", "sensitivity")}
    budget = Budget("snr_db", "min", min_snr, "agreement", True, "snr_db", None)
    return Tuner(layers, budget, _Synthetic(layers, noise, minmax_gain), sets, max_candidates, 60.0, None, False,
                 set(minmax_gain))


def test_search_strategies_on_synthetic_layers() -> None:
    noise = {f"l{i}": 1e-5 for i in range(12)}
    noise["l7"] = 1e-1  # the planted layer: 40 dB worse than the others
    chosen, table = _tuner(noise, 30.0).run("sensitivity")
    assert chosen["kept"] == ["l7"] and chosen["meets_full"] and table[0]["layer"] == "l7"
    # Polygraphy-style bisection keeps a contiguous prefix through the planted layer
    chosen, _ = _tuner(noise, 30.0).run("bisect")
    assert chosen["kept"] == [f"l{i}" for i in range(8)] and chosen["meets_full"]
    # first/last misses it
    chosen, _ = _tuner(noise, 30.0).run("first_last")
    assert chosen["kept"] == ["l0", "l11"] and chosen["meets_full"] is False
    # a search budget that runs out returns the cheapest candidate that met the budget (all kept)
    t = _tuner(noise, 30.0, max_candidates=4)
    chosen, _ = t.run("sensitivity")
    assert "max_candidates" in t.stop_reason and chosen["phase"] == "float" and chosen["meets_full"]
    # unreachable: nothing meets; the best point is reported, not a passing one
    t = _tuner(noise, float("inf"))
    chosen, _ = t.run("sensitivity")
    assert chosen["meets_full"] is False and "cannot be met" in t.stop_reason
    # calibration method per layer: where max|x| ranges cut the planted layer's noise 1000x, it stays INT8
    # with them; where they make another layer worse, that one keeps its calibrated ranges
    chosen, table = _tuner(noise, 30.0, minmax_gain={"l7": 1e-3, "l3": 10.0}).run("sensitivity")
    assert chosen["kept"] == [] and chosen["minmax"] == ["l7"] and chosen["meets_full"]
    methods = {r["layer"]: r["method"] for r in table}
    assert methods["l7"] == "minmax" and methods["l3"] == "calibrated" and set(methods.values()) == {"minmax", "calibrated"}
    # objective: one expensive layer (l11, 12k MACs) or two cheap ones (l0, l1: 1k and 2k MACs) both meet the budget;
    # the fewest layers keeps l11, the cheapest keeps l0 and l1
    noise = {f"l{i}": 1e-6 for i in range(12)}
    noise.update(l11=1.05e-3, l0=5e-4, l1=5e-4)
    fewest, _ = _tuner(noise, 29.0).run("sensitivity")
    t = _tuner(noise, 29.0)
    t.objective = "cost"
    cheapest, _ = t.run("sensitivity")
    assert fewest["kept"] == ["l11"] and cheapest["kept"] == ["l0", "l1"]
    assert cheapest["meets_full"] and fewest["meets_full"] and cheapest["cost"] < fewest["cost"]


# -- a per-output budget on the three-head model (Show 3) ------------------------------------------
DETECTOR_CONFIG = {
    "model": {"name": "digit-detector", "source": "factory", "arch": "digit_detector:make", "checkpoint": "weights.pt",
              "inputs": [{"name": "image", "shape": [1, 8, 8]}]},
    "data": {"source": "digits", "preprocess": {"scale": 0.0625, "mean": [0.5], "std": [0.5]}},
    "calibration": {"num_samples": 96},
    "build": {"backend": "onnxruntime"},
    "evaluate": {"metrics": [{"metric": "top1", "output": "prob"},
                             {"function": "pipeline.examples.task_metrics:box_iou_vs_reference", "output": "boxes"}],
                 "latency": {"warmup": 1, "iterations": 3, "batch_sizes": [1]}},
    "tune": {"budget": {"metric": "snr_db@boxes", "min": 55.0}, "search_samples": 128},
}


@pytest.mark.slow
def test_a_per_output_budget_reads_that_output(tmp_path: Path) -> None:
    from pipeline.config import load_config

    root = _make_project(tmp_path / "det", DETECTOR_CONFIG, "digit_detector")
    with _inside(root):
        from digit_detector import train  # type: ignore[import-not-found]

        train("weights.pt")
        cfg = load_config(quiet=True)
        _run_until_calibrate(cfg)
        _tune(cfg)
    rep = json.loads((root / "artifacts/tune/tune.json").read_text())
    assert rep["budget"]["output"] == "boxes" and rep["met"]
    with np.load(root / "artifacts/prepare/eval.npz") as z:
        x = z["image"]
    from calibration.ort_session import make_session

    def outputs(path: Path) -> dict[str, np.ndarray]:
        s = make_session(path)  # exact Q/DQ semantics on every CPU
        return dict(zip([o.name for o in s.get_outputs()], s.run(None, {"image": x})))

    ref = outputs(root / "artifacts/export/model.onnx")
    tuned = outputs(root / "artifacts/tune/model.qdq.onnx")
    full = outputs(root / "artifacts/calibrate/model.qdq.onnx")
    assert set(ref) == {"boxes", "landmarks", "prob"}
    assert _snr_db(tuned["boxes"], ref["boxes"]) >= 55.0 > _snr_db(full["boxes"], ref["boxes"])
    # the boxes head is kept; the landmark and class heads do not touch boxes: they stay INT8
    assert [k["layer"] for k in rep["kept"]] == ["/inner/boxes/Gemm"]
    sens = {r["layer"]: r for r in rep["sensitivity"]}
    for head in ("/inner/landmarks/Gemm", "/inner/prob/prob.0/Gemm"):
        assert sens[head]["int8_alone_sqnr_db"] == "Infinity" and sens[head]["rank"] > 3
    assert rep["reference_points"]["chosen"]["metric_full"] == pytest.approx(_snr_db(tuned["boxes"], ref["boxes"]),
                                                                              abs=0.01)
    assert rep["reference_points"]["full_int8"]["metric_full"] == pytest.approx(_snr_db(full["boxes"], ref["boxes"]),
                                                                                 abs=0.01)
    # the budget reads boxes alone: the other heads do not enter it
    other = min(_snr_db(tuned[k], ref[k]) for k in ("landmarks", "prob"))
    assert rep["reference_points"]["chosen"]["metric_full"] != pytest.approx(other, abs=1e-6)


# -- dvc: a budget change re-runs tune and the int8 stages only -------------------------------------
@pytest.mark.slow
def test_a_budget_change_reruns_tune_and_the_int8_stages_only(tmp_path: Path) -> None:
    from tests._project import dvc_project
    from tests.test_dvc import _sh

    r = dvc_project(tmp_path)
    shutil.copy(MODELS / "outlier_cnn.py", r / "outlier_cnn.py")
    sys.path.insert(0, str(r))
    try:
        import importlib

        importlib.import_module("outlier_cnn").save(str(r / "weights.pt"), planted=True)
    finally:
        sys.path.remove(str(r))
    cfg = json.loads(json.dumps(OUTLIER_CONFIG))
    cfg["build"]["int8_from_tune"] = True
    (r / "configs" / "model.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (r / "params.yaml").write_text("config: configs/model.yaml\n")  # one source: the budget lives in the config
    _sh(r, "git", "init", "-q")
    _sh(r, "dvc", "init", "-q")
    _sh(r, sys.executable, "-m", "pipeline", "dvc")
    _sh(r, "dvc", "repro", "-q")
    build = json.loads((r / "artifacts/build/int8/build.json").read_text())
    assert build["tune"]["applied"] and build["tune"]["kept"] == ["/inner/c3/Conv"]
    _sh(r, "git", "add", "-A")
    _sh(r, "git", "commit", "-qm", "run")
    out = _sh(r, "dvc", "exp", "run", "-S", "configs/model.yaml:tune.budget.min=25")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}
    assert "tune" in ran and "build@int8" in ran, out
    assert ran <= {"tune", "build@int8", "evaluate@int8", "compare", "publish"}, ran


def test_budgets_that_cannot_be_measured_are_refused_naming_the_key(tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.errors import ConfigError
    from pipeline.tuning.budget import Budget

    def cfg_with(budget: dict[str, Any], metrics: Any = None) -> Any:
        data = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
        data["tune"] = {"budget": budget}
        if metrics is not None:
            data["evaluate"]["metrics"] = metrics
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(data))
        return load_config(path, tmp_path / "none.yaml", quiet=True)

    for budget, words in [({"metric": "top1_agreement", "max_drop": 1.0}, "bound it with min"),
                          ({"metric": "top1", "min": 90.0, "max_drop": 1.0}, "exactly one of min, max, max_drop"),
                          ({"metric": "pytorch_cosine", "min": 0.9}, "drop the pytorch_ prefix"),
                          ({"metric": "rel_l2", "min": 0.1}, "bound it with max")]:
        with pytest.raises(ConfigError, match=words):
            cfg_with(budget)
    ref = {"logits": np.random.default_rng(0).standard_normal((20, 10))}
    y = np.arange(20) % 10
    with pytest.raises(ConfigError, match=r"'recall' is neither a task metric of evaluate.metrics \(top1, top5\)"):
        Budget.resolve(cfg_with({"metric": "recall", "min": 1.0}), ["logits"], ref, y)
    with pytest.raises(ConfigError, match="reads output 'boxes', which the model does not have"):
        Budget.resolve(cfg_with({"metric": "cosine@boxes", "min": 0.9}), ["logits"], ref, y)
    with pytest.raises(ConfigError, match="no output of the model has top1_agreement"):
        Budget.resolve(cfg_with({"metric": "top1_agreement", "min": 0.9}, []), ["logits"], {"logits": ref["logits"][:, :1]}, y)
    # a task metric with max_drop: the threshold follows the FP32 value of each sample set; NaN never meets
    b = Budget.resolve(cfg_with({"metric": "top1", "max_drop": 2.0}), ["logits"], ref, y)
    fp32_top1 = 100.0 * float((ref["logits"].argmax(1) == y).mean())
    assert b.kind == "task" and b.measure(ref, ref, y) == pytest.approx(fp32_top1)
    assert b.threshold(fp32_top1) == pytest.approx(fp32_top1 - 2.0)
    assert not b.meets(float("nan"), 0.0) and b.meets(fp32_top1 - 2.0, b.threshold(fp32_top1))


def test_cost_objective_keeps_float_regions_contiguous_when_reformats_cost_more() -> None:
    """Two planted layers (l2, l5) must stay float. With reformats that cost more than what the INT8
    run between them (l3, l4) saves, objective cost keeps l2..l5 as one region; when reformats are
    cheap it keeps just the two. Costs checked against the roofline worked out here: a layer takes
    max(MACs / peak, bytes / bandwidth) at H100 SXM peaks (INT8 989.5e12 MAC/s, FP16 494.75e12;
    3.35e12 B/s; 1 or 2 bytes an element), a reformat reads 1 and writes 2 bytes an element."""
    from pipeline.tuning.cost import boundaries
    from pipeline.tuning.layers import Layer

    noise = {f"l{i}": 1e-6 for i in range(8)}
    noise.update(l2=1e-1, l5=1e-1)

    def run(out_elements: int) -> dict:
        t = _tuner(noise, 30.0)
        t.layers = [Layer(x.name, x.op_type, x.index, x.nodes, 10 ** 6 * (x.index + 1), None, out_elements)
                    for x in t.layers]
        t.runner.layers = t.layers
        t.objective = "cost"
        chosen, _ = t.run("sensitivity")
        return chosen

    def by_hand(kept: set, e: int) -> float:
        peak, size = {True: 494.75e12, False: 989.5e12}, {True: 2, False: 1}
        total = sum(max(10 ** 6 * (i + 1) / peak[f"l{i}" in kept], e * size[f"l{i}" in kept] / 3.35e12)
                    for i in range(8))
        flips = sum(1 for i in range(7) if (f"l{i}" in kept) != (f"l{i + 1}" in kept))
        return round((total + flips * e * 3 / 3.35e12) * 1e9, 6)

    # 8000-element activations: the two reformats that keeping l3 and l4 saves outweigh their extra time, and the
    # one region (70.6 ns) is cheaper than all-float FP16 (76.3 ns) and than the scattered pair (75.9 ns)
    wide = run(8000)
    assert wide["kept"] == ["l2", "l3", "l4", "l5"] and wide["meets_full"]
    assert wide["cost"] == pytest.approx(by_hand({"l2", "l3", "l4", "l5"}, 8000), abs=1e-5)
    assert wide["cost"] < by_hand({"l2", "l5"}, 8000) and wide["cost"] < by_hand(set(noise), 8000)
    narrow = run(1)  # one-element reformats cost nothing next to l3's and l4's FP16 compute
    assert narrow["kept"] == ["l2", "l5"]
    assert narrow["cost"] == pytest.approx(by_hand({"l2", "l5"}, 1), abs=1e-5)
    assert [b.name for b in boundaries(_tuner(noise, 30.0).layers, ["l2", "l5"])] == ["l1", "l2", "l4", "l5"]
