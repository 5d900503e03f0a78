"""Agreement and task metrics, numpy only (runs on the GPU side without torch)."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np


def agreement(candidate: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """How closely `candidate` follows `reference` (same shape; row = sample)."""
    a = candidate.astype(np.float64).reshape(len(candidate), -1)
    b = reference.astype(np.float64).reshape(len(reference), -1)
    diff = a - b
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    denom = np.maximum(na * nb, np.finfo(np.float64).tiny)
    cos = (a * b).sum(axis=1) / denom
    ref_energy = float((b**2).sum())
    err_energy = float((diff**2).sum())
    out = {
        "cosine": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "max_abs_diff": float(np.abs(diff).max()),
        "mean_abs_diff": float(np.abs(diff).mean()),
        "rel_l2": float(np.sqrt(err_energy / ref_energy)) if ref_energy > 0 else float("inf"),
        "snr_db": float(10 * np.log10(ref_energy / err_energy)) if err_energy > 0 else float("inf"),
    }
    if a.shape[1] > 1:
        out["top1_agreement"] = float((a.argmax(1) == b.argmax(1)).mean())
    return out


def topk(logits: np.ndarray, labels: Optional[np.ndarray], ks: tuple[int, ...] = (1, 5)) -> dict[str, Any]:
    """Top-k accuracy in percent (None without labels)."""
    if labels is None:
        return {}
    order = np.argsort(-logits.reshape(len(logits), -1), axis=1)
    out = {}
    for k in ks:
        if k <= order.shape[1]:
            out[f"top{k}"] = float(100.0 * (order[:, :k] == labels[:, None]).any(axis=1).mean())
    return out
