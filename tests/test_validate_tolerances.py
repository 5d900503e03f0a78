"""validate fails loudly on its tolerances: validate.atol, validate.min_cosine and the
per-output validate.outputs.<name> each make the stage fail (ToleranceError, exit status 1)
with a message naming the output, the difference and the setting, after writing
validate.json with passed false. The numbers are checked against an independent
computation (onnxruntime and PyTorch run here, the differences taken with numpy).

Runs on a three-output model (boxes, landmarks, prob) taken through prepare and export
once per session (tests/_detector_run.py); each validate takes a fraction of a second."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.errors import ConfigError, DataError, ToleranceError
from pipeline.stages import validate
from pipeline.stages.validate import check_output
from tests._detector_run import OUTPUTS, detector_config, detector_run


@pytest.fixture(scope="module")
def det(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return detector_run(tmp_path_factory)


def _independent(det: Path, batch: int = 64) -> dict[str, dict[str, float]]:
    """max |onnxruntime - PyTorch| and the least per-sample cosine of every output, computed
    here: the checkpoint in PyTorch, the ONNX in a plain onnxruntime session, numpy."""
    import onnxruntime as ort
    import torch

    from tests.models.digit_detector import make

    model = make()
    model.load_state_dict(torch.load(det / "prepare" / "model.pt", weights_only=True))
    model.eval()
    with np.load(det / "prepare" / "eval.npz") as z:
        x = z["image"]
    sess = ort.InferenceSession(str(det / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    got: dict[str, list[np.ndarray]] = {n: [] for n in names}
    ref: dict[str, list[np.ndarray]] = {n: [] for n in names}
    with torch.no_grad():
        for i in range(0, len(x), batch):
            for n, o in zip(names, sess.run(None, {"image": x[i:i + batch]})):
                got[n].append(o)
            for n, o in model(torch.from_numpy(x[i:i + batch])).items():
                ref[n].append(o.numpy())
    out = {}
    for n in names:
        a = np.concatenate(got[n]).astype(np.float64).reshape(len(x), -1)
        b = np.concatenate(ref[n]).astype(np.float64).reshape(len(x), -1)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        out[n] = {"max_abs_diff": float(np.abs(a - b).max()), "cosine_min": float(cos.min()), "samples": len(x),
                  "pytorch": np.concatenate(ref[n])}
    return out


@pytest.fixture(scope="module")
def truth(det: Path) -> dict[str, dict[str, float]]:
    return _independent(det)


def _run(det: Path, tmp: Path, **validate_section: Any) -> Any:
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = detector_config(tmp, det / "weights.pt", validate=validate_section)
    return validate.run(cfg, det / "prepare" / "model.pt", det / "export" / "model.onnx", det / "prepare" / "eval.npz",
                        tmp / "validate")


def _report(tmp: Path) -> dict[str, Any]:
    return json.loads((tmp / "validate" / "validate.json").read_text())


# ------------------------------------------------------------------------------- the stage


def test_validate_passes_and_reports_the_measured_differences(det: Path, truth: dict, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    rep = _run(det, tmp_path)
    wall = time.perf_counter() - t0
    data = _report(tmp_path)
    assert data["passed"] is True and rep.passed is True
    n = truth["boxes"]["samples"]
    assert data["samples"] == n and data["reference"] == "pytorch (cpu, fp32)"
    assert list(data["outputs"]) == OUTPUTS
    for name in OUTPUTS:
        o = data["outputs"][name]
        assert o["max_abs_diff"] == pytest.approx(truth[name]["max_abs_diff"], rel=1e-6)
        assert o["cosine_min"] == pytest.approx(truth[name]["cosine_min"], abs=1e-12)
        assert (o["atol"], o["min_cosine"], o["passed"], o["failures"], o["nonfinite"]) == (1e-4, 0.99999, True, [], 0)
    # What it compared, by hash (what the later stages check their inputs against).
    def sha(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()
    assert data["sha256"] == {"onnx": sha(det / "export" / "model.onnx"), "checkpoint": sha(det / "prepare" / "model.pt"),
                              "eval_data": sha(det / "prepare" / "eval.npz"),
                              "reference.npz": sha(tmp_path / "validate" / "reference.npz")}
    # reference.npz: PyTorch's outputs by name, one row per evaluation sample.
    with np.load(tmp_path / "validate" / "reference.npz") as z:
        assert sorted(z.files) == sorted(OUTPUTS) and all(len(z[k]) == n for k in OUTPUTS)
        assert z["prob"].sum(1) == pytest.approx(np.ones(n), abs=1e-5)  # the softmax head
        for name in OUTPUTS:
            np.testing.assert_array_equal(z[name], truth[name]["pytorch"])
    assert "seconds" not in data  # run-to-run noise: the stage's timings file, not the report downstream stages hash
    assert 0 < rep.seconds <= round(wall, 3) + 0.001 and round(rep.seconds, 3) == rep.seconds  # ms resolution


def test_validate_fails_on_atol_exceeded(det: Path, truth: dict, tmp_path: Path) -> None:
    """validate.atol below the measured difference: ToleranceError naming every output, its
    difference and the tolerance; validate.json is written first, with passed false."""
    with pytest.raises(ToleranceError) as e:
        _run(det, tmp_path, atol=1e-12)
    msg = str(e.value)
    n = truth["boxes"]["samples"]
    assert msg.startswith(f"{det / 'export' / 'model.onnx'}: ONNX disagrees with PyTorch on {n} samples: ")
    assert msg.endswith(" (validate.atol / validate.min_cosine, or validate.outputs.<name>)")
    for name in OUTPUTS:
        m = re.search(rf"output '{name}': max abs diff (\S+) > atol 1e-12", msg)
        assert m, (name, msg)
        assert float(m.group(1)) == pytest.approx(truth[name]["max_abs_diff"], rel=5e-3)  # printed to 3 digits
    assert msg.count("; output '") == 2 and "min cosine" not in msg
    data = _report(tmp_path)
    assert data["passed"] is False
    for name in OUTPUTS:
        o = data["outputs"][name]
        assert o["passed"] is False and o["atol"] == 1e-12
        assert o["max_abs_diff"] == pytest.approx(truth[name]["max_abs_diff"], rel=1e-6)
        assert o["failures"] == [f"output '{name}': max abs diff {o['max_abs_diff']:.3g} > atol 1e-12"]
    assert (tmp_path / "validate" / "reference.npz").is_file()  # written, so the numbers can be looked at


def test_validate_fails_on_min_cosine(det: Path, truth: dict, tmp_path: Path) -> None:
    """validate.min_cosine above the measured least cosine of the outputs: ToleranceError naming them."""
    worst = min(truth, key=lambda k: truth[k]["cosine_min"])
    assert truth[worst]["cosine_min"] < 1.0
    with pytest.raises(ToleranceError) as e:
        _run(det, tmp_path, min_cosine=1.0)
    below = [k for k in OUTPUTS if truth[k]["cosine_min"] < 1.0]
    for name in below:
        assert f"output '{name}': min cosine {truth[name]['cosine_min']:.6f} < min_cosine 1.0" in str(e.value)
    assert "max abs diff" not in str(e.value)
    data = _report(tmp_path)
    assert data["passed"] is False and not data["outputs"][worst]["passed"]
    assert [k for k in OUTPUTS if not data["outputs"][k]["passed"]] == below


def test_validate_per_output_tolerance(det: Path, truth: dict, tmp_path: Path) -> None:
    """validate.outputs.<name> overrides atol or min_cosine for that output only; the other
    setting and the other outputs keep the global ones."""
    with pytest.raises(ToleranceError) as e:
        _run(det, tmp_path / "a", outputs={"landmarks": {"atol": 1e-12}})
    msg = str(e.value)
    assert "output 'landmarks': max abs diff" in msg and "'boxes'" not in msg and "'prob'" not in msg
    data = _report(tmp_path / "a")
    assert {k: (o["atol"], o["min_cosine"], o["passed"]) for k, o in data["outputs"].items()} == {
        "boxes": (1e-4, 0.99999, True), "landmarks": (1e-12, 0.99999, False), "prob": (1e-4, 0.99999, True)}
    # A looser atol for one output lets it pass where the global one fails the others.
    big = max(truth[k]["max_abs_diff"] for k in OUTPUTS)
    with pytest.raises(ToleranceError) as e:
        _run(det, tmp_path / "b", atol=1e-12, outputs={"boxes": {"atol": 2 * big}})
    assert "'boxes'" not in str(e.value) and "output 'landmarks'" in str(e.value) and "output 'prob'" in str(e.value)
    # min_cosine only: atol stays the global one.
    with pytest.raises(ToleranceError) as e:
        _run(det, tmp_path / "c", outputs={"prob": {"min_cosine": 1.0}})
    assert "output 'prob': min cosine" in str(e.value) and "max abs diff" not in str(e.value)
    o = _report(tmp_path / "c")["outputs"]["prob"]
    assert (o["atol"], o["min_cosine"]) == (1e-4, 1.0)
    rep = _run(det, tmp_path / "d", atol=1e-12, min_cosine=1.0,
               outputs={k: {"atol": 2 * big, "min_cosine": 0.5} for k in OUTPUTS})
    assert rep.passed and all((o.atol, o.min_cosine) == (2 * big, 0.5) for o in rep.outputs.values())


def test_validate_atol_boundary_is_inclusive(det: Path, truth: dict, tmp_path: Path) -> None:
    """A difference exactly at validate.atol passes; the next float below it fails."""
    first = _run(det, tmp_path / "a")
    d = first.outputs["boxes"].max_abs_diff
    assert d == pytest.approx(truth["boxes"]["max_abs_diff"], rel=1e-6)
    exact = {"outputs": {"boxes": {"atol": d}}, "atol": 1.0}
    assert _run(det, tmp_path / "b", **exact).outputs["boxes"].passed
    below = {"outputs": {"boxes": {"atol": float(np.nextafter(d, 0))}}, "atol": 1.0}
    with pytest.raises(ToleranceError, match="output 'boxes': max abs diff"):
        _run(det, tmp_path / "c", **below)
    c = first.outputs["prob"].cosine_min
    assert _run(det, tmp_path / "d", outputs={"prob": {"min_cosine": c}}).passed
    with pytest.raises(ToleranceError, match="output 'prob': min cosine"):
        _run(det, tmp_path / "e", outputs={"prob": {"min_cosine": float(np.nextafter(c, 2))}})


def test_validate_cli_exits_non_zero_naming_the_output(det: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from tests._project import trtpipe

    cfg = detector_config(tmp_path, det / "weights.pt", validate={"atol": 1e-12, "outputs": {"boxes": {"atol": 1.0}}})
    params = next(tmp_path.glob("params-*.yaml"))
    monkeypatch.chdir(tmp_path)
    args = ["validate", "--params", str(params), "--checkpoint", str(det / "prepare" / "model.pt"),
            "--onnx", str(det / "export" / "model.onnx"), "--eval-data", str(det / "prepare" / "eval.npz"), "--out", "v"]
    assert cfg.validate_.atol == 1e-12
    capsys.readouterr()
    assert trtpipe(*args) == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("trtpipe: note:")]  # params notes
    assert len(lines) == 1
    err = lines[0]
    assert err.startswith("trtpipe validate: error: ") and "ONNX disagrees with PyTorch" in err
    assert "output 'landmarks': max abs diff" in err and "> atol 1e-12" in err and "'boxes'" not in err
    assert json.loads(Path("v/validate.json").read_text())["passed"] is False
    (tmp_path / params.name).write_text(params.read_text().replace("1.0e-12", "0.001"))
    assert trtpipe(*args) == 0
    assert "validate: ONNX matches PyTorch" in capsys.readouterr().out
    assert json.loads(Path("v/validate.json").read_text())["passed"] is True


# ------------------------------------------------------------------------ inputs it refuses


def test_validate_num_samples_is_a_minimum(det: Path, truth: dict, tmp_path: Path) -> None:
    n = truth["boxes"]["samples"]
    assert _run(det, tmp_path / "a", num_samples=n).samples == n
    with pytest.raises(DataError) as e:
        _run(det, tmp_path / "b", num_samples=n + 1)
    assert str(e.value) == (f"{det / 'prepare' / 'eval.npz'}: {n} evaluation samples, validate.num_samples asks for at least "
                            f"{n + 1}; enlarge data.split.evaluation or lower validate.num_samples")
    assert not (tmp_path / "b" / "validate").exists()


def test_validate_refuses_missing_or_inconsistent_evaluation_data(det: Path, tmp_path: Path) -> None:
    cfg = detector_config(tmp_path, det / "weights.pt")
    args = (cfg, det / "prepare" / "model.pt", det / "export" / "model.onnx")
    with pytest.raises(DataError) as e:
        validate.run(*args, tmp_path / "none" / "eval.npz", tmp_path / "v")
    assert str(e.value) == f"{tmp_path / 'none' / 'eval.npz'}: evaluation data not found; run the prepare stage first"
    with np.load(det / "prepare" / "eval.npz") as z:
        x, y = z["image"], z["y"]
    np.savez(tmp_path / "short_labels.npz", image=x, y=y[:-1])  # one label short
    with pytest.raises(DataError) as e:
        validate.run(*args, tmp_path / "short_labels.npz", tmp_path / "v")
    assert str(e.value) == (f"{tmp_path / 'short_labels.npz'}: {len(y) - 1} labels for {len(x)} samples; re-run prepare")
    assert not (tmp_path / "v").exists()


def test_validate_outputs_must_name_outputs_of_the_onnx(det: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        _run(det, tmp_path, outputs={"prob": {"atol": 1.0}, "scores": {"atol": 1.0}})
    assert str(e.value) == "validate.outputs names 'scores', which is not an output of the ONNX (boxes, landmarks, prob)"


def test_validate_refuses_an_onnx_of_another_checkpoint(det: Path, tmp_path: Path) -> None:
    import torch

    from pipeline.provenance import ProvenanceError, sha256_of

    other = tmp_path / "other.pt"
    state = torch.load(det / "prepare" / "model.pt", weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, other)
    cfg = detector_config(tmp_path, det / "weights.pt")
    with pytest.raises(ProvenanceError) as e:
        validate.run(cfg, other, det / "export" / "model.onnx", det / "prepare" / "eval.npz", tmp_path / "validate")
    recorded = json.loads((det / "export" / "export.json").read_text())["sha256"]["checkpoint"]
    assert str(e.value) == (f"{det / 'export' / 'model.onnx'}: was exported from another checkpoint than {other} (sha256 "
                            f"{recorded[:12]}… vs {sha256_of(other)[:12]}…); re-run export (dvc repro export)")
    assert not (tmp_path / "validate").exists()


def test_validate_checks_eval_data_against_prepare_only_beside_it(det: Path, tmp_path: Path) -> None:
    """eval.npz next to prepare.json must be prepare's; a file of the user's elsewhere is used as it is."""
    from pipeline.provenance import ProvenanceError

    prep = tmp_path / "prepare"
    shutil.copytree(det / "prepare", prep)
    with np.load(prep / "eval.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["image"] = arrays["image"][::-1].copy()  # the same samples in another order: other bytes
    np.savez(prep / "eval.npz", **arrays)
    cfg = detector_config(tmp_path, det / "weights.pt")
    with pytest.raises(ProvenanceError, match=r"eval.npz: eval.npz is not the file prepare wrote .*re-run prepare"):
        validate.run(cfg, det / "prepare" / "model.pt", det / "export" / "model.onnx", prep / "eval.npz", tmp_path / "v1")
    mine = tmp_path / "mine" / "eval.npz"
    mine.parent.mkdir()
    shutil.copy(prep / "eval.npz", mine)
    rep = validate.run(cfg, det / "prepare" / "model.pt", det / "export" / "model.onnx", mine, tmp_path / "v2")
    assert rep.passed and rep.samples == len(arrays["image"])


def test_validate_refuses_a_model_whose_outputs_changed_since_export(det: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """forward() edited after export (two outputs where the ONNX has three)."""
    from pipeline.provenance import ProvenanceError

    (tmp_path / "two_heads.py").write_text(
        "from tests.models.digit_detector import DigitDetector\n\n\n"
        "class TwoHeads(DigitDetector):\n"
        "    def forward(self, image):\n"
        "        out = super().forward(image)\n"
        "        return {'boxes': out['boxes'], 'prob': out['prob']}\n\n\n"
        "def make():\n    return TwoHeads()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = detector_config(tmp_path, det / "weights.pt", model={"arch": "two_heads:make"})
    with pytest.raises(ProvenanceError) as e:
        validate.run(cfg, det / "prepare" / "model.pt", det / "export" / "model.onnx", det / "prepare" / "eval.npz",
                     tmp_path / "validate")
    assert str(e.value) == f"{det / 'export' / 'model.onnx'}: has 3 outputs, the model returns 2; re-run export"


def test_validate_refuses_an_output_whose_shape_changed_since_export(det: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """forward() edited after export: the same outputs, one of another width; named, not compared."""

    (tmp_path / "narrow.py").write_text(
        "from tests.models.digit_detector import DigitDetector\n\n\n"
        "class Narrow(DigitDetector):\n"
        "    def forward(self, image):\n"
        "        out = super().forward(image)\n"
        "        return {**out, 'landmarks': out['landmarks'][:, :1]}\n\n\n"
        "def make():\n    return Narrow()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = detector_config(tmp_path, det / "weights.pt", model={"arch": "narrow:make"})
    with pytest.raises(DataError) as e:
        validate.run(cfg, det / "prepare" / "model.pt", det / "export" / "model.onnx", det / "prepare" / "eval.npz",
                     tmp_path / "validate")
    n = len(np.load(det / "prepare" / "eval.npz")["image"])
    assert str(e.value) == (f"output 'landmarks' has shape [{n}, 2], the reference has [{n}, 1]; they must match to be compared")


# --------------------------------------------------------------------- one output, unit level


def test_reference_written_in_batches_equals_one_pass(det: Path, tmp_path: Path) -> None:
    """validate in batches of 7 (the last one short) writes in reference.npz what one PyTorch pass gives."""
    import torch

    from tests.models.digit_detector import make

    cfg = detector_config(tmp_path, det / "weights.pt", validate={"batch_size": 7})
    validate.run(cfg, det / "prepare" / "model.pt", det / "export" / "model.onnx", det / "prepare" / "eval.npz",
                 tmp_path / "validate")
    x = np.load(det / "prepare" / "eval.npz")["image"]
    assert len(x) % 7 != 0
    model = make()
    model.load_state_dict(torch.load(det / "prepare" / "model.pt", weights_only=True))
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(x))
    with np.load(tmp_path / "validate" / "reference.npz") as z:
        assert sorted(z.files) == sorted(OUTPUTS)
        for name in OUTPUTS:
            assert z[name].shape[0] == len(x)
            np.testing.assert_allclose(z[name], ref[name].numpy(), rtol=1e-5, atol=1e-6)


def _pair(diff: float = 0.0, rows: int = 4) -> tuple[np.ndarray, np.ndarray]:
    ref = np.arange(1, 1 + rows * 3, dtype=np.float32).reshape(rows, 3)
    got = ref.copy()
    got[1, 2] += diff
    return got, ref


def test_check_output_atol_boundary_and_message() -> None:
    got, ref = _pair(0.5)  # 0.5 is exact in float32 and float64: max |diff| is exactly 0.5
    ok = check_output("boxes", got, ref, atol=0.5, min_cosine=-1.0)
    assert ok.passed and ok.failures == [] and ok.max_abs_diff == 0.5 and (ok.atol, ok.min_cosine) == (0.5, -1.0)
    bad = check_output("boxes", got, ref, atol=0.4999, min_cosine=-1.0)
    assert not bad.passed and bad.failures == ["output 'boxes': max abs diff 0.5 > atol 0.4999"]
    assert check_output("boxes", got, ref, atol=0.0, min_cosine=-1.0).failures == ["output 'boxes': max abs diff 0.5 > atol 0"]
    assert check_output("boxes", *_pair(0.0), atol=0.0, min_cosine=-1.0).passed  # identical outputs meet atol 0


def test_check_output_min_cosine_boundary_and_message() -> None:
    ref = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    got = np.array([[1.0, 1.0], [0.0, 3.0]], np.float32)  # cosines: 1/sqrt(2) and 1
    c = 1 / np.sqrt(2)
    r = check_output("prob", got, ref, atol=10.0, min_cosine=float(c))
    assert r.cosine_min == pytest.approx(c, abs=1e-15) and r.cosine == pytest.approx((c + 1) / 2, abs=1e-15)
    at = check_output("prob", got, ref, atol=10.0, min_cosine=r.cosine_min)
    assert at.passed
    bad = check_output("prob", got, ref, atol=10.0, min_cosine=0.75)
    assert bad.failures == ["output 'prob': min cosine 0.707107 < min_cosine 0.75"] and not bad.passed
    both = check_output("prob", got, ref, atol=0.5, min_cosine=0.75)
    assert both.failures == ["output 'prob': max abs diff 1 > atol 0.5", "output 'prob': min cosine 0.707107 < min_cosine 0.75"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_output_never_passes_a_non_finite_output(bad: float) -> None:
    got, ref = _pair(0.0)
    got[2, 0] = bad
    got[3, 1] = bad
    r = check_output("logits", got, ref, atol=1e30, min_cosine=-1.0)
    assert not r.passed and r.nonfinite == 2
    assert r.failures[0] == "output 'logits': 2 NaN/Inf values in onnxruntime's outputs"
    assert "output 'logits': max abs diff nan > atol 1e+30" in r.failures
    assert "output 'logits': min cosine nan < min_cosine -1.0" in r.failures


def test_tolerance_per_output_falls_back_per_setting(det: Path, tmp_path: Path) -> None:
    cfg = detector_config(tmp_path, det / "weights.pt", validate={
        "atol": 0.01, "min_cosine": 0.9, "outputs": {"boxes": {"atol": 0.5}, "prob": {"min_cosine": 0.3}, "landmarks": {}}})
    assert validate._tolerance(cfg, "boxes") == (0.5, 0.9)
    assert validate._tolerance(cfg, "prob") == (0.01, 0.3)
    assert validate._tolerance(cfg, "landmarks") == (0.01, 0.9)
    assert validate._tolerance(cfg, "other") == (0.01, 0.9)
    zero = detector_config(tmp_path, det / "weights.pt", validate={"atol": 0.01, "outputs": {"boxes": {"atol": 0.0, "min_cosine": -1.0}}})
    assert validate._tolerance(zero, "boxes") == (0.0, -1.0)  # 0 is a tolerance, not "unset"
