"""Per-image probe metrics at label resolution, averaged over images (the paper's protocol, with IoU added).

Saliency (binary masks P = prediction, G = truth, per image):
    Dice = (2|P∩G| + 1e-8) / (|P| + |G| + 1e-8)        (the paper's formula; two empty masks score 1)
    IoU  = (|P∩G| + 1e-8) / (|P∪G| + 1e-8)
Depth (standardised units, per image, over all H·W pixels):
    RMSE = sqrt(mean((ŷ − y)²)); Pearson r; Spearman ρ = Pearson r of average ranks (scipy's definition).

Correlations are undefined when an image is constant. We define: constant *truth* → NaN, and that image is left out of
the mean (:func:`nanmean`; the count of scored images is reported); constant *prediction* with varying truth → 0
(a probe that says nothing about the ordering earns no credit, rather than being skipped).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata

EPS = 1e-8


def _flat(x) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return a.reshape(len(a), -1)


def dice(pred, gt) -> np.ndarray:
    """Per-image Dice of boolean masks (n, H, W) → (n,)."""
    p, g = _flat(pred).astype(bool), _flat(gt).astype(bool)
    inter = (p & g).sum(1)
    return (2 * inter + EPS) / (p.sum(1) + g.sum(1) + EPS)


def iou(pred, gt) -> np.ndarray:
    """Per-image intersection over union of boolean masks (n, H, W) → (n,)."""
    p, g = _flat(pred).astype(bool), _flat(gt).astype(bool)
    return ((p & g).sum(1) + EPS) / ((p | g).sum(1) + EPS)


def rmse(pred, gt) -> np.ndarray:
    p, g = _flat(pred).astype(np.float64), _flat(gt).astype(np.float64)
    return np.sqrt(((p - g) ** 2).mean(1))


def pearson(pred, gt) -> np.ndarray:
    """Per-image Pearson r (n,); NaN where the truth is constant, 0 where only the prediction is."""
    p, g = _flat(pred).astype(np.float64), _flat(gt).astype(np.float64)
    p = p - p.mean(1, keepdims=True)
    g = g - g.mean(1, keepdims=True)
    sp, sg = np.sqrt((p * p).sum(1)), np.sqrt((g * g).sum(1))
    # "constant" with a relative tolerance: float noise around a constant is not a signal
    scale_p = np.abs(_flat(pred)).max(1) * p.shape[1] ** 0.5 * 1e-12 + 1e-300
    scale_g = np.abs(_flat(gt)).max(1) * g.shape[1] ** 0.5 * 1e-12 + 1e-300
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (p * g).sum(1) / (sp * sg)
    r = np.where(sp <= scale_p, 0.0, r)
    r = np.where(sg <= scale_g, np.nan, r)
    return np.clip(r, -1.0, 1.0)


def ranks(x) -> np.ndarray:
    """Average ranks per image (ties share their mean rank), (n, ...) → (n, H·W) float64."""
    return rankdata(_flat(x), axis=1)


def spearman(pred, gt, gt_ranks: np.ndarray | None = None) -> np.ndarray:
    """Per-image Spearman ρ (n,), equal to ``scipy.stats.spearmanr``; ``gt_ranks`` may be precomputed."""
    return pearson(ranks(pred), ranks(gt) if gt_ranks is None else gt_ranks)


def nanmean(x: np.ndarray) -> float:
    """Mean over the finite entries (NaN if there are none)."""
    x = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(x)
    return float(x[ok].mean()) if ok.any() else float("nan")


def depth_metrics(pred, gt, gt_ranks: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-image depth metrics of standardised predictions and truth (n, H, W)."""
    return {"rmse": rmse(pred, gt), "pearson": pearson(pred, gt), "spearman": spearman(pred, gt, gt_ranks)}


def saliency_metrics(pred_mask, gt_mask) -> dict[str, np.ndarray]:
    """Per-image saliency metrics of boolean masks (n, H, W)."""
    return {"dice": dice(pred_mask, gt_mask), "iou": iou(pred_mask, gt_mask)}


HEADLINE = {"depth": "spearman", "saliency": "dice"}           # the metric the report ranks by (higher is better)
METRICS = {"depth": ("rmse", "pearson", "spearman"), "saliency": ("dice", "iou")}
HIGHER_IS_BETTER = {"rmse": False, "pearson": True, "spearman": True, "dice": True, "iou": True}
