"""The images and labels of a dataset folder, stacked (:class:`SceneData`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import fail
from .splits import SPLITS


@dataclass
class SceneData:
    """Images and labels of a dataset folder, stacked.

    Parameters:
        root (`Path`): the folder.
        names (`list[str]`): file stems, sorted; row ``i`` of every array is image ``names[i]``.
        rgb (`np.ndarray`): (N, H, W, 3) uint8.
        depth (`np.ndarray | None`): (N, H, W) float32, None when the folder has no ``depth/``.
        saliency (`np.ndarray | None`): (N, H, W) bool, None when the folder has no ``saliency/``.
        split (`np.ndarray`): (N,) str, each ``train``, ``val`` or ``test``.
        skipped (`list[str]`): ``"file: reason"`` for every image left out by ``skip_bad=True``.
        converted (`list[str]`): ``"file (mode)"`` for every image converted to RGB.
    """
    root: Path
    names: list[str]
    rgb: np.ndarray
    depth: np.ndarray | None
    saliency: np.ndarray | None
    split: np.ndarray
    skipped: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, split: str) -> "SceneData":
        """The images of one split (arrays are copies)."""
        if split not in SPLITS:
            raise fail(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        keep = self.split == split                                    # (N,) bool
        return SceneData(self.root, [nm for nm, k in zip(self.names, keep) if k], self.rgb[keep],
                         None if self.depth is None else self.depth[keep],
                         None if self.saliency is None else self.saliency[keep], self.split[keep],
                         list(self.skipped), list(self.converted))

    def summary(self) -> str:
        """One line for people: count, size, splits, labels, skipped and converted files."""
        h, w = self.rgb.shape[1:3]
        counts = " / ".join(f"{s} {int((self.split == s).sum())}" for s in SPLITS)
        return (f"{self.root}: {len(self)} images {w}x{h} ({counts}); depth: "
                f"{'yes' if self.depth is not None else 'no'}; saliency: "
                f"{'yes' if self.saliency is not None else 'no'}; skipped {len(self.skipped)}; "
                f"converted to RGB {len(self.converted)}")
