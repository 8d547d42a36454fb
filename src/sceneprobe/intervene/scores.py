"""How an edited output is measured against the unedited one and the counterfactual: PSNR outside the edit, mean
pixel change, and the headroom (what a perfect edit would gain).
"""
from __future__ import annotations

import math

import numpy as np

PSNR_CAP = 100.0                 # identical pixels: report 100 dB rather than ∞


def psnr(a: np.ndarray, b: np.ndarray, keep: np.ndarray) -> float:
    """PSNR (dB) of uint8 images (H, W, 3) over the pixels where ``keep`` (H, W); NaN if none, capped at PSNR_CAP."""
    if not keep.any():
        return float("nan")
    d = a[keep].astype(np.float64) - b[keep].astype(np.float64)
    mse = float((d * d).mean())
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(255.0 ** 2 / mse))


def pixel_change(a: np.ndarray, b: np.ndarray) -> float:
    """Mean |a − b| over pixels and channels of two uint8 images (grey levels of 0…255)."""
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _similarity(task: str, a: np.ndarray, b: np.ndarray) -> float:
    """Dice (saliency) or Spearman ρ (depth) of two label maps (H, W)."""
    from ..probe.metrics import dice, spearman
    f = dice if task == "saliency" else spearman
    return float(f(a[None], b[None])[0])


def headroom(task: str, orig: np.ndarray, cf: np.ndarray) -> float:
    """H = g(perfect) − g(unedited) = [s(cf, cf) − s(cf, orig)] − [s(orig, cf) − s(orig, orig)] (:mod:`.verdicts`)."""
    s = lambda a, b: _similarity(task, a, b)                                    # noqa: E731
    return (s(cf, cf) - s(cf, orig)) - (s(orig, cf) - s(orig, orig))
