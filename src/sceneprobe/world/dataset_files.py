"""Reading one file of a dataset folder — an image, a depth map, a mask — and validating it; a bad file raises
:class:`_Bad` with one line naming the file, the problem and what to do. Wide and palette modes are scaled, not clipped.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image


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
