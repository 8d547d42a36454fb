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
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from .. import __version__
from ..atomic import atomic_write_json, atomic_write_text, temp_folder
from ..owned import atomic_folder, check_out_folder
from ..errors import fail
from .parallel import chunked, map_chunks
from .render import FAR_DEPTH, SALIENCY_RULE, _render_chunk, check_render_args, stack_chunks

LAYOUT_VERSION = 1
SPLITS = ("train", "val", "test")
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
CACHE_DIR = ".cache"
_CACHE_VERSION = 1
_SHEET_SCENES = 8


# ------------------------------------------------------------------------------------------------------ writing
def scene_names(n: int) -> list[str]:
    """``000000`` … : the index zero-padded to 6 digits (more when n > 10⁶), so names sort in index order."""
    width = max(6, len(str(max(n - 1, 0))))
    return [f"{i:0{width}d}" for i in range(n)]


def assign_split(n: int, seed: int, val_fraction: float, test_fraction: float) -> np.ndarray:
    """Fixed split of ``n`` scenes: (n,) str. Exact counts ``round(n·fraction)`` (at least 1 each when n >= 3 and
    the fraction is > 0), chosen by a permutation drawn from ``default_rng([seed, 1])``."""
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    if n >= 3:
        n_test = max(n_test, 1) if test_fraction > 0 else 0
        n_val = max(n_val, 1) if val_fraction > 0 else 0
    while n_test + n_val >= n and n_test + n_val > 0:                 # keep at least one training scene
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    split = np.full(n, "train", dtype="<U5")
    perm = np.random.default_rng([int(seed), 1]).permutation(n)
    split[perm[:n_test]] = "test"
    split[perm[n_test:n_test + n_val]] = "val"
    return split


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
    error unless ``force``. Workers render and write their own chunks, so files are written in parallel too.
    Returns ``out``.
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise fail(f"number of scenes must be a whole number >= 1, got {n!r}; pass e.g. --n 2000")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise fail(f"seed must be a whole number >= 0, got {seed!r}")
    if not isinstance(workers, (int, np.integer)) or workers < 1:
        raise fail(f"workers must be a whole number >= 1, got {workers!r}")
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


# ------------------------------------------------------------------------------------------------------ reading
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


class _Bad(Exception):
    """One unusable input file (message: "file: problem; what to do")."""


_WIDE_GRAY = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535}


def to_uint8_planes(im: Image.Image) -> np.ndarray:
    """Any PIL image → (H, W) or (H, W, C) uint8, *scaling* wide modes to 0…255 (PIL's ``convert`` clips them).

    16-bit grayscale (``I;16*``) is divided by 65535/255; 32-bit ``I`` by its type's range when any value exceeds 255
    (a 16-bit PNG read as ``I``: by 65535, else by 2³¹−1); float ``F`` is read as 0…1 when its maximum is ≤ 1, else
    as 0…255. Palette images go through their palette (RGBA when they carry transparency, so nothing is clipped).
    """
    if im.mode in _WIDE_GRAY or im.mode == "I":
        a = np.asarray(im).astype(np.float64)                                         # (H, W)
        top = _WIDE_GRAY.get(im.mode) or (255 if a.max(initial=0) <= 255 else 65535 if a.max() <= 65535 else 2**31 - 1)
        return np.clip(np.round(a * (255 / top)), 0, 255).astype(np.uint8)
    if im.mode == "F":
        a = np.nan_to_num(np.asarray(im).astype(np.float64))
        a = a * 255 if a.max(initial=0) <= 1 else a
        return np.clip(np.round(a), 0, 255).astype(np.uint8)
    if im.mode in ("P", "PA"):
        return np.asarray(im.convert("RGBA"))
    return np.asarray(im)


def _rgb(im: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 from any mode: gray repeated, alpha dropped, wide modes scaled (see :func:`to_uint8_planes`)."""
    if im.mode == "RGB":
        return np.asarray(im)
    if im.mode in ("L", "LA", "RGBA", "RGBX", "1", "CMYK", "YCbCr", "LAB", "HSV", "La", "RGBa"):
        return np.asarray(im.convert("RGB"))
    a = to_uint8_planes(im)
    return np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else np.ascontiguousarray(a[..., :3])


@contextlib.contextmanager
def _quiet_pil() -> Iterator[None]:
    """PIL warns (two lines on stderr) about images over ~89 M pixels; a large image is no attack here, and what
    matters about it (its size against the others) is said in the one error line, if any."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def _read_image(path: Path) -> tuple[np.ndarray, str | None]:
    """(H, W, 3) uint8 and the original mode if it was converted to RGB."""
    try:
        with _quiet_pil(), Image.open(path) as im:
            im.load()
            if im.mode == "RGB":
                return np.asarray(im), None
            return _rgb(im), im.mode
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise _Bad(f"{path}: cannot read this image ({e}); re-save it as PNG or JPEG, or remove it") from None


def _read_depth(path: Path, image: Path, hw: tuple[int, int]) -> np.ndarray:
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise _Bad(f"{path}: cannot read this .npy file ({e}); save depth with numpy.save") from None
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2 or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise _Bad(f"{path}: depth must be a 2-D array of numbers (H, W), got shape {a.shape} dtype {a.dtype}; "
                   f"save one float map per image")
    if a.shape != hw:
        raise _Bad(f"{path}: depth is {a.shape[1]}x{a.shape[0]} but its image {image.name} is {hw[1]}x{hw[0]}; "
                   f"save the depth map at the image's size")
    a = a.astype(np.float32)
    bad = ~np.isfinite(a)
    if bad.any():
        raise _Bad(f"{path}: depth has {int(bad.sum())} NaN or infinite values; fill them (e.g. with the far "
                   f"depth) before saving, or remove the file")
    if (a < 0).any():
        raise _Bad(f"{path}: depth has negative values (min {float(a.min()):.4g}); depth must be >= 0")
    return a


def _read_mask(path: Path, image: Path, hw: tuple[int, int]) -> np.ndarray:
    try:
        with _quiet_pil(), Image.open(path) as im:
            im.load()
            m = np.asarray(im) if im.mode == "1" else np.asarray(im.convert("L")) if im.mode in ("L", "LA", "RGB", \
                "RGBA") else to_uint8_planes(im)
            if m.ndim == 3:                                               # palette or colour mask: its first channel
                m = m[..., 0]
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise _Bad(f"{path}: cannot read this mask ({e}); re-save it as PNG, or remove it") from None
    if m.shape != hw:
        raise _Bad(f"{path}: mask is {m.shape[1]}x{m.shape[0]} but its image {image.name} is {hw[1]}x{hw[0]}; "
                   f"save the mask at the image's size")
    if m.dtype != bool and ((m != 0) & (m != 255)).any() and ((m != 0) & (m != 1)).any():
        odd = sorted(set(np.unique(m).tolist()) - {0, 1, 255})[:3]
        raise _Bad(f"{path}: mask is not binary (has values {odd}); save it with only 0 and 255 (or 0 and 1), "
                   f"as PNG, not JPEG")
    return m > 0


def _stem_split(stem: str) -> str:
    """Deterministic split from a hash of the name: 80 % train, 10 % val, 10 % test."""
    u = int.from_bytes(hashlib.sha256(stem.encode()).digest()[:8], "big") / 2.0**64
    return "train" if u < 0.8 else "val" if u < 0.9 else "test"


def _read_split(path: Path, names: list[str]) -> np.ndarray:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise fail(f"{path}: not valid JSON ({e}); fix it, or delete it to split by name hash") from None
    table: dict[str, str] = {}
    if isinstance(raw, dict) and set(raw) <= set(SPLITS) and all(isinstance(v, list) for v in raw.values()):
        for split, members in raw.items():                            # {"train": [names], "val": [...], ...}
            for nm in members:
                if str(nm) in table:
                    raise fail(f"{path}: {nm!r} is listed in both {table[str(nm)]} and {split}; keep one")
                table[str(nm)] = split
    elif isinstance(raw, dict) and all(v in SPLITS for v in raw.values()):
        table = {str(k): v for k, v in raw.items()}                   # {name: split}
    else:
        raise fail(f"{path}: expected {{\"train\": [names], \"val\": [...], \"test\": [...]}} or {{name: split}}; "
                   f"fix it, or delete it to split by name hash")
    missing = [nm for nm in names if nm not in table]
    if missing:
        raise fail(f"{path}: {len(missing)} images have no split (e.g. {missing[0]!r}); add them, or delete "
                   f"split.json to split by name hash")
    return np.asarray([table[nm] for nm in names], dtype="<U5")


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
