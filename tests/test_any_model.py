"""Models a user brings, through every stage on the CPU (onnxruntime backend), by the command
line: a sentence-embedding transformer (two int64 inputs with a dynamic sequence axis, two
outputs, attention-mask sentinels) and a three-head model (boxes, landmarks, class
probabilities as a dict). Every output is validated, compared and gated by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests._project import trtpipe

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(__file__).resolve().parent / "models"
STAGES = [("prepare",), ("export",), ("validate",), ("calibrate",), ("build", "--precision", "fp32"),
          ("build", "--precision", "fp16"), ("build", "--precision", "int8"), ("evaluate", "--precision", "fp32"),
          ("evaluate", "--precision", "fp16"), ("evaluate", "--precision", "int8"), ("compare",), ("publish",)]


def _project(tmp: Path, config: dict[str, Any], modules: list[str]) -> Path:
    root = tmp / "project"
    (root / "configs").mkdir(parents=True)
    for m in modules:  # the user's own code, beside the config
        shutil.copy(MODELS / f"{m}.py", root / f"{m}.py")
    (root / "configs" / "model.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump({"config": "configs/model.yaml"}))
    return root


def _run_all(capsys: pytest.CaptureFixture[str]) -> None:
    for step in STAGES:
        rc = trtpipe(*step)
        assert rc == 0, (step, capsys.readouterr().err)


def _json(path: str) -> Any:
    return json.loads(Path(path).read_text())


TEXT = {
    "model": {
        "name": "text-encoder", "source": "factory", "arch": "text_encoder:make", "checkpoint": "weights.pt",
        "inputs": [{"name": "input_ids", "shape": ["seq"], "dtype": "int64"},
                   {"name": "attention_mask", "shape": ["batch", "seq"], "dtype": "int64"}],
        "outputs": [{"name": "embedding"}, {"name": "tokens", "shape": ["seq", 64]}],
    },
    "data": {"source": "factory", "path": "text_data:batches", "pad_to": {"seq": 48},
             "split": {"train": 0.0, "calibration": 0.5, "evaluation": 0.5}},
    "validate": {"num_samples": 48},
    "calibration": {"num_samples": 48, "batch_size": 16},
    "build": {"profiles": [{"batch": [1, 16, 64], "seq": [8, 48, 64]}]},
    "evaluate": {
        "metrics": [{"function": "pipeline.examples.task_metrics:embedding_similarity",
                     "kwargs": {"output": "embedding"}, "output": "embedding"}],
        "latency": {"warmup": 1, "iterations": 5, "batch_sizes": [1, 16]},
    },
    "gate": {"thresholds": {"fp16": {"min_agreement": {"cosine": 0.9999}},
                            "int8": {"min_agreement": {"cosine@embedding": 0.99}}}},
}


@pytest.mark.slow
def test_sentence_transformer_through_every_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    root = _project(tmp_path, TEXT, ["text_encoder", "text_data"])
    monkeypatch.chdir(root)
    monkeypatch.syspath_prepend(str(root))
    from text_encoder import make  # type: ignore[import-not-found]

    torch.manual_seed(0)
    torch.save(make().state_dict(), root / "weights.pt")
    _run_all(capsys)

    # prepare: integer inputs stay integers, padded to the stated length; no labels.
    with np.load("artifacts/prepare/eval.npz") as z:
        assert sorted(z.files) == ["attention_mask", "input_ids"]
        assert z["input_ids"].dtype == np.int64 and z["input_ids"].shape[1] == 48
        assert set(np.unique(z["attention_mask"])) == {0, 1}
    prep = _json("artifacts/prepare/prepare.json")
    assert prep["data"]["labelled"] is False and prep["pytorch_eval_top1"] is None
    # export: every named axis dynamic, on inputs and outputs.
    exp = _json("artifacts/export/export.json")
    assert exp["dynamic_axes"]["input_ids"] == {"0": "batch", "1": "seq"}
    assert exp["dynamic_axes"]["tokens"] == {"0": "batch", "1": "seq"}
    assert [i["dtype"] for i in exp["inputs"]] == ["int64", "int64"]
    # validate: both outputs, each against PyTorch.
    val = _json("artifacts/validate/validate.json")
    assert set(val["outputs"]) == {"embedding", "tokens"} and val["passed"]
    # calibrate: integer inputs get no range; the attention-mask sentinels are left out, with why.
    cal = _json("artifacts/calibrate/calibrate.json")
    ranges = _json("artifacts/calibrate/ranges.json")["tensors"]
    assert "input_ids" not in ranges and "attention_mask" not in ranges
    assert cal["excluded"] and all("sentinel" in why for why in cal["excluded"].values())
    assert not set(cal["excluded"]) & set(ranges)
    assert cal["calibration_shapes"] == {"input_ids": [16, 48], "attention_mask": [16, 48]}
    # fp16: the reductions stay in fp32 and the variant follows PyTorch on both outputs.
    b16 = _json("artifacts/build/fp16/build.json")
    assert any("Softmax" in k for k in b16["kept_fp32"]) and any("LayerNormalization" in k for k in b16["kept_fp32"])
    comp = _json("artifacts/compare/compare.json")
    for out in ("embedding", "tokens"):
        assert comp["agreement"]["fp16"]["pytorch"][out]["cosine"] > 0.9999
        assert comp["agreement"]["int8"]["fp32"][out]["cosine"] > 0.99
    assert comp["outputs"] == ["embedding", "tokens"] and comp["flags"] == {}
    assert comp["metric_outputs"]["embedding_cosine"] == "embedding"
    # gate: passes; every output checked where no '@output' narrows it.
    capsys.readouterr()
    assert trtpipe("gate", "--json") == 0
    checks = json.loads(capsys.readouterr().out)["checks"]
    assert {c["name"] for c in checks if c["variant"] == "fp16"} >= {"cosine vs fp32 (embedding)", "cosine vs fp32 (tokens)"}
    assert [c["name"] for c in checks if c["variant"] == "int8" and "cosine" in c["name"]] == ["cosine vs fp32 (embedding)"]


DETECTOR = {
    "model": {
        "name": "digit-detector", "source": "factory", "arch": "digit_detector:make", "checkpoint": "weights.pt",
        "inputs": [{"name": "image", "shape": [1, 8, 8]}],
    },
    "data": {"source": "digits", "preprocess": {"scale": 0.0625, "mean": [0.5], "std": [0.5]}},
    "calibration": {"num_samples": 96},
    "evaluate": {
        "metrics": [{"metric": "top1", "output": "prob"},
                    {"function": "pipeline.examples.task_metrics:box_iou_vs_reference", "output": "boxes"}],
        "latency": {"warmup": 1, "iterations": 5, "batch_sizes": [1, 32]},
    },
    "gate": {"thresholds": {"int8": {"max_drop": {"top1_prob": 2.0}, "min_agreement": {"cosine": 0.99}}}},
}


@pytest.mark.slow
def test_three_output_model_through_every_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    root = _project(tmp_path, DETECTOR, ["digit_detector"])
    monkeypatch.chdir(root)
    monkeypatch.syspath_prepend(str(root))
    from digit_detector import train  # type: ignore[import-not-found]

    train(str(root / "weights.pt"))
    _run_all(capsys)

    exp = _json("artifacts/export/export.json")
    assert [o["name"] for o in exp["outputs"]] == ["boxes", "landmarks", "prob"]  # named after forward()'s dict
    assert "dict of 3 tensor(s)" in exp["output_structure"]
    assert set(_json("artifacts/validate/validate.json")["outputs"]) == {"boxes", "landmarks", "prob"}
    ev = _json("artifacts/eval/int8.json")
    # top1 reads the class head (an independent check: argmax of PyTorch's prob against the labels).
    assert ev["metric_outputs"] == {"top1_prob": "prob", "boxes_iou": "boxes", "boxes_iou_min": "boxes"}
    with np.load("artifacts/prepare/eval.npz") as z, np.load("artifacts/validate/reference.npz") as ref:
        torch_top1 = 100 * float((ref["prob"].argmax(1) == z["y"]).mean())
    assert ev["reference_metrics"]["pytorch"]["top1_prob"] == pytest.approx(torch_top1) and torch_top1 > 90
    comp = _json("artifacts/compare/compare.json")
    assert comp["outputs"] == ["boxes", "landmarks", "prob"]
    worst = min(comp["agreement"]["int8"]["fp32"][o]["cosine"] for o in comp["outputs"])
    assert comp["variants"]["int8"]["fp32_cosine"] == worst  # the row's headline is the worst output
    md = Path("artifacts/compare/compare.md").read_text()
    assert all(f"| int8 | {o} |" in md for o in comp["outputs"])
    capsys.readouterr()
    assert trtpipe("gate", "--json") in (0, 1)
    checks = [c for c in json.loads(capsys.readouterr().out)["checks"] if c["variant"] == "int8"]
    assert {c["name"] for c in checks} >= {"cosine vs fp32 (boxes)", "cosine vs fp32 (landmarks)", "cosine vs fp32 (prob)",
                                           "top1_prob drop vs fp32"}

    # A built-in top-k without an output, on a model with three, is refused naming them.
    cfg = yaml.safe_load(Path("configs/model.yaml").read_text())
    cfg["evaluate"]["metrics"] = ["top1"]
    Path("configs/model.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert trtpipe("evaluate", "--precision", "fp32") == 1
    err = capsys.readouterr().err
    assert "the model has 3 outputs (boxes, landmarks, prob); say which one it reads: {metric: top1, output: <name>}" in err
