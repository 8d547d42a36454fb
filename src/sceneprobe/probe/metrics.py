"""Per-image probe metrics at label resolution, averaged over images (the paper's protocol, with IoU added).

Saliency (binary masks P = prediction, G = truth, per image):
    Dice = (2|P∩G| + 1e-8) / (|P| + |G| + 1e-8)        (the paper's formula; two empty masks score 1)
    IoU  = (|P∩G| + 1e-8) / (|P∪G| + 1e-8)
Depth (standardised units, per image, over all H·W pixels):
    RMSE = sqrt(mean((ŷ − y)²)); Pearson r; Spearman ρ = Pearson r of average ranks (scipy's definition).

Correlations are undefined when an image is constant. We define: constant *truth* → NaN, and that image is left out of
the mean (:func:`nanmean`); constant *prediction* with varying truth → 0 (a probe that says nothing about the ordering
earns no credit, rather than being skipped).
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


class NearestScorer:
    """The metrics above for predictions made at native resolution h×w and nearest-upsampled to the label grid,
    computed exactly at native resolution from block sums of the labels (no upsampled arrays).

    With n_j label pixels reading native position j: RMSE, Pearson and Dice/IoU need only Σ_j n_j ŷ_j, Σ_j n_j ŷ_j²,
    Σ_j ŷ_j S_j (S_j = block sum of the truth) and per-image label moments; the upsampled prediction's average ranks
    follow from sorting the h·w native values with weights n_j, and Σ_p r̂_p r_p = Σ_j r̂_j R_j (R_j = block sum of the
    truth's ranks). Equal to :func:`depth_metrics` / :func:`saliency_metrics` on the upsampled arrays (tested).
    """

    def __init__(self, depth: np.ndarray, mask: np.ndarray, h: int, w: int, gt_ranks: np.ndarray | None = None):
        from .fit import block_count, block_sum
        n, H, W = depth.shape
        self.P = H * W
        self.cnt = block_count(H, W, h, w).numpy().reshape(-1)                        # (h·w,)
        y = depth.reshape(n, -1).astype(np.float64)
        self.S = block_sum(depth, h, w).numpy().reshape(n, -1)                         # (n, h·w)
        self.sy, self.syy = y.sum(1), (y * y).sum(1)
        r = ranks(depth) if gt_ranks is None else gt_ranks
        self.R = block_sum(r.reshape(n, H, W), h, w).numpy().reshape(n, -1)
        self.sr, self.srr = r.sum(1), (r * r).sum(1)
        self.M = block_sum(mask.astype(np.float64), h, w).numpy().reshape(n, -1)
        self.G = self.M.sum(1)
        self.const_y = np.ptp(y, 1) == 0                                              # undefined correlations

    def _pearson(self, v: np.ndarray, S: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> np.ndarray:
        """Pearson r of block-constant predictions v (n, L, h·w) with a truth of block sums S, Σ s1, Σ² s2 (n,)."""
        c = self.cnt
        sv, svv, svy = (v * c).sum(-1), (v * v * c).sum(-1), (v * S[:, None]).sum(-1)
        cov = svy - sv * s1[:, None] / self.P
        var_v = np.maximum(svv - sv * sv / self.P, 0.0)
        var_y = np.maximum(s2 - s1 * s1 / self.P, 0.0)[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            r = cov / np.sqrt(var_v * var_y)
        r = np.where(var_v <= 1e-12 * np.maximum(svv, 1e-300), 0.0, r)            # constant prediction: no credit
        r = np.where(self.const_y[:, None], np.nan, r)
        return np.clip(r, -1.0, 1.0)

    def weighted_ranks(self, v: np.ndarray) -> np.ndarray:
        """Average ranks (1-based) the upsampled pixels of each native value get: (..., h·w) → same shape."""
        shape = v.shape
        v = v.reshape(-1, shape[-1])
        order = np.argsort(v, axis=1, kind="stable")
        vs = np.take_along_axis(v, order, 1)
        cs = self.cnt[order]
        cum = np.cumsum(cs, 1)
        first = np.concatenate([np.ones((len(v), 1), bool), vs[:, 1:] != vs[:, :-1]], 1)
        last = np.concatenate([vs[:, 1:] != vs[:, :-1], np.ones((len(v), 1), bool)], 1)
        gstart = np.maximum.accumulate(np.where(first, cum - cs, 0), 1)                # pixels before the tie group
        gend = np.minimum.accumulate(np.where(last, cum, np.inf)[:, ::-1], 1)[:, ::-1]  # pixels up to its end
        out = np.empty_like(vs)
        np.put_along_axis(out, order, (gstart + 1 + gend) / 2, 1)
        return out.reshape(shape)

    def depth(self, pred: np.ndarray, spearman: bool = True) -> dict[str, np.ndarray]:
        """Per-image depth metrics (n, L) of native predictions (n, L, h, w) of standardised depth."""
        v = pred.reshape(*pred.shape[:2], -1).astype(np.float64)
        c = self.cnt
        sse = (v * v * c).sum(-1) - 2 * (v * self.S[:, None]).sum(-1) + self.syy[:, None]
        out = {"rmse": np.sqrt(np.maximum(sse, 0.0) / self.P), "pearson": self._pearson(v, self.S, self.sy, self.syy)}
        if spearman:
            out["spearman"] = self._pearson(self.weighted_ranks(v), self.R, self.sr, self.srr)
        return out

    def saliency(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        """Per-image Dice and IoU (n, L) of native logits (n, L, h, w); salient ⇔ logit > 0 (2-class argmax)."""
        p = logits.reshape(*logits.shape[:2], -1) > 0
        size = (p * self.cnt).sum(-1)
        inter = (p * self.M[:, None]).sum(-1)
        G = self.G[:, None]
        return {"dice": (2 * inter + EPS) / (size + G + EPS), "iou": (inter + EPS) / (size + G - inter + EPS)}


HEADLINE = {"depth": "spearman", "saliency": "dice"}           # the metric the report ranks by (higher is better)
METRICS = {"depth": ("rmse", "pearson", "spearman"), "saliency": ("dice", "iou")}
HIGHER_IS_BETTER = {"rmse": False, "pearson": True, "spearman": True, "dice": True, "iou": True}
