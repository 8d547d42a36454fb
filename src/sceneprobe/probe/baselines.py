"""Image-independent baselines, fitted on the probe-train split and tuned on val like the probes, scored like them.

* **position-only probe** ``position@{h}x{w}`` at each site's native resolution (the layout prior): per native
  position, the mean standardised depth and the salient rate over the train images (the least-squares / maximum-
  likelihood fit of a probe whose only input is the position), nearest-upsampled like a probe. Saliency: salient
  where the rate ≥ a threshold chosen on val (highest mean Dice); the rate itself is the score for AUROC / AP.
  Depth skill, the report's headline, is ``1 − MSE(probe) / MSE(position-only at the probe's resolution)``.
* **mean map** (``mean-map``): the same at label resolution (the mean training depth map / mask frequency map),
  threshold chosen on val.
* **all-salient** (saliency only): every pixel salient.

They answer "how much of the score is just the dataset's layout?" (floor at the bottom, object in the middle). A probe
must beat the *strongest* of them (chosen on val) to claim that the activations encode *this image's* scene. Controls
(permuted / fresh U-Nets) are not here: they are other capture stores, probed and scored by the same sweep.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BASELINE_MODEL = "baseline"
MEAN_MAP = "mean-map"
ALL_SALIENT = "all-salient"
MAX_THRESHOLDS = 128          # candidate thresholds tried on val (quantiles of the rates when there are more)


def position_site(h: int, w: int) -> str:
    return f"position@{h}x{w}"


@dataclass
class Prior:
    """A fitted position-only baseline at native resolution h×w."""
    depth: np.ndarray         # (h, w) mean standardised depth per position
    rate: np.ndarray          # (h, w) salient rate per position
    threshold: float          # salient ⇔ rate ≥ threshold (chosen on val)

    def depth_pred(self, n: int) -> np.ndarray:
        return np.broadcast_to(self.depth[None, None], (n, 1, *self.depth.shape))          # (n, 1, h, w)

    def logits(self, n: int) -> np.ndarray:
        """Decision values: > 0 ⇔ rate ≥ threshold (a monotone shift of the rate, so AUROC / AP are the rate's)."""
        z = self.rate - self.threshold + 1e-9
        return np.broadcast_to(z[None, None], (n, 1, *z.shape))                            # (n, 1, h, w)


def fit_prior(weight: np.ndarray, depth_sum: np.ndarray, pos: np.ndarray, train: np.ndarray) -> tuple[np.ndarray,
                                                                                                         np.ndarray]:
    """Per-position means over the train images: weight (h, w) pixels per position, depth_sum / pos (N, h, w) per
    image sums (or area means with weight 1) → (mean depth (h, w), salient rate (h, w))."""
    nt = max(int(train.sum()), 1)
    denom = np.maximum(weight * nt, 1e-300)
    return depth_sum[train].sum(0) / denom, pos[train].sum(0) / denom


def candidate_thresholds(rate: np.ndarray) -> np.ndarray:
    """Thresholds at the distinct rates (at most MAX_THRESHOLDS, by quantile), plus one above the maximum (empty)."""
    u = np.unique(rate)
    if len(u) > MAX_THRESHOLDS:
        u = np.unique(np.quantile(rate, np.linspace(0, 1, MAX_THRESHOLDS)))
    return np.concatenate([u, [u[-1] + 1.0]])


def choose_threshold(rate: np.ndarray, val_dice) -> float:
    """The candidate threshold with the highest mean val Dice (``val_dice(logits (n_val, L, h, w)) → (n_val, L)``);
    ties → the lower threshold."""
    cands = candidate_thresholds(rate)
    z = rate[None] - cands[:, None, None] + 1e-9                                               # (L, h, w)
    scores = np.nanmean(val_dice(z), axis=0)                                                   # (L,)
    return float(cands[int(np.nanargmax(scores))])


def all_salient_logits(n: int) -> np.ndarray:
    """(n, 1, 1, 1): every pixel salient (a constant score: AUROC ½, AP = salient fraction)."""
    return np.ones((n, 1, 1, 1))
