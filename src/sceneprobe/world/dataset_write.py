"""Writing a rendered world as a dataset folder (:func:`make_dataset`; the layout is in :mod:`.dataset`): scenes
rendered and written in parallel, ``scenes.jsonl``, ``split.json``, ``meta.json``, a contact sheet and the loader's
cache, the folder appearing whole or not at all.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from .. import __version__
from ..atomic import atomic_write_json, atomic_write_text
from ..errors import fail
from ..owned import atomic_folder, check_out_folder
from ..processes import resolve_workers
from .dataset_cache import _cache_key, _write_cache
from .dataset_folder import _discover
from .parallel import chunked, map_chunks
from .render import FAR_DEPTH, SALIENCY_RULE, _render_chunk, check_render_args, stack_chunks
from .scene_data import SceneData
from .splits import SPLITS, assign_split

LAYOUT_VERSION = 1
_SHEET_SCENES = 8


def scene_names(n: int) -> list[str]:
    """``000000`` … : the index zero-padded to 6 digits (more when n > 10⁶), so names sort in index order."""
    width = max(6, len(str(max(n - 1, 0))))
    return [f"{i:0{width}d}" for i in range(n)]


def _render_write_chunk(job: tuple[str, int, list[int], int, int, list[str]]) -> dict:
    """Worker: render scenes ``indices`` and write their files under ``root`` (runs in a pool process)."""
    root, seed, indices, size, supersample, names = job
    out = _render_chunk((seed, indices, size, supersample))
    root_path = Path(root)
    for k, name in enumerate(names):
        Image.fromarray(out["rgb"][k]).save(root_path / "rgb" / f"{name}.png", compress_level=1)
        Image.fromarray(out["saliency"][k].astype(np.uint8) * 255).save(root_path / "saliency" / f"{name}.png")
        Image.fromarray(out["instances"][k]).save(root_path / "instances" / f"{name}.png")
        np.save(root_path / "depth" / f"{name}.npy", out["depth"][k])
    del out["instances"]                                              # not needed by the parent: less to pickle
    return out


def _contact_sheet(rgb: np.ndarray, depth: np.ndarray, saliency: np.ndarray) -> np.ndarray:
    """Rows of RGB | depth (viridis: near dark, far yellow, fixed 0 → FAR_DEPTH) | mask; (rows·H', 3·W' + gaps, 3)."""
    from matplotlib import colormaps                                  # lazy: matplotlib is slow to import

    cmap = colormaps["viridis"]
    size = rgb.shape[1]
    zoom = max(1, 128 // size)                                        # small scenes are hard to see at 1:1
    gap = np.full((size * zoom, 2, 3), 255, np.uint8)
    rows = []
    for im, d, m in zip(rgb, depth, saliency):
        dcol = (cmap(np.clip(d / FAR_DEPTH, 0, 1))[..., :3] * 255).astype(np.uint8)        # (H, W, 3)
        mcol = np.repeat(m.astype(np.uint8)[..., None] * 255, 3, axis=-1)                   # (H, W, 3)
        tiles = [np.kron(t, np.ones((zoom, zoom, 1), np.uint8)) for t in (im, dcol, mcol)]
        rows.append(np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2]], axis=1))
        rows.append(np.full((2, rows[-1].shape[1], 3), 255, np.uint8))
    return np.concatenate(rows[:-1], axis=0)


def make_dataset(out: Path, n: int, size: int = 64, seed: int = 0, supersample: int = 3, workers: int = 1,
                 val_fraction: float = 0.1, test_fraction: float = 0.1, force: bool = False,
                 progress: bool = True) -> Path:
    """Render scenes ``0 … n-1`` of world ``seed`` into the folder ``out`` (layout in the module docstring).

    The folder appears whole or not at all (built in a temporary sibling, then renamed); an existing ``out`` is an
    error unless ``force``. Workers (0: every core) render and write their own chunks, so files are written in
    parallel too; the bytes do not depend on their number.
    Returns ``out``.
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise fail(f"number of scenes must be a whole number >= 1, got {n!r}; pass e.g. --n 2000")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise fail(f"seed must be a whole number >= 0, got {seed!r}")
    if not isinstance(workers, (int, np.integer)) or workers < 0:
        raise fail(f"workers must be a whole number >= 0 (0: every core), got {workers!r}")
    workers = resolve_workers(int(workers))
    check_render_args(size, supersample)
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= f < 1:
            raise fail(f"{name} must be in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1:
        raise fail(f"val_fraction + test_fraction must be < 1 (leave scenes to train on), got "
                   f"{val_fraction} + {test_fraction}")
    out = Path(out)
    check_out_folder(out, force)                                      # fail before rendering anything
    names = scene_names(n)
    split = assign_split(n, seed, val_fraction, test_fraction)
    with atomic_folder(out, force) as tmp:
        for sub in ("rgb", "depth", "saliency", "instances"):
            (tmp / sub).mkdir()
        chunks = chunked(list(range(n)), workers)
        jobs = [(str(tmp), int(seed), c, int(size), int(supersample), [names[i] for i in c]) for c in chunks]
        data = stack_chunks(map_chunks(_render_write_chunk, jobs, workers, progress,
                                       counts=[len(c) for c in chunks], desc="scenes"), size)
        atomic_write_text(tmp / "scenes.jsonl", "".join(
            json.dumps({"index": i, "name": nm, "spec": sp.to_dict()}, separators=(",", ":")) + "\n"
            for i, (nm, sp) in enumerate(zip(names, data["specs"]))))
        atomic_write_json(tmp / "split.json", {s: [nm for nm, k in zip(names, split) if k == s] for s in SPLITS})
        counts = {s: int((split == s).sum()) for s in SPLITS}
        atomic_write_json(tmp / "meta.json", {
            "format": "sceneprobe-scenes", "version": LAYOUT_VERSION, "sceneprobe_version": __version__,
            "seed": int(seed), "n": int(n), "size": int(size), "supersample": int(supersample),
            "far_depth": FAR_DEPTH,
            "depth": "camera-space z (distance along the optical axis) of the pixel-centre ray, float32 .npy; "
                     "sky and anything farther are far_depth",
            "saliency_rule": SALIENCY_RULE,
            "instances": "0 = sky, 1 = ground, 2 + k = object k of the scene's spec (scenes.jsonl)",
            "rgb": f"mean of {supersample}x{supersample} rays per pixel",
            "val_fraction": val_fraction, "test_fraction": test_fraction, "split_counts": counts})
        k = min(_SHEET_SCENES, n)
        sheet = _contact_sheet(data["rgb"][:k], data["depth"][:k], data["saliency"][:k])
        Image.fromarray(sheet).save(tmp / "contact_sheet.png")
        # We hold every array already: write the loader's cache now, so the first load is instant.
        listing = _discover(tmp)
        _write_cache(tmp, _cache_key(tmp, listing), SceneData(tmp, names, data["rgb"], data["depth"],
                                                              data["saliency"], split))
    return out
