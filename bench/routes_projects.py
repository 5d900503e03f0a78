"""Four projects for the side-by-side of TensorRT's routes (issue 20's GPU show), made on a CPU up to
calibrate: ResNet-50 (seeded), EfficientNet-Lite0 (ImageNet weights), the three-head digit detector
(trained here) and the BERT-style text encoder with two int64 inputs and a dynamic sequence axis
(seeded; tests/models), EfficientNet-Lite1 (ImageNet weights, `--only efficientnet_lite1`) and all-MiniLM-L6-v2 with its real weights (`--only minilm`; MINILM_PKG,
bench/routes/minilm_factory.py). Each runs `trtpipe prepare, export, validate, calibrate` with its own config
(backend onnxruntime here); the GPU then builds and evaluates every route
(`bench/device_session.sh routes`). `calib.npz` is not needed there: the implicit route reads
calibrate's cache. Writes build/routes/<model>/ and build/routes.tgz parts of < 60 MB (carry limit).

    python bench/routes_projects.py [--only resnet50,efficientnet,detector,text]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

IMAGES = {  # ResNet-50 and EfficientNet-Lite0 on the same crops (routes_factory)
    "data": {"source": "factory", "path": "routes_factory:eval_crops", "calibration_path": "routes_factory:calib_crops"},
    "validate": {"num_samples": 128, "atol": 1.0e-3, "min_cosine": 0.99999},
    "calibration": {"method": "entropy", "num_samples": 256, "batch_size": 32},
    "build": {"profile": {"min_batch": 1, "opt_batch": 32, "max_batch": 32}},
    "evaluate": {"batch_size": 32, "metrics": [], "latency": {"warmup": 20, "iterations": 200, "batch_sizes": [1, 32]}},
}


#: The PTQ a project is also calibrated with (issue 21's "after"; bench/device_session.sh ptq builds both):
#: the full-INT8 recipe with the best logits cosine on EfficientNet-Lite0 and -Lite1 in the CPU simulation
#: (mse + GPTQ + bias correction; docs/results.md, chosen on those same crops) and SmoothQuant for the encoder.
AFTER = {"efficientnet_lite1": {"calibration": {"method": "mse", "weight_rounding": "gptq", "bias_correction": True}},
         "minilm": {"calibration": {"method": "minmax", "smooth_quant": True}}}
#: Projects whose "after" the GPU host calibrates (and "before" again): minilm's Q/DQ ONNX is 58 MB, too big to
#: carry twice; its calib.npz travels instead.
CALIBRATED_ON_GPU = {"minilm"}


def _configs() -> dict[str, tuple[dict[str, Any], list[Path]]]:
    from tests.test_any_model import DETECTOR, TEXT

    def image_model(name: str, arch: str, mean: float | list[float], std: float | list[float]) -> dict[str, Any]:
        cfg = copy.deepcopy(IMAGES)
        cfg["model"] = {"name": name, "source": "factory", "arch": arch, "checkpoint": "weights.pt", "num_classes": 1000,
                        "inputs": [{"name": "input", "shape": [3, 224, 224], "dtype": "float32"}],
                        "outputs": [{"name": "logits"}]}
        cfg["data"]["preprocess"] = {"mean": mean if isinstance(mean, list) else [mean] * 3,
                                     "std": std if isinstance(std, list) else [std] * 3}
        return cfg

    resnet = image_model("resnet50", "routes_factory:resnet50", [123.7, 116.3, 103.5], [58.4, 57.1, 57.4])
    effnet = image_model("efficientnet-lite0", "efficientnet_lite0_factory:make", 127.0, 128.0)
    text = copy.deepcopy(TEXT)
    text["evaluate"]["latency"] = {"warmup": 20, "iterations": 200, "batch_sizes": [1, 16]}
    det = copy.deepcopy(DETECTOR)
    det["evaluate"]["latency"] = {"warmup": 20, "iterations": 200, "batch_sizes": [1, 32]}
    # all-MiniLM-L6-v2, real weights (issue 21's BERT-style encoder on an engine): the text project's
    # shape, the package's tokenizer, 64 tokens; entropy here, minmax + SmoothQuant calibrated on the GPU host
    minilm = copy.deepcopy(TEXT)
    minilm["model"].update({"name": "all-minilm-l6-v2", "arch": "minilm_factory:make",
                            "outputs": [{"name": "embedding"}]})
    minilm["model"]["inputs"][0]["shape"] = ["batch", "seq"]
    minilm["data"] = {"source": "factory", "path": "minilm_factory:batches",
                      "split": {"train": 0.0, "calibration": 0.5, "evaluation": 0.5}}
    minilm["validate"] = {"num_samples": 32}
    minilm["calibration"] = {"method": "entropy", "num_samples": 64, "batch_size": 16}
    minilm["build"] = {"profiles": [{"batch": [1, 16, 32], "seq": [8, 64, 128]}]}
    minilm["evaluate"]["latency"] = {"warmup": 20, "iterations": 200, "batch_sizes": [1, 16]}
    lite1 = image_model("efficientnet-lite1", "efficientnet_lite1_factory:make", 127.0, 128.0)
    lite1["model"]["inputs"][0]["shape"] = [3, 240, 240]
    lite1["data"].update({"path": "efficientnet_lite1_factory:eval_crops",
                          "calibration_path": "efficientnet_lite1_factory:calib_crops"})
    lite1["calibration"]["num_samples"] = 512
    img_mods = [ROOT / "bench/routes/routes_factory.py", ROOT / "configs/efficientnet_lite0_factory.py"]
    return {"resnet50": (resnet, img_mods), "efficientnet": (effnet, img_mods),
            "efficientnet_lite1": (lite1, [ROOT / "bench/routes/efficientnet_lite1_factory.py",
                                           ROOT / "configs/efficientnet_lite0_factory.py"]),
            "detector": (det, [ROOT / "tests/models/digit_detector.py"]),
            "text": (text, [ROOT / "tests/models/text_encoder.py", ROOT / "tests/models/text_data.py"]),
            "minilm": (minilm, [ROOT / "bench/routes/minilm_factory.py", ROOT / "tests/models/text_data.py"])}


def make(name: str, work: Path) -> None:
    from any_model_dvc import _project, _sh

    config, modules = _configs()[name]
    root = work / name
    _project(root, config, modules)
    sys.path.insert(0, str(root))
    if name == "resnet50":
        import torch
        from routes_factory import resnet50  # type: ignore[import-not-found]

        torch.save(resnet50().state_dict(), root / "weights.pt")
    elif name == "efficientnet":
        from efficientnet_lite0_factory import save_checkpoint

        save_checkpoint(str(root / "weights.pt"))
    elif name == "detector":
        from digit_detector import train  # type: ignore[import-not-found]

        train(str(root / "weights.pt"))
    elif name == "efficientnet_lite1":
        from efficientnet_lite1_factory import save_checkpoint as save_lite1  # type: ignore[import-not-found]

        save_lite1(str(root / "weights.pt"))
    elif name == "minilm":
        from minilm_factory import save_checkpoint  # type: ignore[import-not-found]

        save_checkpoint(str(root / "weights.pt"))
    elif name == "text":
        import torch
        from text_encoder import make as make_text  # type: ignore[import-not-found]

        torch.manual_seed(0)
        torch.save(make_text().state_dict(), root / "weights.pt")
    trtpipe = str(Path(sys.executable).parent / "trtpipe")
    t0 = time.monotonic()
    for stage in ("prepare", "export", "validate", "calibrate"):
        _sh(trtpipe, stage, "-q", cwd=root)
    after = AFTER.get(name)
    if after is not None:  # the device's ptq phase calibrates from this file where calibrate_after is absent
        import yaml

        (root / "params-after.yaml").write_text(yaml.safe_dump({"config": "configs/model.yaml", "override": True,
                                                                 **after}))
    if name in CALIBRATED_ON_GPU:
        return print(f"{name}: prepare .. calibrate in {time.monotonic() - t0:.0f} s", flush=True)
    if after is not None:
        _sh(trtpipe, "calibrate", "-q", "--params", "params-after.yaml", "--out", "artifacts/calibrate_after", cwd=root)
    (root / "artifacts/prepare/calib.npz").unlink()  # the GPU reads calibrate's cache, not the samples
    print(f"{name}: prepare .. calibrate in {time.monotonic() - t0:.0f} s", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "routes")
    ap.add_argument("--only", default="resnet50,efficientnet,detector,text")
    a = ap.parse_args()
    for name in [n.strip() for n in a.only.split(",") if n.strip()]:
        make(name, a.work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
