"""The probe split of a store's rows: 60 % / 15 % / 25 % train / val / test, a fixed function of the sample ids,
stored in the manifest and beside the images or labels."""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

SPLIT_FRACTIONS = (0.60, 0.15, 0.25)


def probe_split(sample_ids: Sequence[int]) -> np.ndarray:
    """Split codes (N,) int8 (0 train, 1 val, 2 test): 60 / 15 / 25 %, exact counts, fixed by the ids.

    The ids are ordered by a hash of each id (so the split is unrelated to id order) and cut at 60 % and 75 %.
    """
    keys = np.array([int.from_bytes(hashlib.sha256(f"split:{int(i)}".encode()).digest()[:8], "little")
                     for i in sample_ids], dtype=np.uint64)
    order = np.argsort(keys, kind="stable")
    n = len(keys)
    n_train, n_val = round(SPLIT_FRACTIONS[0] * n), round(SPLIT_FRACTIONS[1] * n)
    split = np.full(n, 2, np.int8)
    split[order[:n_train]] = 0
    split[order[n_train:n_train + n_val]] = 1
    return split
