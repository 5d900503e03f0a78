"""Can an engine run here? pipeline.compat on manifests written by the real writer
(manifest.make_manifest, as publish calls it), and its GPU probes against fakes of what
they read: nvidia-smi (subprocess), libcuda (the ctypes library), cuda-python and pycuda
(modules), since this machine has no GPU.

The fakes behave like the real things where the probe depends on it: nvidia-smi prints a
header without --format=csv,noheader, refuses unknown fields, returns bytes without
text=True and nothing without capture_output; cuda-python returns (cudaError_t, value)
pairs; the driver writes through ctypes pointers."""

from __future__ import annotations

import ctypes
import enum
import subprocess
import sys
import types
from typing import Any, Optional

import pytest

from pipeline import compat
from pipeline.compat import check_runs_here, compat_findings, manifest_from_build_info, probe_here
from pipeline.errors import ArtifactError
from pipeline.manifest import make_manifest
from pipeline.reports import BuildReport
from pipeline.runtime import cuda_device

_LIBCUDA = cuda_device._libcuda  # lru-cached loader of the real library
H100 = {"index": 0, "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "multiprocessors": 132,
        "memory_bytes": 80 << 30, "driver": "550.54.15", "driver_cuda": "12.4", "cuda_runtime": "12.4"}
A100 = {"tensorrt": "8.6.1", "gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}


def trt_build(trt: str = "8.6.1", device: Optional[dict[str, Any]] = None) -> BuildReport:
    """build.json of a TensorRT engine built on `device` with TensorRT `trt`, as the TensorRT backend writes it."""
    dev = {**H100, **(device or {})}
    return BuildReport(
        model="digits-cnn", precision="fp16", backend="tensorrt", backend_version=trt, backend_requested="auto",
        artifact="model.engine", onnx_sha256="0" * 64, sha256="1" * 64, engine_bytes=4096, build_seconds=3.0,
        built_at="2026-12-01T00:00:00+00:00", environment={"backend": "tensorrt", "version": trt, "tensorrt": trt, "device": dev},
        flags=["FP16"], workspace_mb=1024)


def trt_manifest(trt: str = "8.6.1", device: Optional[dict[str, Any]] = None, software: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The manifest publish writes for that engine (publish's _software: the build's tensorrt,
    cuda runtime and driver), or with the `software` section given."""
    from pipeline.stages.publish import _software

    build = trt_build(trt, device)
    sw = _software(build, None) if software is None else software
    return make_manifest("digits-cnn", "fp16", build.model_dump(), inputs={"onnx": "2" * 64}, settings={"precision": "fp16"},
                         metrics={}, files={"model.engine": {"sha256": "1" * 64, "bytes": 4096, "role": "artifact"}},
                         software=sw)


# ------------------------------------------------------------------------------------ findings


def test_compat_refusal_names_both_sides_of_a_tensorrt_and_gpu_mismatch() -> None:
    """An engine for another TensorRT and another GPU is refused, naming both sides."""
    man = trt_manifest("8.6.1")
    assert man["software"]["tensorrt"] == "8.6.1" and man["hardware"]["compute_capability"] == "9.0"
    with pytest.raises(ArtifactError) as e:
        check_runs_here(man, {"tensorrt": "10.3.0", "compute_capability": "8.0", "gpu": "NVIDIA A100-SXM4-80GB"})
    assert str(e.value) == (
        "manifest: engine was built with TensorRT 8.6.1, this machine has TensorRT 10.3.0; "
        "rebuild the engine here (trtpipe build) or run it where TensorRT 8.6.1 is installed; "
        "engine was built for compute capability 9.0 (NVIDIA H100 80GB HBM3), this GPU is compute capability 8.0 "
        "(NVIDIA A100-SXM4-80GB); engines do not move between GPU architectures: rebuild it on this GPU")
    # Where the manifest came from leads the message.
    with pytest.raises(ArtifactError, match=r"^registry/x/manifest.json \(v1\): engine was built for compute capability 9.0"):
        check_runs_here(man, {"tensorrt": "8.6.1", "compute_capability": "sm_80"}, where="registry/x/manifest.json (v1)")
    # The same TensorRT and GPU architecture: runs (another GPU model of the same architecture too).
    check_runs_here(man, {"tensorrt": "8.6.1", "compute_capability": "9.0", "gpu": "NVIDIA H200"})


def test_compat_refusal_of_another_gpu_names_an_unknown_gpu_as_such() -> None:
    man = trt_manifest("8.6.1", device={"gpu": None})
    assert "gpu" not in man["hardware"]
    assert compat_findings(man, {"tensorrt": "8.6.1", "compute_capability": "8.6"}) == [
        "engine was built for compute capability 9.0 (unknown GPU), this GPU is compute capability 8.6 (unknown GPU); "
        "engines do not move between GPU architectures: rebuild it on this GPU"]


def test_compat_refusal_without_tensorrt_or_gpu_says_what_is_missing() -> None:
    man = trt_manifest("8.6.1")
    here = {"tensorrt": None, "tensorrt_error": "ModuleNotFoundError: No module named 'tensorrt'",
            "compute_capability": None, "gpu": None, "gpu_error": "the CUDA driver sees 0 GPU(s)"}
    assert compat_findings(man, here) == [
        "cannot run here: no TensorRT (ModuleNotFoundError: No module named 'tensorrt'); this engine needs TensorRT 8.6.1 "
        "on a GPU of compute capability 9.0 (NVIDIA H100 80GB HBM3): install trtpipe[tensorrt] on such a machine",
        "cannot run here: no CUDA GPU visible (the CUDA driver sees 0 GPU(s)); this engine needs compute capability 9.0 "
        "(NVIDIA H100 80GB HBM3)"]
    # Without a recorded reason, no empty parentheses.
    assert compat_findings(man, {"tensorrt": None, "compute_capability": None}) == [
        "cannot run here: no TensorRT; this engine needs TensorRT 8.6.1 on a GPU of compute capability 9.0 "
        "(NVIDIA H100 80GB HBM3): install trtpipe[tensorrt] on such a machine",
        "cannot run here: no CUDA GPU visible; this engine needs compute capability 9.0 (NVIDIA H100 80GB HBM3)"]
    with pytest.raises(ArtifactError) as e:
        check_runs_here(man, {"tensorrt": None, "compute_capability": None})
    assert str(e.value).count("; this engine needs") == 2 and str(e.value).startswith("manifest: cannot run here: no TensorRT;")


def test_tensorrt_versions_compare_on_three_parts() -> None:
    """TensorRT's build number (the 4th part) does not change the serialization format; the
    patch version does. A part without digits counts as 0."""
    man = trt_manifest("8.6.1.6")
    gpu = {"compute_capability": "9.0"}
    assert compat_findings(man, {"tensorrt": "8.6.1", **gpu}) == []
    assert compat_findings(man, {"tensorrt": "8.6.1.2", **gpu}) == []
    assert compat_findings(man, {"tensorrt": "8.6.0", **gpu}) == [
        "engine was built with TensorRT 8.6.1.6, this machine has TensorRT 8.6.0; rebuild the engine here "
        "(trtpipe build) or run it where TensorRT 8.6.1.6 is installed"]
    assert compat_findings(man, {"tensorrt": "8.61", **gpu}) != []  # not the same as 8.6.1
    dev = trt_manifest("8.6.dev")  # a development build: 8.6.0
    assert compat_findings(dev, {"tensorrt": "8.6.0", **gpu}) == []
    assert compat_findings(dev, {"tensorrt": "8.6.1", **gpu}) != []


def test_the_manifest_tensorrt_comes_from_software_else_backend_version() -> None:
    gpu = {"compute_capability": "9.0"}
    # A build.json turned into a manifest by the runtime (no backend_version key).
    man = manifest_from_build_info(trt_build("8.6.1").model_dump())
    assert "backend_version" not in man
    assert compat_findings(man, {"tensorrt": "10.3.0", **gpu}) == [
        "engine was built with TensorRT 8.6.1, this machine has TensorRT 10.3.0; rebuild the engine here "
        "(trtpipe build) or run it where TensorRT 8.6.1 is installed"]
    assert compat_findings(man, {"tensorrt": None, **gpu})[0].startswith("cannot run here: no TensorRT; this engine needs TensorRT 8.6.1 ")
    # A manifest whose software section does not name TensorRT: backend_version says which built it.
    bare = trt_manifest("8.6.1", software={"trtpipe": "0.1"})
    assert "tensorrt" not in bare["software"] and bare["backend_version"] == "8.6.1"
    assert compat_findings(bare, {"tensorrt": "10.3.0", **gpu})[0].startswith("engine was built with TensorRT 8.6.1, this machine has TensorRT 10.3.0")
    # The software section wins over backend_version when both are there.
    both = {**man, "backend_version": "8.5.3"}
    assert compat_findings(both, {"tensorrt": "8.6.1", **gpu}) == []


def test_partial_or_unknown_here_is_not_a_finding() -> None:
    man = trt_manifest("8.6.1")
    assert compat_findings(man, {}) == []  # nothing known about this machine: nothing to object to
    assert compat_findings(man, {"compute_capability": "sm_90"}) == []  # unknown TensorRT; sm_90 is 9.0
    assert compat_findings(man, {"tensorrt": "8.6.1"}) == []  # unknown GPU
    # A manifest that records no compute capability is not checked against the GPU.
    no_cc = {**man, "hardware": {}}
    assert compat_findings(no_cc, {"tensorrt": "8.6.1", "compute_capability": "8.0"}) == []


def test_onnxruntime_and_unknown_backends() -> None:
    ort = {"backend": "onnxruntime", "software": {"onnxruntime": "1.17.0"}, "hardware": {"cpu": "x86_64"}}
    assert compat_findings(ort, {"onnxruntime": "1.17.0", "tensorrt": None, "compute_capability": None}) == []
    assert compat_findings(ort, {"onnxruntime": None}) == ["cannot run here: onnxruntime does not import; pip install onnxruntime"]
    assert compat_findings(ort, {}) == []
    with pytest.raises(ArtifactError) as e:
        check_runs_here({"backend": "openvino"}, {})
    assert str(e.value) == "manifest: unknown backend 'openvino' in the manifest; this trtpipe runs tensorrt and onnxruntime artifacts"


# ------------------------------------------------------------------------------- nvidia-smi


class FakeNvidiaSmi:
    """subprocess.run for `nvidia-smi --id=N --query-gpu=... --format=csv[,noheader]`."""

    FIELDS = {"name": "gpu", "compute_cap": "compute_capability", "driver_version": "driver"}

    def __init__(self, gpus: list[dict[str, str]], hang: bool = False) -> None:
        self.gpus, self.hang, self.calls = gpus, hang, []

    def __call__(self, argv: list[str], capture_output: bool = False, text: Optional[bool] = None,
                 timeout: Optional[float] = None, **kw: Any) -> subprocess.CompletedProcess:
        self.calls.append(list(argv))
        if argv[0] != "nvidia-smi":
            raise FileNotFoundError(2, "No such file or directory", argv[0])
        if self.hang:
            if timeout is None:
                raise AssertionError("nvidia-smi hangs here: a probe without a timeout would wait forever")
            raise subprocess.TimeoutExpired(argv, timeout)
        rc, out = self._answer(argv[1:])
        stdout: Any = out if text else out.encode()
        return subprocess.CompletedProcess(argv, rc, stdout if capture_output else None, "" if capture_output else None)

    def _answer(self, args: list[str]) -> tuple[int, str]:
        opts = dict(a.split("=", 1) for a in args if "=" in a)
        if set(opts) != {"--id", "--query-gpu", "--format"} or len(opts) != len(args):
            return 2, "Invalid combination of input arguments. Please run 'nvidia-smi -h' for help.\n"
        fields = opts["--query-gpu"].split(",")
        bad = [f for f in fields if f not in self.FIELDS]
        if bad:
            return 2, f'Field "{bad[0]}" is not a valid field to query.\n'
        if opts["--format"] not in ("csv", "csv,noheader"):
            return 2, f'"{opts["--format"]}" is not a valid format.\n'
        ids = opts["--id"].split(",")
        if not all(i.isdigit() and int(i) < len(self.gpus) for i in ids):
            return 6, "No devices were found\n"
        lines = [] if opts["--format"].endswith("noheader") else [", ".join(fields)]
        lines += [", ".join(self.gpus[int(i)][self.FIELDS[f]] for f in fields) for i in ids]
        return 0, "\n".join(lines) + "\n"


TWO_GPUS = [{"gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0", "driver": "535.104.05"},
            {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "driver": "535.104.05"}]


@pytest.fixture
def smi(monkeypatch: pytest.MonkeyPatch) -> FakeNvidiaSmi:
    fake = FakeNvidiaSmi(TWO_GPUS)
    monkeypatch.setattr(cuda_device.subprocess, "run", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake


def test_nvidia_smi_probe_reports_the_gpu_asked_for(smi: FakeNvidiaSmi) -> None:
    assert cuda_device._gpu_nvidia_smi(0) == {"compute_capability": "8.0", "gpu": "NVIDIA A100-SXM4-80GB", "driver": "535.104.05"}
    assert cuda_device._gpu_nvidia_smi(1) == {"compute_capability": "9.0", "gpu": "NVIDIA H100 80GB HBM3", "driver": "535.104.05"}
    assert smi.calls[-1] == ["nvidia-smi", "--id=1", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"]
    assert cuda_device._gpu_nvidia_smi(2) is None  # "No devices were found" (exit 6): no answer from nvidia-smi


def test_nvidia_smi_probe_follows_cuda_visible_devices(smi: FakeNvidiaSmi, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # CUDA device 0 is the machine's GPU 1
    assert cuda_device._gpu_nvidia_smi(0)["gpu"] == "NVIDIA H100 80GB HBM3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", " 1 , 0 ")
    assert cuda_device._gpu_nvidia_smi(1)["gpu"] == "NVIDIA A100-SXM4-80GB"
    assert smi.calls[-1][1] == "--id=0"
    for visible, index in (("", 0), ("-1", 0), (" , ", 0), ("1", 1), ("1,0", 2)):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        n = len(smi.calls)
        assert cuda_device._gpu_nvidia_smi(index) == {"compute_capability": None, "gpu": None,
                                                  "gpu_error": f"CUDA_VISIBLE_DEVICES={visible!r}"}, visible
        assert len(smi.calls) == n  # decided without asking nvidia-smi


def test_nvidia_smi_missing_failing_or_hanging_is_no_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def missing(*a: Any, **k: Any) -> Any:
        raise FileNotFoundError(2, "No such file or directory", "nvidia-smi")

    monkeypatch.setattr(cuda_device.subprocess, "run", missing)
    assert cuda_device._gpu_nvidia_smi(0) is None
    monkeypatch.setattr(cuda_device.subprocess, "run", FakeNvidiaSmi([]))  # a driver without GPUs
    assert cuda_device._gpu_nvidia_smi(0) is None
    monkeypatch.setattr(cuda_device.subprocess, "run", FakeNvidiaSmi(TWO_GPUS, hang=True))
    assert cuda_device._gpu_nvidia_smi(0) is None  # given up after the timeout, not waited on forever

    def empty(argv: list[str], **k: Any) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(argv, 0, "  \n", "")

    monkeypatch.setattr(cuda_device.subprocess, "run", empty)
    assert cuda_device._gpu_nvidia_smi(0) is None


# ---------------------------------------------------------------------------------- libcuda


class FakeLibcuda:
    """The CUDA driver API as ctypes sees libcuda: CUresult return codes, results written
    through pointers."""

    def __init__(self, gpus: list[dict[str, Any]], init_rc: int = 0) -> None:
        self.gpus, self.init_rc = gpus, init_rc

    @staticmethod
    def _set(ref: Any, value: Any) -> None:
        ref._obj.value = value

    def cuInit(self, flags: Any) -> int:
        return self.init_rc

    def cuDeviceGetCount(self, ref: Any) -> int:
        self._set(ref, len(self.gpus))
        return 0

    def cuDeviceGet(self, ref: Any, ordinal: ctypes.c_int) -> int:
        if not 0 <= ordinal.value < len(self.gpus):
            return 101  # CUDA_ERROR_INVALID_DEVICE
        self._set(ref, ordinal.value)
        return 0

    def cuDeviceGetName(self, buf: Any, size: ctypes.c_int, dev: ctypes.c_int) -> int:
        buf.value = self.gpus[dev.value]["gpu"].encode()[: size.value - 1]
        return 0

    def cuDeviceTotalMem_v2(self, ref: Any, dev: ctypes.c_int) -> int:
        self._set(ref, 80 << 30)
        return 0

    def cuDriverGetVersion(self, ref: Any) -> int:
        self._set(ref, 12040)
        return 0

    def cuDeviceGetAttribute(self, ref: Any, attr: ctypes.c_int, dev: ctypes.c_int) -> int:
        major, minor = self.gpus[dev.value]["compute_capability"].split(".")
        self._set(ref, {75: int(major), 76: int(minor), 16: 132}[attr.value])
        return 0


@pytest.fixture
def libcuda(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Install a FakeLibcuda (call the returned function with the GPUs) for pipeline.runtime.cuda_device."""
    def install(gpus: list[dict[str, Any]], init_rc: int = 0) -> FakeLibcuda:
        fake = FakeLibcuda(gpus, init_rc)
        monkeypatch.setattr(cuda_device, "_libcuda", lambda: fake)
        monkeypatch.setattr(cuda_device, "_driver_release", lambda: "550.54.15")
        monkeypatch.setattr(cuda_device, "cuda_runtime_version", lambda: "12.4")
        cuda_device._init.cache_clear()
        return fake

    yield install
    cuda_device._init.cache_clear()


def test_libcuda_probe_reports_the_gpu_asked_for(libcuda: Any) -> None:
    libcuda([{"gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}, {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}])
    assert cuda_device._gpu_libcuda(1) == {"compute_capability": "9.0", "gpu": "NVIDIA H100 80GB HBM3", "driver": "550.54.15",
                                      "cuda_runtime": "12.4"}
    assert cuda_device._gpu_libcuda(0)["gpu"] == "NVIDIA A100-SXM4-80GB"
    assert cuda_device._gpu_libcuda(2) == {"compute_capability": None, "gpu": None, "gpu_error": "the CUDA driver sees 2 GPU(s)"}


def test_libcuda_probe_without_gpus_or_driver(libcuda: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    libcuda([], init_rc=100)  # CUDA_ERROR_NO_DEVICE: a driver, no GPU
    assert cuda_device._gpu_libcuda(0) == {"compute_capability": None, "gpu": None, "gpu_error": "the CUDA driver sees 0 GPU(s)"}
    libcuda([], init_rc=999)
    assert cuda_device._gpu_libcuda(0) == {"compute_capability": None, "gpu": None,
                                      "gpu_error": "the CUDA driver failed to initialize (cuInit returned CUresult 999)"}
    # No driver library at all: the first clause of the driver module's message (what, not the advice).
    monkeypatch.setattr(cuda_device, "_libcuda", _LIBCUDA.__wrapped__)  # uncached: CDLL is called

    def no_library(name: str, *a: Any, **k: Any) -> Any:
        raise OSError(f"{name}: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(cuda_device.ctypes, "CDLL", no_library)
    cuda_device._init.cache_clear()
    assert cuda_device._gpu_libcuda(0) == {"compute_capability": None, "gpu": None, "gpu_error": (
        "the NVIDIA driver library libcuda is not loadable (libcuda.so.1: cannot open shared object file: "
        "No such file or directory)")}


# ------------------------------------------------------------------------------ cuda-python


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorInvalidDevice = 101


def fake_cudart(gpus: list[dict[str, Any]], count_err: cudaError_t = cudaError_t.cudaSuccess,
                driver: tuple[cudaError_t, int] = (cudaError_t.cudaSuccess, 12020)) -> types.ModuleType:
    """cuda-python's runtime module: every call returns (cudaError_t, value)."""
    m = types.ModuleType("cuda.bindings.runtime")

    def cudaGetDeviceCount() -> tuple[cudaError_t, int]:
        return (count_err, 0) if count_err else (cudaError_t.cudaSuccess, len(gpus))

    def cudaGetDeviceProperties(device: int) -> tuple[cudaError_t, Any]:
        if not isinstance(device, int):
            raise TypeError(f"Argument 'device' has incorrect type (expected int, got {type(device).__name__})")
        if not 0 <= device < len(gpus):
            return cudaError_t.cudaErrorInvalidDevice, None
        g = gpus[device]
        return cudaError_t.cudaSuccess, types.SimpleNamespace(name=g["name"], major=g["major"], minor=g["minor"])

    m.cudaGetDeviceCount = cudaGetDeviceCount
    m.cudaGetDeviceProperties = cudaGetDeviceProperties
    m.cudaDriverGetVersion = lambda: driver
    return m


def install_cuda_python(monkeypatch: pytest.MonkeyPatch, runtime: types.ModuleType, new_layout: bool = True) -> None:
    cuda = types.ModuleType("cuda")
    if new_layout:  # cuda-python >= 12.6: cuda.bindings.runtime
        bindings = types.ModuleType("cuda.bindings")
        bindings.runtime = runtime
        cuda.bindings = bindings
        mods = {"cuda": cuda, "cuda.bindings": bindings, "cuda.bindings.runtime": runtime}
    else:  # older: cuda.cudart
        cuda.cudart = runtime
        mods = {"cuda": cuda, "cuda.bindings": None, "cuda.cudart": runtime}
    for k, v in mods.items():
        monkeypatch.setitem(sys.modules, k, v)


GPU_PROPS = [{"name": b"NVIDIA A100-SXM4-80GB\x00\x00\x00", "major": 8, "minor": 0},
             {"name": b"NVIDIA TITAN X\x00\x00", "major": 6, "minor": 1}]


def test_cuda_python_probe_reports_the_gpu_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    install_cuda_python(monkeypatch, fake_cudart(GPU_PROPS))
    assert cuda_device._gpu_cuda_python(0) == {"compute_capability": "8.0", "gpu": "NVIDIA A100-SXM4-80GB", "cuda_driver_api": "12.2"}
    # The name's trailing NULs go, and only those (a GPU name may end in X).
    assert cuda_device._gpu_cuda_python(1) == {"compute_capability": "6.1", "gpu": "NVIDIA TITAN X", "cuda_driver_api": "12.2"}


@pytest.mark.parametrize("version, text", [(12000, "12.0"), (12020, "12.2"), (11080, "11.8"), (13010, "13.1")])
def test_cuda_python_probe_reads_the_driver_api_version(version: int, text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    install_cuda_python(monkeypatch, fake_cudart(GPU_PROPS, driver=(cudaError_t.cudaSuccess, version)))
    assert cuda_device._gpu_cuda_python(0)["cuda_driver_api"] == text


def test_cuda_python_probe_names_and_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    # older cuda-python (cuda.cudart), a str name, no driver version
    props = [{"name": "Tesla T4", "major": 7, "minor": 5}]
    install_cuda_python(monkeypatch, fake_cudart(props, driver=(cudaError_t.cudaErrorInsufficientDriver, 0)), new_layout=False)
    assert cuda_device._gpu_cuda_python(0) == {"compute_capability": "7.5", "gpu": "Tesla T4"}
    # a name that is not UTF-8 is still a name
    install_cuda_python(monkeypatch, fake_cudart([{"name": b"GPU \xff\x00", "major": 9, "minor": 0}]))
    assert cuda_device._gpu_cuda_python(0)["gpu"] == "GPU \ufffd"
    # no GPU, or not the one asked for: say how many there are
    install_cuda_python(monkeypatch, fake_cudart([]))
    assert cuda_device._gpu_cuda_python(0) == {"compute_capability": None, "gpu": None,
                                          "gpu_error": f"cudaGetDeviceCount: {cudaError_t.cudaSuccess}, 0 devices"}
    install_cuda_python(monkeypatch, fake_cudart(props))
    assert cuda_device._gpu_cuda_python(1)["gpu_error"] == f"cudaGetDeviceCount: {cudaError_t.cudaSuccess}, 1 devices"
    install_cuda_python(monkeypatch, fake_cudart(props, count_err=cudaError_t.cudaErrorInsufficientDriver))
    assert cuda_device._gpu_cuda_python(0) == {"compute_capability": None, "gpu": None,
                                          "gpu_error": f"cudaGetDeviceCount: {cudaError_t.cudaErrorInsufficientDriver}, 0 devices"}
    # the device's properties cannot be read: no answer from cuda-python
    broken = fake_cudart(props)
    broken.cudaGetDeviceProperties = lambda device: (cudaError_t.cudaErrorInvalidDevice, None)
    install_cuda_python(monkeypatch, broken)
    assert cuda_device._gpu_cuda_python(0) is None
    # not installed
    monkeypatch.setitem(sys.modules, "cuda", None)
    assert cuda_device._gpu_cuda_python(0) is None


# ----------------------------------------------------------------------------------- pycuda


def install_pycuda(monkeypatch: pytest.MonkeyPatch, gpus: list[tuple[str, tuple[int, int]]], init_error: Optional[str] = None) -> None:
    driver = types.ModuleType("pycuda.driver")

    class Error(Exception):
        pass

    def init() -> None:
        if init_error:
            raise Error(init_error)

    class Device:
        @staticmethod
        def count() -> int:
            return len(gpus)

        def __init__(self, i: int) -> None:
            if not isinstance(i, int) or not 0 <= i < len(gpus):
                raise Error("cuDeviceGet failed: invalid device ordinal")
            self.i = i

        def name(self) -> str:
            return gpus[self.i][0]

        def compute_capability(self) -> tuple[int, int]:
            return gpus[self.i][1]

    driver.init, driver.Device, driver.Error = init, Device, Error
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = driver
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)


def test_pycuda_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    install_pycuda(monkeypatch, [("Tesla T4", (7, 5)), ("NVIDIA L4", (8, 9))])
    assert cuda_device._gpu_pycuda(1) == {"compute_capability": "8.9", "gpu": "NVIDIA L4"}
    assert cuda_device._gpu_pycuda(0) == {"compute_capability": "7.5", "gpu": "Tesla T4"}
    assert cuda_device._gpu_pycuda(2) == {"compute_capability": None, "gpu": None, "gpu_error": "2 CUDA devices"}
    install_pycuda(monkeypatch, [], init_error="cuInit failed: no CUDA-capable device is detected")
    assert cuda_device._gpu_pycuda(0) == {"compute_capability": None, "gpu": None,
                                     "gpu_error": "pycuda: cuInit failed: no CUDA-capable device is detected"}
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    assert cuda_device._gpu_pycuda(0) is None


# --------------------------------------------------------------------------------- probe_here


@pytest.fixture
def fresh_probe() -> Any:
    compat._probe.cache_clear()
    yield
    compat._probe.cache_clear()


def test_probe_here_takes_the_first_probe_that_finds_a_gpu(fresh_probe: None, libcuda: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    libcuda([{"gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}, {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}])
    install_cuda_python(monkeypatch, fake_cudart(GPU_PROPS))
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    here = probe_here()  # device 0 by default
    assert here["tensorrt"] == "8.6.1" and "tensorrt_error" not in here
    assert {k: here[k] for k in ("compute_capability", "gpu", "driver", "cuda_runtime")} == {
        "compute_capability": "8.0", "gpu": "NVIDIA A100-SXM4-80GB", "driver": "550.54.15", "cuda_runtime": "12.4"}
    assert probe_here(1)["gpu"] == "NVIDIA H100 80GB HBM3"
    assert "gpu_error" not in here
    # what probe_here reports feeds the compat check: an engine built on this A100 runs here, one built on an H100 does not
    assert compat_findings(trt_manifest("8.6.1", device={"gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}), here) == []
    assert "this GPU is compute capability 8.0 (NVIDIA A100-SXM4-80GB)" in compat_findings(trt_manifest("8.6.1"), here)[0]


def test_probe_here_falls_through_and_keeps_the_first_reason(fresh_probe: None, libcuda: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    libcuda([], init_rc=100)  # a driver that sees no GPU: the first reason
    install_cuda_python(monkeypatch, fake_cudart([]))
    install_pycuda(monkeypatch, [("NVIDIA L4", (8, 9))])  # pycuda finds one: it wins
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    here = probe_here()
    assert here["tensorrt"] is None and here["tensorrt_error"].startswith("ModuleNotFoundError: ")
    assert here["compute_capability"] == "8.9" and here["gpu"] == "NVIDIA L4"
    compat._probe.cache_clear()
    install_pycuda(monkeypatch, [])
    monkeypatch.setattr(cuda_device.subprocess, "run", FakeNvidiaSmi([]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    here = probe_here()
    assert (here["compute_capability"], here["gpu"], here["gpu_error"]) == (None, None, "the CUDA driver sees 0 GPU(s)")


def test_probe_here_reports_a_probe_that_crashes(fresh_probe: None, monkeypatch: pytest.MonkeyPatch) -> None:
    def _gpu_cuda_python(index: int) -> Any:
        raise RuntimeError("driver went away")

    for name in ("_gpu_libcuda", "_gpu_pycuda", "_gpu_nvidia_smi"):
        monkeypatch.setattr(cuda_device, name, lambda index: None)
    monkeypatch.setattr(cuda_device, "_gpu_cuda_python", _gpu_cuda_python)
    here = probe_here()
    assert (here["compute_capability"], here["gpu"], here["gpu_error"]) == (None, None, "cuda_python: driver went away")
    compat._probe.cache_clear()
    monkeypatch.setattr(cuda_device, "_gpu_cuda_python", lambda index: None)
    here = probe_here()
    assert (here["compute_capability"], here["gpu"], here["gpu_error"]) == (
        None, None, "no CUDA driver, cuda-python, pycuda or nvidia-smi found")


class _BrokenTensorRT(types.ModuleType):
    """An installed tensorrt whose libraries do not load (its version is never reached)."""

    @property
    def __version__(self) -> str:
        raise OSError("libnvinfer.so.8: cannot open shared object file: No such file or directory\nsee the install guide")


def test_probe_here_without_onnxruntime_or_with_a_broken_tensorrt(fresh_probe: None, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("_gpu_libcuda", "_gpu_cuda_python", "_gpu_pycuda", "_gpu_nvidia_smi"):
        monkeypatch.setattr(cuda_device, name, lambda index: None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setitem(sys.modules, "tensorrt", _BrokenTensorRT("tensorrt"))
    here = probe_here()
    assert here["onnxruntime"] is None and here["onnxruntime_error"] == "ModuleNotFoundError: import of onnxruntime halted; None in sys.modules"
    assert here["tensorrt"] is None
    assert here["tensorrt_error"] == "OSError: libnvinfer.so.8: cannot open shared object file: No such file or directory"
    # ... and the compat check names it
    assert compat_findings(trt_manifest("8.6.1"), here)[0].startswith(
        "cannot run here: no TensorRT (OSError: libnvinfer.so.8: cannot open shared object file: No such file or directory); ")
