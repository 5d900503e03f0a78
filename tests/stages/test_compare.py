"""compare: compare.json (flat rows per variant for dvc metrics), compare.md, tradeoff.png,
latency.json; on a real digits run and on synthetic evaluation reports."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import ReportError
from pipeline.fileio import read_json, write_json
from pipeline.stages import compare
from tests._digits_run import digits_config


def _strict_json(path: Path) -> Any:
    def no_constants(name: str) -> Any:
        raise AssertionError(f"{path}: non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=no_constants)


def test_real_run_outputs(clean: Path) -> None:
    out = clean / "compare"
    table = _strict_json(out / "compare.json")  # strict JSON: no Infinity/NaN
    assert table["schema_version"] == compare.SCHEMA_VERSION and table["model"] == "digits-cnn"
    assert table["reference"] == "fp32" and table["backends"] == ["onnxruntime"] and table["primary_metric"] == "top1"
    rows = table["variants"]
    assert list(rows) == ["fp32", "fp16", "int8"]
    evals = {p: read_json(clean / "eval" / f"{p}.json") for p in rows}
    torch_top1 = evals["fp32"]["reference_metrics"]["pytorch"]["top1"]
    assert table["pytorch"]["top1"] == torch_top1
    for p, r in rows.items():
        assert r["top1"] == evals[p]["metrics"]["top1"]
        assert r["top1_delta"] == pytest.approx(r["top1"] - rows["fp32"]["top1"])
        assert r["top1_delta_pytorch"] == pytest.approx(r["top1"] - torch_top1)
        assert r["pytorch_cosine"] == evals[p]["agreement_pytorch"]["logits"]["cosine"]
        for b in (1, 32):
            lat = next(x for x in evals[p]["latency"] if x["batch_size"] == b)
            assert r[f"b{b}_p50_ms"] == lat["p50_ms"] and r[f"b{b}_p99_ms"] == lat["p99_ms"]
            assert r[f"b{b}_speedup"] == pytest.approx(rows["fp32"][f"b{b}_p50_ms"] / lat["p50_ms"])
        assert r["engine_bytes"] == evals[p]["engine_bytes"] and r["build_seconds"] == evals[p]["build_seconds"]
        assert r["size_vs_fp32"] == pytest.approx(r["engine_bytes"] / rows["fp32"]["engine_bytes"])
        assert r["timing"] == "host" and r["device"].startswith("cpu")
    # The reference carries no agreement with itself; the others do.
    assert not any(k.startswith("fp32_") for k in rows["fp32"])
    assert rows["int8"]["fp32_top1_agreement"] == evals["int8"]["agreement_fp32"]["logits"]["top1_agreement"]
    assert rows["int8"]["size_vs_fp32"] < 0.5

    md = (out / "compare.md").read_text()
    assert "## Accuracy" in md and "## Agreement" in md and "## Latency, size, build time" in md
    assert "| pytorch | torch (reference) |" in md and "| int8 |" in md and "simulation" in md
    assert "Δtop1 vs fp32" in md and "Δtop1 vs PyTorch" in md and "b32 speedup" in md

    png = (out / "tradeoff.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    pts = _strict_json(out / "latency.json")
    assert len(pts) == 3 * 2 * 3  # variants x batch sizes x percentiles
    assert {p["variant"] for p in pts} >= {"int8 b32 p99", "fp32 b1 p50"}
    assert all(set(p) >= {"variant", "ms", "precision", "batch_size", "percentile"} for p in pts)


# --- synthetic evaluation reports ---------------------------------------------------------


def _lat(b: int, ms: float, gpu: float | None = None) -> dict[str, Any]:
    def stats(t: float) -> dict[str, Any]:
        return {"batch_size": b, "iterations": 10, "p50_ms": t, "p90_ms": 1.1 * t, "p99_ms": 1.5 * t, "mean_ms": 1.05 * t,
                "std_ms": 0.1, "min_ms": 0.9 * t, "throughput_per_s": b * 1000 / t}

    row = {**stats(ms), "warmup": 2, "method": "test"}
    if gpu is not None:
        row["gpu"] = stats(gpu)
    return row


def synthetic_eval(p: str, top1: float, ms: float, *, cosine: float = 0.9999, agree: float = 1.0, gpu: float | None = None,
                   extra: dict[str, float] | None = None, backend: str = "onnxruntime") -> dict[str, Any]:
    ag = {"cosine": cosine, "cosine_min": cosine - 1e-4, "max_abs_diff": 0.01, "mean_abs_diff": 0.001, "rel_l2": 0.01,
          "snr_db": 40.0, "top1_agreement": agree}
    return {
        "schema_version": 1, "model": "m", "precision": p, "backend": backend, "backend_version": "1",
        "samples": 100, "metrics": {"top1": top1, **(extra or {})},
        "reference_metrics": {"pytorch": {"top1": 90.5, **({k: 50.0 for k in extra} if extra else {})}},
        "agreement_fp32": {"logits": ag if p != "fp32" else {**ag, "cosine": 1.0, "snr_db": float("inf"), "max_abs_diff": 0.0}},
        "agreement_pytorch": {"logits": ag},
        "latency": [_lat(1, ms / 10, None if gpu is None else gpu / 10), _lat(32, ms, gpu)],
        "device": {"gpu": "NVIDIA H100", "compute_capability": "9.0"} if backend == "tensorrt" else {"device": "cpu", "cpu": "x86_64", "cores": 4},
        "engine_bytes": {"fp32": 4000, "fp16": 2000, "int8": 1000}[p], "build_seconds": 1.5,
    }


def synthetic_evals(**kw: Any) -> dict[str, dict[str, Any]]:
    return {
        "fp32": synthetic_eval("fp32", 90.0, 2.0, **kw),
        "fp16": synthetic_eval("fp16", 89.9, 1.0, **kw),
        "int8": synthetic_eval("int8", 80.0, 0.5, cosine=0.95, agree=0.85, **kw),
    }


def test_deltas_speedups_sizes() -> None:
    t = compare.build_table(synthetic_evals())
    r = t["variants"]["int8"]
    assert r["top1_delta"] == pytest.approx(-10.0) and r["top1_delta_pytorch"] == pytest.approx(-10.5)
    assert r["b32_speedup"] == pytest.approx(4.0) and r["b1_speedup"] == pytest.approx(4.0)
    assert r["size_vs_fp32"] == pytest.approx(0.25) and r["fp32_cosine"] == 0.95 and r["fp32_top1_agreement"] == 0.85
    assert t["variants"]["fp16"]["top1_delta"] == pytest.approx(-0.1)
    assert t["variants"]["fp32"]["pytorch_snr_db"] == 40.0
    json.dumps(t, allow_nan=False)


def test_gpu_timings_are_preferred_and_the_host_time_kept() -> None:
    t = compare.build_table(synthetic_evals(gpu=0.4, backend="tensorrt"))
    r = t["variants"]["fp16"]
    assert r["b32_p50_ms"] == 0.4 and r["b32_e2e_p50_ms"] == 1.0 and r["timing"] == "gpu"
    assert r["device"] == "NVIDIA H100 (sm 9.0)" and t["backends"] == ["tensorrt"]
    md = compare.to_markdown(t, "m")
    assert "simulation" not in md and "GPU-timed" in md


def test_infinite_values_are_written_as_strings() -> None:
    evals = synthetic_evals()
    evals["fp16"]["agreement_pytorch"]["logits"]["snr_db"] = float("inf")
    t = compare.build_table(evals)
    assert t["variants"]["fp16"]["pytorch_snr_db"] == "inf"
    assert json.loads(json.dumps(t, allow_nan=False))["variants"]["fp16"]["pytorch_snr_db"] == "inf"


def test_user_metrics_get_columns_and_deltas(tmp_path: Path) -> None:
    t = compare.build_table(synthetic_evals(extra={"map50": 42.0}), primary_metric="map50")
    assert t["primary_metric"] == "map50" and t["variants"]["int8"]["map50_delta_pytorch"] == pytest.approx(-8.0)
    md = compare.to_markdown(t, "m")
    assert "| map50 | Δmap50 vs fp32 | Δmap50 vs PyTorch |" in md and "| int8 |" in md
    compare.plot_tradeoff(t, tmp_path / "t.png", "m")
    assert (tmp_path / "t.png").stat().st_size > 5000


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda e: e.pop("fp32"), "needs the fp32 evaluation"),
        (lambda e: e["int8"]["metrics"].update(engine_bytes=1.0), "task metric 'engine_bytes' \\(int8\\) clashes"),
    ],
)
def test_bad_evaluations(mutate: Any, message: str) -> None:
    evals = synthetic_evals()
    mutate(evals)
    with pytest.raises(ReportError, match=message):
        compare.build_table(evals)


def test_unknown_primary_metric() -> None:
    with pytest.raises(ReportError, match="evaluate.primary_metric 'map50' is not among"):
        compare.build_table(synthetic_evals(), primary_metric="map50")


def test_run_rejects_other_schema_versions_and_empty_dirs(tmp_path: Path) -> None:
    cfg = digits_config(tmp_path)
    with pytest.raises(ReportError, match="no evaluation reports"):
        compare.run(cfg, tmp_path / "eval", tmp_path / "compare")
    evals = synthetic_evals()
    for p, ev in evals.items():
        write_json(tmp_path / "eval" / f"{p}.json", ev)
    bad = copy.deepcopy(evals["int8"])
    bad["schema_version"] = 7
    write_json(tmp_path / "eval" / "int8.json", bad)
    with pytest.raises(ReportError, match=r"int8.json: schema_version 7 but this trtpipe reads 1"):
        compare.run(cfg, tmp_path / "eval", tmp_path / "compare")
    write_json(tmp_path / "eval" / "int8.json", evals["int8"])
    assert compare.run(cfg, tmp_path / "eval", tmp_path / "compare")["variants"]["int8"]["top1"] == 80.0


def test_unlabelled_data_still_compares(tmp_path: Path) -> None:
    evals = synthetic_evals()
    for ev in evals.values():
        ev["metrics"], ev["reference_metrics"] = {}, {"pytorch": {}}
    t = compare.build_table(evals)
    assert t["primary_metric"] is None and t["pytorch"] == {}
    assert t["variants"]["int8"]["fp32_cosine"] == 0.95 and t["variants"]["int8"]["b32_speedup"] == pytest.approx(4.0)
    assert "| int8 |" in compare.to_markdown(t, "m")
    compare.plot_tradeoff(t, tmp_path / "t.png", "m")
    assert (tmp_path / "t.png").is_file()
