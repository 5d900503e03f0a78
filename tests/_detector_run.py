"""A small three-output model (tests/models/digit_detector.py: boxes, landmarks, prob) taken
through prepare and export by the real stage functions, once per test session: the input
of the validate and provenance tests. Its weights are the seeded initial ones (validate
compares onnxruntime with PyTorch; accuracy does not matter), so it takes a second."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_CACHE: dict[str, Path] = {}
OUTPUTS = ["boxes", "landmarks", "prob"]


def detector_config(tmp: Path, weights: Path, **sections: Any) -> Any:
    """configs/digits.yaml with the detector as a factory model (the checkpoint `weights`),
    plus `sections` merged over it (e.g. validate={"atol": 1e-12})."""
    from tests._digits_run import digits_config

    model = {"name": "digit-detector", "source": "factory", "arch": "tests.models.digit_detector:make",
             "checkpoint": str(weights), "inputs": [{"name": "image", "shape": [1, 8, 8]}], "outputs": None}
    return digits_config(tmp, model={**model, **sections.pop("model", {})}, evaluate={"metrics": []}, **sections)


def detector_run(tmp_path_factory: Any) -> Path:
    """A folder with weights.pt, prepare/ (model.pt, calib.npz, eval.npz, prepare.json) and
    export/ (model.onnx, export.json)."""
    if "run" not in _CACHE:
        import torch

        from pipeline.stages import export, prepare
        from tests.models.digit_detector import make

        d = tmp_path_factory.mktemp("detector")
        torch.manual_seed(0)
        torch.save(make().state_dict(), d / "weights.pt")
        cfg = detector_config(d, d / "weights.pt")
        prepare.run(cfg, d / "prepare")
        export.run(cfg, d / "prepare" / "model.pt", d / "export")
        _CACHE["run"] = d
    return _CACHE["run"]
