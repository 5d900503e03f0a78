"""The bad-input and fault matrix: what a new user and a tester do wrong, each case run
through the command line on a finished CPU pipeline. Every case asserts

* the exit status (1 for bad input and failed checks, 2 for usage and unusable reports),
* one line on stderr, naming the file, key or tensor at fault (and no traceback),
* that artifacts/ is byte-identical afterwards where nothing should have been written.

Categories: config, checkpoint and factories, data, ONNX and artifacts (provenance),
manifests and registry, gate reports, disk full. Concurrency and kill -9 live in
test_interrupts.py."""

from __future__ import annotations

import json
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pytest

from tests._project import edit_yaml, snapshot, trtpipe

CFG = "configs/digits.yaml"
A = Path("artifacts")


# -- setups -------------------------------------------------------------------------------------
def cfg(fn: Callable[[dict], None]) -> Callable[[], None]:
    return lambda: edit_yaml(CFG, fn)


def cfg_text(old: str, new: str) -> Callable[[], None]:
    def setup() -> None:
        text = Path(CFG).read_text()
        assert old in text, old
        Path(CFG).write_text(text.replace(old, new))
    return setup


def params(fn: Callable[[dict], None]) -> Callable[[], None]:
    return lambda: edit_yaml("params.yaml", fn)


def module(name: str, source: str) -> Callable[[], None]:
    def setup() -> None:
        import importlib
        import sys

        Path(f"{name}.py").write_text(textwrap.dedent(source))
        sys.modules.pop(name, None)  # another case's module of the same name
        importlib.invalidate_caches()
    return setup


def npz(path: str, **arrays: Any) -> None:
    np.savez(path, **arrays)


def digits_npz(path: str = "d.npz", n: int = 200, **over: Any) -> dict[str, Any]:
    from sklearn.datasets import load_digits

    d = load_digits()
    arrays = {"x": d.images[:n, None].astype(np.float32), "y": d.target[:n]}
    arrays.update(over)
    np.savez(path, **arrays)
    return arrays


def use_npz(path: str = "d.npz", **data: Any) -> None:
    edit_yaml(CFG, lambda d: d["data"].update({"source": "npz", "path": path, **data}))


def chain(*steps: Callable[[], None]) -> Callable[[], None]:
    def setup() -> None:
        for s in steps:
            s()
    return setup


def rewrite_onnx(path: Path, doc: str = "edited") -> None:
    import onnx

    m = onnx.load(str(path))
    m.doc_string = doc  # a valid model with other bytes
    onnx.save(m, str(path))


def edit_json(path: Path, fn: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data, indent=2))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def version_dir(precision: str) -> Path:
    return next(p for p in (A / "registry" / "digits-cnn").iterdir() if f"-{precision}-" in p.name)


def edit_manifest(precision: str, fn: Callable[[dict], None]) -> Callable[[], None]:
    def setup() -> None:
        vdir = version_dir(precision)
        os.chmod(vdir / "manifest.json", 0o644)
        edit_json(vdir / "manifest.json", fn)
    return setup


def swap_in_fp16_model() -> None:
    """Replace the fp32 version's model.onnx with the fp16 one and fix its hash in the manifest."""
    from pipeline.fileio import sha256_file

    v32, v16 = version_dir("fp32"), version_dir("fp16")
    os.chmod(v32 / "model.onnx", 0o644)
    (v32 / "model.onnx").write_bytes((v16 / "model.onnx").read_bytes())

    def fix(m: dict) -> None:
        m["files"]["model.onnx"].update(sha256=sha256_file(v32 / "model.onnx"), bytes=(v32 / "model.onnx").stat().st_size)
        from pipeline.manifest import content_digest

        m["content_digest"] = content_digest(m)  # even with its own digest recomputed
    edit_manifest("fp32", fix)()


def recompute_digest_after(fn: Callable[[dict], None]) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        from pipeline.manifest import content_digest

        fn(m)
        m["content_digest"] = content_digest(m)
    return edit


# -- cases -----------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    argv: tuple[str, ...]
    fragments: tuple[str, ...]
    setup: Optional[Callable[[], None]] = None
    code: int = 1
    stdout: tuple[str, ...] = ()  # e.g. verify's per-version findings
    writes: bool = False  # the command may write (a report), so artifacts/ is not compared
    usage: bool = False  # argparse's own usage error: its usage line, then the one error line
    marks: tuple[Any, ...] = field(default_factory=tuple)


PREP = ("prepare",)
CASES = [
    # -- config ------------------------------------------------------------------------------------
    Case("config-misspelt-key", PREP, ("unknown key 'export.opsett'", CFG), cfg(lambda d: d["export"].update(opsett=17))),
    Case("config-wrong-type", PREP, ("'validate.num_samples'", "valid integer", "two hundred"),
         cfg(lambda d: d["validate"].update(num_samples="two hundred"))),
    Case("config-lr-inf", PREP, ("'model.train.lr'", "not a finite number"), cfg_text("lr: 0.003", "lr: .inf")),
    Case("config-lr-nan", PREP, ("'model.train.lr'", "not a finite number"), cfg_text("lr: 0.003", "lr: .nan")),
    Case("config-atol-nan", ("validate",), ("'validate.atol'", "not a finite number"), cfg_text("atol: 1.0e-4", "atol: .nan")),
    Case("config-min-cosine-inf", ("validate",), ("'validate.min_cosine'",), cfg_text("min_cosine: 0.99999", "min_cosine: .inf")),
    Case("config-percentile-nan", ("calibrate",), ("'calibration.percentile'", "not a finite number"),
         params(lambda p: p["calibration"].update(percentile=float("nan")))),
    Case("config-floor-nan", ("evaluate", "--precision", "int8"), ("'evaluate.agreement_floor.cosine'", "finite"),
         cfg(lambda d: d["evaluate"].update(agreement_floor={"cosine": float("nan")}))),
    Case("config-file-missing", PREP, ("configs/nope.yaml: config file not found",),
         params(lambda p: p.update(config="configs/nope.yaml"))),
    Case("config-bad-yaml", PREP, (CFG, "not valid YAML"), lambda: Path(CFG).write_text("model: [unclosed\n")),
    Case("config-params-without-config", PREP, ("params.yaml: no 'config:' key",), params(lambda p: p.pop("config"))),
    Case("config-zero-dimension", PREP, ("'model.inputs.0.shape'", "positive integer"),
         cfg(lambda d: d["model"]["inputs"][0].update(shape=[1, 0, 8]))),
    Case("config-unknown-dtype", PREP, ("'model.inputs.0.dtype'", "int8"),
         cfg(lambda d: d["model"]["inputs"][0].update(dtype="int8"))),
    Case("config-duplicate-inputs", PREP, ("model.inputs names 'input' twice",),
         cfg(lambda d: d["model"]["inputs"].append(dict(d["model"]["inputs"][0])))),
    Case("config-input-and-inputs", PREP, ("either model.input (one input) or model.inputs",),
         cfg(lambda d: d["model"].update(input={"shape": [1, 8, 8]}))),
    Case("config-profile-and-profiles", PREP, ("either build.profile (batch only) or build.profiles",),
         cfg(lambda d: d["build"].update(profiles=[{"batch": [1, 2, 4]}]))),
    Case("config-profile-order", PREP, ("min_batch <= opt_batch <= max_batch",),
         cfg(lambda d: d["build"].update(profile={"min_batch": 8, "opt_batch": 4, "max_batch": 2}))),
    Case("config-empty-registry", PREP, ("'publish.registry'", "at least 1 character"),
         cfg(lambda d: d["publish"].update(registry=""))),
    Case("config-bad-trt-version", ("calibrate",), ("'calibration.tensorrt_version'",),
         cfg(lambda d: d["calibration"].update(tensorrt_version="eight"))),
    Case("config-labels-key-is-an-input", PREP, ("data.labels_key 'input' is also an input name",),
         cfg(lambda d: d["data"].update(labels_key="input"))),
    Case("config-pad-value-unknown-input", PREP, ("data.pad_value names 'ids'",),
         cfg(lambda d: d["data"].update(pad_value={"ids": 0}))),
    Case("config-pad-to-unknown-axis", PREP, ("data.pad_to names axis 'seq'",),
         cfg(lambda d: d["data"].update(pad_to={"seq": 16}))),
    Case("config-unknown-metric", ("evaluate", "--precision", "fp32"), ("'accuracy' is neither a built-in",),
         cfg(lambda d: d["evaluate"].update(metrics=["accuracy"]))),
    Case("config-bad-floor-key", ("compare",), ("'snr' is not one of cosine",),
         cfg(lambda d: d["evaluate"].update(agreement_floor={"snr": 30}))),
    Case("config-batch-axis-inside-shape", PREP, ("'batch' is the leading batch axis",),
         cfg(lambda d: d["model"]["inputs"][0].update(shape=[1, "batch", 8]))),
    Case("config-factory-without-colon", PREP, ("model.arch must be 'module:function'",),
         cfg(lambda d: d["model"].update(source="factory", arch="mymodels"))),
    Case("config-empty-timing-cache", ("build", "--precision", "fp32"), ("'build.timing_cache'",),
         cfg(lambda d: d["build"].update(timing_cache=""))),
    Case("config-preprocess-dtype-clash", PREP, ("data.preprocess.dtype is float16 but input 'input' is float32",),
         cfg(lambda d: d["data"]["preprocess"].update(dtype="float16"))),
    # -- checkpoint and factories ---------------------------------------------------------------------
    Case("checkpoint-missing", PREP, ("weights/missing.pt: checkpoint not found",),
         cfg(lambda d: d["model"].update(checkpoint="weights/missing.pt"))),
    Case("checkpoint-text-file", PREP, ("notes.pt: not a PyTorch checkpoint",),
         chain(lambda: Path("notes.pt").write_text("these are my notes\n" * 10),
               cfg(lambda d: d["model"].update(checkpoint="notes.pt")))),
    Case("checkpoint-other-architecture", PREP, ("other.pt: checkpoint does not fit model.arch",),
         chain(lambda: __import__("torch").save(__import__("torchvision").models.resnet18(num_classes=10).state_dict(), "other.pt"),
               cfg(lambda d: d["model"].update(checkpoint="other.pt")))),
    Case("checkpoint-not-a-state-dict", PREP, ("list.pt: expected a state_dict",),
         chain(lambda: __import__("torch").save([1, 2, 3], "list.pt"), cfg(lambda d: d["model"].update(checkpoint="list.pt")))),
    Case("factory-module-missing", PREP, ("model.arch 'no_such_models:make'", "cannot import module"),
         cfg(lambda d: d["model"].update(source="factory", arch="no_such_models:make", checkpoint="artifacts/prepare/model.pt"))),
    Case("factory-function-missing", PREP, ("model.arch 'mymodels:nope'", "has no callable 'nope'"),
         chain(module("mymodels", "def make():\n    return None\n"),
               cfg(lambda d: d["model"].update(source="factory", arch="mymodels:nope", checkpoint="artifacts/prepare/model.pt")))),
    Case("factory-raises", PREP, ("model.arch 'mymodels:make' raised RuntimeError: no GPU weights here",),
         chain(module("mymodels", "def make():\n    raise RuntimeError('no GPU weights here')\n"),
               cfg(lambda d: d["model"].update(source="factory", arch="mymodels:make", checkpoint="artifacts/prepare/model.pt")))),
    Case("factory-returns-non-module", PREP, ("model.arch 'mymodels:make' returned dict, not a torch.nn.Module",),
         chain(module("mymodels", "def make():\n    return {'conv': 1}\n"),
               cfg(lambda d: d["model"].update(source="factory", arch="mymodels:make", checkpoint="artifacts/prepare/model.pt")))),
    Case("torchvision-unknown-arch", PREP, ("model.arch 'resnet9000': not a torchvision model",),
         cfg(lambda d: d["model"].update(source="torchvision", arch="resnet9000", checkpoint="artifacts/prepare/model.pt"))),
    Case("torchvision-without-checkpoint", PREP, ("model.checkpoint is not set for model.source 'torchvision'",),
         cfg(lambda d: d["model"].update(source="torchvision", arch="resnet18"))),
    # -- data -------------------------------------------------------------------------------------------
    Case("data-npz-missing", PREP, ("nope.npz: data file not found (data.path)",), lambda: use_npz("nope.npz")),
    Case("data-npz-without-x", PREP, ("images.npz: an .npz dataset needs an array per model input named 'input' (or 'x')",),
         chain(lambda: npz("images.npz", images=np.zeros((40, 1, 8, 8))), lambda: use_npz("images.npz"))),
    Case("data-npz-truncated", PREP, ("cut.npz: cannot read as npz",),
         chain(lambda: digits_npz("cut.npz"), lambda: truncate(Path("cut.npz")), lambda: use_npz("cut.npz"))),
    Case("data-string-labels", PREP, ("labels have dtype <U", "map class names to indices"),
         chain(lambda: digits_npz(y=np.array(["cat"] * 200)), lambda: use_npz())),
    Case("data-label-99", PREP, ("label 99 is outside 0..9 (model.num_classes 10)",),
         chain(lambda: digits_npz(y=np.r_[np.full(1, 99), np.zeros(199, int)]), lambda: use_npz())),
    Case("data-label-negative", PREP, ("label -1 is outside 0..9",),
         chain(lambda: digits_npz(y=np.r_[np.full(1, -1), np.zeros(199, int)]), lambda: use_npz())),
    Case("data-label-nan", PREP, ("label", "is nan; labels must be finite numbers"),
         chain(lambda: digits_npz(y=np.r_[np.nan, np.zeros(199)]), lambda: use_npz())),
    Case("data-100-labels-for-1797", PREP, ("100 labels for 200 samples; give one label per sample",),
         chain(lambda: digits_npz(y=np.zeros(100, int)), lambda: use_npz())),
    Case("data-complex-input", PREP, ("input 'input' data has dtype complex", "give real numbers"),
         chain(lambda: digits_npz(x=np.zeros((200, 1, 8, 8), np.complex64)), lambda: use_npz())),
    Case("data-nan-input", PREP, ("contains NaN or Inf after preprocessing",),
         chain(lambda: digits_npz(x=np.full((200, 1, 8, 8), np.nan, np.float32)), lambda: use_npz())),
    Case("data-wrong-shape", PREP, ("samples of input 'input' have shape [1, 9, 9], the model expects [1, 8, 8]",),
         chain(lambda: digits_npz(x=np.zeros((200, 1, 9, 9), np.float32)), lambda: use_npz())),
    Case("data-empty", PREP, ("empty.npz", "dataset is empty"),
         chain(lambda: npz("empty.npz", x=np.zeros((0, 1, 8, 8), np.float32)), lambda: use_npz("empty.npz"))),
    Case("data-image-folder-missing", PREP, ("photos: image folder not found (data.path)",),
         cfg(lambda d: d["data"].update(source="image_folder", path="photos"))),
    Case("data-factory-raises", PREP, ("data.path 'mydata:batches' raised ValueError at batch 2: corrupt shard 2",),
         chain(module("mydata", """
                 import numpy as np
                 def batches():
                     for i in range(5):
                         if i == 2:
                             raise ValueError("corrupt shard 2")
                         yield np.zeros((16, 1, 8, 8), np.float32), np.zeros(16, int)
               """), cfg(lambda d: d["data"].update(source="factory", path="mydata:batches")))),
    Case("data-factory-empty", PREP, ("mydata:batches: the factory yielded no batches",),
         chain(module("mydata", "def batches():\n    return iter([])\n"),
               cfg(lambda d: d["data"].update(source="factory", path="mydata:batches")))),
    Case("data-factory-triple", PREP, ("mydata:batches: batch 0 is a sequence of 3 items",),
         chain(module("mydata", "import numpy as np\ndef batches():\n    yield (np.zeros((2, 1, 8, 8)), np.zeros(2), np.zeros(2))\n"),
               cfg(lambda d: d["data"].update(source="factory", path="mydata:batches")))),
    Case("data-too-few-to-split", PREP, ("samples are too few to split",),
         chain(lambda: digits_npz(n=3), lambda: use_npz())),
    Case("data-calibration-is-evaluation", PREP, ("calibration must not overlap evaluation",),
         chain(lambda: digits_npz(), lambda: use_npz(calibration_path="d.npz"))),
    Case("data-float-for-int-input", PREP, ("input 'input' data has dtype float32, but the input is int64",),
         chain(lambda: digits_npz(), lambda: use_npz(),
               cfg(lambda d: d["model"]["inputs"][0].update(dtype="int64")))),
    # -- ONNX and artifacts: provenance ---------------------------------------------------------------
    Case("validate-corrupt-onnx", ("validate",), ("artifacts/export/model.onnx: not a readable ONNX model",),
         lambda: (A / "export" / "model.onnx").write_bytes(b"\x08\x07this is not protobuf" * 50)),
    Case("validate-edited-onnx", ("validate",), ("model.onnx: the ONNX model is not the file export wrote", "re-run export"),
         lambda: rewrite_onnx(A / "export" / "model.onnx")),
    Case("validate-truncated-eval", ("validate",), ("eval.npz", "re-run prepare"),
         lambda: truncate(A / "prepare" / "eval.npz")),
    Case("validate-eval-without-input", ("validate", "--eval-data", "mine.npz"),
         ("mine.npz: evaluation data has no array for input(s) ['input']",),
         lambda: npz("mine.npz", x=np.zeros((300, 1, 8, 8), np.float32))),
    Case("validate-eval-changed", ("validate",), ("eval.npz: eval.npz is not the file prepare wrote", "re-run prepare"),
         lambda: npz(str(A / "prepare" / "eval.npz"), input=np.zeros((359, 1, 8, 8), np.float32), y=np.zeros(359, int))),
    Case("validate-other-checkpoint", ("validate", "--checkpoint", "other.pt"),
         ("was exported from another checkpoint than other.pt", "re-run export"),
         lambda: __import__("torch").save(__import__("pipeline.models", fromlist=["digits_cnn"]).digits_cnn().state_dict(), "other.pt")),
    Case("validate-atol-exceeded", ("validate",),
         ("ONNX disagrees with PyTorch", "output 'logits': max abs diff", "> atol 1e-12"),
         cfg_text("atol: 1.0e-4", "atol: 1.0e-12"), writes=True),
    Case("calibrate-not-validated", ("calibrate",), ("validate.json: validation report not found", "dvc repro validate"),
         lambda: (A / "validate" / "validate.json").unlink()),
    Case("calibrate-validation-failed", ("calibrate",), ("the ONNX failed validation (outputs logits beyond tolerance)",),
         lambda: edit_json(A / "validate" / "validate.json", lambda v: (v.update(passed=False), v["outputs"]["logits"].update(passed=False)))),
    Case("calibrate-calib-data-changed", ("calibrate",), ("calib.npz: calib.npz is not the file prepare wrote",),
         lambda: npz(str(A / "prepare" / "calib.npz"), input=np.ones((359, 1, 8, 8), np.float32))),
    Case("calibrate-fewer-than-a-batch", ("calibrate", "--calib-data", "few.npz"),
         ("few.npz: 10 calibration samples are fewer than one batch of 32",),
         lambda: npz("few.npz", input=np.zeros((10, 1, 8, 8), np.float32))),
    Case("calibrate-exclude-matches-nothing", ("calibrate",), ("calibration.exclude", "'/no/such/*'", "matches no"),
         cfg(lambda d: d["calibration"].update(exclude=["/no/such/*"]))),
    Case("build-edited-onnx", ("build", "--precision", "fp32"), ("the ONNX model is not the file validate wrote",),
         lambda: rewrite_onnx(A / "export" / "model.onnx")),
    Case("build-int8-qdq-tampered", ("build", "--precision", "int8"), ("model.qdq.onnx is not the file calibrate wrote",),
         lambda: rewrite_onnx(A / "calibrate" / "model.qdq.onnx")),
    Case("build-int8-calibrated-other-onnx", ("build", "--precision", "int8"), ("calibrated another ONNX", "re-run calibrate"),
         lambda: edit_json(A / "calibrate" / "calibrate.json", lambda c: c["sha256"].update(onnx="0" * 64))),
    Case("build-tensorrt-without-tensorrt", ("build", "--precision", "fp32"), ("build.backend is 'tensorrt' but tensorrt does not import",),
         params(lambda p: p["build"].update(backend="tensorrt"))),
    Case("evaluate-artifact-tampered", ("evaluate", "--precision", "fp16"), ("the fp16 artifact is not the file build@fp16 wrote",),
         lambda: rewrite_onnx(A / "build" / "fp16" / "model.onnx")),
    Case("evaluate-reference-corrupt", ("evaluate", "--precision", "fp32"), ("reference.npz", "re-run validate"),
         lambda: (A / "validate" / "reference.npz").write_bytes(b"PK\x03\x04 broken")),
    Case("evaluate-build-report-missing", ("evaluate", "--precision", "int8"), ("int8/build.json: build report not found",),
         lambda: (A / "build" / "int8" / "build.json").unlink()),
    Case("evaluate-build-report-old-schema", ("evaluate", "--precision", "int8"), ("build report has schema_version 1",),
         lambda: edit_json(A / "build" / "int8" / "build.json", lambda b: b.update(schema_version=1))),
    Case("evaluate-build-report-without-max-batch-key", ("evaluate", "--precision", "int8"),
         ("build report does not have the expected form (profile", "re-run build"),
         lambda: edit_json(A / "build" / "int8" / "build.json", lambda b: b.update(profile={"max_batch": 16}))),
    Case("compare-eval-without-agreement", ("compare",), ("fp16.json: evaluation report does not have the expected form (agreement_fp32",),
         lambda: edit_json(A / "eval" / "fp16.json", lambda e: e.pop("agreement_fp32")), code=2),
    Case("compare-evals-of-other-data", ("compare",), ("the evaluations used different evaluation data",),
         lambda: edit_json(A / "eval" / "fp16.json", lambda e: e["sha256"].update(eval_data="0" * 64)), code=2),
    # -- manifests and registry -------------------------------------------------------------------------
    Case("publish-cache-changed-after-calibrate", ("publish",), ("calibration.cache is not the file calibrate wrote",),
         lambda: truncate(A / "calibrate" / "calibration.cache", 0.05)),
    Case("publish-truncated-cache", ("publish",), ("will not publish this calibration cache", "is not '<tensor name>: <hex float32"),
         lambda: (truncate(A / "calibrate" / "calibration.cache", 0.5), edit_json(
             A / "calibrate" / "calibrate.json", lambda c: c["sha256"].update(**{"calibration.cache": __import__(
                 "pipeline.fileio", fromlist=["sha256_file"]).sha256_file(A / "calibrate" / "calibration.cache")})))),
    Case("publish-cache-other-tensorrt", ("publish",), ("calibration.cache: calibration.cache is not the file calibrate wrote",),
         lambda: (A / "calibrate" / "calibration.cache").write_text(
             (A / "calibrate" / "calibration.cache").read_text().replace("TRT-8600-", "TRT-100300-"))),
    Case("publish-empty-registry-option", ("publish", "--registry", ""), ("argument --registry: is empty",), code=2, usage=True),
    Case("publish-registry-symlink-out", ("publish",), ("'artifacts/registry' resolves to", "outside the project"),
         lambda: (os.rename(A / "registry", "/tmp/elsewhere-registry-%d" % os.getpid()),
                  os.symlink("/tmp/elsewhere-registry-%d" % os.getpid(), A / "registry"))),
    Case("publish-out-dotdot", ("publish", "--out", "../published.json"), ("'../published.json' resolves to", "outside the project")),
    Case("verify-edited-metrics", ("artifacts", "verify", "--integrity-only"), ("1 of 3 version(s) failed",),
         edit_manifest("int8", lambda m: m["metrics"]["task"].update(top1=99.99)),
         stdout=("content_digest does not match", "metrics changed")),
    Case("verify-edited-metrics-digest-recomputed", ("artifacts", "verify", "--integrity-only"), ("1 of 3 version(s) failed",),
         edit_manifest("int8", recompute_digest_after(lambda m: m["metrics"]["task"].update(top1=99.99))),
         stdout=("manifest content differs from what was published: metrics changed",)),
    Case("verify-edited-hardware", ("artifacts", "verify", "--integrity-only"), ("failed",),
         edit_manifest("fp16", recompute_digest_after(lambda m: m["hardware"].update(cpu="a bigger one"))),
         stdout=("hardware changed",)),
    Case("verify-edited-software", ("artifacts", "verify", "--integrity-only"), ("failed",),
         edit_manifest("fp32", recompute_digest_after(lambda m: m["software"].update(onnxruntime="9.9.9"))),
         stdout=("software changed",)),
    Case("verify-swapped-model", ("artifacts", "verify", "--integrity-only"), ("failed",), swap_in_fp16_model,
         stdout=("files changed",)),
    Case("verify-folder-without-manifest", ("artifacts", "verify", "--integrity-only"), ("1 of 4 version(s) failed",),
         lambda: (A / "registry" / "digits-cnn" / "digits-cnn-fp32-half-copied").mkdir(),
         stdout=("no manifest", "OK   digits-cnn-fp16")),
    Case("show-unknown-version", ("artifacts", "show", "deadbeef"), ("no published version 'deadbeef'",)),
    # -- gate reports -------------------------------------------------------------------------------------
    Case("gate-missing-report", ("gate", "--report", "nope.json"), ("nope.json: compare report not found",), code=2),
    Case("gate-nan-metric", ("gate",), ("int8: top1 vs fp32 is NaN",),
         lambda: edit_json(A / "compare" / "compare.json", lambda c: c["variants"]["int8"].update(  # as compare writes it
             top1="NaN", top1_delta="NaN", top1_delta_pytorch="NaN")), writes=True),
    Case("gate-report-not-json", ("gate",), ("compare.json: compare report is not valid JSON",),
         lambda: (A / "compare" / "compare.json").write_text("{"), code=2),
]


def _run_case(case: Case, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    if case.setup is not None:
        case.setup()
    before = snapshot()
    rc = trtpipe(*case.argv)
    out, err = capsys.readouterr()
    if not case.writes:
        assert snapshot() == before, "artifacts/ changed"
    return rc, out, err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: Case, finished: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    rc, out, err = _run_case(case, capsys)
    assert rc == case.code, (rc, err)
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("trtpipe: note:")]
    if case.usage:
        lines = [ln for ln in lines if not ln.startswith("usage:") and not ln.startswith(" ")]
    errors = [line for line in lines if line.startswith("trtpipe ")]
    assert len(errors) == 1 and len(lines) == 1, err
    assert "Traceback" not in err
    for f in case.fragments:
        assert f in errors[0], (f, errors[0])
    for f in case.stdout:
        assert f in out, (f, out)


def test_the_matrix_is_large_enough() -> None:
    assert len(CASES) >= 80
