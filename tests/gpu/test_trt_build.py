"""TensorRT builds of a tiny network: FP32/FP16/INT8 accuracy against onnxruntime,
build.json facts, timing cache, layer precision pins, parser and profile errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tensorrt", reason="TensorRT is not installed: these need TensorRT and an NVIDIA GPU (pip install -e .[tensorrt]; README, On a GPU)")
pytestmark = pytest.mark.gpu

from pipeline.errors import BackendError, ConfigError  # noqa: E402


def _run(engine, x):
    from pipeline.runtime.trt_runner import TrtRunner

    with TrtRunner(engine) as r:
        return r.infer({"input": x})["logits"]


@pytest.mark.parametrize("precision,min_cos,atol", [("fp32", 0.99999, 2e-2), ("fp16", 0.9999, 5e-2), ("int8", 0.99, None)])
def test_engine_matches_onnxruntime(env, engines, precision, min_cos, atol):
    engine, info = engines[precision]
    out = _run(engine, env.x7)
    assert out.shape == env.ref7.shape
    cos = env.cosine(out, env.ref7)
    assert cos > min_cos, f"{precision}: cosine {cos} vs onnxruntime FP32"
    if atol is not None:
        np.testing.assert_allclose(out, env.ref7, atol=atol, rtol=atol)
    flags = set(info.flags)
    assert ("FP16" in flags) == (precision in ("fp16", "int8"))  # int8: layers without int8 kernels run in fp16
    assert ("INT8" in flags) == (precision == "int8")


def test_build_info(env, engines):
    engine, info = engines["fp16"]
    for key in ("tensorrt", "builder_seconds", "timing_cache", "network_flags", "layers_file"):
        assert key in info.details, key
    assert info.artifact == "model.engine" and info.workspace_mb == 256
    c, h, w = env.IN_SHAPE
    assert info.profiles == [{"input": {"min": [1, c, h, w], "opt": [8, c, h, w], "max": [16, c, h, w]}}]
    assert info.details["network_flags"] == ["EXPLICIT_BATCH"]  # 8.x enum has it
    layers = json.loads((engine.parent / "layers.json").read_text())
    assert layers["Layers"] and info.details["engine_layers"] == len(layers["Layers"])


def test_implicit_int8_engine_runs_int8_layers(engines):
    """The tiny net is big enough that TensorRT really picks INT8 kernels (layers.json). (In the
    FP16 build TensorRT 8.6 on an H100 picks FP32 kernels for it: faster at this size.)"""
    by_type = engines["int8"][1].details["by_output_type"]
    assert by_type.get("INT8", 0) >= 2, by_type


def test_timing_cache_cold_then_warm(env, engines):
    cold, warm = engines["fp32"][1].details["timing_cache"], engines["fp16"][1].details["timing_cache"]
    assert cold["warm"] is False and cold["saved_bytes"] > 0
    assert warm["warm"] is True and warm["loaded_bytes"] > 0
    assert (env.root / "engines.timing.cache").is_file()


def test_layer_precision_pins_show_in_layers_json(env):
    """conv1 pinned to fp32 and conv2 to fp16 in an fp16 build. Unpinned, TensorRT runs both in
    FP32 on this tiny net, so the FP16 pin shows that the constraints reach the engine."""
    from pipeline.backends.trt_build import layer_precision

    engine, info = env.build("fp16", "pinned", layer_precisions={"/conv1/*": "fp32", "/conv2/Conv": "fp16"})
    assert info.details["layer_precisions"]["pinned"] == {"/conv1/Conv": "fp32", "/conv2/Conv": "fp16"}
    assert "OBEY_PRECISION_CONSTRAINTS" in info.flags
    layers = json.loads((engine.parent / "layers.json").read_text())["Layers"]

    def layer(node):
        found = [ly for ly in layers if node in ly.get("Name", "").split(" + ")]
        assert found, [ly.get("Name") for ly in layers]
        return found[0]

    assert layer_precision(layer("/conv1/Conv")) == "FP32", layer("/conv1/Conv")
    assert layer_precision(layer("/conv2/Conv")) == "FP16", layer("/conv2/Conv")
    assert env.cosine(_run(engine, env.x7), env.ref7) > 0.9999


def test_pattern_that_matches_nothing_is_an_error(env):
    with pytest.raises(ConfigError, match=r"/nope/\*"):
        env.build("fp16", "nomatch", layer_precisions={"/nope/*": "fp32"})


def test_unparseable_op_names_the_node(env):
    bad = env.make_tiny_onnx(env.root / "custom.onnx", custom_op=True)
    with pytest.raises(BackendError) as e:
        env.build("fp32", "custom", onnx=bad)
    msg = str(e.value)
    assert "/custom/FooBar" in msg and "FooBarUnknownOp" in msg and "custom.onnx" in msg, msg


def test_profile_naming_an_axis_the_model_lacks_is_a_clear_error(env):
    with pytest.raises(ConfigError, match=r"build.profiles\[0\]: 'seq' is neither a model input \(input\) nor a dynamic "
                                          r"axis of one \(batch\)"):
        env.build("fp32", "badprofile", profiles=[{"batch": [1, 2, 4], "seq": [1, 2, 3]}])


def test_builder_options_reach_the_engine_and_are_recorded(env):
    """Optimization level and a preview feature from the config: set on the builder,
    recorded in build.json, the engine still matches onnxruntime; a feature this
    TensorRT lacks is a config error naming the ones it has."""
    engine, info = env.build("fp32", "options", timing_cache=None, builder_optimization_level=1,
                             preview_features={"fasterDynamicShapes0805": False})
    assert info.details["builder_optimization_level"] == 1
    assert info.details["preview_features"]["faster_dynamic_shapes_0805"] is False
    np.testing.assert_allclose(_run(engine, env.x7), env.ref7, atol=2e-2, rtol=2e-2)
    _, default = env.build("fp32", "options_default", timing_cache=None)
    assert default.details["builder_optimization_level"] == 3
    with pytest.raises(ConfigError, match="no preview feature 'warp_speed'.*faster_dynamic_shapes_0805"):
        env.build("fp32", "options_bad", timing_cache=None, preview_features={"warp_speed": True})


def test_outputs_left_on_the_device_pin_no_host_memory_and_shapes_change(env, engines):
    """infer_on_device allocates pinned host memory for the inputs only (ResNet-50's 72 calibrated
    outputs at batch 32 would pin ~3 GB); a later infer, another batch size and a DeviceTensor's
    host() still give onnxruntime's values."""
    from pipeline.runtime.trt_runner import TrtRunner

    engine, _ = engines["fp32"]
    with TrtRunner(engine) as r:
        dev = r.infer_on_device({"input": env.x7})
        assert set(r._host) == {"input"}
        np.testing.assert_allclose(dev["logits"].host(), env.ref7, atol=2e-2, rtol=2e-2)
        assert set(r._host) == {"input", "logits"}
        three = r.infer({"input": env.x7[:3]})["logits"]
        np.testing.assert_allclose(three, env.ref7[:3], atol=2e-2, rtol=2e-2)
        again = r.infer_on_device({"input": env.x7})
        assert again["logits"].shape == env.ref7.shape
        np.testing.assert_allclose(again["logits"].host(), env.ref7, atol=2e-2, rtol=2e-2)
