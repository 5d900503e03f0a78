"""Config checks that the model's outputs and the labels settle are made at prepare, through
the CLI, before any work (one line, exit 1, nothing written): a metric naming an output the
model does not have, a top-k without labels, a top-k that does not say which of several
outputs it reads. Where the config leaves evaluate.metrics out, the default fits the model
(agreement only without labels or with several outputs), prepare says so in one note, and
evaluate runs with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests._project import trtpipe

DETECTOR = {"name": "det", "source": "factory", "arch": "tests.models.digit_detector:make",
            "checkpoint": "weights.pt", "inputs": [{"name": "image", "shape": [1, 8, 8]}]}


def _project(root: Path, labelled: bool, **sections: Any) -> None:
    """A user project: the three-head detector (seeded weights) on 120 real digit images
    in an npz (with or without labels), short latency runs on onnxruntime."""
    import torch
    from sklearn.datasets import load_digits

    from tests.models.digit_detector import make

    torch.manual_seed(0)
    torch.save(make().state_dict(), root / "weights.pt")
    d = load_digits()
    arrays = {"image": d.images[:120, None].astype(np.float32)}
    if labelled:
        arrays["y"] = d.target[:120].astype(np.int64)
    np.savez(root / "data.npz", **arrays)
    cfg: dict[str, Any] = {
        "model": dict(DETECTOR),
        "data": {"source": "npz", "path": "data.npz", "split": {"train": 0.0, "calibration": 0.5, "evaluation": 0.5},
                 "preprocess": {"scale": 0.0625, "mean": [0.5], "std": [0.5]}},
        "validate": {"num_samples": 32},
        "calibration": {"num_samples": 32, "batch_size": 16},
        "build": {"backend": "onnxruntime"},
        "evaluate": {"batch_size": 32, "latency": {"warmup": 1, "iterations": 2, "batch_sizes": [1]}},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    (root / "configs").mkdir(exist_ok=True)
    (root / "configs" / "det.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (root / "params.yaml").write_text("config: configs/det.yaml\n")


def _fails_at_prepare(root: Path, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert trtpipe("prepare") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (root / "artifacts" / "prepare").exists()  # refused before any work
    return err


@pytest.mark.parametrize("labelled", [False, True], ids=["unlabelled", "labelled"])
def test_a_metric_naming_a_missing_output_fails_at_prepare(mine: Path, labelled: bool,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    _project(mine, labelled, evaluate={"metrics": [{"function": "pipeline.examples.task_metrics:box_iou_vs_reference",
                                                    "output": "bbox"}]})
    err = _fails_at_prepare(mine, capsys)
    assert "evaluate.metrics" in err and "'bbox'" in err and "boxes, landmarks, prob" in err, err


def test_an_agreement_floor_tune_budget_or_gate_key_on_a_missing_output_fails_at_prepare(
        mine: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _project(mine, True, evaluate={"agreement_floor": {"cosine@box": 0.9}})
    err = _fails_at_prepare(mine, capsys)
    assert "evaluate.agreement_floor 'cosine@box'" in err and "output 'box'" in err, err
    _project(mine, True, tune={"budget": {"metric": "snr_db@probs", "min": 30}})
    err = _fails_at_prepare(mine, capsys)
    assert "tune.budget.metric 'snr_db@probs'" in err and "boxes, landmarks, prob" in err, err
    _project(mine, True, gate={"thresholds": {"int8": {"min_agreement": {"cosine@landmark": 0.99}}}})
    err = _fails_at_prepare(mine, capsys)
    assert "gate.thresholds.int8.min_agreement 'cosine@landmark'" in err and "output 'landmark'" in err, err


def test_a_top_k_without_labels_fails_at_prepare(mine: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _project(mine, False, evaluate={"metrics": [{"metric": "top1", "output": "prob"}]})
    err = _fails_at_prepare(mine, capsys)
    assert "evaluate.metrics 'top1' is a top-k accuracy" in err and "no labels" in err and "'y'" in err, err


def test_a_top_k_on_several_outputs_must_name_one_at_prepare(mine: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _project(mine, True, evaluate={"metrics": ["top1"]})
    err = _fails_at_prepare(mine, capsys)
    assert "'top1': the model has 3 outputs" in err and "say which one it reads" in err, err


def test_a_top_k_on_a_named_output_with_labels_passes(mine: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _project(mine, True, evaluate={"metrics": [{"metric": "top1", "output": "prob"}]})
    assert trtpipe("prepare") == 0
    assert "note" not in capsys.readouterr().err


@pytest.mark.parametrize("labelled,why", [(False, "the evaluation data has no labels"),
                                          (True, "the model has 3 outputs (boxes, landmarks, prob)")],
                         ids=["unlabelled", "three-outputs"])
def test_the_default_metrics_fit_the_model_and_evaluate_runs(mine: Path, labelled: bool, why: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """No evaluate.metrics: prepare notes the choice once, and evaluate (which used to fail
    with "the model has 3 outputs ... say which one it reads") measures agreement only."""
    _project(mine, labelled)
    capsys.readouterr()
    assert trtpipe("prepare") == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "evaluate.metrics is not set" in line]
    assert len(notes) == 1 and why in notes[0] and "agreement with fp32 only" in notes[0], err
    for step in (("export",), ("validate",), ("build", "--precision", "fp32"), ("evaluate", "--precision", "fp32")):
        assert trtpipe(*step) == 0, (step, capsys.readouterr().err)
    import json

    report = json.loads((mine / "artifacts" / "eval" / "fp32.json").read_text())
    assert report["metrics"] == {}
    assert set(report["agreement_pytorch"]) == {"boxes", "landmarks", "prob"}


def test_the_digits_default_keeps_top1_and_top5_without_a_note(project: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert trtpipe("prepare") == 0
    captured = capsys.readouterr()
    assert "evaluate.metrics" not in captured.err
    assert "PyTorch eval top-1" in captured.out
