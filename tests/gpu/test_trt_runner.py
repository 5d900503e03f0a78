"""TrtRunner: dynamic batch inside the profile, both memory implementations, CUDA graph
replay, timing, manifest checks, and files that are not engines."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tensorrt", reason="TensorRT is not installed: these need TensorRT and an NVIDIA GPU (pip install -e .[tensorrt]; README, On a GPU)")
pytestmark = pytest.mark.gpu

from pipeline.errors import ArtifactError, DataError  # noqa: E402
from pipeline.compat import trt_runner  # noqa: E402
from pipeline.runtime.trt_runner import TrtRunner  # noqa: E402


@pytest.fixture(scope="module")
def fp32(engines):
    return engines["fp32"][0]


def test_dynamic_batch_sizes(env, fp32):
    with TrtRunner(fp32) as r:
        assert r.input_names == ["input"] and r.output_names == ["logits"]
        assert r.profile["input"]["max"] == [16, *env.IN_SHAPE]
        for batch in (1, 7, 16, 3):  # grows, then shrinks back into the same buffers
            x = env.inputs(batch, seed=batch)
            out = r.infer({"input": x})["logits"]
            np.testing.assert_allclose(out, env.ort_run(env.onnx, x), atol=2e-2, rtol=2e-2)


def test_batch_outside_profile_names_min_and_max(env, fp32):
    with TrtRunner(fp32) as r:
        dims = ", ".join(map(str, env.IN_SHAPE))
        with pytest.raises(DataError, match=rf"fit none of the engine's optimization profiles \(#0 input \[1, {dims}\]\.\.\[16, {dims}\]\)"):
            r.infer({"input": env.inputs(17)})
        with pytest.raises(DataError, match="missing"):
            r.infer({"x": env.inputs(1)})


@pytest.mark.parametrize("memory", ["pycuda", "cuda-python"])
def test_memory_implementations_agree(env, fp32, memory):
    from pipeline.runtime.cuda_memory import available

    if memory not in available():
        pytest.skip(f"{memory} is not installed")
    with TrtRunner(fp32, memory="pycuda" if "pycuda" in available() else "cuda-python") as r:
        ref = r.infer({"input": env.x7})["logits"]
    with TrtRunner(fp32, memory=memory) as r:
        assert r.device()["memory"] == memory
        np.testing.assert_array_equal(r.infer({"input": env.x7})["logits"], ref)


@pytest.mark.parametrize("memory", ["pycuda", "cuda-python"])
def test_cuda_graph_replay_matches(env, engines, memory):
    from pipeline.runtime.cuda_memory import available

    if memory not in available() or "cuda-python" not in available():
        pytest.skip("CUDA graphs need cuda-python (and the memory implementation under test)")
    engine = engines["fp16"][0]
    with TrtRunner(engine, memory=memory) as plain, TrtRunner(engine, memory=memory, use_cuda_graph=True) as graph:
        for batch, seed in ((7, 1), (7, 2), (1, 3), (16, 4)):  # new data replays the same graph; new shapes recapture
            x = env.inputs(batch, seed=seed)
            np.testing.assert_array_equal(graph.infer({"input": x})["logits"], plain.infer({"input": x})["logits"])
        t = graph.time({"input": env.x7}, warmup=2, iterations=5)
        assert t["cuda_graph"] is True and "CUDA graph" in t["method"]
        t = plain.time({"input": env.x7}, warmup=2, iterations=5, mode="cuda_graph")  # either mode on demand
        assert t["cuda_graph"] is True and plain.time_modes == ("plain", "cuda_graph")


def test_time_reports_gpu_and_end_to_end(env, fp32):
    with TrtRunner(fp32) as r:
        t = r.time({"input": env.x7}, warmup=3, iterations=20)
    assert len(t["times_ms"]) == 20 and len(t["gpu_times_ms"]) == 20
    assert t["batch_size"] == 7 and "CUDA events" in t["method"]
    assert all(g > 0 for g in t["gpu_times_ms"])
    assert np.median(t["times_ms"]) >= np.median(t["gpu_times_ms"]) * 0.5


def _here():
    import tensorrt as trt

    from pipeline.runtime.cuda_device import device_info

    return trt.__version__, device_info()["compute_capability"]


def test_manifest_for_another_gpu_is_refused(env, fp32):
    version, cc = _here()
    other = "8.0" if cc != "8.0" else "9.0"
    man = {"backend": "tensorrt", "software": {"tensorrt": version}, "hardware": {"compute_capability": other, "gpu": "A100"}}
    with pytest.raises(ArtifactError) as e:
        trt_runner(fp32, manifest=man)
    assert other in str(e.value) and cc in str(e.value)


def test_manifest_for_another_tensorrt_is_refused(env, fp32, tmp_path):
    version, cc = _here()
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"backend": "tensorrt", "software": {"tensorrt": "10.3.0"},
                                "hardware": {"compute_capability": cc}}))
    with pytest.raises(ArtifactError) as e:
        trt_runner(fp32, manifest=path)
    assert "10.3.0" in str(e.value) and version in str(e.value)
    engine = tmp_path / "model.engine"  # manifest.json beside the engine is found by itself
    engine.write_bytes(fp32.read_bytes())
    with pytest.raises(ArtifactError, match="10.3.0"):
        trt_runner(engine)


def test_matching_manifest_loads_through_the_backend(env, engines):
    from pipeline.backends.tensorrt_backend import TensorRTBackend

    import tensorrt as trt

    from pipeline.runtime.cuda_device import device_info

    engine, _ = engines["fp32"]
    build_json = {"backend": "tensorrt", "environment": {"tensorrt": trt.__version__, "device": device_info(0)}}
    with TensorRTBackend().load(engine, build_json) as r:
        assert r.infer({"input": env.x7})["logits"].shape == (7, 10)


@pytest.mark.parametrize("content", [b"this is not a TensorRT engine" * 100, b"", None])
def test_not_an_engine_is_an_artifact_error(env, fp32, tmp_path, content):
    path = tmp_path / "broken.engine"
    path.write_bytes(fp32.read_bytes()[:2000] if content is None else content)
    with pytest.raises(ArtifactError, match="broken.engine"):
        TrtRunner(path)


def test_evaluate_times_every_mode_on_the_device_clock(env, engines, tmp_path):
    """evaluate's latency rows for a TensorRT engine: plain enqueue and CUDA-graph replay,
    each with device (CUDA events) and host times; compare's headline takes the faster."""
    from pipeline.runtime.cuda_memory import available
    from pipeline.stages import evaluate
    from pipeline.stages.compare import _headline

    if "cuda-python" not in available():
        pytest.skip("CUDA graphs need cuda-python")
    cfg = env.make_config().model_copy(update={"evaluate": env.make_config().evaluate.model_copy(update={
        "latency": env.make_config().evaluate.latency.model_copy(update={"warmup": 3, "iterations": 20,
                                                                         "batch_sizes": [1, 16, 64]})})})
    skipped = []
    with TrtRunner(engines["fp16"][0]) as r:
        rows = evaluate.measure_latency(r, {"input": env.inputs(16)}, cfg, skipped)
    assert [(row.batch_size, row.mode) for row in rows] == [(1, "plain"), (1, "cuda_graph"), (16, "plain"),
                                                           (16, "cuda_graph")]
    assert all(row.gpu is not None and row.gpu.p50_ms > 0 and row.host.p50_ms > 0 for row in rows)
    assert [s["batch_size"] for s in skipped] == [64]  # above the profile's max of 16
    best = _headline(rows)
    assert best[1][0].gpu.p50_ms == min(r.gpu.p50_ms for r in rows if r.batch_size == 1)
