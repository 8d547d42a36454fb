"""The train / val / test split of a dataset: drawn with exact counts for a rendered world (:func:`assign_split`),
read from a folder's ``split.json``, or drawn from a hash of each file stem (80 / 10 / 10) when there is none.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..errors import fail

SPLITS = ("train", "val", "test")


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
