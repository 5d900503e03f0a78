"""Tensors left out of calibration: attention-mask sentinels (+-Inf, or |x| >= sentinel_abs,
e.g. HF's torch.finfo(float32).min), the user's ``exclude`` globs, and integer / bool
tensors, which are never histogrammed. Models are built with onnx.helper: an int64
token-id input feeding a Gather (embedding), a bool attention mask turned into an
additive bias with Where, scores, Softmax and context, as a transformer's attention."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from calibration.collect import ActivationCollector, collect_histograms
from calibration.errors import CalibrationError
from tests.calibration.reference_histogram import AbsHistogram as Reference

VOCAB, SEQ, DIM, BATCH = 50, 6, 8, 4
FLOAT_TENSORS = {"embeddings", "q", "k_t", "scores", "mask_bias", "mask_bias_3d", "masked_scores", "probs",
                 "context", "mask_f", "ids_f"}


def _attention_model(path: Path, neg: float) -> Path:
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    emb = rng.normal(0, 1, (VOCAB, DIM)).astype(np.float32)
    wq = rng.normal(0, 0.5, (DIM, DIM)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["embeddings"]),
        helper.make_node("MatMul", ["embeddings", "wq"], ["q"]),
        helper.make_node("Transpose", ["embeddings"], ["k_t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "k_t"], ["scores"]),
        helper.make_node("Where", ["attention_mask", "zero", "neg"], ["mask_bias"]),
        helper.make_node("Unsqueeze", ["mask_bias", "axis1"], ["mask_bias_3d"]),
        helper.make_node("Add", ["scores", "mask_bias_3d"], ["masked_scores"]),
        helper.make_node("Softmax", ["masked_scores"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "embeddings"], ["context"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Shape", ["input_ids"], ["ids_shape"]),  # int64, computed from an input
        helper.make_node("Not", ["attention_mask"], ["mask_not"]),  # bool, computed from an input
    ]
    graph = helper.make_graph(
        nodes, "attention",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", SEQ]),
         helper.make_tensor_value_info("attention_mask", TensorProto.BOOL, ["b", SEQ])],
        [helper.make_tensor_value_info("context", TensorProto.FLOAT, ["b", SEQ, DIM]),
         helper.make_tensor_value_info("mask_f", TensorProto.FLOAT, ["b", SEQ]),
         helper.make_tensor_value_info("ids_f", TensorProto.FLOAT, ["b", SEQ]),
         helper.make_tensor_value_info("ids_shape", TensorProto.INT64, [2]),
         helper.make_tensor_value_info("mask_not", TensorProto.BOOL, ["b", SEQ])],
        [helper.make_tensor("emb", TensorProto.FLOAT, emb.shape, emb.ravel()),
         helper.make_tensor("wq", TensorProto.FLOAT, wq.shape, wq.ravel()),
         helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
         helper.make_tensor("neg", TensorProto.FLOAT, [], [neg]),
         helper.make_tensor("axis1", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _batches(n: int, masked_from: int = 0, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``n`` batches of token ids and masks; batches before ``masked_from`` mask nothing,
    later ones mask the tail of each sequence (never a whole row)."""
    rng = np.random.default_rng(seed)
    out = []
    for b in range(n):
        ids = rng.integers(0, VOCAB, (BATCH, SEQ), dtype=np.int64)
        mask = np.ones((BATCH, SEQ), bool)
        if b >= masked_from:
            lengths = rng.integers(1, SEQ + 1, BATCH)
            lengths[0] = 2
            mask = np.arange(SEQ)[None, :] < lengths[:, None]
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.mark.parametrize("neg, shown", [(float(np.finfo(np.float32).min), "-3.403e+38"), (-np.inf, "-inf")])
def test_mask_sentinels_are_excluded_with_a_reason(tmp_path, neg, shown):
    path = _attention_model(tmp_path / "attn.onnx", neg)
    col = collect_histograms(path, _batches(3), progress=False)
    sentinel = {"mask_bias", "mask_bias_3d", "masked_scores"}
    assert set(col.excluded) == sentinel
    for name in sentinel:
        assert shown in col.excluded[name] and "batch 0" in col.excluded[name], col.excluded[name]
        assert col.excluded[name].endswith("kept in higher precision")
        assert col.excluded_max_abs[name] == abs(float(np.float32(neg)))
    assert set(col.histograms) == FLOAT_TENSORS - sentinel
    assert np.isfinite(col.histograms["probs"].max_abs) and col.histograms["probs"].max_abs <= 1.0


def test_integer_and_bool_tensors_are_never_histogrammed(tmp_path):
    path = _attention_model(tmp_path / "attn.onnx", -1e4)
    col = collect_histograms(path, _batches(2), progress=False)
    assert set(col.tensor_names) == FLOAT_TENSORS
    assert not {"input_ids", "attention_mask", "ids_shape", "mask_not"} & set(col.histograms)
    assert not col.excluded  # -1e4 is below the default sentinel_abs (1e30): calibrated
    assert col.histograms["mask_bias"].max_abs == 1e4
    ids = np.concatenate([b["input_ids"] for b in _batches(2)]).astype(np.float32)
    assert col.histograms["ids_f"].max_abs == ids.max()  # a float tensor made from the ids is calibrated


def test_sentinel_abs_threshold_and_later_batches(tmp_path):
    """-1e9 with sentinel_abs=1e8 is a sentinel; a tensor first seen clean (batches 0, 1 mask
    nothing: the bias is all zero) and excluded in batch 2 loses its histogram."""
    path = _attention_model(tmp_path / "attn.onnx", -1e9)
    col = collect_histograms(path, _batches(4, masked_from=2), progress=False, sentinel_abs=1e8)
    assert set(col.excluded) == {"mask_bias", "mask_bias_3d", "masked_scores"}
    assert "-1e+09 (|x| >= sentinel_abs 1e+08)" in col.excluded["mask_bias"]
    assert "batch 2" in col.excluded["mask_bias"]
    assert col.excluded_max_abs["mask_bias"] == 1e9
    kept = collect_histograms(path, _batches(4, masked_from=2), progress=False, growth="double")  # calibrated
    assert not kept.excluded and kept.histograms["mask_bias"].max_abs == 1e9
    # Appending bins of the first width up to 1e9 would take ~1e11 bins: refused, with the way out.
    with pytest.raises(CalibrationError, match=r"batch 2 .*'masked_scores'.*max\|x\| grew .*sentinel_abs"):
        collect_histograms(path, _batches(4, masked_from=2), progress=False, growth="append")


def test_user_exclude_globs(tmp_path):
    path = _attention_model(tmp_path / "attn.onnx", -1e4)
    col = collect_histograms(path, _batches(2), progress=False, exclude=["mask_*", "scores"])
    assert col.excluded == {"mask_bias": "excluded by calibration.exclude 'mask_*'",
                            "mask_bias_3d": "excluded by calibration.exclude 'mask_*'",
                            "mask_f": "excluded by calibration.exclude 'mask_*'",
                            "scores": "excluded by calibration.exclude 'scores'"}
    assert not set(col.excluded) & set(col.histograms)
    assert "masked_scores" in col.histograms  # globs are fnmatch over whole names
    # fetched for max|x| only (the FP16 range check reads it from maxima.json), never binned
    maxima = col.maxima()
    assert maxima["mask_bias"] == maxima["mask_bias_3d"] == 1e4 and maxima["mask_f"] == 1.0
    assert set(maxima) == set(col.histograms) | set(col.excluded)
    one = collect_histograms(path, _batches(2), progress=False, exclude="mask_f")  # one glob as a string
    assert one.excluded == {"mask_f": "excluded by calibration.exclude 'mask_f'"}


def test_exclude_glob_matching_nothing_is_an_error(tmp_path):
    path = _attention_model(tmp_path / "attn.onnx", -1e4)
    with pytest.raises(CalibrationError, match=r"calibration.exclude 'mask_bais\*' matches no calibrated tensor.*"
                                               r"'embeddings'.*fix the glob"):
        ActivationCollector(path, exclude=["mask_*", "mask_bais*"])
    with pytest.raises(CalibrationError, match="leaves no tensor to calibrate"):
        ActivationCollector(path, exclude=["*"])


def test_nan_is_still_an_error_naming_tensor_and_batch(tmp_path):
    path = _attention_model(tmp_path / "attn.onnx", -np.inf)
    batches = _batches(3)
    batches[1]["attention_mask"][2, :] = False  # a fully masked row: softmax of all -inf is NaN
    with pytest.raises(CalibrationError, match=r"batch 1 \(samples 4\.\.7 of calib\.npy\): .*'probs' has \d+ NaN"):
        collect_histograms(path, batches, progress=False, source="calib.npy")


def test_calibrated_tensors_still_equal_the_reference(tmp_path, monkeypatch):
    """Exclusions change nothing for the other tensors: equal to the commit-9b9dfe4
    histogram of the same activations."""
    seen = []
    real = ActivationCollector._run

    def run(self, feeds, where):
        values, seconds = real(self, feeds, where)
        seen.append({n: np.array(v) for n, v in zip(self._outputs, values)})
        return values, seconds

    monkeypatch.setattr(ActivationCollector, "_run", run)
    path = _attention_model(tmp_path / "attn.onnx", -np.inf)
    col = collect_histograms(path, _batches(4, masked_from=1), progress=False, growth="double", derive=False)
    first_run = list(seen)  # this run's activations only
    derived = collect_histograms(path, _batches(4, masked_from=1), progress=False, growth="double")
    assert set(derived.derived) == {"k_t", "mask_bias_3d"}  # Transpose, Unsqueeze: binned from their inputs
    assert derived.excluded == col.excluded
    for name, hist in col.histograms.items():
        np.testing.assert_array_equal(derived.histograms[name].counts, hist.counts, err_msg=name)
        ref = Reference(name=name, growth="double")
        for values in first_run:
            ref.update(values[name])
        np.testing.assert_array_equal(hist.counts, ref.counts, err_msg=name)
        assert (hist.bin_width, hist.max_abs, hist.num_samples) == (ref.bin_width, ref.max_abs, ref.num_samples)
