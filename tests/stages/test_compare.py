"""compare: compare.json (flat rows per variant for dvc metrics, agreement per output, flags),
compare.md, tradeoff.png, latency.json; on a real digits run and on evaluation reports
built as EvalReport models (the type evaluate writes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import ReportError
from pipeline.fileio import read_json
from pipeline.reports import EvalReport, write_report
from pipeline.stages import compare
from tests._digits_run import digits_config


def _strict_json(path: Path) -> Any:
    def no_constants(name: str) -> Any:
        raise AssertionError(f"{path}: non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=no_constants)


def test_real_run_outputs(clean: Path) -> None:
    out = clean / "compare"
    table = _strict_json(out / "compare.json")  # strict JSON: no Infinity/NaN constants
    assert table["schema_version"] == compare.SCHEMA_VERSION and table["model"] == "digits-cnn"
    assert table["reference"] == "fp32" and table["backends"] == ["onnxruntime"] and table["primary_metric"] == "top1"
    assert table["outputs"] == ["logits"] and table["metric_outputs"] == {"top1": "logits", "top5": "logits"}
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
            assert r[f"b{b}_p50_ms"] == lat["host"]["p50_ms"] and r[f"b{b}_p99_ms"] == lat["host"]["p99_ms"]
            assert r[f"b{b}_mode"] == "plain" and r[f"b{b}_timing"] == "host"
            assert r[f"b{b}_speedup"] == pytest.approx(rows["fp32"][f"b{b}_p50_ms"] / lat["host"]["p50_ms"])
        assert r["engine_bytes"] == evals[p]["engine_bytes"]
        assert "build_seconds" not in evals[p] and r["build_seconds"] is None  # a wall time: artifacts/timings/
        assert r["size_vs_fp32"] == pytest.approx(r["engine_bytes"] / rows["fp32"]["engine_bytes"])
        assert r["timing"] == "host" and r["device"].startswith("cpu") and r["flagged"] is False
    # The reference carries no agreement with itself; the others do.
    assert not any(k.startswith("fp32_") for k in rows["fp32"])
    assert rows["int8"]["fp32_top1_agreement"] == evals["int8"]["agreement_fp32"]["logits"]["top1_agreement"]
    assert table["agreement"]["int8"]["fp32"]["logits"]["cosine"] == evals["int8"]["agreement_fp32"]["logits"]["cosine"]
    assert rows["int8"]["size_vs_fp32"] < 0.5

    md = (out / "compare.md").read_text()
    assert "## Accuracy" in md and "## Agreement, every output" in md and "## Latency and size" in md
    # no build wall time in a cached report of the evaluations: it lives in artifacts/timings/ (uncached)
    assert "build s" not in md and "artifacts/timings/build-<precision>.json" in md
    assert "| pytorch | torch (reference) |" in md and "| int8 |" in md and "simulation" in md
    assert "Δtop1 vs fp32" in md and "Δtop1 vs PyTorch" in md and "b32 speedup" in md and "Flagged" not in md

    png = (out / "tradeoff.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    pts = _strict_json(out / "latency.json")
    assert len(pts) == 3 * 2 * 3  # variants x batch sizes x percentiles (one mode on onnxruntime)
    assert {p["variant"] for p in pts} >= {"int8 b32 plain p99", "fp32 b1 plain p50"}
    assert all(set(p) >= {"variant", "ms", "precision", "batch_size", "percentile", "mode"} for p in pts)


def test_broken_int8_is_flagged_in_every_report(broken: Path) -> None:
    table = read_json(broken / "compare" / "compare.json")
    assert table["variants"]["int8"]["flagged"] is True and table["variants"]["fp16"]["flagged"] is False
    assert any("under evaluate.agreement_floor" in f for f in table["flags"]["int8"])
    md = (broken / "compare" / "compare.md").read_text()
    assert "## ⚠ Flagged" in md and "| int8 ⚠ |" in md


# --- evaluation reports of other models and machines ----------------------------------------


def _stats(b: int, t: float) -> dict[str, Any]:
    return {"batch_size": b, "iterations": 10, "p50_ms": t, "p90_ms": 1.1 * t, "p99_ms": 1.5 * t, "mean_ms": 1.05 * t,
            "std_ms": 0.1, "min_ms": 0.9 * t, "throughput_per_s": b * 1000 / t}


def _lat(b: int, ms: float, gpu: float | None = None, mode: str = "plain") -> dict[str, Any]:
    return {"batch_size": b, "mode": mode, "host": _stats(b, ms), "gpu": None if gpu is None else _stats(b, gpu),
            "warmup": 2, "method": "test"}


def _agree(cosine: float, agree: float | None = 1.0, **over: float) -> dict[str, Any]:
    a = {"cosine": cosine, "cosine_min": cosine - 1e-4, "max_abs_diff": 0.01, "mean_abs_diff": 0.001, "rel_l2": 0.01,
         "snr_db": 40.0, "top1_agreement": agree, "nonfinite": 0}
    return {**a, **over}


def report(p: str, top1: float, ms: float, *, cosine: float = 0.9999, agree: float = 1.0, gpu: float | None = None,
           extra: dict[str, float] | None = None, backend: str = "onnxruntime", outputs: dict[str, float] | None = None,
           latency: list[dict[str, Any]] | None = None, flags: list[str] | None = None) -> EvalReport:
    """An EvalReport like evaluate writes; `outputs`: output name -> cosine vs fp32 (default one 'logits')."""
    outputs = outputs or {"logits": cosine}
    fp32 = {n: _agree(1.0, 1.0, snr_db=float("inf"), max_abs_diff=0.0) if p == "fp32" else _agree(c, agree)
            for n, c in outputs.items()}
    return EvalReport.model_validate({
        "model": "m", "precision": p, "backend": backend, "backend_version": "1",
        "samples": 100, "metrics": {"top1": top1, **(extra or {})}, "metric_outputs": {"top1": next(iter(outputs))},
        "reference_metrics": {"pytorch": {"top1": 90.5, **({k: 50.0 for k in extra} if extra else {})}},
        "agreement_fp32": fp32, "agreement_pytorch": {n: _agree(c, agree) for n, c in outputs.items()},
        "latency": latency or [_lat(1, ms / 10, None if gpu is None else gpu / 10), _lat(32, ms, gpu)],
        "latency_config": {},
        "device": {"gpu": "NVIDIA H100", "compute_capability": "9.0"} if backend == "tensorrt" else {"device": "cpu", "cpu": "x86_64", "cores": 4},
        "engine_bytes": {"fp32": 4000, "fp16": 2000, "int8": 1000}[p], "build_seconds": 1.5, "seconds": 1.0,
        "flags": flags or [],
        "sha256": {"artifact": p, "fp32_artifact": "fp32", "eval_data": "e", "reference": "r", "onnx": "o"},
    })


def reports(**kw: Any) -> dict[str, EvalReport]:
    int8 = {"cosine": 0.95, "agree": 0.85, **kw}
    return {
        "fp32": report("fp32", 90.0, 2.0, **kw),
        "fp16": report("fp16", 89.9, 1.0, **kw),
        "int8": report("int8", 80.0, 0.5, **int8),
    }


def test_deltas_speedups_sizes() -> None:
    t = compare.build_table(reports(), "m")
    r = t.variants["int8"]
    assert r["top1_delta"] == pytest.approx(-10.0) and r["top1_delta_pytorch"] == pytest.approx(-10.5)
    assert r["b32_speedup"] == pytest.approx(4.0) and r["b1_speedup"] == pytest.approx(4.0)
    assert r["size_vs_fp32"] == pytest.approx(0.25) and r["fp32_cosine"] == 0.95 and r["fp32_top1_agreement"] == 0.85
    assert t.variants["fp16"]["top1_delta"] == pytest.approx(-0.1)
    assert t.variants["fp32"]["pytorch_snr_db"] == 40.0
    json.loads(t.model_dump_json())


def test_gpu_timings_are_preferred_and_the_host_time_kept() -> None:
    t = compare.build_table(reports(gpu=0.4, backend="tensorrt"), "m")
    r = t.variants["fp16"]
    assert r["b32_p50_ms"] == 0.4 and r["b32_e2e_p50_ms"] == 1.0 and r["timing"] == "gpu" and r["b32_timing"] == "gpu"
    assert r["device"] == "NVIDIA H100 (sm 9.0)" and t.backends == ["tensorrt"]
    md = compare.to_markdown(t, reports(gpu=0.4, backend="tensorrt"))
    assert "simulation" not in md and "plain, gpu" in md


def test_headline_is_the_fastest_mode_and_names_it() -> None:
    lat = [_lat(1, 0.30, 0.20), _lat(1, 0.12, 0.08, "cuda_graph"), _lat(32, 1.0, 0.9), _lat(32, 1.1, 0.95, "cuda_graph")]
    evals = {p: report(p, 90.0, 1.0, backend="tensorrt", latency=lat) for p in ("fp32", "int8")}
    t = compare.build_table(evals, "m")
    r = t.variants["int8"]
    assert r["b1_mode"] == "cuda_graph" and r["b1_p50_ms"] == 0.08 and r["b1_e2e_p50_ms"] == 0.12
    assert r["b32_mode"] == "plain" and r["b32_p50_ms"] == 0.9
    md = compare.to_markdown(t, evals)
    assert "cuda_graph, gpu" in md and "| int8 | 1 | cuda_graph | 0.080 |" in md


def test_every_output_is_reported_and_the_worst_heads_the_row() -> None:
    outs = {"boxes": 0.977, "landmarks": 0.999, "prob": 0.9999}
    evals = {p: report(p, 90.0, 1.0, outputs=outs) for p in ("fp32", "int8")}
    t = compare.build_table(evals, "m")
    assert t.outputs == ["boxes", "landmarks", "prob"]
    assert t.variants["int8"]["fp32_cosine"] == 0.977  # the worst output, not the first
    assert t.agreement["int8"]["fp32"]["landmarks"]["cosine"] == 0.999
    md = compare.to_markdown(t, evals)
    for name in outs:
        assert f"| int8 | {name} |" in md


def test_nan_never_looks_like_a_number() -> None:
    evals = reports()
    evals["int8"] = report("int8", float("nan"), 0.5, cosine=float("nan"), flags=["output 'logits' has 4 NaN/Inf values"])
    t = compare.build_table(evals, "m")
    assert t.variants["int8"]["fp32_cosine"] != t.variants["int8"]["fp32_cosine"]  # NaN stays NaN
    assert t.flags == {"int8": ["output 'logits' has 4 NaN/Inf values"]} and t.variants["int8"]["flagged"]
    data = json.loads(t.model_dump_json())
    assert data["variants"]["int8"]["top1"] == "NaN" and data["variants"]["int8"]["fp32_cosine"] == "NaN"
    md = compare.to_markdown(t, evals)
    assert "NaN ⚠" in md and "Flagged" in md


def test_user_metrics_get_columns_and_deltas(tmp_path: Path) -> None:
    t = compare.build_table(reports(extra={"map50": 42.0}), "m", primary_metric="map50")
    assert t.primary_metric == "map50" and t.variants["int8"]["map50_delta_pytorch"] == pytest.approx(-8.0)
    md = compare.to_markdown(t, reports(extra={"map50": 42.0}))
    assert "| map50 | Δmap50 vs fp32 | Δmap50 vs PyTorch |" in md and "| int8 |" in md
    compare.plot_tradeoff(t, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 5000


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda e: e.pop("fp32"), "needs the fp32 evaluation"),
        (lambda e: e["int8"].metrics.update(engine_bytes=1.0), "task metric 'engine_bytes' \\(int8\\) clashes"),
    ],
)
def test_bad_evaluations(mutate: Any, message: str) -> None:
    evals = reports()
    mutate(evals)
    with pytest.raises(ReportError, match=message):
        compare.build_table(evals, "m")


def test_unknown_primary_metric() -> None:
    with pytest.raises(ReportError, match="evaluate.primary_metric 'map50' is not among"):
        compare.build_table(reports(), "m", primary_metric="map50")


def test_run_rejects_other_schema_versions_mixed_inputs_and_empty_dirs(tmp_path: Path) -> None:
    cfg = digits_config(tmp_path)
    with pytest.raises(ReportError, match="no evaluation reports"):
        compare.run(cfg, tmp_path / "eval", tmp_path / "compare")
    evals = reports()
    for p, ev in evals.items():
        write_report(tmp_path / "eval" / f"{p}.json", ev)
    bad = json.loads((tmp_path / "eval" / "int8.json").read_text())
    bad["schema_version"] = 7
    (tmp_path / "eval" / "int8.json").write_text(json.dumps(bad))
    with pytest.raises(ReportError, match=r"int8.json: evaluation report has schema_version 7, this trtpipe reads 2"):
        compare.run(cfg, tmp_path / "eval", tmp_path / "compare")
    other = evals["int8"].model_copy(update={"sha256": {**evals["int8"].sha256, "eval_data": "other"}})
    write_report(tmp_path / "eval" / "int8.json", other)
    with pytest.raises(ReportError, match=r"used different evaluation data"):
        compare.run(cfg, tmp_path / "eval", tmp_path / "compare")
    write_report(tmp_path / "eval" / "int8.json", evals["int8"])
    assert compare.run(cfg, tmp_path / "eval", tmp_path / "compare").variants["int8"]["top1"] == 80.0


def test_unlabelled_data_still_compares(tmp_path: Path) -> None:
    evals = {p: ev.model_copy(update={"metrics": {}, "reference_metrics": {"pytorch": {}}}) for p, ev in reports().items()}
    t = compare.build_table(evals, "m")
    assert t.primary_metric is None and t.pytorch == {}
    assert t.variants["int8"]["fp32_cosine"] == 0.95 and t.variants["int8"]["b32_speedup"] == pytest.approx(4.0)
    assert "| int8 |" in compare.to_markdown(t, evals)
    compare.plot_tradeoff(t, tmp_path / "t.png")
    assert (tmp_path / "t.png").is_file()


def test_a_fresh_clone_keeps_only_metrics_json_and_compare_runs_there(clean: Path, tmp_path: Path) -> None:
    """git keeps compare's metrics.json (dvc.yaml: metrics, cache: false) and nothing else of its folder: in a
    fresh clone `trtpipe compare` must replace that folder, not refuse it; anything else there is still refused."""
    from pipeline.errors import PipelineError

    cfg = digits_config(tmp_path)
    out = tmp_path / "compare"
    out.mkdir()
    (out / "metrics.json").write_text("{}\n")  # an older metrics.json, as a clone checks it out
    compare.run(cfg, clean / "eval", out)
    assert (out / "compare.json").is_file() and json.loads((out / "metrics.json").read_text()) != {}
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.json").write_text("{}\n")
    (other / "notes.txt").write_text("mine\n")
    with pytest.raises(PipelineError, match="is not compare's output"):
        compare.run(cfg, clean / "eval", other)
    assert (other / "notes.txt").read_text() == "mine\n"


def test_without_matplotlib_compare_writes_every_report_but_the_picture(clean: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "compare"
    compare.run(digits_config(tmp_path), clean / "eval", out)
    assert {p.name for p in out.iterdir()} >= {"compare.json", "compare.md", "metrics.json", "latency.json"}
    assert not (out / "tradeoff.png").exists()
    assert "matplotlib is not installed" in caplog.text
