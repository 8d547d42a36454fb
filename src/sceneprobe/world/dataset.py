"""Dataset folders: write a rendered world (:func:`make_dataset`); read it, or a user's images (:func:`load_dataset`).

Layout written by :func:`make_dataset` (a person can open every file)::

    out/
      rgb/000000.png          # (H, W, 3) uint8
      depth/000000.npy        # (H, W) float32 camera-space z, sky = FAR_DEPTH
      saliency/000000.png     # L, 0 / 255 (255 = object pixel)
      instances/000000.png    # L, 0 sky, 1 ground, 2 + k object k (dark when viewed: the values are small)
      scenes.jsonl            # {"index", "name", "spec"} per line; spec = SceneSpec.to_dict()
      split.json              # {"train": [names], "val": [names], "test": [names]}
      meta.json               # seed, n, size, supersample, FAR_DEPTH, saliency rule, version, split counts
      contact_sheet.png       # first 8 scenes: RGB | depth (viridis, 0 → FAR_DEPTH) | saliency
      .cache/                 # packed arrays for fast loading (see below)

:func:`load_dataset` reads such a folder or a user's own: images (png/jpg) in ``rgb/`` or, without ``rgb/``, in the
folder itself; optional ``depth/<stem>.npy`` and ``saliency/<stem>.png`` matched by file stem; optional ``split.json``
(else the split is drawn from a hash of each stem: 80 % train, 10 % val, 10 % test, stable across machines).
The first load validates every file and writes a packed cache (atomically; ``.cache/`` in a folder sceneprobe made,
else under ``~/.cache/sceneprobe/``: a user's folder is never written into), keyed by the list of files
with their sizes and modification times; later loads read only the cache, until a file changes.

Bad input is a one-line :class:`~sceneprobe.errors.SceneprobeError` naming the file, the problem and what to do;
with ``skip_bad=True`` the image is left out instead and the reason is kept in ``SceneData.skipped``.
Grayscale, palette and RGBA images are not errors: they are converted to RGB (alpha dropped), listed in
``SceneData.converted`` and reported once by ``warnings.warn`` — converting is what a user means by "use my images".

The pieces: :mod:`.dataset_write` (:func:`make_dataset`), :mod:`.dataset_folder` (what a folder holds),
:mod:`.dataset_files` (reading and validating one file), :mod:`.dataset_cache` (the packed cache), :mod:`.splits`,
:mod:`.scene_data` (:class:`SceneData`); this module loads a folder (:func:`load_dataset`).
"""
from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from ..errors import fail
from .dataset_cache import _cache_key, _read_cache, _write_cache
from .dataset_files import _Bad, _read_depth, _read_image, _read_mask
from .dataset_folder import _discover, _Listing
from .dataset_write import make_dataset
from .scene_data import SceneData
from .splits import _read_split, _stem_split


def _load_files(folder: Path, listing: _Listing, skip_bad: bool) -> SceneData:
    """Read and validate every file (the slow path, once per change of the folder)."""
    skipped: list[str] = []
    lacking_any: set[str] = set()                                     # stems without a label they need

    def bad(message: str) -> None:
        if not skip_bad:
            raise fail(message + " (or load with --skip-bad to leave it out)")
        skipped.append(message)

    # Labels missing for some images: report them all together first, it is one mistake.
    for sub, labels in (("depth", listing.depths), ("saliency", listing.saliencies)):
        label_dir = listing.depth_dir if sub == "depth" else listing.saliency_dir
        if label_dir is None:
            continue
        lacking = [s for s in listing.images if s not in labels]
        if lacking and not skip_bad:
            ext = ".npy" if sub == "depth" else ".png"
            raise fail(f"{label_dir}: no {sub} for {len(lacking)} of {len(listing.images)} images (e.g. "
                       f"{lacking[0]}{ext} for {listing.images[lacking[0]]}); add the missing files, remove "
                       f"{sub}/, or load with --skip-bad")
        for s in lacking:
            if s not in lacking_any:
                skipped.append(f"{listing.images[s]}: no {sub} file for it in {label_dir}")
            lacking_any.add(s)

    images: dict[str, np.ndarray] = {}
    converted: list[str] = []
    for stem, path in listing.images.items():
        if stem in lacking_any:
            continue
        try:
            arr, mode = _read_image(path)
        except _Bad as e:
            bad(str(e))
            continue
        images[stem] = arr
        if mode is not None:
            converted.append(f"{path} ({mode})")
    if not images:
        raise fail(f"no usable images in {listing.image_dir}: all {len(listing.images)} were skipped "
                   f"(first: {skipped[0] if skipped else '?'})")

    sizes = Counter(a.shape[:2] for a in images.values())
    hw = max(sizes, key=lambda s: (sizes[s], -list(sizes).index(s)))  # most common size (ties: first seen)
    names, rgb, depth, sal = [], [], [], []
    for stem, arr in images.items():
        path = listing.images[stem]
        try:
            if arr.shape[:2] != hw:
                raise _Bad(f"{path}: image is {arr.shape[1]}x{arr.shape[0]} but the others are {hw[1]}x{hw[0]}; "
                           f"resize it to match, or remove it")
            d = _read_depth(listing.depths[stem], path, hw) if listing.depth_dir else None
            m = _read_mask(listing.saliencies[stem], path, hw) if listing.saliency_dir else None
        except _Bad as e:
            bad(str(e))
            continue
        names.append(stem)
        rgb.append(arr)
        depth.append(d)
        sal.append(m)
    if not names:
        raise fail(f"no usable images in {folder}: all {len(listing.images)} were skipped (first: {skipped[0]})")
    split = _read_split(listing.split_file, names) if listing.split_file else \
        np.asarray([_stem_split(s) for s in names], dtype="<U5")
    return SceneData(folder, names, np.stack(rgb), np.stack(depth) if listing.depth_dir else None,
                     np.stack(sal) if listing.saliency_dir else None, split, skipped, converted)


def load_dataset(folder: Path, skip_bad: bool = False) -> SceneData:
    """Load a dataset folder (ours or a user's own; see the module docstring) as stacked arrays.

    Uses the cache (:func:`cache_dir`) when it matches the files on disk, else validates every file and writes it.
    ``skip_bad``: leave unusable images out (listed in ``SceneData.skipped``) instead of raising.
    """
    folder = Path(folder)
    listing = _discover(folder)
    key = _cache_key(folder, listing)
    data = _read_cache(folder, key)
    if data is None:
        data = _load_files(folder, listing, skip_bad)
        _write_cache(folder, key, data)
    elif data.skipped and not skip_bad:
        raise fail(f"{data.skipped[0]} (and {len(data.skipped) - 1} more bad files); fix them, or load with "
                   f"--skip-bad to leave them out")
    data.root = folder
    if data.converted:
        more = f" and {len(data.converted) - 3} more" if len(data.converted) > 3 else ""
        warnings.warn(f"{folder}: converted {len(data.converted)} image(s) to RGB: "
                      f"{', '.join(data.converted[:3])}{more}; the files on disk are unchanged", stacklevel=2)
    return data


__all__ = ["SceneData", "load_dataset", "make_dataset"]
