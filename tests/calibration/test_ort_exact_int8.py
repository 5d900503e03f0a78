"""The CPU INT8 simulation is the Q/DQ model's own arithmetic on every CPU.

The graphs here are built so that onnxruntime's fused u8 x s8 integer kernels would
saturate their 16-bit pair sums on an x86 CPU without VNNI (activations and weights at
+-127: 255 * 127 * 2 > 32767), and with power-of-two scales, so that the
dequantize -> float op -> quantize semantics are exact in float32 and numpy computes them
bit for bit. Every entry point that runs a Q/DQ model to stand for TensorRT (the
onnxruntime backend's int8 runner, the stages' `ort_session`, tune's candidates) must give
exactly numpy's answer here, on an AVX2-only CPU and a VNNI one alike; and no session it
makes may let onnxruntime swap the float ops for its integer kernels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from calibration.ort_session import EXACT, FUSED, INTEGER_KERNELS, cpu_features, make_session

SX, SW, SY = 2.0 ** -7, 2.0 ** -7, 2.0 ** -1  # power-of-two scales: the float reference is exact
K = 64


def _q(x: np.ndarray, s: float) -> np.ndarray:
    return np.clip(np.round(x / s), -128, 127)  # np.round: half to even, as QuantizeLinear


def _inputs(n: int, seed: int) -> np.ndarray:
    """Activations at +-(120..127) quantization steps, signs in runs: pair sums far past int16."""
    rng = np.random.default_rng(seed)
    q = rng.integers(120, 128, size=(n, K)).astype(np.float32)
    sign = np.where(rng.random((n, 1)) < 0.5, -1.0, 1.0).astype(np.float32)
    return (q * sign * SX).astype(np.float32)


def _weights(m: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = rng.integers(120, 128, size=(K, m)).astype(np.int8)
    q[:, 1::2] *= -1  # both signs, so one output column saturates upward and its neighbour downward
    return q


def _qdq_model(path: Path, op: Any, w: np.ndarray, w_axis: int, x_shape: list, y_shape: list,
               extra: tuple = ()) -> Path:
    """x -> Q/DQ (sx) -> `op` with DQ(w, sw per channel along `w_axis`) -> Q/DQ (sy) -> out."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = w.shape[w_axis]
    f = lambda name, v: numpy_helper.from_array(np.asarray(v, np.float32), name)  # noqa: E731
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=w_axis),
        op,
        helper.make_node("QuantizeLinear", ["y", "sy", "z"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "sy", "z"], ["out"]),
    ]
    inits = [f("sx", SX), f("sy", SY), numpy_helper.from_array(np.asarray(0, np.int8), "z"),
             numpy_helper.from_array(w, "wq"), f("sw", np.full(m, SW)),
             numpy_helper.from_array(np.zeros(m, np.int8), "zw"), *(f(k, v) for k, v in extra)]
    g = helper.make_graph(nodes, f"saturating_{op.op_type.lower()}",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, y_shape)], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def _matmul_model(path: Path, wq: np.ndarray) -> Path:
    from onnx import helper

    return _qdq_model(path, helper.make_node("MatMul", ["xd", "wd"], ["y"]), wq, 1, ["n", K], ["n", wq.shape[1]])


def _conv_model(path: Path, wq: np.ndarray) -> Path:
    """A 1x1 Conv over K channels with the same numbers (NCHW, H=W=2)."""
    from onnx import helper

    m = wq.shape[1]
    return _qdq_model(path, helper.make_node("Conv", ["xd", "wd", "b"], ["y"]), wq.T.reshape(m, K, 1, 1), 0,
                      ["n", K, 2, 2], ["n", m, 2, 2], extra=(("b", np.zeros(m)),))


def _reference(x: np.ndarray, wq: np.ndarray) -> np.ndarray:
    """dequantize -> float MatMul -> quantize -> dequantize, in float64 (exact here)."""
    xd = _q(x.astype(np.float64), SX) * SX
    y = xd @ (wq.astype(np.float64) * SW)
    return (_q(y, SY) * SY).astype(np.float32)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sat")
    wq = _weights(16, seed=1)
    x = _inputs(64, seed=2)
    ref = _reference(x, wq)
    # the test is only meaningful if the exact answer needs 32-bit sums: u8 x s8 pairs past int16
    pair = (np.abs(_q(x, SX)[:, :2]) + 128) @ np.abs(wq[:2].astype(np.float64))
    assert pair.max() > 32767
    assert np.abs(ref).max() > 16  # and the outputs are far from zero
    return folder, wq, x, ref


def test_exact_session_equals_numpy_bit_for_bit_matmul_and_conv(case):
    folder, wq, x, ref = case
    got = make_session(_matmul_model(folder / "mm.onnx", wq)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, ref)
    xc = np.repeat(np.repeat(x[:, :, None, None], 2, 2), 2, 3)
    got = make_session(_conv_model(folder / "conv.onnx", wq)).run(None, {"x": xc})[0]
    np.testing.assert_array_equal(got, np.repeat(np.repeat(ref[:, :, None, None], 2, 2), 2, 3))


def _optimized_ops(path: Path, mode: str, tmp: Path) -> set[str]:
    import onnx

    out = tmp / f"optimized-{mode}.onnx"
    make_session(path, mode=mode, level="extended", optimized_path=out)
    return {n.op_type for n in onnx.load(str(out)).graph.node}


def test_exact_mode_keeps_float_ops_where_fused_mode_swaps_in_integer_kernels(case, tmp_path):
    """A check that fails on any CPU: onnxruntime's fusion is CPU-independent, only its
    numbers are not. The exact session's optimized graph has no integer kernel; the fused
    one has (so this test sees fusion when it happens)."""
    folder, wq, _, _ = case
    for model in (_matmul_model(folder / "mm.onnx", wq), _conv_model(folder / "conv.onnx", wq)):
        exact, fused = _optimized_ops(model, EXACT, tmp_path), _optimized_ops(model, FUSED, tmp_path)
        assert not exact & INTEGER_KERNELS, exact
        assert fused & INTEGER_KERNELS, fused


def test_every_entry_point_that_stands_for_tensorrt_is_exact(case, tmp_path, monkeypatch):
    """The onnxruntime backend's int8 runner and the stages' ort_session (calibrate's check,
    validate, tune's sensitivity and candidates): each answers exactly as numpy, and every
    session they make has QDQ fusion off."""
    import onnxruntime as ort

    from pipeline.backends.onnxruntime_backend import OrtRunner
    from pipeline.onnx_utils import ort_session  # calibrate's check, validate, tune and its candidates use it

    folder, wq, x, ref = case
    path = _matmul_model(folder / "mm.onnx", wq)
    made: list[str] = []
    real = ort.InferenceSession

    def recording(model, sess_options=None, *a, **k):
        made.append(sess_options.get_session_config_entry("session.disable_quant_qdq"))
        return real(model, sess_options, *a, **k)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    runner = OrtRunner(path)
    np.testing.assert_array_equal(runner.infer({"x": x})["out"], ref)
    np.testing.assert_array_equal(ort_session(path).run(None, {"x": x})[0], ref)
    assert runner.device()["int8_semantics"].startswith("exact")
    assert made == ["1", "1"]


_ON_ANOTHER_CPU = """
import sys, numpy as np
from calibration.ort_session import make_session
x, ref = np.load(sys.argv[2]), np.load(sys.argv[3])
for mode in ("exact", "fused"):
    got = make_session(sys.argv[1], mode=mode).run(None, {"x": x})[0]
    print(mode, float(np.abs(got - ref).max()))
"""


@pytest.mark.slow
def test_without_vnni_the_fused_kernels_saturate_and_the_exact_session_does_not(case, tmp_path):
    """Why exact mode exists, on an x86 CPU without an int8 dot-product instruction: the
    fused kernels are far off on these graphs, the exact session is bit for bit numpy. Runs
    natively on such a CPU, else under qemu-user emulating a Haswell (AVX2, no AVX-512, no
    VNNI: onnxruntime picks its kernels by CPUID, which qemu emulates)."""
    import os
    import shutil
    import subprocess
    import sys

    c = cpu_features()
    if c["machine"] != "x86_64":
        pytest.skip(f"the saturation is an x86 kernel's; this CPU is {c['machine']}")
    cmd = [sys.executable]
    if c["int8_dot"]:
        qemu = shutil.which("qemu-x86_64")
        if not qemu:
            pytest.skip(f"this CPU has an int8 dot-product instruction ({' '.join(c['flags'])}) and qemu-user is not "
                        "installed to emulate one without (apt-get install qemu-user)")
        cmd = [qemu, "-cpu", "Haswell", os.path.realpath(sys.executable)]
    folder, wq, x, ref = case
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "ref.npy", ref)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), *sys.path])}
    run = subprocess.run([*cmd, "-c", _ON_ANOTHER_CPU, str(_matmul_model(folder / "mm.onnx", wq)),
                          str(tmp_path / "x.npy"), str(tmp_path / "ref.npy")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    diff = dict(line.split() for line in run.stdout.splitlines() if line.startswith(("exact", "fused")))
    assert float(diff["exact"]) == 0.0
    assert float(diff["fused"]) > 10 * SY  # many output steps off: the 16-bit pair sums saturated


def test_cpu_features_name_the_int8_relevant_flags():
    c = cpu_features()
    assert c["model"] and c["machine"] and c["cores"] >= 1
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").is_file() else set()
    for f in c["flags"]:
        assert f in flags or not flags
    assert c["int8_dot"] == bool({"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"} & (flags or set(c["flags"])))


def test_a_model_past_the_inline_limit_goes_through_a_file(monkeypatch):
    """make_session serializes a ModelProto once; one at or past the inline limit (protobuf's
    2 GiB, or EncodeError when serializing fails there) is saved with external data and loaded
    from that file, giving the same outputs."""
    from google.protobuf.message import EncodeError
    from onnx import TensorProto, helper, numpy_helper

    import calibration.ort_session as ort_session

    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.ones((2, 3), np.float32)
    want = make_session(model).run(None, {"x": x})[0]
    np.testing.assert_array_equal(want, x @ np.arange(12, dtype=np.float32).reshape(3, 4))
    through_file = []
    real = ort_session._session_from_file

    def spy(*args, **kwargs):
        through_file.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(ort_session, "_session_from_file", spy)
    monkeypatch.setattr(ort_session, "_INLINE_LIMIT", 10)  # this small model is "too large" to pass inline
    np.testing.assert_array_equal(make_session(model).run(None, {"x": x})[0], want)
    assert through_file == [True]

    class Unserializable:
        def SerializeToString(self):
            raise EncodeError("Failed to serialize proto")

    monkeypatch.setattr(ort_session, "_INLINE_LIMIT", 2_000_000_000)
    monkeypatch.setattr(ort_session, "_session_from_file", lambda m, so, what, error: ("file", m))
    marker = Unserializable()
    assert make_session(marker) == ("file", marker)
