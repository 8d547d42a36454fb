"""What a dataset folder holds (:class:`_Listing`): its images by file stem (in ``rgb/`` or the folder itself), the
optional ``depth/`` and ``saliency/`` files matched by stem, and an optional ``split.json``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import fail

IMAGE_EXTS = (".png", ".jpg", ".jpeg")


@dataclass
class _Listing:
    image_dir: Path
    images: dict[str, Path]                                           # stem → file, sorted by stem
    depth_dir: Path | None
    depths: dict[str, Path]
    saliency_dir: Path | None
    saliencies: dict[str, Path]
    split_file: Path | None


def _by_stem(folder: Path, exts: tuple[str, ...]) -> dict[str, Path]:
    """Files of ``folder`` with one of ``exts`` (any case), by stem; hidden files are ignored."""
    found: dict[str, Path] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        path = Path(entry.path)
        if path.suffix.lower() not in exts:
            continue
        if path.stem in found:
            raise fail(f"{path} and {found[path.stem]} have the same name {path.stem!r}; rename or remove one")
        found[path.stem] = path
    return dict(sorted(found.items()))


def _discover(folder: Path) -> _Listing:
    if not folder.is_dir():
        raise fail(f"dataset folder {folder} does not exist or is not a folder")
    image_dir = folder / "rgb" if (folder / "rgb").is_dir() else folder
    images = _by_stem(image_dir, IMAGE_EXTS)
    if not images:
        raise fail(f"no images (.png, .jpg) in {image_dir}; put images in the folder or in its rgb/ subfolder")
    depth_dir = folder / "depth" if (folder / "depth").is_dir() else None
    sal_dir = folder / "saliency" if (folder / "saliency").is_dir() else None
    split_file = folder / "split.json" if (folder / "split.json").is_file() else None
    return _Listing(image_dir, images, depth_dir, _by_stem(depth_dir, (".npy",)) if depth_dir else {},
                    sal_dir, _by_stem(sal_dir, IMAGE_EXTS) if sal_dir else {}, split_file)
