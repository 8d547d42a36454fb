"""One protocol's labels for the probes (:class:`ProtocolLabels`): depth (or inverse depth) standardised with the
probe-train split's mean and std, saliency, the split codes, and the caches every fit and score of that protocol
shares (native block sums, exact scorers, the position-only prior); read and checked by :func:`load_protocol_labels`."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..capture.store import load_labels
from ..errors import fail
from . import baselines as bl
from . import fit
from .metrics import NearestScorer, ranks

SKY_DEPTH = 0.99                       # × FAR_DEPTH: labels at or beyond are sky (renderer: sky = FAR_DEPTH; = readout.py)

SPLITS = {"val": 1, "test": 2}


@dataclass
class ProtocolLabels:
    """One protocol's labels, depth standardised with the probe-train split's mean and std."""
    protocol: str
    depth: np.ndarray                  # (N, H, W) float32, standardised
    saliency: np.ndarray               # (N, H, W) uint8 {0, 1}
    split: np.ndarray                  # (N,) int8
    depth_mean: float
    depth_std: float
    digest: str
    sky: np.ndarray | None = None      # (N, H, W) bool: depth ≥ SKY_DEPTH·FAR_DEPTH (metrics are also given without)
    target: str = "depth"              # "depth" or "inverse" (1/depth): what ``depth`` holds, standardised
    _native: dict = field(default_factory=dict, repr=False)
    _ranks: dict = field(default_factory=dict, repr=False)
    _scorers: dict = field(default_factory=dict, repr=False)
    _priors: dict = field(default_factory=dict, repr=False)

    @property
    def size(self) -> tuple[int, int]:
        return self.depth.shape[1], self.depth.shape[2]

    def idx(self, code: int) -> np.ndarray:
        return np.flatnonzero(self.split == code)

    def native(self, h: int, w: int, upsample: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per native position of every image: (pixel weight n (h, w), depth sum (N, h, w), positive count (N, h, w)).

        nearest: n = pixels reading the position, sums over them; area: n = 1, block means (see :mod:`.fit`)."""
        key = (h, w, upsample)
        if key not in self._native:
            H, W = self.size
            if upsample == "nearest":
                self._native[key] = (fit.block_count(H, W, h, w), fit.block_sum(self.depth, h, w),
                                     fit.block_sum(self.saliency, h, w))
            else:
                self._native[key] = (torch.ones(h, w, dtype=torch.float64), fit.area_downsample(self.depth, h, w),
                                     fit.area_downsample(self.saliency, h, w))
        return self._native[key]

    def scorer(self, code: int, h: int, w: int) -> NearestScorer:
        """Exact metrics of nearest-upsampled native predictions for the rows of split ``code`` (cached)."""
        if code not in self._ranks:
            self._ranks[code] = ranks(self.depth[self.idx(code)])
        if (code, h, w) not in self._scorers:
            rows = self.idx(code)
            self._scorers[code, h, w] = NearestScorer(self.depth[rows], self.saliency[rows], h, w, self._ranks[code])
        return self._scorers[code, h, w]

    def nonsky_scorer(self, code: int, h: int, w: int) -> NearestScorer:
        """As :meth:`scorer`, restricted to the non-sky pixels of each image."""
        if (code, h, w, "nonsky") not in self._scorers:
            rows = self.idx(code)
            self._scorers[code, h, w, "nonsky"] = NearestScorer(self.depth[rows], self.saliency[rows], h, w,
                                                                valid=~self.sky[rows])
        return self._scorers[code, h, w, "nonsky"]

    def target_units(self, z: np.ndarray) -> np.ndarray:
        """Standardised values → the target's own units (depth, or inverse depth)."""
        return self.depth_mean + self.depth_std * z

    def prior(self, h: int, w: int, upsample: str) -> bl.Prior:
        """The position-only baseline at h×w: means over train, saliency threshold chosen on val Dice (cached)."""
        key = (h, w, upsample)
        if key not in self._priors:
            n_pix, dsum, pos = (t.numpy() for t in self.native(h, w, upsample))
            dmap, rate = bl.fit_prior(n_pix, dsum, pos, self.split == 0)
            sc = self.scorer(1, h, w)
            thr = bl.choose_threshold(rate, lambda z: sc.saliency(
                np.broadcast_to(z[None], (len(self.idx(1)), *z.shape)))["dice"])
            self._priors[key] = bl.Prior(dmap, rate, thr)
        return self._priors[key]


def load_protocol_labels(protocol_root: Path, n: int | None = None, target: str = "depth") -> ProtocolLabels:
    """Labels of one protocol; the depth target (depth or inverse depth) standardised with train's mean and std."""
    from ..world.render import FAR_DEPTH
    root = Path(protocol_root)
    raw = load_labels(root)
    for key in ("depth", "saliency", "split"):
        if key not in raw:
            raise fail(f"labels file {root / 'labels.safetensors'} has no {key!r} tensor; recreate it with the capture")
    depth, sal, split = raw["depth"].astype(np.float32), raw["saliency"].astype(np.uint8), raw["split"].astype(np.int8)
    if depth.ndim != 3 or sal.shape != depth.shape or split.shape != (len(depth),):
        raise fail(f"labels in {root / 'labels.safetensors'} disagree: depth {depth.shape}, saliency {sal.shape}, "
                   f"split {split.shape}; expected (N, H, W), (N, H, W), (N,)")
    if n is not None and len(depth) != n:
        raise fail(f"labels in {root / 'labels.safetensors'} have {len(depth)} rows but the capture stores have {n}; "
                   f"recapture or relabel so that rows align")
    for name, code in (("train", 0), ("val", 1), ("test", 2)):
        if not (split == code).any():
            raise fail(f"labels in {root / 'labels.safetensors'} have no {name} rows (split code {code}); probes need "
                       f"train, val and test rows")
    if not np.isfinite(depth).all():
        raise fail(f"labels in {root / 'labels.safetensors'} have non-finite depth values; fix the labels")
    if target not in ("depth", "inverse"):
        raise fail(f"probe.depth_target must be depth or inverse, got {target!r}")
    if target == "inverse":
        if (depth <= 0).any():
            raise fail(f"labels in {root / 'labels.safetensors'} have depth <= 0; inverse depth needs positive depth")
        depth_t = (1.0 / depth.astype(np.float64)).astype(np.float32)
    else:
        depth_t = depth
    train = depth_t[split == 0].astype(np.float64)
    mean, std = float(train.mean()), float(train.std())
    std = std if std > 0 else 1.0
    digest = hashlib.sha256((root / "labels.safetensors").read_bytes()).hexdigest()[:16]
    return ProtocolLabels(root.name, ((depth_t - mean) / std).astype(np.float32), (sal > 0).astype(np.uint8), split,
                          mean, std, digest, sky=depth >= SKY_DEPTH * FAR_DEPTH, target=target)
