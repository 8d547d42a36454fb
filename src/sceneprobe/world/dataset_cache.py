"""The packed cache of a dataset folder: arrays keyed by every input file's path, size and mtime, so a later load reads
only the cache until a file changes; ``.cache/`` in a folder sceneprobe made, else under ``~/.cache/sceneprobe/``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_json, temp_folder
from .dataset_folder import _Listing
from .scene_data import SceneData

CACHE_DIR = ".cache"
_CACHE_VERSION = 1


def _cache_key(folder: Path, listing: _Listing) -> str:
    """Hash of every input file's relative path, size and mtime (ns): any change invalidates the cache."""
    files = [*listing.images.values(), *listing.depths.values(), *listing.saliencies.values()]
    if listing.split_file:
        files.append(listing.split_file)
    rows = []
    for f in files:
        st = f.stat()
        rows.append((str(f.relative_to(folder)), st.st_size, st.st_mtime_ns))
    blob = json.dumps([_CACHE_VERSION, rows], separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def cache_dir(folder: Path) -> Path:
    """Where the packed cache of ``folder`` lives: ``folder/.cache`` in a folder sceneprobe made; for a user's own
    folder (which sceneprobe never writes into) under ``$XDG_CACHE_HOME/sceneprobe/datasets/`` (default
    ``~/.cache``), named by a hash of the folder's absolute path."""
    from ..owned import is_ours
    folder = Path(folder)
    if is_ours(folder):
        return folder / CACHE_DIR
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sceneprobe" / "datasets"
    return base / hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:20]


def _write_cache(folder: Path, key: str, data: SceneData) -> None:
    """Packed arrays in :func:`cache_dir` (replaced in one rename). Where it cannot be written, no cache is kept."""
    try:
        with temp_folder(cache_dir(folder)) as tmp:
            np.save(tmp / "rgb.npy", data.rgb)
            if data.depth is not None:
                np.save(tmp / "depth.npy", data.depth)
            if data.saliency is not None:
                np.save(tmp / "saliency.npy", data.saliency)
            atomic_write_json(tmp / "index.json", {
                "key": key, "names": data.names, "split": [str(s) for s in data.split], "skipped": data.skipped,
                "converted": data.converted, "depth": data.depth is not None,
                "saliency": data.saliency is not None})
    except OSError:
        pass                                                          # the cache is an optimisation only


def _read_cache(folder: Path, key: str) -> SceneData | None:
    cache = cache_dir(folder)
    try:
        index = json.loads((cache / "index.json").read_text())
        if index.get("key") != key:
            return None
        load = lambda name: np.load(cache / f"{name}.npy", allow_pickle=False)  # noqa: E731
        return SceneData(folder, list(index["names"]), load("rgb"), load("depth") if index["depth"] else None,
                         load("saliency") if index["saliency"] else None, np.asarray(index["split"], dtype="<U5"),
                         list(index["skipped"]), list(index["converted"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None                                                   # missing or damaged: rebuild
