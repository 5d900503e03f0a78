"""evaluate with built-in metrics reads the evaluation set chunk by chunk: the variant's, fp32's
and PyTorch's outputs of one chunk at a time (reference.npz read by rows), never all of them.
A user metric (a function called once on whole arrays) gets them collected from the chunks.
Checked on real digits variants against one pass and against an independent numpy computation
from whole arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.data import chunks
from pipeline.data.npz_rows import npz_row_chunks, npz_shapes
from pipeline.errors import ArtifactError, DataError
from pipeline.stages import evaluate
from tests._digits_run import digits_config

EX = "pipeline.examples.task_metrics"
PER_SAMPLE = 10 * 8 + 64 * 4  # a digit's bytes in a chunk: 10 logits (as float64 sums) and its 8x8 float32 input


def _run(cfg, d: Path, precision: str, out: Path, reference: Path | None = None):
    return evaluate.run(cfg, precision, d / "build" / precision, d / "build" / "fp32", d / "prepare" / "eval.npz",
                        reference or d / "validate" / "reference.npz", out)


def test_many_chunks_give_the_numbers_of_one_pass(clean: Path, tmp_path: Path, monkeypatch) -> None:
    cfg = digits_config(tmp_path, evaluate={"metrics": ["top1", "top5"], "batch_size": 32})
    one = _run(cfg, clean, "int8", tmp_path / "one.json")
    seen: list[int] = []
    real_predict = evaluate.predict

    def predict(runner, x, bs):
        seen.append(len(next(iter(x.values()))))
        return real_predict(runner, x, bs)

    monkeypatch.setattr(evaluate, "predict", predict)
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 64 * PER_SAMPLE)  # 64 samples (10 logits, an 8x8 image) per chunk
    many = _run(cfg, clean, "int8", tmp_path / "many.json")
    n = one.samples
    assert n > 300 and max(seen) == 64 and sum(seen) == 2 * n  # the variant and fp32, 64 samples at a time
    assert many.metrics == one.metrics and many.reference_metrics == one.reference_metrics
    for which in ("agreement_fp32", "agreement_pytorch"):
        a, b = getattr(many, which)["logits"].model_dump(), getattr(one, which)["logits"].model_dump()
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-12, abs=1e-15), (which, k)


def test_streamed_numbers_match_an_independent_whole_array_computation(clean: Path, tmp_path: Path, monkeypatch) -> None:
    cfg = digits_config(tmp_path, evaluate={"metrics": ["top1"]})
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 32 * PER_SAMPLE)
    r = _run(cfg, clean, "int8", tmp_path / "int8.json")
    # The independent reference: the whole arrays, numpy only, no trtpipe metric code.
    import onnxruntime as ort

    with np.load(clean / "prepare" / "eval.npz") as z:
        x, y = z["input"], z["y"]
    with np.load(clean / "validate" / "reference.npz") as z:
        torch_logits = z["logits"].astype(np.float64)
    qdq = ort.SessionOptions()
    qdq.add_session_config_entry("session.disable_quant_qdq", "1")
    s = ort.InferenceSession(str(clean / "build" / "int8" / "model.onnx"), qdq, providers=["CPUExecutionProvider"])
    got = s.run(None, {s.get_inputs()[0].name: x})[0].astype(np.float64)
    assert r.metrics["top1"] == pytest.approx(100.0 * np.mean(got.argmax(1) == y))
    assert r.reference_metrics["pytorch"]["top1"] == pytest.approx(100.0 * np.mean(torch_logits.argmax(1) == y))
    cos = (got * torch_logits).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(torch_logits, axis=1)
    a = r.agreement_pytorch["logits"].model_dump()
    assert a["cosine"] == pytest.approx(cos.mean(), rel=1e-9) and a["cosine_min"] == pytest.approx(cos.min(), rel=1e-9)
    assert a["max_abs_diff"] == pytest.approx(np.abs(got - torch_logits).max(), rel=1e-6)
    snr = 10 * np.log10((torch_logits**2).sum() / ((got - torch_logits) ** 2).sum())
    assert a["snr_db"] == pytest.approx(snr, rel=1e-9)
    assert a["top1_agreement"] == pytest.approx(np.mean(got.argmax(1) == torch_logits.argmax(1)))


def test_a_user_metric_is_called_once_on_the_whole_arrays_while_the_rest_streams(clean: Path, tmp_path: Path,
                                                                                monkeypatch) -> None:
    """A user function (here one reading PyTorch's outputs too) is called once per model on all the
    samples, in order, however many chunks evaluate reads; its values equal the function applied
    to the whole arrays computed here, and every other number is the built-in-only run's."""
    from calibration.ort_session import make_session
    from pipeline.data import load_samples
    from pipeline.examples import task_metrics as tm

    calls: list[tuple[int, int]] = []
    real = tm.embedding_similarity

    def spy(outputs, labels, reference=None, output=None):
        calls.append((len(outputs["logits"]), len(reference["logits"])))
        return real(outputs, labels, reference=reference, output=output)

    monkeypatch.setattr(tm, "embedding_similarity", spy)
    streamed = _run(digits_config(tmp_path, evaluate={"metrics": ["top1"]}), clean, "int8", tmp_path / "s.json")
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 64 * PER_SAMPLE)  # 64 samples a chunk
    cfg = digits_config(tmp_path, evaluate={"metrics": ["top1", f"{EX}:embedding_retrieval", f"{EX}:embedding_similarity"]})
    user = _run(cfg, clean, "int8", tmp_path / "u.json")
    n = user.samples
    assert calls == [(n, n), (n, n)]  # the variant's outputs, then PyTorch's, each whole

    x = load_samples(clean / "prepare" / "eval.npz", cfg.model.inputs, cfg.data.labels_key).x["input"]
    s = make_session(str(clean / "build" / "int8" / "model.onnx"))
    got = {"logits": s.run(None, {"input": x})[0]}
    with np.load(clean / "validate" / "reference.npz") as z:
        torch_out = {"logits": z["logits"]}
    labels = np.load(clean / "prepare" / "eval.npz")["y"]
    want = {**real(got, labels, reference=torch_out), **tm.embedding_retrieval(got, labels)}
    for k, v in want.items():
        assert user.metrics[k] == pytest.approx(v, rel=1e-9), k
    assert user.reference_metrics["pytorch"]["recall_at_1"] == pytest.approx(
        tm.embedding_retrieval(torch_out, labels)["recall_at_1"])
    assert user.metrics["top1"] == streamed.metrics["top1"]
    w = user.agreement_fp32["logits"].model_dump()
    for k, v in streamed.agreement_fp32["logits"].model_dump().items():
        assert w[k] == pytest.approx(v, rel=1e-12, abs=1e-15), k


@pytest.mark.parametrize("edit", ["fewer", "more"])
def test_a_reference_of_another_sample_count_is_refused(clean: Path, tmp_path: Path, edit: str) -> None:
    """reference.npz with rows missing at the end, or extra ones: one line, re-run validate; nothing written."""
    import shutil

    d = tmp_path / "v"
    shutil.copytree(clean / "validate", d)
    with np.load(d / "reference.npz") as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(d / "reference.npz", **{k: v[:-5] if edit == "fewer" else np.concatenate([v, v[:5]])
                                     for k, v in arrays.items()})
    # validate's record says this is its file (else provenance refuses it first): the reader itself must refuse it
    import json

    from pipeline.fileio import sha256_file

    rec = json.loads((d / "validate.json").read_text())
    rec["sha256"]["reference.npz"] = sha256_file(d / "reference.npz")
    (d / "validate.json").write_text(json.dumps(rec))
    with pytest.raises(DataError, match=r"reference.npz: holds PyTorch outputs 'logits' for \d+ samples, the evaluation"):
        _run(digits_config(tmp_path), clean, "int8", tmp_path / "x.json", reference=d / "reference.npz")
    assert not (tmp_path / "x.json").exists()


def test_npz_rows_streams_stored_and_deflated_members(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((1001, 3, 5)).astype(np.float32), "b": np.arange(2002).reshape(1001, 2),
              "f": np.asfortranarray(rng.standard_normal((1001, 4)))}
    for save in (np.savez, np.savez_compressed):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, **arrays)
        assert npz_shapes(path)["a"] == ((1001, 3, 5), np.dtype(np.float32))
        parts = list(npz_row_chunks(path, list(arrays), 128))
        assert [len(p["a"]) for p in parts] == [128] * 7 + [105]
        for k, v in arrays.items():
            assert np.array_equal(np.concatenate([p[k] for p in parts]), v)
    with pytest.raises(ArtifactError, match="has no array 'zz'"):
        list(npz_row_chunks(tmp_path / "savez.npz", ["zz"], 10))
    truncated = tmp_path / "cut.npz"
    truncated.write_bytes((tmp_path / "savez.npz").read_bytes()[:5000])
    with pytest.raises(ArtifactError, match="cut.npz"):
        list(npz_row_chunks(truncated, ["a"], 10))
