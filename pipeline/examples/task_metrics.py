"""Example user task metrics for `evaluate.metrics` ('module:function' entries).

Each is called as fn(outputs, labels, **kwargs) -> {name: float} over the whole evaluation
set, where `outputs` maps output names to numpy arrays (one row per sample) and `labels`
is eval.npz's `y` (or None); declaring a `reference` parameter also gets the PyTorch
outputs in the same form. Values are in percent, like top-k, so the gate's `max_drop`
reads in points. In a config:

    evaluate:
      metrics:
        - top1
        - pipeline.examples.task_metrics:embedding_retrieval
        - {function: pipeline.examples.task_metrics:detection_map, kwargs: {iou_threshold: 0.5}}
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def _pick(outputs: dict[str, np.ndarray], name: Optional[str]) -> np.ndarray:
    if name is None:
        return next(iter(outputs.values()))
    if name not in outputs:
        raise KeyError(f"no output named '{name}' (outputs: {', '.join(outputs)})")
    return outputs[name]


# --- detection ------------------------------------------------------------------------


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a (n, 4) against every box in b (m, 4), boxes as x1, y1, x2, y2."""
    a, b = a[:, None, :], b[None, :, :]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area = lambda x: np.clip(x[..., 2] - x[..., 0], 0, None) * np.clip(x[..., 3] - x[..., 1], 0, None)  # noqa: E731
    union = area(a) + area(b) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def _average_precision(tp: np.ndarray, scores: np.ndarray, n_gt: int) -> float:
    """All-point interpolated AP (PASCAL VOC 2010+, COCO-style per class)."""
    if n_gt == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    tp = tp[order].astype(np.float64)
    ctp, cfp = np.cumsum(tp), np.cumsum(1 - tp)
    recall = ctp / n_gt
    precision = ctp / np.maximum(ctp + cfp, 1e-12)
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[1.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    return float(np.sum((r[1:] - r[:-1]) * p[1:]))


def detection_map(
    outputs: dict[str, np.ndarray],
    labels: Optional[np.ndarray],
    iou_threshold: float = 0.5,
    boxes: str = "boxes",
    scores: str = "scores",
    classes: str = "classes",
    min_score: float = 0.0,
) -> dict[str, float]:
    """Mean average precision at one IoU threshold, in percent (e.g. `map50`).

    outputs[boxes] (N, K, 4) x1 y1 x2 y2, outputs[scores] (N, K), outputs[classes] (N, K):
    K detections per image (padding: score <= min_score). labels (N, M, 5): class, x1, y1,
    x2, y2 per ground-truth box, padded with class -1."""
    if labels is None:
        return {}
    B, S, C = outputs[boxes], outputs[scores], outputs[classes].astype(np.int64)
    per_class: dict[int, tuple[list[float], list[bool], int]] = {}
    for i in range(len(B)):
        gt = labels[i][labels[i][:, 0] >= 0]
        gt_cls = gt[:, 0].astype(np.int64)
        for c in np.unique(gt_cls):
            per_class.setdefault(int(c), ([], [], 0))
            sc, tp, n = per_class[int(c)]
            per_class[int(c)] = (sc, tp, n + int((gt_cls == c).sum()))
        keep = S[i] > min_score
        for c in np.unique(C[i][keep]):
            sel = keep & (C[i] == c)
            det_b, det_s = B[i][sel], S[i][sel]
            order = np.argsort(-det_s, kind="stable")
            g = gt[gt_cls == c][:, 1:5]
            used = np.zeros(len(g), dtype=bool)
            ious = box_iou(det_b[order], g) if len(g) else np.zeros((len(order), 0))
            sc, tp, n = per_class.setdefault(int(c), ([], [], 0))
            for j, d in enumerate(order):
                hit = False
                if len(g):
                    cand = np.where(~used, ious[j], -1.0)
                    best = int(cand.argmax())
                    if cand[best] >= iou_threshold:
                        used[best], hit = True, True
                sc.append(float(det_s[d]))
                tp.append(hit)
    aps = [_average_precision(np.array(tp, bool), np.array(sc), n) for sc, tp, n in per_class.values()]
    aps = [a for a in aps if not np.isnan(a)]
    return {f"map{round(100 * iou_threshold)}": 100.0 * float(np.mean(aps)) if aps else 0.0}


# --- embeddings -----------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.reshape(len(x), -1).astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def embedding_retrieval(
    outputs: dict[str, np.ndarray], labels: Optional[np.ndarray], k: int = 1, output: Optional[str] = None
) -> dict[str, float]:
    """Recall@k in percent: a sample's k nearest other samples (cosine) include one of its label."""
    if labels is None:
        return {}
    e = _unit(_pick(outputs, output))
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    nn = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    hit = (labels[nn] == labels[:, None]).any(axis=1)
    return {f"recall_at_{k}": 100.0 * float(hit.mean())}


def embedding_similarity(
    outputs: dict[str, np.ndarray],
    labels: Optional[np.ndarray],
    reference: Optional[dict[str, np.ndarray]] = None,
    output: Optional[str] = None,
) -> dict[str, float]:
    """Per-sample cosine between this variant's embedding and PyTorch's (mean and worst, in percent):
    a label-free task metric for models whose output is an embedding."""
    if reference is None:
        return {}
    name = output or next(iter(outputs))
    cos = (_unit(outputs[name]) * _unit(reference[name])).sum(axis=1)
    return {"embedding_cosine": 100.0 * float(cos.mean()), "embedding_cosine_min": 100.0 * float(cos.min())}


def box_iou_vs_reference(
    outputs: dict[str, np.ndarray],
    labels: Optional[np.ndarray],
    reference: Optional[dict[str, np.ndarray]] = None,
    output: str = "boxes",
) -> dict[str, float]:
    """Mean and worst IoU (percent) of each predicted box (N, 4 or N, K, 4; x1 y1 x2 y2) with
    the box PyTorch predicts for the same sample: a label-free check of a box head."""
    if reference is None:
        return {}
    a = _pick(outputs, output).reshape(-1, 4).astype(np.float64)
    b = reference[output].reshape(-1, 4).astype(np.float64)
    iou = np.array([box_iou(x[None], y[None])[0, 0] for x, y in zip(a, b)])
    return {f"{output}_iou": 100.0 * float(iou.mean()), f"{output}_iou_min": 100.0 * float(iou.min())}
