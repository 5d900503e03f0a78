"""The TensorRT build path on 8.6, 10.x and 11.x, run against the stand-in `tensorrt`
modules (tests/backends/trt_standin.py: the names each version's bindings export, with a
recording builder): which network flags, builder flags, casts, profiles and calibrators each
version's build sets, and that a build on 11 never touches an API 11 removed."""

from __future__ import annotations

import contextlib
import json
import types
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import Config
from pipeline.errors import ConfigError, PipelineError
from tests.backends.trt_standin import install

V86, V10, V11 = "8.6.1", "10.16.0", "11.1.0"
PROFILE = {"input": ([1, 3, 8, 8], [4, 3, 8, 8], [8, 3, 8, 8])}


def _model(path: Path, qdq: bool = False) -> Path:
    """input -> Conv -> Relu -> ReduceMean (a reduction build.fp16 keeps in FP32) -> out;
    with `qdq`, the Conv's input and weights go through QuantizeLinear/DequantizeLinear."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 1, 1)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([0.1, -0.2, 0.3, 0.0], np.float32), "B")]
    nodes = []
    x, w = "input", "W"
    if qdq:
        inits += [numpy_helper.from_array(np.array(0.05, np.float32), "s_x"),
                  numpy_helper.from_array(np.array(0, np.int8), "z"),
                  numpy_helper.from_array(np.array(0.02, np.float32), "s_w")]
        nodes += [helper.make_node("QuantizeLinear", ["input", "s_x", "z"], ["xq"], name="/q_x"),
                  helper.make_node("DequantizeLinear", ["xq", "s_x", "z"], ["xdq"], name="/dq_x"),
                  helper.make_node("QuantizeLinear", ["W", "s_w", "z"], ["wq"], name="/q_w"),
                  helper.make_node("DequantizeLinear", ["wq", "s_w", "z"], ["wdq"], name="/dq_w")]
        x, w = "xdq", "wdq"
    nodes += [helper.make_node("Conv", [x, w, "B"], ["c"], name="/conv/Conv", kernel_shape=[1, 1]),
              helper.make_node("Relu", ["c"], ["r"], name="/relu/Relu"),
              helper.make_node("ReduceMean", ["r"], ["out"], name="/pool/ReduceMean", axes=[2, 3], keepdims=0)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _config(**build) -> Config:
    return Config.model_validate({
        "model": {"name": "tiny", "arch": "tiny", "input": {"shape": [3, 8, 8]}},
        "calibration": {"num_samples": 8, "batch_size": 4},
        "build": {"backend": "tensorrt", "timing_cache": None,
                  "profile": {"min_batch": 1, "opt_batch": 4, "max_batch": 8}, **build}})


class _Memory:  # pipeline.runtime.cuda_memory's interface, without a GPU
    def activate(self):
        return contextlib.nullcontext()

    def alloc_device(self, nbytes):
        return types.SimpleNamespace(ptr=1, nbytes=nbytes, free=lambda: None)

    def htod(self, ptr, array):
        pass

    def close(self):
        pass


@pytest.fixture
def env(tmp_path, monkeypatch):
    from pipeline.backends import tensorrt_backend
    from pipeline.runtime import cuda_memory

    monkeypatch.setattr(tensorrt_backend, "device_info", lambda i=0: {"gpu": "stand-in"})
    monkeypatch.setattr(cuda_memory, "open_memory", lambda kind="auto", device=0: _Memory())
    onnx_path = _model(tmp_path / "model.onnx")
    calib = tmp_path / "calibrate"
    calib.mkdir()
    _model(calib / "model.qdq.onnx", qdq=True)
    np.savez(tmp_path / "calib.npz", input=np.random.default_rng(1).normal(size=(8, 3, 8, 8)).astype(np.float32))

    def build(version, precision, fail_build=None, **build_cfg):
        from pipeline.backends.base import BuildRequest
        from pipeline.backends.tensorrt_backend import TensorRTBackend

        trt = install(monkeypatch, version)
        trt._rec.fail_build = fail_build  # a build TensorRT refuses (Recorder.fail_build)
        out = tmp_path / f"out-{version}-{precision}-{len(list(tmp_path.iterdir()))}"
        req = BuildRequest(precision, onnx_path, out, _config(**build_cfg), calib_dir=calib,
                           calib_data=tmp_path / "calib.npz")
        result = TensorRTBackend(progress=False).build(req)
        return trt._rec, result, out

    return types.SimpleNamespace(build=build, onnx=onnx_path, calib=calib, monkeypatch=monkeypatch)


# -- fp32 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("version, net_flags", [(V86, ["EXPLICIT_BATCH"]), (V10, ["EXPLICIT_BATCH", "STRONGLY_TYPED"]),
                                                (V11, ["STRONGLY_TYPED"])])
def test_fp32_flags_and_profiles(env, version, net_flags):
    rec, res, out = env.build(version, "fp32")
    assert rec.network_flags == net_flags
    assert rec.flags_set == [] and rec.layer_precision == {} and rec.output_types == {}
    assert rec.profiles == [PROFILE] and rec.calibration_profile is None and rec.calibrator is None
    assert rec.parsed["path"] == str(env.onnx) and rec.memory_pools == {"WORKSPACE": 1024 << 20}
    assert res.details["strongly_typed"] is (version != V86)
    assert res.details["by_output_type"] == {"FP32": 3}  # the inspector's JSON read in each version's shape
    assert (out / "model.engine").is_file() and (out / "layers.json").is_file()
    if version == V11:
        assert rec.missing == []
        assert "Format/Datatype" not in (out / "layers.json").read_text()  # 11's split fields were parsed


# -- fp16 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [V10, V11])
def test_fp16_is_the_typed_onnx_built_strongly_typed(env, version):
    rec, res, out = env.build(version, "fp16")
    typed = out / "model.fp16.onnx"
    assert rec.parsed["path"] == str(typed)
    assert "STRONGLY_TYPED" in rec.network_flags
    assert rec.flags_set == [] and rec.layer_precision == {} and rec.output_types == {}  # no flags, no constraints
    assert rec.parsed["fp16_initializers"] >= 2  # W and B in FP16
    assert rec.parsed["input_dtypes"] == {"input": "FLOAT"} and rec.parsed["output_dtypes"] == {"out": "FLOAT"}
    # FP32 in and out, the kept ReduceMean wrapped in Casts: to FP16 after the input, to FP32 around the reduction
    assert rec.parsed["cast_to"].get("HALF", 0) >= 1 and rec.parsed["cast_to"].get("FLOAT", 0) >= 1
    assert res.kept_fp32 == ["/pool/ReduceMean: op ReduceMean (build.fp16.keep_fp32_ops)"]
    import hashlib

    info = res.details["typed_onnx"]
    assert info["sha256"] == hashlib.sha256(typed.read_bytes()).hexdigest() and info["kept_fp32_nodes"] == 1
    assert res.details["precision_flags_set"] == [] and "FP16" not in res.flags
    assert res.details["by_output_type"].get("FP16", 0) >= 2  # Conv and Relu run FP16 (from the ONNX's types)
    assert any("typed FP16 ONNX" in n for n in res.details["notes"])
    if version == V11:
        assert rec.missing == []


def test_fp16_on_86_keeps_the_flag_and_the_constraints(env):
    rec, res, out = env.build(V86, "fp16")
    assert rec.parsed["path"] == str(env.onnx) and not (out / "model.fp16.onnx").exists()
    assert rec.network_flags == ["EXPLICIT_BATCH"]
    assert rec.flags_set == ["FP16", "OBEY_PRECISION_CONSTRAINTS"]
    assert rec.layer_precision == {"/pool/ReduceMean": "FLOAT"} and rec.output_types == {"/pool/ReduceMean": ["FLOAT"]}
    assert res.details["strongly_typed"] is False and res.details["typed_onnx"] is None


def test_fp16_typed_onnx_on_86_builds_it_with_the_flag_and_pins_the_kept_nodes_not_the_casts(env):
    import onnx

    rec, res, out = env.build(V86, "fp16", fp16={"source": "typed_onnx"})
    typed = out / "model.fp16.onnx"
    assert rec.parsed["path"] == str(typed) and rec.network_flags == ["EXPLICIT_BATCH"]
    assert rec.flags_set == ["FP16", "OBEY_PRECISION_CONSTRAINTS"]
    casts = {n.name for n in onnx.load(str(typed)).graph.node if n.op_type == "Cast"}
    assert casts and not casts & set(rec.layer_precision)  # the Casts keep the types the ONNX gives them
    assert rec.layer_precision == {"/pool/ReduceMean": "FLOAT"}
    assert res.details["strongly_typed"] is False and res.details["fp16"]["route"] == "typed"
    assert any("FP16 flag" in n for n in res.details["notes"])


def test_fp16_flag_on_10_is_weakly_typed_and_refused_on_11(env):
    rec, res, _ = env.build(V10, "fp16", fp16={"source": "flag"})
    assert rec.parsed["path"] == str(env.onnx) and "STRONGLY_TYPED" not in rec.network_flags
    assert rec.flags_set == ["FP16", "OBEY_PRECISION_CONSTRAINTS"] and res.details["fp16"]["route"] == "flag"
    assert "deprecated since TensorRT 10" in res.details["fp16"]["why"]
    with pytest.raises(ConfigError) as e:
        env.build(V11, "fp16", fp16={"source": "flag"})
    assert "\n" not in str(e.value) and "removed" in str(e.value) and "typed_onnx" in str(e.value)
    import sys

    assert sys.modules["tensorrt"]._rec.missing == []


# -- int8 explicit ---------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [V86, V10, V11])
def test_int8_explicit_builds_the_qdq_onnx(env, version):
    rec, res, _ = env.build(version, "int8", int8_route="explicit")
    assert rec.parsed["path"] == str(env.calib / "model.qdq.onnx")
    assert rec.parsed["quantize"] == 2 and rec.parsed["dequantize"] == 2
    assert rec.calibrator is None and rec.calibration_profile is None and rec.profiles == [PROFILE]
    assert res.details["int8_route"] == "explicit" and res.calibration["route"] == "explicit"
    if version == V86:  # as before: weakly typed, INT8 with FP16 for the float layers
        assert rec.network_flags == ["EXPLICIT_BATCH"] and rec.flags_set == ["FP16", "INT8"]
        return
    assert "STRONGLY_TYPED" in rec.network_flags and rec.flags_set == [] and rec.layer_precision == {}
    if version == V11:
        assert rec.missing == []
        assert "TensorRT < 11" in res.calibration["calibration_cache"]


# -- int8 implicit / auto ------------------------------------------------------------------------------
def test_int8_implicit_on_10_works_with_a_deprecation_note(env):
    rec, res, out = env.build(V10, "int8", int8_route="implicit", calibration_source="tensorrt")
    assert rec.network_flags == ["EXPLICIT_BATCH"]  # weakly typed
    assert rec.flags_set == ["FP16", "INT8"] and rec.calibrator == "EntropyCalibrator2"
    assert rec.calibration_profile == {"input": ([4, 3, 8, 8],) * 3} and rec.profiles == [PROFILE]
    assert rec.calibration == {"cache_read": False, "batches_fed": 2}
    assert res.calibration["route"] == "implicit" and res.calibration["cache_header"] == "TRT-10160-EntropyCalibration2"
    assert (out / "calibration.cache").is_file()
    (note,) = [n for n in res.details["notes"] if "deprecates implicit INT8" in n]
    assert "\n" not in note and "int8_route: explicit" in note


@pytest.mark.parametrize("version, route", [(V86, "implicit"), (V10, "implicit"), (V11, "explicit")])
def test_int8_auto_takes_implicit_where_tensorrt_has_it(env, version, route):
    rec, res, _ = env.build(version, "int8", int8_route="auto", calibration_source="tensorrt")
    assert res.details["int8_route"] == route and res.details["int8_route_requested"] == "auto"
    why = res.details["int8_route_why"]
    if route == "implicit":
        assert "IInt8EntropyCalibrator2" in why and rec.calibrator == "EntropyCalibrator2"
        assert rec.parsed["path"] == str(env.onnx)
    else:
        assert "no implicit INT8" in why and rec.calibrator is None and rec.missing == []
        assert rec.parsed["path"] == str(env.calib / "model.qdq.onnx") and rec.network_flags == ["STRONGLY_TYPED"]
    assert res.calibration["route_why"] == why


def test_int8_default_route_is_auto():
    assert _config().build.int8_route == "auto"
    assert _config(int8_route="implicit").build.int8_route == "implicit"  # old configs still load


def test_int8_implicit_on_11_refused_in_one_line(env, tmp_path):
    from pipeline.backends.trt_build import ImplicitInt8Unavailable
    from pipeline.stages.build import _trt_int8_route

    with pytest.raises(ImplicitInt8Unavailable) as e:
        env.build(V11, "int8", int8_route="implicit")
    msg = str(e.value)
    assert isinstance(e.value, PipelineError) and "\n" not in msg
    assert msg.startswith("build.int8_route: implicit needs BuilderFlag.INT8 and IInt8EntropyCalibrator2, which "
                          "TensorRT 11.1.0 removed; set build.int8_route: explicit")
    import sys

    rec = sys.modules["tensorrt"]._rec
    assert rec.calls == [] and rec.missing == []  # refused before anything was built
    with pytest.raises(ImplicitInt8Unavailable):  # the build stage refuses before reading calibrate's outputs
        _trt_int8_route("implicit")
    assert _trt_int8_route("auto") == "explicit"  # so build@int8 with tune applies tune's Q/DQ ONNX on 11
    install(env.monkeypatch, V10)
    assert _trt_int8_route("auto") == "implicit"  # ... and tune's layer precisions on 10


# -- layer precisions (tune's mixed precision on the implicit route) ---------------------------------------
@pytest.mark.parametrize("version", [V86, V10])
def test_layer_precisions_pin_layers_on_the_implicit_route(env, version):
    rec, res, _ = env.build(version, "int8", int8_route="implicit", calibration_source="tensorrt",
                            layer_precisions={"/conv/*": "fp32"})
    assert rec.layer_precision == {"/conv/Conv": "FLOAT"} and rec.output_types == {"/conv/Conv": ["FLOAT"]}
    assert rec.flags_set == ["FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS"]
    assert res.details["layer_precisions"]["pinned"] == {"/conv/Conv": "fp32"}


@pytest.mark.parametrize("version", [V10, V11])
def test_layer_precisions_on_a_strongly_typed_int8_build_refused_in_one_line(env, version):
    with pytest.raises(ConfigError) as e:
        env.build(version, "int8", int8_route="explicit", layer_precisions={"/conv/*": "fp32"})
    assert "\n" not in str(e.value) and "build.int8_from_tune: true" in str(e.value)
    import sys

    assert sys.modules["tensorrt"]._rec.missing == []


@pytest.mark.parametrize("version", [V10, V11])
def test_layer_precisions_on_typed_fp16_become_casts(env, version):
    import onnx

    rec, res, out = env.build(version, "fp16", layer_precisions={"/conv/*": "fp32"})
    assert rec.layer_precision == {} and rec.output_types == {} and rec.flags_set == [] and rec.missing == []
    assert "/conv/Conv: build.layer_precisions: fp32" in res.kept_fp32
    typed = onnx.load(str(out / "model.fp16.onnx"))
    conv = next(n for n in typed.graph.node if n.name == "/conv/Conv")
    w = {i.name: i.data_type for i in typed.graph.initializer}
    assert w[conv.input[1]] == onnx.TensorProto.FLOAT  # the pinned Conv kept its FP32 weights
    assert res.details["typed_onnx"]["kept_fp32_nodes"] == 2


# -- preview features ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [V86, V10, V11])
def test_preview_features_only_where_the_enum_has_them(env, version):
    rec, res, _ = env.build(version, "fp32", preview_features={"faster_dynamic_shapes_0805": False})
    if version == V86:
        assert rec.preview == {"FASTER_DYNAMIC_SHAPES_0805": False}
        assert not any("preview" in n for n in res.details["notes"])
    else:
        (note,) = res.details["notes"]
        assert rec.preview == {} and "dropped in TensorRT 10.0" in note and note.endswith("not set")
    with pytest.raises(ConfigError, match="no preview feature 'fastr'"):  # a typo is still an error
        env.build(version, "fp32", preview_features={"fastr": False})


def test_inspector_json_of_each_shape():
    from pipeline.backends.trt_build import layer_summary

    old = {"Layers": [{"Name": "a", "Outputs": [{"Name": "t", "Format/Datatype": "Row major linear FP16 format"}]}]}
    new = [{"Name": "a", "Outputs": [{"Name": "t", "Format": "Row major linear", "Datatype": "Int8"}]},
           {"Name": "b", "Outputs": [{"Name": "u", "Format": "Row major linear", "Datatype": "Float"}]}]
    assert layer_summary(old) == {"engine_layers": 1, "by_output_type": {"FP16": 1}}
    assert layer_summary(new) == {"engine_layers": 2, "by_output_type": {"INT8": 1, "FP32": 1}}
    assert layer_summary({"Layers": new}) == layer_summary(new)
    assert json.loads(json.dumps(new))  # plain JSON data


# -- hardware compatibility (build.hardware_compatibility) ---------------------------------------------------
@pytest.mark.parametrize("version", [V86, V10, V11])
def test_hardware_compatibility_sets_the_builder_config_and_is_recorded(version):
    """Every TensorRT from 8.6 has HardwareCompatibilityLevel.AMPERE_PLUS and
    IBuilderConfig.hardware_compatibility_level (tests/backends/trt_names.py): ampere_plus sets it,
    none leaves TensorRT's default, and what the config holds afterwards is what build.json records."""
    from pipeline.backends.trt_build import apply_builder_options
    from tests.backends.trt_standin import make_trt

    trt = make_trt(version)
    config = trt.Builder(None).create_builder_config()
    got = apply_builder_options(trt, config, None, {}, "ampere_plus")
    assert trt._rec.hardware_compatibility == "AMPERE_PLUS"
    assert config.hardware_compatibility_level == trt.HardwareCompatibilityLevel.AMPERE_PLUS
    assert got["hardware_compatibility"] == "ampere_plus"

    trt = make_trt(version)
    config = trt.Builder(None).create_builder_config()
    for level in ("none", None):
        assert apply_builder_options(trt, config, None, {}, level)["hardware_compatibility"] == "none"
    assert trt._rec.hardware_compatibility is None  # TensorRT's default left alone
    assert trt._rec.missing == []


def test_hardware_compatibility_without_the_api_is_one_line():
    """A TensorRT before 8.6 has no HardwareCompatibilityLevel (8.6 introduced it; no stand-in names exist
    for 8.5, so this is the 8.6.1 stand-in without that enum): ampere_plus is a ConfigError naming the
    version, none builds as before and records nothing."""
    from pipeline.backends.trt_build import apply_builder_options
    from tests.backends.trt_standin import make_trt

    trt = make_trt(V86)
    del trt.HardwareCompatibilityLevel
    trt.__version__ = "8.5.3"
    config = trt.Builder(None).create_builder_config()
    with pytest.raises(ConfigError) as e:
        apply_builder_options(trt, config, None, {}, "ampere_plus")
    msg = str(e.value)
    assert "\n" not in msg and "TensorRT 8.5.3" in msg and "build.hardware_compatibility" in msg
    assert trt._rec.hardware_compatibility is None
    assert "hardware_compatibility" not in apply_builder_options(trt, config, None, {}, "none")
    with pytest.raises(ConfigError, match="'ampere\\+' is not one of none, ampere_plus"):
        apply_builder_options(make_trt(V10), make_trt(V10).Builder(None).create_builder_config(), None, {}, "ampere+")


@pytest.mark.parametrize("version", [V86, V10, V11])
def test_build_json_records_the_hardware_compatibility(env, version):
    rec, res, _ = env.build(version, "fp32")
    assert res.details["hardware_compatibility"] == "none" and rec.hardware_compatibility is None


def test_build_with_ampere_plus_reaches_the_builder(env):
    rec, res, _ = env.build(V10, "fp32", hardware_compatibility="ampere_plus")
    assert rec.hardware_compatibility == "AMPERE_PLUS" and res.details["hardware_compatibility"] == "ampere_plus"


# -- tune's engine candidates ---------------------------------------------------------------------
@pytest.mark.parametrize("version", [V86, V11])
def test_tune_candidates_take_build_int8s_route(env, version):
    """On 11 (no implicit INT8) a candidate is its own Q/DQ ONNX with the kept Conv left float,
    built strongly typed; on 8.6 it is the implicit build with the kept Conv pinned."""
    import onnx

    from pipeline.backends.tensorrt_backend import TensorRTBackend
    from pipeline.tuning.layers import Layer
    from pipeline.tuning.trt_candidates import TrtCandidates

    trt = install(env.monkeypatch, version)
    from calibration.cache import write_cache

    write_cache(env.calib / "calibration.cache", {"input": np.float32(0.05), "c": np.float32(0.1), "r": np.float32(0.1)},
                version, "EntropyCalibration2")
    conv = Layer(name="/conv/Conv", op_type="Conv", index=0, nodes=("/conv/Conv", "/relu/Relu"), macs=96)
    cands = TrtCandidates(_config(), env.onnx, env.calib, [conv], "fp16", progress=False,
                          amax={"input": 4.0, "c": 3.0, "r": 3.0}, calib_data=env.calib.parent / "calib.npz")
    try:
        out = Path(cands._tmp.name) / "out"
        for kept, q in ((frozenset(), 1), (frozenset({"/conv/Conv"}), 0)):
            req = cands.request_for(kept, frozenset(), out)
            if version == V11:
                assert req.config.build.int8_route == "explicit"
                model = onnx.load(str(req.calib_dir / "model.qdq.onnx"))
                assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node if "input" in n.input) == q
                # what build@int8 builds on 11: the candidate's typed INT8 ONNX (float parts FP16), the same Q/DQ
                typed = onnx.load(str(req.qdq_onnx))
                assert req.qdq_onnx.name == "model.int8.onnx" and req.typed_onnx["quantize_linear"] == q
                assert sum(n.op_type == "QuantizeLinear" for n in typed.graph.node) == q
                assert req.typed_onnx["fp16_initializers"] > 0
                res = TensorRTBackend(progress=False).build(req)
                assert res.details["int8_route"] == "explicit" and res.details["strongly_typed"] is True
                assert trt._rec.parsed["path"] == str(req.qdq_onnx) and res.details["typed_onnx"]["file"] == "model.int8.onnx"
                assert trt._rec.calibrator is None and trt._rec.missing == []
            else:
                assert cands.route()[0] == "implicit" and req.config.build.int8_route == "implicit"
                pins = req.config.build.layer_precisions
                assert ("/conv/Conv" in pins) == bool(kept) and ("/relu/Relu" in pins) == bool(kept)
    finally:
        cands.close()


def _float_conv_relu_q(path: Path) -> Path:
    """input -> Conv (float: a kept layer) -> Relu -> Q/DQ -> Conv (int8 weights) -> out: the pattern
    TensorRT 8.6.0 built wrong (calibration/qdq_patterns.py)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 1, 1)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.integers(-127, 127, size=(4, 4, 1, 1)).astype(np.int8), "W2q"),
             numpy_helper.from_array(np.full(4, 0.01, np.float32), "s_w"),
             numpy_helper.from_array(np.zeros(4, np.int8), "z_w"),
             numpy_helper.from_array(np.array(0.05, np.float32), "s_x"),
             numpy_helper.from_array(np.array(0, np.int8), "z")]
    nodes = [helper.make_node("Conv", ["input", "W1"], ["c1"], name="/kept/Conv", kernel_shape=[1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="/kept/Relu"),
             helper.make_node("QuantizeLinear", ["r1", "s_x", "z"], ["rq"], name="/q_r1"),
             helper.make_node("DequantizeLinear", ["rq", "s_x", "z"], ["rdq"], name="/dq_r1"),
             helper.make_node("DequantizeLinear", ["W2q", "s_w", "z_w"], ["w2"], name="/dq_w2", axis=0),
             helper.make_node("Conv", ["rdq", "w2"], ["c2"], name="/int8/Conv", kernel_shape=[1, 1]),
             helper.make_node("ReduceMean", ["c2"], ["out"], name="/pool/ReduceMean", axes=[2, 3], keepdims=0)]
    graph = helper.make_graph(nodes, "kept", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("version", [V86, V11])
def test_explicit_build_moves_a_q_86_built_wrong_before_the_activation(env, version, caplog):
    """A Q/DQ right after a float Conv's Relu: weakly typed 8.6 builds the same Q/DQ ONNX with a Q/DQ of the
    same scale before the Relu too (written beside the engine, said in build.json and a warning line), which
    onnxruntime computes to the same outputs; the plain Q/DQ model is built as it is; strongly typed 11 builds
    the ONNX as given."""
    import onnx

    from calibration.ort_session import make_session
    from calibration.qdq_patterns import float_conv_activation_q

    _, plain, _ = env.build(version, "int8", int8_route="explicit")
    assert plain.details["qdq_edit"] == {} and not any("float Conv" in n for n in plain.details["notes"])
    original = _float_conv_relu_q(env.calib / "model.qdq.onnx")
    assert float_conv_activation_q(onnx.load(str(original))) == ["r1"]
    with caplog.at_level("WARNING"):
        rec, res, out = env.build(version, "int8", int8_route="explicit")
    notes = [n for n in res.details["notes"] if "float Conv" in n]
    if version == V86:
        edited = out / "model.qdq.preact_q.onnx"
        assert rec.parsed["path"] == str(edited) and res.details["onnx"] == str(edited)
        assert len(notes) == 1 and "first: r1" in notes[0] and "built model.qdq.preact_q.onnx instead" in notes[0]
        assert res.details["qdq_edit"]["quantize_before_activation"]["conv_outputs"] == ["c1"]
        assert any("float Conv" in r.getMessage() for r in caplog.records)
        g = onnx.load(str(edited)).graph
        relu = next(n for n in g.node if n.op_type == "Relu")
        assert relu.input[0] == "c1_preact_dq" and [n.op_type for n in g.node].count("QuantizeLinear") == 2
        x = {"input": np.random.default_rng(4).normal(size=(6, 3, 8, 8)).astype(np.float32)}
        a, b = (make_session(str(p)).run(None, x)[0] for p in (original, edited))
        np.testing.assert_array_equal(b, a)
    else:
        assert notes == [] and res.details["qdq_edit"] == {} and rec.parsed["path"] == str(original)


def _qdq_gemm_head(path: Path) -> Path:
    """input -> Flatten -> Q/DQ -> Gemm (int8 weights, per output channel, transB=1, bias) -> boxes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.integers(-127, 127, size=(2, 192)).astype(np.int8), "Wq"),
             numpy_helper.from_array(np.array([0.004, 0.002], np.float32), "s_w"),
             numpy_helper.from_array(np.zeros(2, np.int8), "z_w"),
             numpy_helper.from_array(np.array([0.5, -0.25], np.float32), "B"),
             numpy_helper.from_array(np.array(0.03, np.float32), "s_x"),
             numpy_helper.from_array(np.array(0, np.int8), "z")]
    nodes = [helper.make_node("Flatten", ["input"], ["f"], name="/flat"),
             helper.make_node("QuantizeLinear", ["f", "s_x", "z"], ["fq"], name="/q_f"),
             helper.make_node("DequantizeLinear", ["fq", "s_x", "z"], ["fdq"], name="/dq_f"),
             helper.make_node("DequantizeLinear", ["Wq", "s_w", "z_w"], ["w"], name="/dq_w", axis=0),
             helper.make_node("Gemm", ["fdq", "w", "B"], ["boxes"], name="/boxes/Gemm", transB=1)]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", 2])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _refuse_gemm_weight_qdq(path: str) -> str | None:
    """What TensorRT 8.6.0 did with the detector's Q/DQ ONNX (bench/results/h100_2026-12-07b/probes/detector.json)."""
    import onnx

    g = onnx.load(path).graph
    dq = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in {i.name for i in g.initializer}}
    if any(n.op_type == "Gemm" and n.input[1] in dq for n in g.node):
        return ("2: [graphOptimizer.cpp::chooseHigherPrecision::7079] Error Code 2: Internal Error (Assertion "
                "dt1 == DataType::kFLOAT || dt1 == DataType::kHALF failed. )")
    return None


def test_explicit_gemm_weight_assertion_on_86_builds_with_those_weights_in_float(env):
    """8.6 stops on Q/DQ Gemm weights (as it did on the detector): the build writes the same Q/DQ ONNX with
    those weights in float, builds that, and says so; the edited ONNX computes what the original does."""
    from calibration.ort_session import make_session

    original = _qdq_gemm_head(env.calib / "model.qdq.onnx")
    rec, res, out = env.build(V86, "int8", fail_build=_refuse_gemm_weight_qdq, int8_route="explicit")
    edited = out / "model.qdq.gemm_float.onnx"
    assert rec.parsed["path"] == str(edited) and len(rec.build_errors) == 1
    assert "chooseHigherPrecision" in rec.build_errors[0]
    note = res.details["notes"][-1]
    assert "could not build the Q/DQ on the weights of 1 Gemm node(s)" in note and "/boxes/Gemm" in note
    assert res.details["qdq_edit"]["gemm_weights_in_float"]["onnx"] == str(edited) and res.details["onnx"] == str(edited)
    x = {"input": np.random.default_rng(2).normal(size=(5, 3, 8, 8)).astype(np.float32)}
    a, b = (make_session(str(p)).run(None, x)[0] for p in (original, edited))
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)  # onnxruntime's exact Q/DQ: the same arithmetic
    import onnx

    g = onnx.load(str(edited)).graph
    assert [n.op_type for n in g.node].count("DequantizeLinear") == 1  # the input's stays, the weight's went


@pytest.mark.parametrize("version, error", [(V11, "chooseHigherPrecision"), (V86, "some other failure")])
def test_no_retry_where_it_does_not_apply(env, version, error):
    """Strongly typed TensorRT (11), or another build error: the failure is reported as it is, in one line."""
    from pipeline.errors import BackendError

    _qdq_gemm_head(env.calib / "model.qdq.onnx")
    with pytest.raises(BackendError) as e:
        env.build(version, "int8", fail_build=lambda path: error, int8_route="explicit")
    assert error in str(e.value) and "\n" not in str(e.value)
    assert not list(env.calib.parent.glob("out-*/*.gemm_float.onnx"))


@pytest.mark.slow
def test_build_stage_records_the_edited_onnx_where_it_stays(tmp_path, tmp_path_factory, monkeypatch):
    """Through the build stage (which builds in a hidden folder and renames it at the end): the Q/DQ ONNX
    the 8.6 retry wrote is named in build.json at its final place, and its sha256 is that file's (it was
    recorded under the hidden folder's name, which no longer exists after the rename, on the H100)."""
    from pipeline import backends
    from pipeline.backends import tensorrt_backend
    from pipeline.fileio import sha256_file
    from pipeline.runtime import cuda_memory
    from pipeline.stages import build
    from tests._digits_run import digits_base, digits_config

    base = digits_base(tmp_path_factory)  # before the stand-in: these stages run on onnxruntime
    monkeypatch.setattr(tensorrt_backend, "device_info", lambda i=0: {"gpu": "stand-in"})
    monkeypatch.setattr(cuda_memory, "open_memory", lambda kind="auto", device=0: _Memory())
    monkeypatch.setattr(backends, "tensorrt_usable", lambda: (True, ""))
    trt = install(monkeypatch, V86)
    trt._rec.fail_build = _refuse_gemm_weight_qdq
    cfg = digits_config(tmp_path, build={"backend": "tensorrt", "int8_route": "explicit", "timing_cache": None})
    out = tmp_path / "int8"
    report = build.run(cfg, "int8", base / "export" / "model.onnx", out, calib_dir=base / "calibrate",
                       calib_data=base / "prepare" / "calib.npz", validation=base / "validate" / "validate.json")
    edit = report.details["qdq_edit"]["gemm_weights_in_float"]
    assert edit["onnx"] == str(out / "model.qdq.gemm_float.onnx") == report.details["onnx"]
    assert edit["sha256"] == sha256_file(out / "model.qdq.gemm_float.onnx")
    assert ".tmp-" not in json.dumps(report.details) and ".tmp-" not in (out / "build.json").read_text()


def _stage_build(tmp_path, tmp_path_factory, monkeypatch, version, **build_cfg):
    """build.run on the digits model (prepare .. calibrate on onnxruntime) against the stand-in `version`."""
    from pipeline import backends
    from pipeline.backends import tensorrt_backend
    from pipeline.runtime import cuda_memory
    from pipeline.stages import build
    from tests._digits_run import digits_base, digits_config

    base = digits_base(tmp_path_factory)  # before the stand-in: these stages run on onnxruntime
    monkeypatch.setattr(tensorrt_backend, "device_info", lambda i=0: {"gpu": "stand-in"})
    monkeypatch.setattr(cuda_memory, "open_memory", lambda kind="auto", device=0: _Memory())
    monkeypatch.setattr(backends, "tensorrt_usable", lambda: (True, ""))
    trt = install(monkeypatch, version)
    cfg = digits_config(tmp_path, build={"backend": "tensorrt", "timing_cache": None, **build_cfg})
    out = tmp_path / f"int8-{version}"
    report = build.run(cfg, "int8", base / "export" / "model.onnx", out, calib_dir=base / "calibrate",
                       calib_data=base / "prepare" / "calib.npz", validation=base / "validate" / "validate.json")
    return trt._rec, report, out, base


@pytest.mark.slow
@pytest.mark.parametrize("version", [V10, V11])
def test_strongly_typed_int8_builds_the_qdq_onnx_with_its_float_parts_in_fp16(tmp_path, tmp_path_factory,
                                                                              monkeypatch, version):
    """int8_float_fallback: fp16 (the default) on a strongly typed explicit build: the stage writes the typed
    INT8 ONNX (every Q/DQ of calibrate's ONNX kept, the float parts FP16), the build parses it with no precision
    flag, and build.json names it with its sha256; in onnxruntime it computes what the Q/DQ ONNX computes up to
    FP16 rounding of the float parts (the reference: calibrate's Q/DQ ONNX, FP32)."""
    import onnx

    from calibration.ort_session import make_session
    from pipeline.fileio import sha256_file

    rec, report, out, base = _stage_build(tmp_path, tmp_path_factory, monkeypatch, version, int8_route="explicit")
    typed = out / "model.int8.onnx"
    assert Path(rec.parsed["path"]).name == typed.name and report.details["onnx"] == str(typed)  # (parsed in staging)
    assert rec.flags_set == [] and report.details["strongly_typed"] is True
    info = report.details["typed_onnx"]
    assert info["file"] == "model.int8.onnx" and info["sha256"] == sha256_file(typed) and "int8_float_fallback" in info["why"]
    original = onnx.load(str(base / "calibrate" / "model.qdq.onnx"))
    half = onnx.load(str(typed))
    count = lambda m, op: sum(n.op_type == op for n in m.graph.node)  # noqa: E731
    for op in ("QuantizeLinear", "DequantizeLinear"):
        assert count(half, op) == count(original, op) == info[op.replace("Linear", "_linear").lower()] > 0
    assert info["fp16_initializers"] > 0 and info["casts_to_fp16"] > 0
    convs = [n for n in half.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    kinds = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(half).graph.value_info}
    assert convs and all(kinds.get(n.output[0]) == onnx.TensorProto.FLOAT16 for n in convs)
    with np.load(base / "prepare" / "eval.npz") as z:
        x = {"input": z["input"][:64]}
    a = make_session(str(base / "calibrate" / "model.qdq.onnx")).run(None, x)[0]
    b = make_session(str(typed)).run(None, x)[0]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.999 and np.mean(a.argmax(1) == b.argmax(1)) >= 0.98
    assert not np.array_equal(a, b)  # FP16 did round something: the file is not the FP32 Q/DQ ONNX renamed


@pytest.mark.slow
@pytest.mark.parametrize("version, fallback", [(V11, "fp32"), (V86, "fp16")])
def test_qdq_onnx_built_as_it_is_without_fp16_fallback_or_on_86(tmp_path, tmp_path_factory, monkeypatch,
                                                                 version, fallback):
    """int8_float_fallback: fp32 keeps the float parts FP32 (calibrate's Q/DQ ONNX as it is); 8.6 builds that ONNX
    with its INT8 (+FP16) flags and writes no typed INT8 ONNX."""
    rec, report, out, base = _stage_build(tmp_path, tmp_path_factory, monkeypatch, version, int8_route="explicit",
                                          int8_float_fallback=fallback)
    assert rec.parsed["path"] == str(base / "calibrate" / "model.qdq.onnx") and not (out / "model.int8.onnx").exists()
    assert report.details["typed_onnx"] is None
    assert rec.flags_set == ([] if version == V11 else ["FP16", "INT8"])


@pytest.mark.slow
def test_typed_int8_keeps_the_nodes_it_is_told_in_fp32(tmp_path, tmp_path_factory):
    """tune's layers kept in FP32 (or nodes build.fp16 keeps) stay FP32 in the typed INT8 ONNX; the others FP16."""
    import onnx

    from pipeline.backends.trt_typed import plan_int8_typed
    from tests._digits_run import digits_base, digits_config

    base = digits_base(tmp_path_factory)
    convs = [n.name for n in onnx.load(str(base / "export" / "model.onnx")).graph.node if n.op_type == "Conv"]
    info = plan_int8_typed(base / "export" / "model.onnx", base / "calibrate" / "model.qdq.onnx", digits_config(tmp_path),
                           tmp_path / "out", base / "calibrate", keep_fp32={convs[0]: "tune kept its layer in fp32"})
    assert info["keep_fp32"][convs[0]] == "tune kept its layer in fp32"
    half = onnx.shape_inference.infer_shapes(onnx.load(info["path"]))
    kinds = {v.name: v.type.tensor_type.elem_type for v in half.graph.value_info}
    by_name = {n.name: n for n in half.graph.node}
    assert kinds[by_name[convs[0]].output[0]] == onnx.TensorProto.FLOAT
    assert all(kinds[by_name[c].output[0]] == onnx.TensorProto.FLOAT16 for c in convs[1:] if c not in info["keep_fp32"])


def test_implicit_build_from_the_stage_cache_needs_no_calibration_samples(env, tmp_path):
    """Where TensorRT takes the calibrate stage's cache it does not calibrate, so the calibration samples are
    not read (a GPU machine need not hold calib.npz); without a usable cache their absence is one line."""
    from calibration.cache import write_cache
    from pipeline.backends.base import BuildRequest
    from pipeline.backends.tensorrt_backend import TensorRTBackend
    from pipeline.errors import DataError

    trt = install(env.monkeypatch, V86)
    write_cache(env.calib / "calibration.cache", {"input": np.float32(0.05), "c": np.float32(0.1), "r": np.float32(0.1)},
                V86, "EntropyCalibration2")
    absent = tmp_path / "absent" / "calib.npz"
    req = BuildRequest("int8", env.onnx, tmp_path / "a", _config(int8_route="implicit", calibration_source="cache"),
                       calib_dir=env.calib, calib_data=absent)
    res = TensorRTBackend(progress=False).build(req)
    assert res.calibration["route"] == "implicit" and trt._rec.calibration["cache_read"] is True
    assert trt._rec.calibration["batches_fed"] == 0
    (env.calib / "calibration.cache").unlink()
    req = BuildRequest("int8", env.onnx, tmp_path / "b", _config(int8_route="implicit"), calib_dir=env.calib,
                       calib_data=absent)
    with pytest.raises(DataError, match="calib.npz: calibration data not found") as e:
        TensorRTBackend(progress=False).build(req)
    assert "\n" not in str(e.value)


def _qdq_matmul(path: Path) -> Path:
    """input [N, 16] -> Q/DQ -> MatMul (int8 weights [16, 8], per output column, axis 1) -> out."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.integers(-127, 127, size=(16, 8)).astype(np.int8), "Wq"),
             numpy_helper.from_array(np.linspace(0.001, 0.004, 8).astype(np.float32), "s_w"),
             numpy_helper.from_array(np.zeros(8, np.int8), "z_w"),
             numpy_helper.from_array(np.array(0.02, np.float32), "s_x"),
             numpy_helper.from_array(np.array(0, np.int8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s_x", "z"], ["xq"], name="/q_x"),
             helper.make_node("DequantizeLinear", ["xq", "s_x", "z"], ["xdq"], name="/dq_x"),
             helper.make_node("DequantizeLinear", ["Wq", "s_w", "z_w"], ["w"], name="/dq_w", axis=1),
             helper.make_node("MatMul", ["xdq", "w"], ["out"], name="/attn/q/MatMul")]
    graph = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _refuse_matmul_weight_qdq(path: str) -> str | None:
    """What TensorRT 8.6.0 did with a BERT-style encoder's Q/DQ ONNX on an H100
    (bench/results/h100_2026-12-07c/routes_run/r/routes/text/routes.log)."""
    import onnx

    g = onnx.load(path).graph
    dq = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in {i.name for i in g.initializer}}
    if any(n.op_type == "MatMul" and set(n.input) & dq for n in g.node):
        return ("2: [graphOptimizer.cpp::convertMyelinWeightsToFp32::7903] Error Code 2: Internal Error (Assertion "
                "params.weights.type() != DataType::kINT8 failed. )")
    return None


def test_explicit_matmul_weight_assertion_on_86_builds_with_those_weights_in_float(env):
    """8.6 stops on Q/DQ MatMul weights inside a Myelin graph: the build writes the same Q/DQ ONNX with those
    weights in float, builds that and says so; onnxruntime computes the same outputs from both."""
    import onnx

    from calibration.ort_session import make_session

    original = _qdq_matmul(env.calib / "model.qdq.onnx")
    rec, res, out = env.build(V86, "int8", fail_build=_refuse_matmul_weight_qdq, int8_route="explicit")
    edited = out / "model.qdq.matmul_float.onnx"
    assert rec.parsed["path"] == str(edited) and "convertMyelinWeightsToFp32" in rec.build_errors[0]
    note = res.details["notes"][-1]
    assert "1 MatMul/Gemm node(s) (convertMyelinWeightsToFp32 assertion)" in note and "/attn/q/MatMul" in note
    assert res.details["qdq_edit"]["matmul_weights_in_float"]["onnx"] == str(edited)
    x = {"input": np.random.default_rng(5).normal(size=(7, 16)).astype(np.float32)}
    a, b = (make_session(str(p)).run(None, x)[0] for p in (original, edited))
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
    g = onnx.load(str(edited)).graph
    assert [n.op_type for n in g.node] == ["QuantizeLinear", "DequantizeLinear", "MatMul"]  # the input still INT8


def test_implicit_build_from_the_cache_with_a_dynamic_sequence_takes_the_profiles_opt_shape(env, tmp_path):
    """A dynamic sequence axis and no calibration samples: TensorRT reads the cache and does not calibrate, so
    the calibration profile is the build profile's opt shape (batch: calibration.batch_size)."""
    import onnx
    from onnx import TensorProto, helper

    from calibration.cache import write_cache
    from pipeline.backends.base import BuildRequest
    from pipeline.backends.tensorrt_backend import TensorRTBackend

    trt = install(env.monkeypatch, V86)
    path = tmp_path / "seq.onnx"
    graph = helper.make_graph([helper.make_node("Relu", ["tokens"], ["out"], name="/relu/Relu")], "seq",
                              [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", "seq"])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "seq"])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    calib = tmp_path / "cal"
    calib.mkdir()
    write_cache(calib / "calibration.cache", {"tokens": np.float32(0.05), "out": np.float32(0.05)}, V86,
                "EntropyCalibration2")
    cfg = Config.model_validate({
        "model": {"name": "seq", "arch": "seq", "inputs": [{"name": "tokens", "shape": ["seq"]}]},
        "calibration": {"num_samples": 8, "batch_size": 4},
        "build": {"backend": "tensorrt", "timing_cache": None, "int8_route": "implicit", "calibration_source": "cache",
                  "profiles": [{"batch": [1, 4, 8], "seq": [2, 6, 10]}]}})
    req = BuildRequest("int8", path, tmp_path / "out", cfg, calib_dir=calib, calib_data=tmp_path / "absent.npz")
    res = TensorRTBackend(progress=False).build(req)
    assert trt._rec.calibration_profile == {"tokens": ([4, 6],) * 3}
    assert trt._rec.calibration["cache_read"] is True and res.calibration["route"] == "implicit"


@pytest.mark.slow
def test_layer_precisions_on_a_strongly_typed_int8_build_are_casts_in_the_typed_onnx(tmp_path, tmp_path_factory,
                                                                                    monkeypatch):
    """build.layer_precisions on 11 (int8, fp16 fallback): the fp32 pins stay FP32 in model.int8.onnx, which is
    built with no refusal and no layer precision set on the network; build.json says how they were applied."""
    import onnx

    from tests._digits_run import digits_base

    base = digits_base(tmp_path_factory)
    convs = [n.name for n in onnx.load(str(base / "export" / "model.onnx")).graph.node if n.op_type == "Conv"]
    pin = convs[0]
    rec, report, out, _ = _stage_build(tmp_path, tmp_path_factory, monkeypatch, V11, int8_route="explicit",
                                       layer_precisions={pin: "fp32"})
    half = onnx.shape_inference.infer_shapes(onnx.load(str(out / "model.int8.onnx")))
    kinds = {v.name: v.type.tensor_type.elem_type for v in half.graph.value_info}
    node = next(n for n in half.graph.node if n.name == pin)
    assert kinds[node.output[0]] == onnx.TensorProto.FLOAT
    assert report.details["typed_onnx"]["keep_fp32"][pin] == "build.layer_precisions: fp32"
    assert report.details["layer_precisions"]["pinned"] == {pin: "fp32"} and rec.layer_precision == {}
