"""The images a capture writes: the final samples (batch PNGs, then ``samples.safetensors``) and the read-out's
decoded x̂₀ per step (``<store>/x0/step_XX/<sample id>.png``)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..sample import to_uint8

X0Sink = Callable[[int, torch.Tensor], None]     # (step, decoded x̂₀ of the read-out rows (k, 3, H, W) in [−1, 1])


def save_images(folder: Path, sample_ids: Sequence[int], images: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in zip(sample_ids, images):
        Image.fromarray(im).save(folder / f"{int(i):06d}.png")


def x0_image_path(store_root: Path, step: int, sample_id: int) -> Path:
    """Where the capture writes the decoded x̂₀ of a read-out row at ``step`` (PNG, uint8 RGB)."""
    return Path(store_root) / "x0" / f"step_{step:02d}" / f"{int(sample_id):06d}.png"


def _x0_saver(store_root: Path, sample_ids: Sequence[int]) -> X0Sink:
    """An :data:`X0Sink` that saves each step's decoded x̂₀ of ``sample_ids`` as PNGs under ``store_root/x0``."""
    def sink(step: int, images: torch.Tensor) -> None:
        save_images(Path(store_root) / "x0" / f"step_{step:02d}", sample_ids, to_uint8(images))
    return sink


def collect_samples(image_dir: Path, out: Path, sample_ids: Sequence[int], split: np.ndarray,
                    made: dict[int, np.ndarray] | None = None) -> Path:
    """``samples.safetensors`` (images (N, H, W, 3) uint8, sample_ids int64, split int8) from the batch PNGs.

    ``made`` (optional): images this process has just written as PNGs, by sample id; they are taken from memory
    instead of being read back (PNG is lossless: the same pixels). Ids not in it (another rank's rows, a resumed
    run's earlier batches) are read from their PNGs."""
    from safetensors.numpy import save_file
    made = made or {}
    images = np.stack([made[int(i)] if int(i) in made else
                       np.asarray(Image.open(image_dir / f"{int(i):06d}.png").convert("RGB")) for i in sample_ids])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({"images": images, "sample_ids": np.asarray(sample_ids, np.int64), "split": np.asarray(split, np.int8)},
              str(tmp))
    tmp.replace(out)
    return out
