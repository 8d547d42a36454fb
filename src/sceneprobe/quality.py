"""Sample quality: Fréchet Scene Distance (FSD) in a small, fixed, hand-defined feature space.

No pretrained Inception network can be had offline, so the feature vector of an image (H, W, 3) uint8 is defined
here, from things a scene's look depends on:

* its 8×8 area-downsampled RGB in [0, 1] (192 numbers: layout and colour),
* per-channel mean and std (6: global colour),
* a 8-bin histogram of gradient magnitude on the 32×32 grey image (8: edges and texture).

FSD = ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^{1/2}) between the feature Gaussians of two image sets (the FID formula).
Reference points printed beside it: real-vs-real (held-out vs training scenes, the floor) and noise-vs-real.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F


def scene_features(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 → (N, 206) float64 features."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255.0  # (N, 3, H, W)
    small = F.adaptive_avg_pool2d(x, 8).flatten(1)  # (N, 192)
    stats = torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)  # (N, 6)
    grey = F.adaptive_avg_pool2d(x.mean(1, keepdim=True), 32)  # (N, 1, 32, 32)
    gx, gy = grey[..., :, 1:] - grey[..., :, :-1], grey[..., 1:, :] - grey[..., :-1, :]
    mag = torch.sqrt(gx[..., :-1, :] ** 2 + gy[..., :, :-1] ** 2).flatten(1)  # (N, 961)
    edges = torch.tensor([0, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 10], dtype=torch.float64)
    hist = torch.stack([((mag >= lo) & (mag < hi)).double().mean(1) for lo, hi in zip(edges[:-1], edges[1:])], 1)
    return torch.cat([small, stats, hist], 1).numpy()


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets (N1, D) and (N2, D)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def fsd(generated: np.ndarray, reference: np.ndarray) -> float:
    return frechet_distance(scene_features(generated), scene_features(reference))
