"""`trtpipe tune` measures the full evaluation set chunk by chunk (issue 22): the FP32 reference
is computed once, batch by batch, into a temporary .npz beside the output folder (removed when
the stage ends, also on error), and every candidate's check on the full set reads its outputs and
the FP32 rows a chunk at a time. On the three-head detector (tests/models/digit_detector.py):
tune.json is the same whether the full set is one chunk or many (counts exactly, sums to float
rounding), a candidate's full-set metric and its search-subset metric equal numpy's from
onnxruntime's outputs, and no array of the evaluation set's size reaches the runner or the
budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.stages.test_tune import DETECTOR_CONFIG, _inside, _make_project, _run_until_calibrate

BATCH = 16  # evaluate.batch_size: the FP32 pass and the candidates' runs go 16 samples at a time
BUDGETS = {  # one of each kind: a sum (SNR), a count (top-1 agreement, top-1), a user metric (whole arrays)
    "snr": {"metric": "snr_db@boxes", "min": 55.0},
    "agree": {"metric": "top1_agreement@prob", "min": 0.999},
    "top1": {"metric": "top1_prob", "max_drop": 0.5},
    "iou": {"metric": "boxes_iou", "max_drop": 0.5},
}
COUNTS = ("agree", "top1", "iou")  # budgets whose metric is exact whatever the chunks (iou: one call on whole arrays)
NUMBERS = ("metric", "metric_sensitivity", "metric_full", "sqnr_db", "cost")


@pytest.fixture(scope="module")
def det(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The detector through prepare .. calibrate (evaluate.batch_size 16)."""
    from pipeline.config import load_config

    config = json.loads(json.dumps(DETECTOR_CONFIG))
    config["evaluate"]["batch_size"] = BATCH
    root = _make_project(tmp_path_factory.mktemp("tune-streamed") / "det", config, "digit_detector")
    with _inside(root):
        from digit_detector import train  # type: ignore[import-not-found]

        train("weights.pt")
        _run_until_calibrate(load_config(quiet=True))
    return root


def _cfg(root: Path, budget: dict[str, Any]) -> Any:
    from pipeline.config import load_config

    params = {"config": "configs/model.yaml", "override": True,
              "tune": {"budget": {"min": None, "max": None, "max_drop": None, **budget}}}
    (root / "params-b.yaml").write_text(yaml.safe_dump(params))
    return load_config(None, root / "params-b.yaml", quiet=True)


def _tune(root: Path, budget: dict[str, Any], out: str) -> dict[str, Any]:
    from pipeline.stages import tune

    with _inside(root):
        A = Path("artifacts")
        tune.run(_cfg(root, budget), A / "export/model.onnx", A / "calibrate", A / "prepare/eval.npz", A / out,
                 progress=False)
    return json.loads((root / "artifacts" / out / "tune.json").read_text())


class _Rows:
    """The number of samples of every array some functions are given (spied on)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from pipeline.data.npz_writer import NpzWriter
        from pipeline.tuning import budget, ort_candidates

        self.seen: dict[str, list[int]] = {}
        self._spy(monkeypatch, ort_candidates.OrtCandidates, "run", "runner", lambda a: a[2])
        self._spy(monkeypatch, budget.Budget, "measure", "Budget.measure", lambda a: {**a[1], **a[2]})
        self._spy(monkeypatch, budget.BudgetSum, "add", "BudgetSum.add", lambda a: {**a[1], **a[2]})
        self._spy(monkeypatch, NpzWriter, "add", "NpzWriter.add", lambda a: {"rows": a[2]})

    def _spy(self, monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, label: str, arrays: Any) -> None:
        real = getattr(owner, name)

        def spy(*a: Any, **k: Any) -> Any:
            self.seen.setdefault(label, []).extend(len(v) for v in arrays(a).values())
            return real(*a, **k)

        monkeypatch.setattr(owner, name, spy)


def _same(a: dict[str, Any], b: dict[str, Any], exact: bool) -> None:
    assert a["chosen"] == b["chosen"] and a["kept"] == b["kept"] and a["met"] == b["met"]
    assert len(a["candidates"]) == len(b["candidates"])
    for p, q in zip(a["candidates"], b["candidates"]):
        assert (p["kept"], p["minmax"], p["phase"], p["meets"], p["meets_full"]) == \
            (q["kept"], q["minmax"], q["phase"], q["meets"], q["meets_full"])
        for k in NUMBERS:
            _close(p[k], q[k], 0.0 if exact and k != "sqnr_db" else 1e-9)
    for k in ("fp32_full", "threshold_full", "fp32_search", "threshold_search"):
        _close(a["budget"][k], b["budget"][k], 0.0 if exact else 1e-12)
    assert a["sensitivity"] == b["sensitivity"]  # the search subsets: held, measured as before


def _close(a: Any, b: Any, rel: float) -> None:
    """Equal, or (floats; "Infinity"/"NaN" are strings in the report) within `rel`."""
    if rel and isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=rel, abs=1e-12)
    else:
        assert a == b


def _scratch_left(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "artifacts").iterdir() if "fp32" in p.name)


@pytest.mark.slow
@pytest.mark.parametrize("which", list(BUDGETS))
def test_chunks_of_a_batch_give_the_numbers_of_one_chunk(det: Path, which: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.data import chunks

    whole = _Rows(monkeypatch)
    one = _tune(det, BUDGETS[which], f"tune-{which}-one")
    n = one["samples"]["full"]
    assert n > 300 and one["samples"]["search"] == 128
    assert n in whole.seen["runner"] and n in whole.seen["BudgetSum.add"]  # small outputs: the full set is one chunk
    rows = _Rows(monkeypatch)
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 1)  # a chunk of one batch
    many = _tune(det, BUDGETS[which], f"tune-{which}-many")
    # the full set goes a batch at a time (at least full INT8 and all kept); whole arrays: the search subsets only
    assert max(rows.seen["runner"]) <= 128 and rows.seen["runner"].count(BATCH) >= 2 * (n // BATCH)
    assert max(rows.seen["BudgetSum.add"]) == BATCH and max(rows.seen["NpzWriter.add"]) == BATCH
    assert max(rows.seen["Budget.measure"]) == 128
    _same(one, many, exact=which in COUNTS)
    assert _scratch_left(det) == []


def _outputs(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """onnxruntime's outputs of `path`, BATCH samples at a time (as tune runs them)."""
    from calibration.ort_session import make_session

    s = make_session(path)  # exact Q/DQ semantics on every CPU
    names = [o.name for o in s.get_outputs()]
    parts = [s.run(None, {"image": x[i:i + BATCH]}) for i in range(0, len(x), BATCH)]
    return {k: np.concatenate([p[j] for p in parts]) for j, k in enumerate(names)}


def _snr(got: np.ndarray, ref: np.ndarray) -> float:
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    return float(10 * np.log10((ref**2).sum() / ((got - ref) ** 2).sum()))


@pytest.mark.slow
def test_full_set_metrics_are_numpys_from_onnxruntime_outputs(det: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In chunks of one batch: the chosen and the full-INT8 candidates' SNR on the full set, the
    full-INT8 candidate's SNR on the search subset (its rows gathered as the chunks passed), and the
    FP32 top-1 of the full set, each computed here with numpy from onnxruntime's outputs."""
    from pipeline.stages.tune import _split
    from pipeline.data import chunks

    monkeypatch.setattr(chunks, "CHUNK_BYTES", 1)
    rep = _tune(det, BUDGETS["snr"], "tune-numpy")
    top1 = _tune(det, BUDGETS["top1"], "tune-numpy-top1")
    with np.load(det / "artifacts/prepare/eval.npz") as z:
        x, y = z["image"], z["y"]
    A = det / "artifacts"
    ref = _outputs(A / "export/model.onnx", x)
    tuned = _outputs(A / "tune-numpy/model.qdq.onnx", x)
    full = _outputs(A / "calibrate/model.qdq.onnx", x)
    points = rep["reference_points"]
    assert points["chosen"]["metric_full"] == pytest.approx(_snr(tuned["boxes"], ref["boxes"]), rel=1e-9)
    assert points["full_int8"]["metric_full"] == pytest.approx(_snr(full["boxes"], ref["boxes"]), rel=1e-9)
    base = rep["candidates"][0]
    assert base["phase"] == "full_int8" and base["kept"] == [] and base["minmax"] == []
    search, _ = _split(len(x), 128, None, 0)
    assert base["metric"] == pytest.approx(_snr(full["boxes"][search], ref["boxes"][search]), rel=1e-9)
    assert base["sqnr_db"] == pytest.approx(_snr(full["boxes"], ref["boxes"]), rel=1e-9)  # boxes: the budget's output
    assert top1["budget"]["fp32_full"] == 100.0 * float(np.mean(ref["prob"].argmax(1) == y))
    assert top1["budget"]["fp32_search"] == 100.0 * float(np.mean(ref["prob"][search].argmax(1) == y[search]))


@pytest.mark.slow
def test_the_fp32_reference_is_a_temporary_npz_beside_the_output_removed_also_on_error(
        det: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.data.npz_rows import npz_shapes
    from pipeline.errors import PipelineError
    from pipeline.data import chunks
    from pipeline.tuning import fullset, ort_candidates

    written: list[Path] = []
    real = fullset.write_reference

    def spy(session: Any, x: Any, bs: int, path: Path, keep: Any) -> Any:
        out = real(session, x, bs, path, keep)
        written.append(Path(path).resolve())
        assert {k: s for k, (s, _) in npz_shapes(path).items()}["boxes"][0] == len(next(iter(x.values())))
        return out

    monkeypatch.setattr(fullset, "write_reference", spy)
    _tune(det, BUDGETS["snr"], "tune-where")
    out = (det / "artifacts/tune-where").resolve()
    assert written[0].parent.parent == out.parent and not written[0].is_relative_to(out)
    assert not written[0].exists() and _scratch_left(det) == []

    calls = []
    real_run = ort_candidates.OrtCandidates.run

    def failing(self: Any, kept: Any, x: Any, *a: Any) -> Any:
        calls.append(len(next(iter(x.values()))))
        if len(calls) == 3:
            raise PipelineError("a candidate failed mid-pass")
        return real_run(self, kept, x, *a)

    monkeypatch.setattr(ort_candidates.OrtCandidates, "run", failing)
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 1)
    with pytest.raises(PipelineError, match="a candidate failed mid-pass"):
        _tune(det, BUDGETS["snr"], "tune-fails")
    assert calls == [BATCH] * 3  # in the middle of the first full pass
    assert not written[1].exists() and _scratch_left(det) == [] and not (det / "artifacts/tune-fails").exists()


def test_engine_candidates_run_per_chunk_are_built_and_timed_once(tmp_path: Path) -> None:
    """TrtCandidates (its own run, timing and cost code; a stand-in build and engine) called chunk by
    chunk on the full set: no candidate is rebuilt between chunks, each is timed once per latency
    batch size, and no engine call sees more than a chunk of the full set."""
    import collections

    from pipeline.backends import tensorrt_backend
    from pipeline.backends.base import BuildResult
    from pipeline.data.npz_writer import NpzWriter
    from pipeline.runtime import trt_runner
    from pipeline.tuning.budget import Budget
    from pipeline.tuning.fullset import StreamedSet
    from pipeline.tuning.layers import Layer
    from pipeline.tuning.search import SampleSet, Tuner
    from pipeline.tuning.trt_candidates import TrtCandidates
    from tests._digits_run import digits_config

    layers = [Layer(f"l{i}", "Conv", i, (f"l{i}",), 1000) for i in range(4)]
    noise = {"l0": 1e-6, "l1": 1e-1, "l2": 1e-6, "l3": 1e-6}  # l1: the layer INT8 breaks
    built: list[list[str]] = []
    timed: list[tuple[tuple[str, ...], int]] = []
    rows: list[int] = []

    class Engine:  # stand-in TrtRunner: the input plus a fixed error per INT8 layer
        def __init__(self, path: Path) -> None:
            self.kept = tuple(json.loads(Path(path).read_text()))
            self.output_names, self.profiles = ["y"], []

        def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            v = feed["input"].astype(np.float64)
            rows.append(len(v))
            for i, layer in enumerate(layers):
                if layer.name not in self.kept:
                    v = v + np.sqrt(noise[layer.name]) * np.sin(7.0 * (i + 1) * feed["input"])
            return {"y": v.astype(np.float32)}

        def time(self, batch: dict[str, np.ndarray], warmup: int, iterations: int, mode: Any = None) -> dict[str, Any]:
            timed.append((self.kept, len(batch["input"])))
            return {"times_ms": [1.0 + len(self.kept)]}

        def close(self) -> None:
            pass

    def build(self: Any, req: Any) -> BuildResult:
        pins = req.config.build.layer_precisions
        kept = [layer.name for layer in layers if any(layer.name in p for p in pins)]
        (req.out_dir / "model.engine").write_text(json.dumps(kept))
        built.append(kept)
        return BuildResult("model.engine")

    mp = pytest.MonkeyPatch()
    mp.setattr(tensorrt_backend.TensorRTBackend, "build", build)
    mp.setattr(trt_runner, "TrtRunner", Engine)
    n, chunk = 200, 16
    x = np.random.default_rng(0).standard_normal((n, 8)).astype(np.float32)
    with NpzWriter(tmp_path / "fp32.npz", ["y"]) as w:
        w.add("y", x)
        w.close()
    idx = np.sort(np.random.default_rng(1).permutation(n)[:48])
    sets = {"full": StreamedSet({"input": x}, None, tmp_path / "fp32.npz", ["y"], chunk),
            "search": SampleSet({"input": x[idx]}, None, {"y": x[idx]}, index=idx),
            "sensitivity": SampleSet({"input": x[idx]}, None, {"y": x[idx]})}
    cfg = digits_config(tmp_path, evaluate={"batch_size": chunk})
    cands = TrtCandidates(cfg, tmp_path / "model.onnx", tmp_path, layers, "fp16", progress=False)
    cands._route = ("implicit", "stand-in")
    try:
        budget = Budget("snr_db", "min", 30.0, "agreement", True, "snr_db", None)
        tuner = Tuner(layers, budget, cands, sets, 100, 60.0, None, False)
        chosen, _ = tuner.run("sensitivity")
    finally:
        cands.close()
        mp.undo()
    assert chosen["kept"] == ["l1"] and chosen["meets_full"]
    full = [c for c in tuner.candidates if c["metric_full"] is not None]
    assert len(full) >= 3 and all(c["latency_ms"] == {"b1": 1.0 + len(c["kept"]), "b32": 1.0 + len(c["kept"])}
                                  for c in full)
    assert all(a != b for a, b in zip(built, built[1:]))  # never rebuilt between the chunks of one pass
    assert set(collections.Counter(timed).values()) == {1}  # once per candidate and latency batch size
    assert {len(k) for k in built} >= {0, 1, 3, 4} and len({k for k, _ in timed}) == len({tuple(k) for k in built})
    assert max(rows) == chunk and rows.count(chunk) >= len(full) * n // chunk
