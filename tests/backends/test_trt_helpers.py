"""CPU tests of the TensorRT backend's pure-Python pieces (no TensorRT, no GPU)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from pipeline.backends.trt_layers import match_layer_precisions
from pipeline.config import BuildConfig, Config
from pipeline.profiles import config_profiles, fits, max_batch, onnx_inputs, pick_profile, resolve_profiles
from pipeline.errors import BackendError, ConfigError, ModelError


def _tiny_onnx(path: Path, batch="N") -> Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "W"], ["out"], name="/conv/Conv")], "t",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 8, 8]),
         helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 3, 1, 1])],  # an initializer listed as input
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, 4, 8, 8])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_onnx_inputs_skips_initializers(tmp_path):
    assert onnx_inputs(_tiny_onnx(tmp_path / "m.onnx")) == {"input": ["N", 3, 8, 8]}


def test_onnx_inputs_missing_or_garbage(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        onnx_inputs(tmp_path / "nope.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(ModelError, match="bad.onnx"):
        onnx_inputs(tmp_path / "bad.onnx")


def test_batch_profile_shorthand_on_axis_0():
    build = BuildConfig(profile={"min_batch": 1, "opt_batch": 4, "max_batch": 16})
    (p,) = config_profiles({"input": ["N", 3, 8, 8]}, build)
    assert p["input"] == {"min": [1, 3, 8, 8], "opt": [4, 3, 8, 8], "max": [16, 3, 8, 8]}
    assert max_batch([p]) == 16


def test_static_batch_keeps_its_size():
    (p,) = config_profiles({"input": [2, 3, 8, 8]}, BuildConfig())
    assert p["input"]["min"] == p["input"]["max"] == [2, 3, 8, 8]


def test_named_axes_shared_by_inputs_and_several_profiles():
    inputs = {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"], "pixel": ["batch", 3, "h", "w"]}
    specs = [{"batch": [1, 1, 1], "seq": [1, 16, 32], "h": [32, 64, 64], "w": [32, 64, 64]},
             {"batch": [2, 8, 32], "seq": [16, 128, 256], "pixel": {"min": [2, 3, 64, 64], "opt": [8, 3, 64, 64],
                                                                     "max": [32, 3, 128, 128]}}]
    a, b = resolve_profiles(inputs, specs)
    assert a["attention_mask"] == {"min": [1, 1], "opt": [1, 16], "max": [1, 32]}
    assert a["pixel"] == {"min": [1, 3, 32, 32], "opt": [1, 3, 64, 64], "max": [1, 3, 64, 64]}
    assert b["input_ids"]["max"] == [32, 256] and b["pixel"]["max"] == [32, 3, 128, 128]
    request = {"input_ids": [4, 100], "attention_mask": [4, 100], "pixel": [4, 3, 64, 64]}
    assert not fits(a, request) and fits(b, request) and pick_profile([a, b], request) == 1
    assert pick_profile([a, b], {**request, "input_ids": [4, 300]}) is None


def test_profile_errors_name_the_setting():
    with pytest.raises(ConfigError, match=r"build.profiles\[0\].seq: input 'ids' has dynamic axis 1 'seq'.*no range"):
        resolve_profiles({"ids": ["batch", "seq"]}, [{"batch": [1, 2, 4]}])
    with pytest.raises(ConfigError, match=r"build.profiles\[0\].batch: need 1 <= min <= opt <= max, got 8 / 4 / 2"):
        resolve_profiles({"ids": ["batch", 3]}, [{"batch": [8, 4, 2]}])
    with pytest.raises(ConfigError, match=r"'sequence' is neither a model input \(ids\) nor a dynamic axis"):
        resolve_profiles({"ids": ["batch", "seq"]}, [{"batch": [1, 2, 4], "seq": [1, 2, 3], "sequence": [1, 2, 3]}])
    with pytest.raises(ConfigError, match=r"axis 1 is fixed to 3 in the model, got 4"):
        resolve_profiles({"x": ["batch", 3]}, [{"x": {"min": [1, 4], "opt": [1, 4], "max": [1, 4]}}])
    with pytest.raises(ModelError, match="unnamed dynamic axis 2"):
        resolve_profiles({"x": ["batch", 3, None]}, [{"batch": [1, 1, 1]}])


def test_layer_patterns():
    names = ["/conv1/Conv", "/relu1/Relu", "/conv2/Conv", "/fc/Gemm"]
    assign, matched = match_layer_precisions(names, {"/conv1/*": "fp32", "/conv*": "fp16"})
    assert assign == {"/conv1/Conv": "fp32", "/conv2/Conv": "fp16"}  # first matching pattern wins
    assert matched == {"/conv1/*": ["/conv1/Conv"], "/conv*": ["/conv2/Conv"]}


def test_layer_pattern_matching_nothing_names_it():
    with pytest.raises(ConfigError, match=r"'/conv9/\*' match no layer.*'/conv1/Conv'"):
        match_layer_precisions(["/conv1/Conv"], {"/conv1/Conv": "fp32", "/conv9/*": "fp32"})
    with pytest.raises(ConfigError, match="must be one of fp32, fp16"):
        match_layer_precisions(["/conv1/Conv"], {"/conv1/Conv": "int8"})


def _fake_trt(version: str, *flags: str):
    enum = type("NetworkDefinitionCreationFlag", (), {f: i for i, f in enumerate(flags)})
    return types.SimpleNamespace(__version__=version, NetworkDefinitionCreationFlag=enum)


def test_network_flags_follow_the_enum():
    from pipeline.backends.trt_build import network_flags

    assert network_flags(_fake_trt("8.6.0", "EXPLICIT_BATCH", "EXPLICIT_PRECISION")) == (1, ["EXPLICIT_BATCH"])
    assert network_flags(_fake_trt("11.0.0", "STRONGLY_TYPED"), strongly_typed=True) == (1, ["STRONGLY_TYPED"])
    assert network_flags(_fake_trt("11.0.0", "STRONGLY_TYPED")) == (0, [])
    with pytest.raises(BackendError, match="needs TensorRT >= 10"):
        network_flags(_fake_trt("8.6.0", "EXPLICIT_BATCH"), strongly_typed=True)


class _FakeConfig:
    def __init__(self):
        self.builder_optimization_level = 3
        self.features = {"A": False, "B": True}

    def set_preview_feature(self, feature, on):
        self.features[feature] = on

    def get_preview_feature(self, feature):
        return self.features[feature]


def test_builder_options_by_any_spelling():
    from pipeline.backends.trt_build import apply_builder_options

    enum = types.SimpleNamespace(__members__={"FASTER_DYNAMIC_SHAPES_0805": "A", "PROFILE_SHARING_0806": "B"})
    trt = types.SimpleNamespace(__version__="8.6.0", PreviewFeature=enum)
    config = _FakeConfig()
    got = apply_builder_options(trt, config, 5, {"fasterDynamicShapes0805": True, "profile_sharing_0806": False})
    assert got == {"builder_optimization_level": 5,
                   "preview_features": {"faster_dynamic_shapes_0805": True, "profile_sharing_0806": False}}
    untouched = apply_builder_options(trt, _FakeConfig(), None, {})
    assert untouched["builder_optimization_level"] == 3 and untouched["preview_features"]["profile_sharing_0806"]
    with pytest.raises(ConfigError, match=r"no preview feature 'fast'; it has faster_dynamic_shapes_0805, "
                                          r"profile_sharing_0806"):
        apply_builder_options(trt, _FakeConfig(), None, {"fast": False})


def test_parser_errors_name_the_node(tmp_path):
    from pipeline.backends.trt_build import parser_error_message

    onnx_path = _tiny_onnx(tmp_path / "m.onnx")

    class Err:  # TensorRT 8.6's ParserError: no node_name()/node_operator()
        def node(self):
            return 0

        def desc(self):
            return "No importer registered for op: Conv"

    parser = types.SimpleNamespace(num_errors=1, get_error=lambda i: Err())
    msg = parser_error_message(types.SimpleNamespace(__version__="8.6.0"), parser, onnx_path, [])
    assert "node 0 '/conv/Conv' (op Conv)" in msg and str(onnx_path) in msg


def test_heartbeat_when_there_is_no_progress_monitor(capsys):
    import time

    from pipeline.backends.trt_build import build_progress

    with build_progress(types.SimpleNamespace(), object(), "tiny fp32 engine", interval_s=0.02) as how:
        time.sleep(0.1)
    assert how.startswith("heartbeat")
    assert "building tiny fp32 engine" in capsys.readouterr().err


def _config(**build):
    return Config.model_validate({"model": {"name": "tiny", "arch": "tiny", "input": {"shape": [3, 8, 8]}},
                                  "build": {"backend": "tensorrt", **build}})


def test_build_without_tensorrt_says_what_to_install(monkeypatch, tmp_path):
    from pipeline.backends.base import BuildRequest
    from pipeline.backends.tensorrt_backend import TensorRTBackend

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    req = BuildRequest("fp32", tmp_path / "m.onnx", tmp_path / "out", _config())
    with pytest.raises(BackendError, match=r"pip install 'trtpipe\[tensorrt\]'"):
        TensorRTBackend().build(req)


def test_implicit_int8_on_tensorrt_11_points_to_explicit(monkeypatch, tmp_path):
    from pipeline.backends.base import BuildRequest
    from pipeline.backends.tensorrt_backend import TensorRTBackend

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="11.0.0"))
    req = BuildRequest("int8", tmp_path / "m.onnx", tmp_path / "out", _config(int8_route="implicit"))
    with pytest.raises(BackendError, match="int8_route: explicit"):
        TensorRTBackend().build(req)


def test_explicit_route_needs_the_qdq_model(monkeypatch, tmp_path):
    from pipeline.backends.base import BuildRequest
    from pipeline.backends.tensorrt_backend import TensorRTBackend

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    req = BuildRequest("int8", tmp_path / "m.onnx", tmp_path / "out", _config(int8_route="explicit"), calib_dir=tmp_path)
    with pytest.raises(ModelError, match="model.qdq.onnx"):
        TensorRTBackend().build(req)
