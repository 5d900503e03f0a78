"""Agreement statistics, built-in and user ('module:function') task metrics, and the example
detection-mAP and embedding metrics that show the plug-in signature carries such tasks."""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import EvaluateConfig, GateConfig, MetricSpec
from pipeline.errors import ConfigError
from pipeline.examples import task_metrics as ex
from pipeline.metrics import agreement, as_float, compute_task_metrics, json_number, resolve_metrics, topk

EX = "pipeline.examples.task_metrics"


# --- agreement ----------------------------------------------------------------------------


def test_agreement_identical_outputs() -> None:
    a = np.random.default_rng(0).normal(size=(50, 10)).astype(np.float32)
    r = agreement(a, a)
    assert r["cosine"] == pytest.approx(1.0) and r["max_abs_diff"] == 0.0 and r["rel_l2"] == 0.0
    assert r["snr_db"] == math.inf and r["top1_agreement"] == 1.0


def test_agreement_known_perturbation() -> None:
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(200, 10))
    noise = rng.normal(size=ref.shape)
    noise *= 0.1 * np.linalg.norm(ref) / np.linalg.norm(noise)  # relative L2 exactly 0.1
    r = agreement(ref + noise, ref)
    assert r["rel_l2"] == pytest.approx(0.1, rel=1e-9)
    assert r["snr_db"] == pytest.approx(20.0, rel=1e-9)  # -20 log10(0.1)
    assert r["max_abs_diff"] == pytest.approx(np.abs(noise).max())
    assert 0.95 < r["cosine"] < 1.0 and r["cosine_min"] <= r["cosine"]
    flipped = ref.copy()
    flipped[:50] = -flipped[:50]  # argmax changes on those rows (almost surely)
    assert agreement(flipped, ref)["top1_agreement"] == pytest.approx(0.75, abs=0.01)


def test_agreement_in_chunks_is_the_whole_array_statistic(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 7 rows (sizes that do not divide 100) give what numpy says of the whole
    arrays at once, computed here independently; a NaN in any chunk still makes it NaN."""
    from pipeline import metrics

    rng = np.random.default_rng(3)
    ref = rng.normal(size=(100, 4, 3)).astype(np.float32)
    cand = (ref + rng.normal(scale=0.2, size=ref.shape)).astype(np.float32)
    monkeypatch.setattr(metrics, "AGREEMENT_ROWS", 7)
    r = agreement(cand, ref)
    a, b = cand.reshape(100, -1).astype(np.float64), ref.reshape(100, -1).astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    d = a - b
    assert r["cosine"] == pytest.approx(cos.mean(), rel=1e-12) and r["cosine_min"] == pytest.approx(cos.min(), rel=1e-12)
    assert r["max_abs_diff"] == np.abs(d).max() and r["mean_abs_diff"] == pytest.approx(np.abs(d).mean(), rel=1e-12)
    assert r["snr_db"] == pytest.approx(10 * np.log10((b**2).sum() / (d**2).sum()), rel=1e-12)
    assert r["top1_agreement"] == (a.argmax(1) == b.argmax(1)).mean()
    cand[93, 1, 2] = np.nan
    bad = agreement(cand, ref)
    assert bad["nonfinite"] == 1 and math.isnan(bad["cosine"]) and math.isnan(bad["top1_agreement"])


def test_topk_in_percent() -> None:
    logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5], [0.5, 0.3, 0.2]])
    labels = np.array([1, 1, 0, 2])
    assert topk(logits, labels, (1, 2, 3)) == {"top1": 25.0, "top2": 50.0, "top3": 100.0}
    assert topk(logits, None) == {}


def test_json_number_round_trip() -> None:
    vals = [1.5, math.inf, -math.inf, 3]
    text = json.dumps([json_number(v) for v in vals], allow_nan=False)  # strict JSON: would raise on inf
    back = [as_float(v) for v in json.loads(text)]
    assert back == [1.5, math.inf, -math.inf, 3.0]
    assert math.isnan(as_float(json_number(math.nan)))
    assert as_float("onnxruntime") is None and as_float(True) is None


# --- pluggable task metrics ------------------------------------------------------------
DET = ["boxes", "scores", "classes"]


def values(*args: Any, **kw: Any) -> dict[str, float]:
    """The metric values of compute_task_metrics (its second result names the outputs read)."""
    return compute_task_metrics(*args, **kw)[0]



def _logits_labels(n: int = 40) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 10, n)
    logits = rng.normal(size=(n, 10))
    logits[np.arange(n) % 4 != 0, y[np.arange(n) % 4 != 0]] += 10  # 3 in 4 right
    return {"logits": logits}, y


def test_builtin_topk_via_config() -> None:
    out, y = _logits_labels()
    ms = resolve_metrics(EvaluateConfig(metrics=["top1", "top3"]).metrics, ["logits"])
    got = values(ms, out, y)
    assert set(got) == {"top1", "top3"}
    assert got["top1"] == pytest.approx(75.0, abs=5)


def test_user_metric_signature_kwargs_and_reference() -> None:
    out, y = _logits_labels()
    ref = {"logits": out["logits"] + 0.01}
    specs = EvaluateConfig(metrics=[
        "top1",
        f"{EX}:embedding_retrieval",
        {"function": f"{EX}:embedding_retrieval", "kwargs": {"k": 5}},
        f"{EX}:embedding_similarity",
    ]).metrics
    assert isinstance(specs[1], MetricSpec) and specs[2].kwargs == {"k": 5}
    ms = resolve_metrics(specs, ['logits'])
    assert ms[3].wants == {"reference"} and ms[1].wants == frozenset()
    got = values(ms, out, y, reference=ref)
    assert set(got) == {"top1", "recall_at_1", "recall_at_5", "embedding_cosine", "embedding_cosine_min"}
    assert got["recall_at_5"] >= got["recall_at_1"]
    assert 99.9 < got["embedding_cosine"] <= 100.0
    # Without a reference (labels-only data), the similarity metric reports nothing rather than guessing.
    assert "embedding_cosine" not in values(ms, out, y)


def test_user_metric_from_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_task_metrics.py").write_text(textwrap.dedent("""
        import numpy as np
        def mean_logit(outputs, labels, scale=1.0, inputs=None):
            return {"mean_logit": scale * float(np.mean(outputs["logits"])), "n_inputs": len(inputs)}
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    ms = resolve_metrics([MetricSpec(function="my_task_metrics:mean_logit", kwargs={"scale": 2.0})], ["logits"])
    got = values(ms, {"logits": np.ones((3, 2))}, None, inputs=np.zeros((3, 4)))
    assert got == {"mean_logit": 2.0, "n_inputs": 3.0}


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
        (f"{EX}:no_such_function", "has no callable 'no_such_function'"),
        ("top0", "neither a built-in"),
    ],
)
def test_bad_metric_specs(spec: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        resolve_metrics([spec if spec == "top0" else MetricSpec(function=spec)], ["logits"])


def test_metric_return_values_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bad_metrics_mod.py").write_text(
        "def a_list(o, l):\n    return [1]\n"
        "def a_string(o, l):\n    return {'x': 'high'}\n"
        "def top1_again(o, l):\n    return {'top1': 1.0}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out, y = _logits_labels()
    with pytest.raises(ConfigError, match="returned list"):
        values(resolve_metrics([MetricSpec(function="bad_metrics_mod:a_list")], ["logits"]), out, y)
    with pytest.raises(ConfigError, match="x='high', not a number"):
        values(resolve_metrics([MetricSpec(function="bad_metrics_mod:a_string")], ["logits"]), out, y)
    with pytest.raises(ConfigError, match="both report a metric named 'top1'"):
        values(resolve_metrics(["top1", MetricSpec(function="bad_metrics_mod:top1_again")], ["logits"]), out, y)


def test_config_rejects_unknown_metric_names_and_misplaced_thresholds() -> None:
    with pytest.raises(ValueError, match="'accuracy' is neither a built-in"):
        EvaluateConfig(metrics=["accuracy"])
    with pytest.raises(ValueError, match="'rel_l2' is not one of cosine"):
        GateConfig(thresholds={"int8": {"min_agreement": {"rel_l2": 0.1}}})
    with pytest.raises(ValueError, match="'pytorch_cosine' is not one of max_abs_diff"):
        GateConfig(thresholds={"int8": {"max_divergence": {"pytorch_cosine": 0.1}}})
    ok = GateConfig(thresholds={"int8": {"min_agreement": {"pytorch_snr_db": 30}, "max_divergence": {"rel_l2": 0.1}}})
    assert ok.thresholds["int8"].max_divergence == {"rel_l2": 0.1}


# --- detection mAP (expressible as a user metric) ------------------------------------------


def _detections(gt: np.ndarray, shift: float = 0.0, extra_fp: bool = False) -> dict[str, np.ndarray]:
    """Detections = the ground truth boxes (optionally shifted), score 0.9, plus an optional low-score false positive."""
    n, m, _ = gt.shape
    k = m + 1
    boxes = np.zeros((n, k, 4), np.float32)
    scores = np.zeros((n, k), np.float32)
    classes = np.zeros((n, k), np.int64)
    boxes[:, :m] = gt[:, :, 1:5] + shift
    scores[:, :m] = np.where(gt[:, :, 0] >= 0, 0.9, 0.0)
    classes[:, :m] = np.maximum(gt[:, :, 0], 0)
    if extra_fp:
        boxes[:, m] = [50, 50, 60, 60]
        scores[:, m] = 0.1
    return {"boxes": boxes, "scores": scores, "classes": classes}


def _gt() -> np.ndarray:
    gt = -np.ones((4, 2, 5), np.float32)
    gt[:, 0] = [0, 0, 0, 10, 10]
    gt[:2, 1] = [1, 20, 20, 30, 30]
    return gt


def test_detection_map_perfect_shifted_and_false_positives() -> None:
    gt = _gt()
    fn = resolve_metrics([MetricSpec(function=f"{EX}:detection_map")], DET)
    assert values(fn, _detections(gt), gt) == {"map50": pytest.approx(100.0)}
    # A low-scored false positive ranked after every true positive leaves AP at 100.
    assert values(fn, _detections(gt, extra_fp=True), gt)["map50"] == pytest.approx(100.0)
    # Shifted by 5 px on 10 px boxes: IoU = 25/175 < 0.5, every detection misses.
    assert values(fn, _detections(gt, shift=5.0), gt)["map50"] == pytest.approx(0.0)
    # The threshold is a keyword argument from the config: IoU 0.14 passes at 0.1.
    loose = resolve_metrics([MetricSpec(function=f"{EX}:detection_map", kwargs={"iou_threshold": 0.1})], DET)
    assert values(loose, _detections(gt, shift=5.0), gt) == {"map10": pytest.approx(100.0)}


def test_detection_map_hand_computed() -> None:
    # One class, 2 ground truth boxes in one image; detections: hit (0.9), miss (0.8), hit (0.7).
    gt = np.array([[[0, 0, 0, 10, 10], [0, 20, 20, 30, 30]]], np.float32)
    out = {
        "boxes": np.array([[[0, 0, 10, 10], [40, 40, 50, 50], [20, 20, 30, 30]]], np.float32),
        "scores": np.array([[0.9, 0.8, 0.7]], np.float32),
        "classes": np.zeros((1, 3), np.int64),
    }
    # precision/recall: (1, .5), (.5, .5), (.67, 1) -> all-point AP = .5 * 1 + .5 * 2/3
    assert ex.detection_map(out, gt)["map50"] == pytest.approx(100 * (0.5 + 0.5 * 2 / 3))


# --- embeddings ------------------------------------------------------------------------------


def test_embedding_retrieval_hand_computed() -> None:
    emb = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.8, 0.6]], np.float32)
    labels = np.array([0, 0, 1, 1, 1])
    # Nearest others: 0->1, 1->0, 2->3, 3->2 (hits); 4 -> 1 (cos .86), 0 (.80), 3 (.68): a hit only at k=3.
    assert ex.embedding_retrieval({"emb": emb}, labels) == {"recall_at_1": pytest.approx(80.0)}
    assert ex.embedding_retrieval({"emb": emb}, labels, k=2) == {"recall_at_2": pytest.approx(80.0)}
    assert ex.embedding_retrieval({"emb": emb}, labels, k=3) == {"recall_at_3": pytest.approx(100.0)}


def test_embedding_similarity_sees_a_broken_variant() -> None:
    rng = np.random.default_rng(3)
    ref = {"emb": rng.normal(size=(64, 16))}
    good = {"emb": ref["emb"] + 0.01 * rng.normal(size=(64, 16))}
    bad = {"emb": ref["emb"] + 1.0 * rng.normal(size=(64, 16))}
    g = ex.embedding_similarity(good, None, reference=ref)
    b = ex.embedding_similarity(bad, None, reference=ref)
    assert g["embedding_cosine"] > 99.9 and b["embedding_cosine"] < 90.0
    assert b["embedding_cosine_min"] < b["embedding_cosine"]
