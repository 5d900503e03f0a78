"""evaluate on real digits variants (onnxruntime on a CPU): task metrics, agreement with fp32
and PyTorch, user metrics from the config, latency rows, flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.errors import ArtifactError, ConfigError
from pipeline.fileio import read_json
from pipeline.profiles import resolve_profiles
from pipeline.reports import SCHEMA_VERSION, EvalReport
from pipeline.stages import evaluate
from tests._digits_run import digits_config

EX = "pipeline.examples.task_metrics"


def _run(cfg: Any, d: Path, precision: str, out: Path) -> Any:
    return evaluate.run(cfg, precision, d / "build" / precision, d / "build" / "fp32", d / "prepare" / "eval.npz",
                        d / "validate" / "reference.npz", out)


def test_report_contents(clean: Path) -> None:
    fp32, int8 = read_json(clean / "eval" / "fp32.json"), read_json(clean / "eval" / "int8.json")
    for ev in (fp32, int8):
        EvalReport.model_validate(ev)
        assert ev["schema_version"] == SCHEMA_VERSION and ev["backend"] == "onnxruntime" and ev["flags"] == []
        assert set(ev["metrics"]) == {"top1", "top5"} and ev["metric_outputs"] == {"top1": "logits", "top5": "logits"}
        assert set(ev["reference_metrics"]["pytorch"]) == {"top1", "top5"}
        assert ev["device"]["device"] == "cpu"
        assert set(ev["agreement_fp32"]) == set(ev["agreement_pytorch"]) == {"logits"}
        assert ev["latency_config"] == {"warmup": 3, "iterations": 30, "batch_sizes": [1, 32]}
        assert [r["batch_size"] for r in ev["latency"]] == [1, 32] and ev["latency_skipped"] == []
        for r in ev["latency"]:
            h = r["host"]
            assert r["mode"] == "plain" and r["gpu"] is None
            assert h["iterations"] == 30 and r["warmup"] == 3 and "perf_counter" in r["method"]
            assert 0 < h["p50_ms"] <= h["p90_ms"] <= h["p99_ms"] and h["throughput_per_s"] > 0
    assert fp32["metrics"]["top1"] > 95.0
    # fp32 onnxruntime vs PyTorch: the same numbers to float rounding; vs itself: exact.
    assert fp32["metrics"] == pytest.approx(fp32["reference_metrics"]["pytorch"])
    assert fp32["agreement_fp32"]["logits"]["max_abs_diff"] == 0.0
    assert fp32["agreement_pytorch"]["logits"]["cosine"] > 0.99999
    # INT8 (Q/DQ simulation): close but not identical.
    a = int8["agreement_fp32"]["logits"]
    assert 0.99 < a["cosine"] < 1.0 and a["max_abs_diff"] > 1e-3 and a["top1_agreement"] >= 0.97
    assert int8["engine_bytes"] < fp32["engine_bytes"] / 2


def test_broken_int8_is_measured_as_broken(clean: Path, broken: Path) -> None:
    good, bad = read_json(clean / "eval" / "int8.json"), read_json(broken / "eval" / "int8.json")
    assert good["metrics"]["top1"] > 95.0
    assert bad["metrics"]["top1"] < 50.0
    assert bad["agreement_fp32"]["logits"]["top1_agreement"] < 0.5
    assert bad["agreement_pytorch"]["logits"]["snr_db"] < 10.0
    assert any("agreement_floor" in f for f in bad["flags"])
    # The other variants of the broken run are untouched.
    assert read_json(broken / "eval" / "fp16.json")["metrics"] == read_json(clean / "eval" / "fp16.json")["metrics"]


def test_user_metrics_from_config(clean: Path, tmp_path: Path) -> None:
    cfg = digits_config(tmp_path, evaluate={"metrics": [
        "top1",
        f"{EX}:embedding_retrieval",
        {"function": f"{EX}:embedding_similarity", "kwargs": {"output": "logits"}, "output": "logits"},
    ]})
    r = _run(cfg, clean, "int8", tmp_path / "int8.json")
    assert set(r.metrics) == {"top1", "recall_at_1", "embedding_cosine", "embedding_cosine_min"}
    assert r.metric_outputs["embedding_cosine"] == "logits" and r.metric_outputs["recall_at_1"] is None
    assert r.metrics["recall_at_1"] > 80.0  # logits cluster by digit
    assert 99.0 < r.metrics["embedding_cosine"] < 100.0  # int8 vs PyTorch: close, not equal
    # On PyTorch's own outputs, similarity with itself is exact.
    assert r.reference_metrics["pytorch"]["embedding_cosine"] == pytest.approx(100.0)


def test_bad_metric_fails_before_any_work(clean: Path, tmp_path: Path) -> None:
    cfg = digits_config(tmp_path, evaluate={"metrics": ["top1", "no_such_pkg_q.metrics:fn"]})
    with pytest.raises(ConfigError, match="no_such_pkg_q.metrics:fn"):
        _run(cfg, clean, "fp32", tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_missing_reference_is_a_clear_error(clean: Path, tmp_path: Path) -> None:
    cfg = digits_config(tmp_path)
    with pytest.raises(ArtifactError, match="reference.npz: PyTorch reference outputs not found"):
        evaluate.run(cfg, "fp32", clean / "build" / "fp32", clean / "build" / "fp32", clean / "prepare" / "eval.npz",
                     tmp_path / "reference.npz", tmp_path / "x.json")


def test_batch_sizes_outside_every_profile_are_listed(clean: Path, tmp_path: Path) -> None:
    """A runner with optimization profiles (as a TensorRT engine has): a batch that fits none
    lands in latency_skipped with the reason."""
    cfg = digits_config(tmp_path, evaluate={"latency": {"warmup": 1, "iterations": 5, "batch_sizes": [1, 8, 64]}})
    runner, info = evaluate.load_variant(clean / "build" / "fp32")
    runner.profiles = resolve_profiles({"input": ["batch", 1, 8, 8]}, [{"batch": [1, 8, 16]}])
    x = {"input": np.load(clean / "prepare" / "eval.npz")["input"]}
    skipped: list[dict[str, Any]] = []
    with runner:
        rows = evaluate.measure_latency(runner, x, cfg, skipped)
    assert [r.batch_size for r in rows] == [1, 8]
    assert [s["batch_size"] for s in skipped] == [64] and "fit no optimization profile (largest batch 16)" in skipped[0]["reason"]
