"""Counterfactual labels: the salient-object mask moved, the depth map moved or mirrored.

The paper (reference/paper-protocol.md §5) translates the TRACER mask by (dx, dy), each uniform in
{−120…−91} ∪ {90…119} px at 512 px (fill 0), and the MiDaS depth map horizontally then vertically with edge-replicate
fill. Here each offset is a random sign times a whole number of pixels in [shift_min, shift_max] of the image side
(per axis); a depth edit is either such a translation or a left-right mirror (one of the two at random).
Every draw comes from ``numpy.random.default_rng([seed, task, edit])``, so an edit's target never depends on batching.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import fail

TASK_CODE = {"saliency": 0, "depth": 1}


@dataclass(frozen=True)
class Transform:
    """A counterfactual's geometry: ``kind`` "shift" (by dy, dx pixels) or "mirror" (left-right)."""
    kind: str
    dy: int = 0
    dx: int = 0

    def __str__(self) -> str:
        return "mirror" if self.kind == "mirror" else f"shift({self.dy:+d},{self.dx:+d})"


def offset_range(size: int, lo: float, hi: float) -> tuple[int, int]:
    """Whole-pixel offsets in [lo·size, hi·size] (at least 1 px)."""
    a, b = max(1, math.ceil(lo * size - 1e-9)), max(1, math.floor(hi * size + 1e-9))
    if not 0 < lo <= hi < 1 or a > b:
        raise fail(f"intervene.shift_min / shift_max must satisfy 0 < min ≤ max < 1 and span a whole pixel of the "
                   f"{size}-px image, got {lo}, {hi}")
    return a, b


def draw_transform(seed: int, task: str, edit: int, size: tuple[int, int], lo: float, hi: float) -> Transform:
    """The random geometry of edit ``edit`` of ``task``: a shift of 15–25 % per axis (random signs); depth edits are
    a mirror instead with probability ½."""
    rng = np.random.default_rng([int(seed), TASK_CODE[task], int(edit)])
    offs = []
    for s in size:
        a, b = offset_range(s, lo, hi)
        offs.append(int(rng.integers(a, b + 1)) * (1 if rng.random() < 0.5 else -1))
    if task == "depth" and rng.random() < 0.5:
        return Transform("mirror")
    return Transform("shift", offs[0], offs[1])


def translate(x: np.ndarray, dy: int, dx: int, fill: str | float = 0.0) -> np.ndarray:
    """Move image content by (dy, dx) pixels: out[i, j] = x[i − dy, j − dx] over the last two axes.

    ``fill="edge"`` replicates the border (the paper's depth fill); a number fills uncovered pixels with it.
    """
    H, W = x.shape[-2:]
    r, c = np.arange(H) - dy, np.arange(W) - dx
    out = x[..., np.clip(r, 0, H - 1), :][..., np.clip(c, 0, W - 1)]
    if fill != "edge":
        out = out.copy()
        out[..., (r < 0) | (r >= H), :] = fill
        out[..., :, (c < 0) | (c >= W)] = fill
    return out


def apply_transform(x: np.ndarray, t: Transform, fill: str | float) -> np.ndarray:
    """Apply a :class:`Transform` over the last two axes of ``x``."""
    if t.kind == "mirror":
        return x[..., ::-1].copy()
    return translate(x, t.dy, t.dx, fill)


def counterfactual_mask(mask: np.ndarray, t: Transform) -> np.ndarray:
    """(H, W) {0, 1} mask → the moved mask (fill 0), uint8."""
    return apply_transform(mask.astype(np.uint8), t, 0).astype(np.uint8)


def counterfactual_depth(depth: np.ndarray, t: Transform) -> np.ndarray:
    """(H, W) depth → moved (edge-replicate fill) or mirrored depth, float32 (same units)."""
    return apply_transform(depth.astype(np.float32), t, "edge").astype(np.float32)
