"""evaluate on real digits variants (onnxruntime on a CPU): task metrics, agreement with fp32
and PyTorch, user metrics from the config, latency rows; plus the GPU-timing path with a stub runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.backends.base import Runner
from pipeline.errors import ArtifactError, ConfigError
from pipeline.fileio import read_json
from pipeline.stages import evaluate
from tests._digits_run import digits_config

EX = "pipeline.examples.task_metrics"


def _run(cfg: Any, d: Path, precision: str, out: Path) -> dict[str, Any]:
    return evaluate.run(cfg, precision, d / "build" / precision, d / "build" / "fp32", d / "prepare" / "eval.npz",
                        d / "validate" / "reference.npz", out)


def test_report_contents(clean: Path) -> None:
    fp32, int8 = read_json(clean / "eval" / "fp32.json"), read_json(clean / "eval" / "int8.json")
    for ev in (fp32, int8):
        assert ev["schema_version"] == evaluate.SCHEMA_VERSION and ev["backend"] == "onnxruntime"
        assert set(ev["metrics"]) == {"top1", "top5"} and ev["metric_functions"] == ["top1", "top5"]
        assert set(ev["reference_metrics"]["pytorch"]) == {"top1", "top5"}
        assert ev["device"]["device"] == "cpu"
        assert set(ev["agreement_fp32"]) == set(ev["agreement_pytorch"]) == {"logits"}
        assert ev["latency_config"] == {"warmup": 3, "iterations": 30, "batch_sizes": [1, 32]}
        assert [r["batch_size"] for r in ev["latency"]] == [1, 32] and ev["latency_skipped"] == []
        for r in ev["latency"]:
            assert r["iterations"] == 30 and r["warmup"] == 3 and "perf_counter" in r["method"]
            assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["throughput_per_s"] > 0
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
    # The other variants of the broken run are untouched.
    assert read_json(broken / "eval" / "fp16.json")["metrics"] == read_json(clean / "eval" / "fp16.json")["metrics"]


def test_user_metrics_from_config(clean: Path, tmp_path: Path) -> None:
    cfg = digits_config(tmp_path, evaluate={"metrics": [
        "top1",
        f"{EX}:embedding_retrieval",
        {"function": f"{EX}:embedding_similarity", "kwargs": {"output": "logits"}},
    ]})
    r = _run(cfg, clean, "int8", tmp_path / "int8.json")
    assert set(r["metrics"]) == {"top1", "recall_at_1", "embedding_cosine", "embedding_cosine_min"}
    assert r["metric_functions"] == ["top1", f"{EX}:embedding_retrieval", f"{EX}:embedding_similarity"]
    assert r["metrics"]["recall_at_1"] > 80.0  # logits cluster by digit
    assert 99.0 < r["metrics"]["embedding_cosine"] < 100.0  # int8 vs PyTorch: close, not equal
    # On PyTorch's own outputs, similarity with itself is exact.
    assert r["reference_metrics"]["pytorch"]["embedding_cosine"] == pytest.approx(100.0)


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


def test_batch_sizes_outside_the_profile_are_listed(clean: Path, tmp_path: Path) -> None:
    cfg = digits_config(tmp_path, evaluate={"latency": {"warmup": 1, "iterations": 5, "batch_sizes": [1, 8, 64]}})
    runner, info = evaluate.load_variant(clean / "build" / "fp32")
    x = np.load(clean / "prepare" / "eval.npz")["x"]
    skipped: list[dict[str, Any]] = []
    with runner:
        rows = evaluate.measure_latency(runner, x, cfg, {**info, "profile": {"max_batch": 16}}, skipped)
    assert [r["batch_size"] for r in rows] == [1, 8]
    assert skipped == [{"batch_size": 64, "reason": "above the optimization profile's max_batch 16"}]


class _GpuTimedRunner(Runner):
    """Stands in for the TensorRT runner: host and GPU times, a method string, a GPU device."""

    backend = "tensorrt"
    input_names = ["input"]
    output_names = ["logits"]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"logits": np.zeros((len(feeds["input"]), 10), np.float32)}

    def time(self, feeds: dict[str, np.ndarray], warmup: int, iterations: int) -> dict[str, Any]:
        self.calls = getattr(self, "calls", []) + [(len(feeds["input"]), warmup, iterations)]
        return {"times_ms": [2.0] * iterations, "gpu_times_ms": [1.0] * iterations, "method": "cuda events"}


def test_gpu_times_are_kept_beside_host_times(tmp_path: Path) -> None:
    cfg = digits_config(tmp_path, evaluate={"latency": {"warmup": 7, "iterations": 11, "batch_sizes": [1, 4, 300]}})
    r = _GpuTimedRunner()
    x = np.zeros((100, 1, 8, 8), np.float32)
    rows = evaluate.measure_latency(r, x, cfg, {"profile": {"max_batch": 512}})
    assert r.calls == [(1, 7, 11), (4, 7, 11), (300, 7, 11)]  # a batch larger than the data is tiled
    for row in rows:
        assert row["p50_ms"] == 2.0 and row["gpu"]["p50_ms"] == 1.0 and row["method"] == "cuda events"
        assert row["gpu"]["throughput_per_s"] == pytest.approx(row["batch_size"] * 1000.0)
