"""prepare: the model's weights and the data splits, ready for export, calibration and evaluation.

Outputs (folder, replaced atomically): model.pt (a state_dict), calib.npy (calibration
samples, preprocessed), eval.npz (x, y: evaluation samples), prepare.json."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.datasets import Splits, load_splits

from ..config import Config
from ..errors import ConfigError, DataError
from ..fileio import sha256_file, staging_dir, write_json


def train_builtin(model: Any, splits: Splits, cfg: Config) -> dict[str, Any]:
    """Deterministic training of the built-in model on the train split (seconds on a CPU)."""
    import torch

    t = cfg.model.train
    if len(splits.train) == 0 or splits.train.y is None:
        raise DataError("training the built-in model needs a labelled train split (data.split.train > 0 and labels)")
    torch.manual_seed(t.seed)
    torch.use_deterministic_algorithms(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same summation order on every machine
    try:
        x = torch.from_numpy(splits.train.x.astype(np.float32))
        y = torch.from_numpy(splits.train.y)
        opt = torch.optim.Adam(model.parameters(), lr=t.lr)
        gen = torch.Generator().manual_seed(t.seed)
        model.train()
        losses = []
        for _ in range(t.epochs):
            perm = torch.randperm(len(x), generator=gen)
            total = 0.0
            for i in range(0, len(x), t.batch_size):
                idx = perm[i : i + t.batch_size]
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            losses.append(total / len(x))
        model.eval()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    return {"epochs": t.epochs, "final_loss": losses[-1], "samples": len(x)}


def run(cfg: Config, out_dir: Path) -> dict[str, Any]:
    import torch

    from ..models import build_model, load_checkpoint

    start = time.perf_counter()
    splits = load_splits(cfg.data, cfg.model.input)
    torch.manual_seed(cfg.model.train.seed)  # initial weights too: same config, same model.pt
    model = build_model(cfg.model)
    if cfg.model.checkpoint:
        load_checkpoint(model, cfg.model.checkpoint)
        model.eval()
        weights = {"from": "checkpoint", "path": cfg.model.checkpoint, "sha256": sha256_file(cfg.model.checkpoint)}
    elif cfg.model.source == "builtin":
        weights = {"from": "trained", **train_builtin(model, splits, cfg)}
    else:
        raise ConfigError(
            f"model.checkpoint is not set for model.source '{cfg.model.source}'; weights cannot be downloaded here: "
            "point model.checkpoint at a state_dict saved with torch.save(model.state_dict(), path)"
        )
    with torch.no_grad():
        model.eval()
        ev = splits.evaluation
        logits = torch.cat([model(torch.from_numpy(ev.x[i : i + 256].astype(np.float32))) for i in range(0, len(ev), 256)])
    top1 = float((logits.argmax(1).numpy() == ev.y).mean()) if ev.y is not None else None

    with staging_dir(out_dir) as tmp:
        torch.save(model.state_dict(), tmp / "model.pt")
        np.save(tmp / "calib.npy", splits.calibration.x)
        np.savez(tmp / "eval.npz", x=splits.evaluation.x, **({"y": ev.y} if ev.y is not None else {}))
        report = {
            "model": cfg.model.name,
            "weights": weights,
            "data": {
                "source": cfg.data.source,
                "path": cfg.data.path,
                "seed": cfg.data.seed,
                "train": len(splits.train),
                "calibration": len(splits.calibration),
                "evaluation": len(splits.evaluation),
                "input_shape": list(cfg.model.input.shape),
            },
            "pytorch_eval_top1": top1,
            "seconds": round(time.perf_counter() - start, 3),
            "sha256": {name: sha256_file(tmp / name) for name in ("model.pt", "calib.npy", "eval.npz")},
        }
        write_json(tmp / "prepare.json", report)
    return report
