"""pipeline.provenance: a stage uses an input only when its producer wrote (or validated)
exactly those bytes, and otherwise stops naming the file, both hashes and the stage to
re-run. The reports are the real ones: a three-output model taken through prepare,
export, validate and calibrate by the stage functions (tests/_detector_run.py); the
hashes are checked against hashlib."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline import provenance
from pipeline.provenance import (ProvenanceError, calibrated, exported, prepared, require_hash, same_file, sha256_of,
                                 validated)
from pipeline.reports import CalibrateReport, ExportReport, PrepareReport, ValidateReport
from tests._detector_run import detector_config, detector_run

CAL_FILES = ("ranges.json", "calibration.cache", "model.qdq.onnx")


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """prepare/ export/ validate/ calibrate/ of the detector, as the stages write them."""
    from pipeline.stages import calibrate, validate

    base = detector_run(tmp_path_factory)
    d = tmp_path_factory.mktemp("provenance")
    for sub in ("prepare", "export"):
        shutil.copytree(base / sub, d / sub)
    cfg = detector_config(d, base / "weights.pt")
    validate.run(cfg, d / "prepare" / "model.pt", d / "export" / "model.onnx", d / "prepare" / "eval.npz", d / "validate")
    calibrate.run(cfg, d / "export" / "model.onnx", d / "prepare" / "calib.npz", d / "calibrate",
                  validation=d / "validate" / "validate.json", progress=False)
    return SimpleNamespace(root=d, onnx=d / "export" / "model.onnx", validation=d / "validate" / "validate.json",
                           cal=d / "calibrate")


@pytest.fixture
def copy(run: SimpleNamespace, tmp_path: Path) -> SimpleNamespace:
    """A private copy of the run, to damage."""
    d = tmp_path / "run"
    shutil.copytree(run.root, d)
    return SimpleNamespace(root=d, onnx=d / "export" / "model.onnx", validation=d / "validate" / "validate.json",
                           cal=d / "calibrate")


def edit_json(path: Path, fn) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data, indent=2))


# ------------------------------------------------------------------------------------ hashing


def test_sha256_of_is_the_file_hash_and_follows_changes(tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(b"first")
    assert sha256_of(f) == hashlib.sha256(b"first").hexdigest() == sha256_of(str(f))
    f.write_bytes(b"second, longer")  # another size
    assert sha256_of(f) == hashlib.sha256(b"second, longer").hexdigest()
    st = f.stat()
    f.write_bytes(b"third!, longer")  # the same size, another mtime
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert sha256_of(f) == hashlib.sha256(b"third!, longer").hexdigest()


def test_sha256_of_tells_files_of_the_same_size_and_time_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, body in (("a", b"one"), ("b", b"two")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.npz").write_bytes(body)
        os.utime(tmp_path / name / "x.npz", ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    monkeypatch.chdir(tmp_path / "a")
    assert sha256_of("x.npz") == hashlib.sha256(b"one").hexdigest()
    monkeypatch.chdir(tmp_path / "b")  # the same relative name is another file now
    assert sha256_of("x.npz") == hashlib.sha256(b"two").hexdigest()
    assert sha256_of(tmp_path / "a" / "x.npz") != sha256_of(tmp_path / "b" / "x.npz")


def test_sha256_of_hashes_each_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "big.bin"
    f.write_bytes(b"x" * 1000)
    calls = []
    real = provenance.sha256_model  # a file's sha256 (with an ONNX model's external data)
    monkeypatch.setattr(provenance, "sha256_model", lambda p: calls.append(Path(p)) or real(p))
    first = sha256_of(f)
    assert sha256_of(f) == sha256_of(tmp_path / "." / "big.bin") == first
    assert calls == [f]


def test_sha256_of_a_missing_file_names_it(tmp_path: Path) -> None:
    from pipeline.errors import ArtifactError

    with pytest.raises(ArtifactError, match=rf"^{tmp_path / 'nope.npz'}: not found, cannot hash it$"):
        sha256_of(tmp_path / "nope.npz")


def test_require_hash_returns_the_hash_or_names_both(tmp_path: Path) -> None:
    f = tmp_path / "calib.npz"
    f.write_bytes(b"calibration samples")
    good = sha(f)
    assert require_hash(f, good, "calib.npz", "prepare.json", "prepare") == good
    with pytest.raises(ProvenanceError) as e:
        require_hash(f, "0123456789abcdef" * 4, "calib.npz", "art/prepare.json", "prepare")
    assert str(e.value) == (f"{f}: calib.npz is not the file prepare wrote or checked (sha256 {good[:12]}…, art/prepare.json "
                            "records 0123456789ab…): it changed after prepare ran; re-run prepare (dvc repro prepare)")
    with pytest.raises(ProvenanceError) as e:
        require_hash(f, None, "calib.npz", "art/prepare.json", "prepare")
    assert str(e.value) == f"art/prepare.json: records no sha256 for calib.npz ({f}); re-run prepare (dvc repro prepare)"


def test_same_file(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("a")
    os.link(tmp_path / "a", tmp_path / "hard")
    (tmp_path / "sub").mkdir()
    assert same_file(tmp_path / "a", tmp_path / "sub" / ".." / "a")
    assert same_file(str(tmp_path / "a"), tmp_path / "hard")
    assert not same_file(tmp_path / "a", tmp_path / "b")  # equal content, other file
    assert not same_file(tmp_path / "a", tmp_path / "missing")  # no error: just not the same


# ------------------------------------------------------------------------------ each producer


def test_prepared_checks_the_file_against_prepare_json(run: SimpleNamespace, copy: SimpleNamespace) -> None:
    prep = run.root / "prepare"
    rep = prepared(prep / "eval.npz", "eval.npz")
    assert isinstance(rep, PrepareReport) and rep.sha256["eval.npz"] == sha(prep / "eval.npz")
    assert prepared(prep / "model.pt", "model.pt").model == "digit-detector"
    # another report named explicitly
    elsewhere = copy.root / "moved.json"
    shutil.move(copy.root / "prepare" / "prepare.json", elsewhere)
    assert prepared(copy.root / "prepare" / "calib.npz", "calib.npz", report=elsewhere).sha256["calib.npz"] == sha(prep / "calib.npz")
    with pytest.raises(ProvenanceError) as e:
        prepared(copy.root / "prepare" / "calib.npz", "calib.npz")
    assert str(e.value) == (f"{copy.root / 'prepare' / 'prepare.json'}: prepare report not found; run the prepare stage first "
                            "(dvc repro prepare)")


def test_prepared_refuses_a_changed_file_naming_the_key(copy: SimpleNamespace) -> None:
    f = copy.root / "prepare" / "calib.npz"
    recorded = json.loads((copy.root / "prepare" / "prepare.json").read_text())["sha256"]["calib.npz"]
    f.write_bytes(f.read_bytes() + b"\0")
    with pytest.raises(ProvenanceError) as e:
        prepared(f, "calib.npz")
    assert str(e.value) == (f"{f}: calib.npz is not the file prepare wrote or checked (sha256 {sha(f)[:12]}…, "
                            f"{copy.root / 'prepare' / 'prepare.json'} records {recorded[:12]}…): it changed after prepare ran; "
                            "re-run prepare (dvc repro prepare)")
    with pytest.raises(ProvenanceError, match=r"prepare.json: records no sha256 for labels.npz .*re-run prepare"):
        prepared(f, "labels.npz")


def test_exported_checks_the_onnx_against_export_json(run: SimpleNamespace, copy: SimpleNamespace) -> None:
    rep = exported(run.onnx)
    assert isinstance(rep, ExportReport) and rep.sha256["onnx"] == sha(run.onnx)
    assert [o.name for o in rep.outputs] == ["boxes", "landmarks", "prob"]
    shutil.move(copy.root / "export" / "export.json", copy.root / "e.json")
    assert exported(copy.onnx, copy.root / "e.json").sha256["onnx"] == sha(copy.onnx)
    with pytest.raises(ProvenanceError, match=r"export/export.json: export report not found; run the export stage first"):
        exported(copy.onnx)
    copy.onnx.write_bytes(copy.onnx.read_bytes() + b"\0")
    with pytest.raises(ProvenanceError) as e:
        exported(copy.onnx, copy.root / "e.json")
    assert str(e.value).startswith(f"{copy.onnx}: the ONNX model is not the file export wrote or checked (sha256 {sha(copy.onnx)[:12]}…, "
                                   f"{copy.root / 'e.json'} records ")
    assert str(e.value).endswith("it changed after export ran; re-run export (dvc repro export)")


def test_validated_needs_the_same_onnx_and_a_pass(run: SimpleNamespace, copy: SimpleNamespace) -> None:
    rep = validated(run.onnx, run.validation)
    assert isinstance(rep, ValidateReport) and rep.passed and rep.sha256["onnx"] == sha(run.onnx)
    with pytest.raises(ProvenanceError, match=r"missing.json: validation report not found; run the validate stage first"):
        validated(run.onnx, copy.root / "validate" / "missing.json")
    # failed validation: the outputs beyond tolerance are named
    edit_json(copy.validation, lambda v: (v.update(passed=False), v["outputs"]["boxes"].update(passed=False),
                                          v["outputs"]["prob"].update(passed=False)))
    with pytest.raises(ProvenanceError) as e:
        validated(copy.onnx, copy.validation)
    assert str(e.value) == (f"{copy.validation}: the ONNX failed validation (outputs boxes, prob beyond tolerance); fix the "
                            "export or the tolerances and re-run validate")
    edit_json(copy.validation, lambda v: [o.update(passed=True) for o in v["outputs"].values()])
    with pytest.raises(ProvenanceError, match=r"the ONNX failed validation \(outputs \? beyond tolerance\)"):
        validated(copy.onnx, copy.validation)
    # an ONNX other than the one validated
    edit_json(copy.validation, lambda v: v.update(passed=True))
    validated(copy.onnx, copy.validation)
    copy.onnx.write_bytes(copy.onnx.read_bytes()[:-1] + b"\1")
    with pytest.raises(ProvenanceError, match=r"model.onnx: the ONNX model is not the file validate wrote or checked .*"
                                              r"re-run validate \(dvc repro validate\)"):
        validated(copy.onnx, copy.validation)


def test_calibrated_needs_this_onnx_and_unchanged_outputs(run: SimpleNamespace, copy: SimpleNamespace) -> None:
    onnx_sha = sha(run.onnx)
    rep = calibrated(run.cal, onnx_sha, CAL_FILES)
    assert isinstance(rep, CalibrateReport) and rep.sha256["onnx"] == onnx_sha
    assert calibrated(str(run.cal), onnx_sha, ()).samples == rep.samples
    with pytest.raises(ProvenanceError) as e:
        calibrated(run.cal, "f" * 64, CAL_FILES)
    assert str(e.value) == (f"{run.cal / 'calibrate.json'}: calibrated another ONNX (sha256 {onnx_sha[:12]}…) than the one being "
                            "built (ffffffffffff…); its cache and Q/DQ model do not fit this network: re-run calibrate "
                            "(dvc repro calibrate)")
    # each named output is checked; the others are not
    cache = copy.cal / "calibration.cache"
    cache.write_text(cache.read_text() + "\n")
    calibrated(copy.cal, onnx_sha, ("ranges.json", "model.qdq.onnx"))
    with pytest.raises(ProvenanceError) as e:
        calibrated(copy.cal, onnx_sha, ("ranges.json", "calibration.cache"))
    assert str(e.value).startswith(f"{cache}: calibration.cache is not the file calibrate wrote or checked (sha256 {sha(cache)[:12]}…, "
                                   f"{copy.cal / 'calibrate.json'} records {rep.sha256['calibration.cache'][:12]}…)")
    assert str(e.value).endswith("re-run calibrate (dvc repro calibrate)")
    (copy.cal / "extra.bin").write_bytes(b"not calibrate's")
    with pytest.raises(ProvenanceError, match=r"calibrate.json: records no sha256 for extra.bin"):
        calibrated(copy.cal, onnx_sha, ("extra.bin",))
    (copy.cal / "calibrate.json").unlink()
    with pytest.raises(ProvenanceError, match=r"calibrate.json: calibration report not found; run the calibrate stage first"):
        calibrated(copy.cal, onnx_sha, ())
