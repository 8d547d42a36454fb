"""Per-image probe metrics at label resolution, averaged over images (the paper's protocol, with IoU added).

Saliency (binary masks P = prediction, G = truth, per image):
    Dice = (2|P∩G| + 1e-8) / (|P| + |G| + 1e-8)        (the paper's formula; two empty masks score 1)
    IoU  = (|P∩G| + 1e-8) / (|P∪G| + 1e-8)
    AUROC (ties count ½) and average precision (sklearn's step-wise definition) of the logits: threshold-free.
Depth (standardised units, per image, over all H·W pixels or over the non-sky pixels only):
    RMSE = sqrt(mean((ŷ − y)²)); Pearson r; Spearman ρ = Pearson r of average ranks (scipy's definition);
    AbsRel and δ₁ (< 1.25) on the target in its own positive units (depth, or inverse depth);
    skill = 1 − Σ_images MSE(probe) / Σ_images MSE(position-only probe) — the headline, computed by the sweep.

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


def depth_ratio_metrics(pred, gt, valid=None, *more_valid) -> dict[str, np.ndarray] | list[dict[str, np.ndarray]]:
    """Per-image AbsRel = mean |t̂ − t| / t and δ₁ = fraction with max(t̂/t, t/t̂) < 1.25 (a non-positive t̂ fails),
    on the target in its own positive units (depth or inverse depth), over the ``valid`` pixels (all by default).

    With ``more_valid`` masks: a list of the metrics over each of ``valid``, ``*more_valid`` (None = all pixels),
    from one computation of the per-pixel errors."""
    p, g = _flat(pred).astype(np.float64), _flat(gt).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        err = np.abs(p - g) / g
        ok = (p > 0) & (np.maximum(p / g, g / np.where(p > 0, p, 1.0)) < 1.25)
    out = []
    for valid_i in (valid, *more_valid):
        v = np.ones_like(g, dtype=bool) if valid_i is None else _flat(valid_i).astype(bool)
        cnt = v.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            rel = np.where(v, err, 0.0).sum(1) / cnt
            d1 = np.where(v, ok, False).sum(1) / cnt
        out.append({"absrel": np.where(cnt > 0, rel, np.nan), "delta1": np.where(cnt > 0, d1, np.nan)})
    return out if more_valid else out[0]


def auroc(score, gt) -> np.ndarray:
    """Per-image area under the ROC curve (n,) from average ranks (ties count ½, = sklearn); NaN for a one-class image."""
    s, g = _flat(score).astype(np.float64), _flat(gt).astype(bool)
    pos = g.sum(1)
    neg = g.shape[1] - pos
    r = (rankdata(s, axis=1) * g).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((pos > 0) & (neg > 0), (r - pos * (pos + 1) / 2) / (pos * neg), np.nan)


def _ap_sorted(vs: np.ndarray, tp: np.ndarray, cnt: np.ndarray) -> np.ndarray:
    """Average precision Σ_k (R_k − R_{k−1}) P_k over the distinct thresholds of rows sorted by descending score
    ``vs`` with positives ``tp`` and pixel counts ``cnt`` per entry (sklearn's definition, no interpolation)."""
    ctp, ccnt = np.cumsum(tp, 1), np.cumsum(cnt, 1)
    end = np.concatenate([vs[:, 1:] != vs[:, :-1], np.ones((len(vs), 1), bool)], 1)   # last entry of a tie group
    at_end = np.where(end, ctp, 0.0)
    prev = np.concatenate([np.zeros((len(vs), 1)), np.maximum.accumulate(at_end, 1)[:, :-1]], 1)
    total = ctp[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = np.where(ccnt > 0, ctp / np.where(ccnt > 0, ccnt, 1.0), 0.0)
        ap = np.where(end, (ctp - prev) * prec, 0.0).sum(1) / total
    return np.where(total > 0, ap, np.nan)


def average_precision(score, gt) -> np.ndarray:
    """Per-image average precision (n,) of scores against a binary mask (= sklearn); NaN without positives."""
    s, g = _flat(score).astype(np.float64), _flat(gt).astype(np.float64)
    order = np.argsort(-s, axis=1, kind="stable")
    return _ap_sorted(np.take_along_axis(-s, order, 1), np.take_along_axis(g, order, 1), np.ones_like(g))


class NearestScorer:
    """The metrics above for predictions made at native resolution h×w and nearest-upsampled to the label grid,
    computed exactly at native resolution from block sums of the labels (no upsampled arrays).

    With n_j label pixels reading native position j: RMSE, Pearson and Dice/IoU need only Σ_j n_j ŷ_j, Σ_j n_j ŷ_j²,
    Σ_j ŷ_j S_j (S_j = block sum of the truth) and per-image label moments; the upsampled prediction's average ranks
    follow from sorting the h·w native values with weights n_j, and Σ_p r̂_p r_p = Σ_j r̂_j R_j (R_j = block sum of the
    truth's ranks). AUROC = (Σ_pos r̂ − P(P+1)/2)/(P·N) from the same weighted ranks; average precision from the
    native values sorted with their positive and pixel counts. Equal to :func:`depth_metrics` /
    :func:`saliency_metrics` / :func:`auroc` / :func:`average_precision` on the upsampled arrays (tested).

    ``valid`` (n, H, W) restricts every metric to some pixels per image (e.g. non-sky): n_j becomes the number of
    valid pixels reading j (per image), and the truth's ranks are ranks among the valid pixels.
    """

    def __init__(self, depth: np.ndarray, mask: np.ndarray, h: int, w: int, gt_ranks: np.ndarray | None = None,
                 valid: np.ndarray | None = None):
        from .fit import block_count, block_sum
        n, H, W = depth.shape
        if valid is None:
            self.cnt = np.broadcast_to(block_count(H, W, h, w).numpy().reshape(1, 1, -1), (n, 1, h * w))
            vf = np.ones((n, H * W))
            r = ranks(depth) if gt_ranks is None else gt_ranks
        else:
            vf = valid.reshape(n, -1).astype(np.float64)
            self.cnt = block_sum(vf.reshape(n, H, W), h, w).numpy().reshape(n, 1, -1)      # (n, 1, h·w)
            r = ranks(np.where(valid, depth, np.inf)) * vf                            # ranks among valid pixels
        self.P = vf.sum(1)                                                            # (n,) valid pixels
        y = depth.reshape(n, -1).astype(np.float64) * vf
        self.S = block_sum(y.reshape(n, H, W), h, w).numpy().reshape(n, -1)          # (n, h·w)
        self.sy, self.syy = y.sum(1), (y * y).sum(1)
        self.R = block_sum(r.reshape(n, H, W), h, w).numpy().reshape(n, -1)
        self.sr, self.srr = r.sum(1), (r * r).sum(1)
        m = mask.reshape(n, -1).astype(np.float64) * vf
        self.M = block_sum(m.reshape(n, H, W), h, w).numpy().reshape(n, -1)          # (n, h·w) positives
        self.G = self.M.sum(1)
        yv = np.where(vf > 0, depth.reshape(n, -1), np.nan)
        with np.errstate(invalid="ignore"):
            self.const_y = ~(np.nanmax(yv, 1, initial=-np.inf) > np.nanmin(yv, 1, initial=np.inf))  # undefined r

    def _pearson(self, v: np.ndarray, S: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> np.ndarray:
        """Pearson r of block-constant predictions v (n, L, h·w) with a truth of block sums S, Σ s1, Σ² s2 (n,)."""
        c, P = self.cnt, np.maximum(self.P, 1e-300)[:, None]
        sv, svv, svy = (v * c).sum(-1), (v * v * c).sum(-1), (v * S[:, None]).sum(-1)
        cov = svy - sv * s1[:, None] / P
        var_v = np.maximum(svv - sv * sv / P, 0.0)
        var_y = np.maximum(s2 - s1 * s1 / P[:, 0], 0.0)[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            r = cov / np.sqrt(var_v * var_y)
        r = np.where(var_v <= 1e-12 * np.maximum(svv, 1e-300), 0.0, r)            # constant prediction: no credit
        r = np.where(self.const_y[:, None], np.nan, r)
        return np.clip(r, -1.0, 1.0)

    def weighted_ranks(self, v: np.ndarray) -> np.ndarray:
        """Average ranks (1-based) the upsampled pixels of each native value get: (n, L, h·w) → same shape."""
        shape = v.shape
        cnt = np.broadcast_to(self.cnt, shape).reshape(-1, shape[-1])
        v = v.reshape(-1, shape[-1])
        order = np.argsort(v, axis=1, kind="stable")
        vs = np.take_along_axis(v, order, 1)
        cs = np.take_along_axis(cnt, order, 1)
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
        with np.errstate(invalid="ignore", divide="ignore"):
            mse = np.maximum(sse, 0.0) / self.P[:, None]
        out = {"rmse": np.sqrt(mse), "pearson": self._pearson(v, self.S, self.sy, self.syy)}
        if spearman:
            out["spearman"] = self._pearson(self.weighted_ranks(v), self.R, self.sr, self.srr)
        return out

    def saliency(self, logits: np.ndarray, ranking: bool = False) -> dict[str, np.ndarray]:
        """Per-image Dice and IoU (n, L) of native logits (n, L, h, w); salient ⇔ logit > 0 (2-class argmax).

        ``ranking``: also the threshold-free AUROC and average precision of the logits."""
        v = logits.reshape(*logits.shape[:2], -1).astype(np.float64)
        p = v > 0
        size = (p * self.cnt).sum(-1)
        inter = (p * self.M[:, None]).sum(-1)
        G = self.G[:, None]
        out = {"dice": (2 * inter + EPS) / (size + G + EPS), "iou": (inter + EPS) / (size + G - inter + EPS)}
        if ranking:
            Nn = self.P[:, None] - G
            rsum = (self.weighted_ranks(v) * self.M[:, None]).sum(-1)
            with np.errstate(invalid="ignore", divide="ignore"):
                out["auroc"] = np.where((G > 0) & (Nn > 0), (rsum - G * (G + 1) / 2) / (G * Nn), np.nan)
            flat = v.reshape(-1, v.shape[-1])
            order = np.argsort(-flat, axis=1, kind="stable")
            tp = np.take_along_axis(np.broadcast_to(self.M[:, None], v.shape).reshape(flat.shape), order, 1)
            cnt = np.take_along_axis(np.broadcast_to(self.cnt, v.shape).reshape(flat.shape), order, 1)
            out["ap"] = _ap_sorted(np.take_along_axis(-flat, order, 1), tp, cnt).reshape(v.shape[:2])
        return out


HEADLINE = {"depth": "skill", "saliency": "dice"}  # the metric the report ranks by (higher is better)
DEPTH_METRICS = ("mse", "rmse", "spearman", "pearson", "absrel", "delta1")
METRICS = {"depth": ("skill", *DEPTH_METRICS, "skill_nonsky", *(f"{m}_nonsky" for m in DEPTH_METRICS),
                     "skill_centred", "mse_centred", "skill_ssi", "mse_ssi"),
           "saliency": ("dice", "iou", "auroc", "ap")}
HIGHER_IS_BETTER = {"skill": True, "mse": False, "rmse": False, "pearson": True, "spearman": True, "absrel": False,
                    "delta1": True, "dice": True, "iou": True, "auroc": True, "ap": True}
HIGHER_IS_BETTER.update({f"{k}_nonsky": v for k, v in list(HIGHER_IS_BETTER.items())})
HIGHER_IS_BETTER.update({"skill_centred": True, "skill_ssi": True, "mse_centred": False, "mse_ssi": False})
