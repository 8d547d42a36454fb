"""Image-independent baselines, scored exactly like the probes.

* depth: the mean standardised depth map of the probe-train split, predicted for every image;
* saliency: the mean training mask thresholded at 0.5 (the pixels salient in most training images).

They answer "how much of the score is just the dataset's layout?" (e.g. floor at the bottom, object in the middle).
A probe must beat them to claim the activations encode *this image's* scene. Controls (permuted / fresh U-Nets) are
not here: they are other capture stores, probed and scored by the same sweep.
"""
from __future__ import annotations

import numpy as np

from .metrics import depth_metrics, nanmean, saliency_metrics

BASELINE_MODEL = "baseline-mean"


def mean_maps(depth_std: np.ndarray, saliency: np.ndarray, split: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean standardised depth map (H, W) float64, thresholded mean mask (H, W) bool) over the train split."""
    train = split == 0
    depth_map = depth_std[train].astype(np.float64).mean(0)
    mask = saliency[train].astype(np.float64).mean(0) >= 0.5
    return depth_map, mask


def baseline_scores(depth_std: np.ndarray, saliency: np.ndarray, split: np.ndarray,
                    code: int) -> dict[tuple[str, str], float]:
    """{(task, metric): mean over the images of split ``code``} for both baselines."""
    depth_map, mask = mean_maps(depth_std, saliency, split)
    rows = np.flatnonzero(split == code)
    out: dict[tuple[str, str], float] = {}
    if not len(rows):
        return out
    d = depth_metrics(np.broadcast_to(depth_map, (len(rows), *depth_map.shape)), depth_std[rows])
    s = saliency_metrics(np.broadcast_to(mask, (len(rows), *mask.shape)), saliency[rows].astype(bool))
    out.update({("depth", k): nanmean(v) for k, v in d.items()})
    out.update({("saliency", k): nanmean(v) for k, v in s.items()})
    return out
