"""Streamed image splits (pipeline.data.stream): prepare keeps a large image-folder split as an
index of its files (sha256 each), every stage decodes it batch by batch, and the numbers are
the ones the in-memory split gives: the same samples bit for bit, the same calibration
ranges and the same evaluation report, on the real digits written as 8x8 PNG files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import DataError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def digit_pngs(tmp_path_factory) -> Path:
    """scikit-learn's 1797 digits as 8-bit grayscale PNGs, one folder per class."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digit-pngs") / "digits"
    d = load_digits()
    for i, (img, label) in enumerate(zip(d.images, d.target)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 15).astype(np.uint8), mode="L").save(folder / f"{i:04d}.png")
    return root


def _cfg(tmp: Path, images: Path, stream, **extra):
    import yaml

    from pipeline.config import load_config

    params = {"config": str(ROOT / "configs" / "digits.yaml"), "override": True,
              "data": {"source": "image_folder", "path": str(images), "stream": stream,
                       "preprocess": {"scale": 1 / 240, "mean": [0.5], "std": [0.5]}},
              "build": {"backend": "onnxruntime"}, "calibration": {"num_samples": 64},
              "evaluate": {"latency": {"warmup": 1, "iterations": 3, "batch_sizes": [1]}}, **extra}
    path = tmp / f"params-{stream}.yaml"
    path.write_text(yaml.safe_dump(params))
    return load_config(None, path, quiet=True)


@pytest.fixture(scope="module")
def prepared(digit_pngs, tmp_path_factory):
    """prepare run twice on the same PNG folder: streamed and in memory."""
    from pipeline.stages import prepare

    tmp = tmp_path_factory.mktemp("streamed")
    out = {}
    for stream in (True, False):
        cfg = _cfg(tmp, digit_pngs, stream)
        prepare.run(cfg, tmp / f"prepare-{stream}")
        out[stream] = (cfg, tmp / f"prepare-{stream}")
    return out


def test_a_streamed_split_is_an_index_that_decodes_to_the_same_samples(prepared):
    from pipeline.data import load_samples
    from pipeline.data.stream import ImageStream

    (cfg, streamed), (_, held) = prepared[True], prepared[False]
    for name in ("calib.npz", "eval.npz"):
        a = load_samples(streamed / name, cfg.model.inputs, "y", name)
        b = load_samples(held / name, cfg.model.inputs, "y", name)
        x, ref = a.x["input"], b.x["input"]
        assert isinstance(x, ImageStream) and isinstance(ref, np.ndarray)
        assert x.shape == ref.shape and x.dtype == ref.dtype and len(a) == len(b)
        np.testing.assert_array_equal(a.y, b.y)
        with np.load(streamed / name) as z:  # names and checksums, no pixels
            assert "input" not in z.files and "__stream__" in z.files
        for s in (slice(0, 32), slice(32, 64), slice(64, 100), slice(5, 6)):  # sequential: the prefetched path
            np.testing.assert_array_equal(x[s], ref[s])
        pick = np.array([7, 3, 50, 3])
        np.testing.assert_array_equal(x[pick], ref[pick])
        np.testing.assert_array_equal(a.take(pick).x["input"][0:4], ref[pick])
        np.testing.assert_array_equal(x[-1], ref[-1])
        x.close()


def test_prefetch_decodes_the_next_batch_while_this_one_is_used(prepared):
    from pipeline.data import load_samples

    cfg, streamed = prepared[True]
    x = load_samples(streamed / "eval.npz", cfg.model.inputs, "y").x["input"]
    x[0:16]
    assert x._ahead is not None and x._ahead[0] == (16, 32)
    ahead = x._ahead[1]
    x[16:32]
    assert ahead.done() and x._ahead[0] == (32, 48)  # the prefetched batch was used, the next one queued
    x.close()


def test_a_changed_or_missing_image_is_named(prepared, tmp_path):
    from pipeline.data import load_samples

    cfg, streamed = prepared[True]
    x = load_samples(streamed / "eval.npz", cfg.model.inputs, "y").x["input"]
    victim = Path(x.files[3])
    backup = tmp_path / "backup.png"
    shutil.copy(victim, backup)
    try:
        victim.write_bytes(victim.read_bytes() + b"\0")
        with pytest.raises(DataError, match=rf"{victim.name}: changed since prepare indexed it.*re-run prepare"):
            x[0:8]
        victim.unlink()
        with pytest.raises(DataError, match=rf"{victim.name}.*is gone.*re-run prepare"):
            load_samples(streamed / "eval.npz", cfg.model.inputs, "y")
    finally:
        shutil.copy(backup, victim)
    x.close()


def test_auto_streams_only_what_would_not_fit(digit_pngs):
    from pipeline.config import InputSpec
    from pipeline.data.stream import should_stream

    spec = InputSpec(shape=[3, 224, 224])
    assert not should_stream("auto", 800, spec)  # 800 x 602112 B = 459 MiB as float32: held
    assert should_stream("auto", 1000, spec)  # 574 MiB: streamed
    assert should_stream("auto", 20000, spec) and not should_stream(False, 20000, spec) and should_stream(True, 1, spec)


def test_calibrate_and_evaluate_give_the_same_numbers_streamed(prepared, tmp_path, monkeypatch):
    """export, validate, calibrate, build fp32/int8, evaluate int8 on the streamed split and on
    the in-memory one: identical ranges, identical metrics and agreement; no stage ever decodes
    the whole streamed split into one array."""
    from pipeline.data.stream import ImageStream
    from pipeline.stages import build, calibrate, evaluate, export, validate

    def whole(self, *a, **k):
        raise AssertionError("a stage decoded a whole streamed split into one array")

    monkeypatch.setattr(ImageStream, "__array__", whole)

    reports = {}
    for stream, (cfg, prep) in prepared.items():
        d = tmp_path / f"run-{stream}"
        export.run(cfg, prep / "model.pt", d / "export")
        validate.run(cfg, prep / "model.pt", d / "export" / "model.onnx", prep / "eval.npz", d / "validate")
        calibrate.run(cfg, d / "export" / "model.onnx", prep / "calib.npz", d / "calibrate",
                      validation=d / "validate" / "validate.json", progress=False)
        for p in ("fp32", "int8"):
            build.run(cfg, p, d / "export" / "model.onnx", d / "build" / p, calib_dir=d / "calibrate",
                      calib_data=prep / "calib.npz", validation=d / "validate" / "validate.json")
        rep = evaluate.run(cfg, "int8", d / "build" / "int8", d / "build" / "fp32", prep / "eval.npz",
                           d / "validate" / "reference.npz", d / "eval-int8.json")
        ranges = json.loads((d / "calibrate" / "ranges.json").read_text())["tensors"]
        reports[stream] = (ranges, rep)
    (r1, e1), (r2, e2) = reports[True], reports[False]
    assert r1 == r2
    assert e1.metrics == e2.metrics and e1.samples == e2.samples
    assert e1.agreement_fp32 == e2.agreement_fp32 and e1.agreement_pytorch == e2.agreement_pytorch


def test_a_damaged_index_or_a_stream_asked_of_other_data_is_one_line(prepared, tmp_path):
    import yaml

    from pipeline.config import load_config
    from pipeline.data import load_samples
    from pipeline.errors import ConfigError, PipelineError

    cfg, streamed = prepared[True]
    with np.load(streamed / "eval.npz") as z:
        arrays = {k: z[k] for k in z.files}
    index = json.loads(bytes(arrays["__stream__"]).decode())
    for name, member, match in (
            ("torn.npz", np.frombuffer(b'{"files": [', dtype=np.uint8), "index of streamed images cannot be read"),
            ("other.npz", np.frombuffer(json.dumps({**index, "input": {**index["input"], "shape": [3, 8, 8]}}).encode(),
                                        dtype=np.uint8), r"indexes images for input 'input' \[3, 8, 8\]"),
            ("short.npz", np.frombuffer(json.dumps({**index, "sha256": index["sha256"][:-1]}).encode(), dtype=np.uint8),
             "files and .* checksums")):
        np.savez(tmp_path / name, **{**arrays, "__stream__": member})
        with pytest.raises(DataError, match=match) as e:
            load_samples(tmp_path / name, cfg.model.inputs, "y")
        assert "\n" not in str(e.value) and "re-run prepare" in str(e.value)
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"config": str(ROOT / "configs" / "digits.yaml"), "override": True,
                                      "data": {"stream": True}}))
    with pytest.raises((ConfigError, PipelineError), match="stream: true streams image folders only") as e:
        load_config(None, params, quiet=True)
    assert "\n" not in str(e.value)


def test_tune_on_a_streamed_split_gives_the_numbers_of_the_held_one(prepared, digit_pngs, tmp_path, monkeypatch):
    """tune on the in-memory split (its full set one chunk) and on the streamed one (chunks of one
    batch): the same tune.json; the streamed split is decoded a chunk at a time, never whole."""
    from pipeline.data.stream import ImageStream
    from pipeline.stages import calibrate, export, tune, validate
    from pipeline.data import chunks

    def whole(self, *a, **k):
        raise AssertionError("tune decoded a whole streamed split into one array")

    slices: list[int] = []
    real_slice = ImageStream._slice

    def spy(self, start, stop):
        slices.append(stop - start)
        return real_slice(self, start, stop)

    monkeypatch.setattr(ImageStream, "__array__", whole)
    monkeypatch.setattr(ImageStream, "_slice", spy)
    reports = {}
    for stream in (False, True):
        _, prep = prepared[stream]
        cfg = _cfg(tmp_path, digit_pngs, stream, tune={"budget": {"metric": "top1_agreement", "min": 1.0}})
        d = tmp_path / f"run-{stream}"
        export.run(cfg, prep / "model.pt", d / "export")
        validate.run(cfg, prep / "model.pt", d / "export" / "model.onnx", prep / "eval.npz", d / "validate")
        calibrate.run(cfg, d / "export" / "model.onnx", prep / "calib.npz", d / "calibrate",
                      validation=d / "validate" / "validate.json", progress=False)
        if stream:
            slices.clear()
            monkeypatch.setattr(chunks, "CHUNK_BYTES", 1)
        tune.run(cfg, d / "export" / "model.onnx", d / "calibrate", prep / "eval.npz", d / "tune",
                 validation=d / "validate" / "validate.json", progress=False)
        reports[stream] = json.loads((d / "tune" / "tune.json").read_text())
    held, streamed = reports[False], reports[True]
    bs = prepared[True][0].evaluate.batch_size
    assert slices and max(slices) == bs < streamed["samples"]["full"] and len(held["candidates"]) > 2
    for k in ("budget", "samples", "layers", "sensitivity", "chosen", "kept", "frontier", "reference_points"):
        assert streamed[k] == held[k], k
    drop = ("seconds", "sqnr_db")  # sqnr_db: a sum over chunks (float rounding); the rest is counted
    assert [{k: v for k, v in c.items() if k not in drop} for c in streamed["candidates"]] == \
        [{k: v for k, v in c.items() if k not in drop} for c in held["candidates"]]
    for a, b in zip(streamed["candidates"], held["candidates"]):
        assert a["sqnr_db"] == b["sqnr_db"] or a["sqnr_db"] == pytest.approx(b["sqnr_db"], rel=1e-9)
