"""prepare: the model's weights and the data splits, ready for export, calibration and evaluation.

Outputs (folder, replaced atomically): model.pt (a state_dict), calib.npz and eval.npz
(one array per model input, labels under data.labels_key; pipeline.data.samples), and
prepare.json (a PrepareReport: split sizes, what the weights are, and the sha256 of
every file written and of the user's own inputs: checkpoint, data, factory modules)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..config import Config
from ..data import Splits, load_splits, save_samples
from ..errors import ConfigError, DataError, ModelError
from ..fileio import claim_dir, sha256_file, staging_dir, write_through
from ..reports import PrepareData, PrepareReport, TensorInfo, write_report
from .common import module_file, torch_inputs

OUTPUTS = ("model.pt", "calib.npz", "eval.npz")
TOP1_BATCH = 32  # PyTorch's top-1 on the evaluation split, batch by batch: memory bounded by the batch, not the split


def check_class_labels(y: Optional[np.ndarray], num_classes: int, where: str) -> None:
    """Class-index labels for a model with `num_classes` outputs: integers in [0, num_classes)."""
    if y is None:
        return
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(f"{where}: labels have shape {list(y.shape)} and dtype {y.dtype}; a classifier needs one "
                        "integer class index per sample")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        bad = int(y.min()) if y.min() < 0 else int(y.max())
        raise DataError(f"{where}: label {bad} is outside 0..{num_classes - 1} (model.num_classes {num_classes}); "
                        "fix the labels or model.num_classes")


def train_builtin(model: Any, splits: Splits, cfg: Config) -> dict[str, Any]:
    """Deterministic training of the built-in model on the train split (seconds on a CPU)."""
    import torch

    t = cfg.model.train
    if len(splits.train) == 0 or splits.train.y is None:
        raise DataError("training the built-in model needs a labelled train split (data.split.train > 0 and labels)")
    check_class_labels(splits.train.y, cfg.model.num_classes, "the train split")
    torch.manual_seed(t.seed)
    torch.use_deterministic_algorithms(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same summation order on every machine
    try:
        x = torch.from_numpy(splits.train.x[cfg.model.input.name].astype(np.float32))
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
    if not math.isfinite(losses[-1]) or not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise ModelError(f"training the built-in model diverged (final loss {losses[-1]}); lower model.train.lr "
                         f"(now {t.lr})")
    return {"epochs": t.epochs, "final_loss": losses[-1], "samples": len(x)}


def _eval_top1(model: Any, cfg: Config, splits: Splits) -> Optional[float]:
    """PyTorch top-1 (percent) on the evaluation split, for labelled single-output classifiers."""
    import torch

    from ..models import run_flat

    ev = splits.evaluation
    if ev.y is None or ev.y.ndim != 1 or ev.y.dtype.kind not in "iu":
        return None
    logits = []
    bs = TOP1_BATCH
    with torch.no_grad():
        for i in range(0, len(ev), bs):
            outs = run_flat(model, torch_inputs(cfg.model.inputs, {k: v[i:i + bs] for k, v in ev.x.items()}))
            if len(outs) != 1 or outs[0].ndim != 2:
                return None
            logits.append(outs[0].float().numpy())
    pred = np.concatenate(logits).argmax(1)
    return float(100.0 * (pred == ev.y).mean())


def _output_names(model: Any, cfg: Config, splits: Splits) -> Optional[list[str]]:
    """The names export will give the model's outputs (from a forward pass on two samples);
    None where the model does not run on them (export says why, in its terms)."""
    import torch

    from ..models import describe_structure, flatten_outputs, output_names

    part = splits.evaluation if len(splits.evaluation) else splits.calibration
    if not len(part):
        return None
    training = model.training
    model.eval()  # no batch-norm statistics or dropout draws: the weights and the seed's stream stay as they were
    try:
        with torch.no_grad():
            out = model(*torch_inputs(cfg.model.inputs, {k: v[:2] for k, v in part.x.items()}))
    except Exception:
        return None
    finally:
        model.train(training)
    return output_names(flatten_outputs(out), cfg.model.output_names, describe_structure(out))


def check_against_model(cfg: Config, names: list[str], labelled: bool) -> Optional[str]:
    """The checks of evaluate.metrics, evaluate.agreement_floor and tune.budget.metric that the
    model's outputs and the labels settle, made before any work (one ConfigError); returns the
    note on the metrics evaluate will compute where the config left them to a default."""
    from ..config import split_agreement_key
    from ..metrics import check_metric_specs, metric_specs

    specs, note = metric_specs(cfg.evaluate, names, labelled)
    check_metric_specs(specs, names, labelled, cfg.data.labels_key)
    keys = [("evaluate.agreement_floor", k) for k in cfg.evaluate.agreement_floor]
    for precision, t in cfg.gate.thresholds.items():
        keys += [(f"gate.thresholds.{precision}.{field}", k) for field in ("min_agreement", "max_divergence")
                 for k in getattr(t, field, {}) or {}]
    if cfg.tune is not None:
        keys.append(("tune.budget.metric", cfg.tune.budget.metric))
    for where, key in keys:
        output = split_agreement_key(key)[2]
        if output is not None and output not in names:
            raise ConfigError(f"{where} '{key}' reads output '{output}', which the model does not have "
                              f"({', '.join(names)})")
    return note


def user_sources(cfg: Config) -> dict[str, Optional[str]]:
    """sha256 of every file of the user's the config names (checkpoint, data, factory modules)."""
    out: dict[str, Optional[str]] = {}
    if cfg.model.checkpoint:
        out["model.checkpoint"] = sha256_file(cfg.model.checkpoint)
    if cfg.model.source == "factory":
        f = module_file(cfg.model.arch)
        out["model.arch"] = sha256_file(f) if f else None
    for key in ("path", "calibration_path"):
        loc = getattr(cfg.data, key)
        if not loc:
            continue
        if cfg.data.source == "factory":
            f = module_file(loc)
            out[f"data.{key}"] = sha256_file(f) if f else None
        elif Path(loc).exists():
            out[f"data.{key}"] = sha256_file(loc)
    return out


def run(cfg: Config, out_dir: Path) -> PrepareReport:
    import torch

    claim_dir(out_dir, "prepare")  # only into an output it owns (fileio.claim_dir)

    from ..models import build_model, load_checkpoint

    start = time.perf_counter()
    splits = load_splits(cfg.data, cfg.model.inputs)
    if cfg.model.source in ("builtin", "torchvision"):
        for name, part in (("calibration", splits.calibration), ("evaluation", splits.evaluation)):
            if part.y is not None and part.y.ndim == 1:
                check_class_labels(part.y, cfg.model.num_classes, f"the {name} split ({cfg.data.source})")
    torch.manual_seed(cfg.model.train.seed)  # initial weights too: same config, same model.pt
    model = build_model(cfg.model)
    names = _output_names(model, cfg, splits)
    if names is not None:  # before training: a config that cannot evaluate fails now, not stages later
        note = check_against_model(cfg, names, splits.evaluation.y is not None)
        if note:
            from ..log import get_logger

            get_logger().info(note)
    if cfg.model.checkpoint:
        load_checkpoint(model, cfg.model.checkpoint)
        model.eval()
        weights = {"from": "checkpoint", "path": cfg.model.checkpoint}
    elif cfg.model.source == "builtin":
        weights = {"from": "trained", **train_builtin(model, splits, cfg)}
    else:
        raise ConfigError(
            f"model.checkpoint is not set for model.source '{cfg.model.source}'; weights cannot be downloaded here: "
            "point model.checkpoint at a state_dict saved with torch.save(model.state_dict(), path)"
        )
    model.eval()
    top1 = _eval_top1(model, cfg, splits)
    sources = user_sources(cfg)

    with staging_dir(out_dir) as tmp:
        write_through(tmp / "model.pt", lambda f: torch.save(model.state_dict(), f))
        save_samples(tmp / "calib.npz", splits.calibration, cfg.data.labels_key)
        save_samples(tmp / "eval.npz", splits.evaluation, cfg.data.labels_key)
        ev = splits.evaluation
        report = PrepareReport(
            model=cfg.model.name,
            weights=weights,
            data=PrepareData(
                source=cfg.data.source, path=cfg.data.path, calibration_path=cfg.data.calibration_path,
                seed=cfg.data.seed, train=len(splits.train), calibration=len(splits.calibration),
                evaluation=len(ev), labelled=ev.y is not None, labels_key=cfg.data.labels_key,
                inputs=[TensorInfo(name=k, dtype=str(v.dtype), shape=["batch", *v.shape[1:]]) for k, v in ev.x.items()],
            ),
            pytorch_eval_top1=top1,
            seconds=round(time.perf_counter() - start, 3),
            sources=sources,
            sha256={name: sha256_file(tmp / name) for name in OUTPUTS},
        )
        write_report(tmp / "prepare.json", report)
    return report
