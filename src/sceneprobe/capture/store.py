"""The capture store: one safetensors shard per (site, step), streamed to disk, read lazily.

Layout of a store (``captures/<protocol>/<model>/``)::

    manifest.json                      written last: sites, shapes, steps, timesteps, n, sample ids, seeds, ...
    progress/rank<r>.json              rows finished so far (resume); removed when the store is complete
    <site>/step_XX.safetensors         one tensor "activations", shape (N, C, h, w), float16 by default; one file per
                                       stored step of the site (``manifest["sites"][site]["steps"]``: every step, or
                                       only ``[0]`` for a step-independent site such as the VAE encoder)

A shard is a valid safetensors file from the moment it is created: its header declares the full (N, C, h, w) tensor
and the file is pre-sized (sparse) to hold it; rows are written in place at their byte offsets as batches are
produced. So peak memory does not grow with N, several processes can fill disjoint rows of the same shards, and the
result is read with plain ``safetensors.safe_open`` (``get_slice`` reads only the requested rows).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from safetensors import safe_open

from ..atomic import atomic_write_json
from ..errors import fail

_DT = {"float16": ("F16", np.float16, 2), "float32": ("F32", np.float32, 4), "bfloat16": ("BF16", None, 2)}


def shard_path(root: Path, site: str, step: int) -> Path:
    return Path(root) / site / f"step_{step:02d}.safetensors"


def create_shard(path: Path, shape: Sequence[int], dtype: str = "float16") -> None:
    """Create a pre-sized shard holding one tensor ``activations`` of ``shape`` (zeros until rows are written)."""
    code, _, item = _DT[dtype]
    nbytes = int(np.prod(shape)) * item
    header = {"activations": {"dtype": code, "shape": [int(s) for s in shape], "data_offsets": [0, nbytes]}}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data start to 8 bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        f.truncate(8 + len(blob) + nbytes)
    os.replace(tmp, path)


MAX_HEADER = 1 << 20   # a shard's JSON header is ~100 bytes; a length beyond this (or the file) is damage, not a header


def _layout(path: Path, f=None) -> tuple[int, list[int], str]:
    """(data start offset, shape, dtype code) read from a shard's header (from the open file ``f`` if given, at its
    start); ValueError if it is damaged.

    The header length is checked against the file's size and :data:`MAX_HEADER` before it is read: a garbage length
    must not become a multi-GB read."""
    if f is None:
        with open(path, "rb") as f:
            return _layout(path, f)
    n = int.from_bytes(f.read(8), "little")
    if not 0 < n <= min(MAX_HEADER, os.fstat(f.fileno()).st_size - 8):
        raise ValueError(f"header length {n} does not fit the file")
    meta = json.loads(f.read(n))["activations"]
    if not (isinstance(meta, dict) and isinstance(meta.get("shape"), list) and isinstance(meta.get("dtype"), str)
            and all(isinstance(s, int) and s >= 0 for s in meta["shape"])):
        raise ValueError("header has no valid activations entry")
    return 8 + n, meta["shape"], meta["dtype"]


def write_rows(path: Path, start: int, rows: torch.Tensor | np.ndarray) -> None:
    """Write ``rows`` (b, C, h, w) into rows [start, start + b) of the shard at ``path``, in place."""
    arr = rows.detach().cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
    with open(path, "r+b") as f:                           # one open: the header, then the rows in place
        offset, shape, code = _layout(path, f)
        want = {"F16": np.float16, "F32": np.float32}[code]
        arr = np.ascontiguousarray(arr.astype(want, copy=False))
        if list(arr.shape[1:]) != shape[1:] or start + len(arr) > shape[0]:
            raise ValueError(f"rows {arr.shape} at {start} do not fit shard {path} of shape {shape}")
        row_bytes = int(np.prod(shape[1:])) * arr.itemsize
        f.seek(offset + start * row_bytes)
        f.write(arr)                                       # buffer protocol: no bytes copy


def redo_advice(root: Path) -> str:
    """What repairs a damaged finished store: the capture command with --force (a plain rerun would skip it)."""
    root = Path(root)
    protocol, model = root.parent.name, root.name
    if protocol in ("generate", "noised"):
        control = "" if model == "ldm" else f" --control {model}"
        return (f"redo the store with `sceneprobe capture --run {root.parents[2]} --protocol {protocol}{control} "
                f"--force` (or rerun `sceneprobe run`, which redoes it)")
    return "redo the store: rerun the same `sceneprobe capture` command with --force"


_MANIFEST_FIELDS = {"sites": dict, "steps": list, "timesteps": list, "n": int, "dtype": str}


def read_manifest(path: Path) -> dict:
    """The guarded reader of a store's ``manifest.json``: damaged JSON, missing or mistyped fields are one error."""
    path = Path(path)
    try:
        m = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise fail(f"capture manifest {path} is unreadable or not valid JSON; {redo_advice(path.parent)}") from None
    bad = [k for k, tp in _MANIFEST_FIELDS.items() if not isinstance(m, dict) or not isinstance(m.get(k), tp)
           or (tp is int and isinstance(m.get(k), bool))] if isinstance(m, dict) else ["(not an object)"]
    if not bad:
        if m["dtype"] not in _DT or m["n"] < 0:
            bad = ["dtype" if m["dtype"] not in _DT else "n"]
        elif not all(isinstance(v, dict) and isinstance(v.get("shape"), list) and len(v["shape"]) == 3
                     and all(isinstance(c, int) and c > 0 for c in v["shape"]) for v in m["sites"].values()):
            bad = ["sites"]
        elif not all(isinstance(t, int) and not isinstance(t, bool) for t in m["steps"] + m["timesteps"]):
            bad = ["steps"]
    if bad:
        raise fail(f"capture manifest {path} has a missing or mistyped field {bad[0]!r}; {redo_advice(path.parent)}")
    return m


class CaptureStore:
    """Read side of a finished store: lazy, validated against the manifest.

    ``manifest`` keys: ``protocol``, ``model``, ``sites`` ({name: {"shape": [C, h, w]}}), ``steps`` (indices),
    ``timesteps``, ``n``, ``sample_ids``, ``seeds``, ``dtype``, ``pool``, ``site_kind``, ``model_hash``.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        mpath = self.root / "manifest.json"
        if not mpath.is_file():
            raise fail(f"capture store {self.root} has no manifest.json; the capture did not finish — rerun "
                       f"`sceneprobe capture` with the same options to resume it")
        self.manifest = read_manifest(mpath)
        self.sites: list[str] = list(self.manifest["sites"])
        self.steps: list[int] = list(self.manifest["steps"])
        self.timesteps: list[int] = list(self.manifest["timesteps"])
        self.n: int = int(self.manifest["n"])

    def shape(self, site: str) -> tuple[int, int, int]:
        return tuple(self.manifest["sites"][site]["shape"])

    def site_steps(self, site: str) -> list[int]:
        """The steps stored for ``site``: all steps, or ``[0]`` for a step-independent site (the VAE encoder, which
        sees the clean image: ``manifest["sites"][site]["step_independent"]``)."""
        return list(self.manifest["sites"][site].get("steps", self.steps))

    def step_independent(self, site: str) -> bool:
        return bool(self.manifest["sites"][site].get("step_independent", False))

    def check_shard(self, site: str, step: int) -> Path:
        """Raise a clear error if the shard is missing, truncated or disagrees with the manifest."""
        path = shard_path(self.root, site, step)
        if not path.is_file():
            raise fail(f"capture shard {path} is missing; {redo_advice(self.root)}")
        try:
            offset, shape, code = _layout(path)
        except (OSError, ValueError, KeyError, TypeError):
            raise fail(f"capture shard {path} has a damaged header; {redo_advice(self.root)}") from None
        want = [self.n, *self.shape(site)]
        if shape != want or code != _DT[self.manifest["dtype"]][0]:
            raise fail(f"capture shard {path} holds {code}{shape} but the manifest says "
                       f"{_DT[self.manifest['dtype']][0]}{want}; {redo_advice(self.root)}")
        size = offset + int(np.prod(shape)) * _DT[self.manifest["dtype"]][2]
        if path.stat().st_size < size:
            raise fail(f"capture shard {path} is truncated ({path.stat().st_size} of {size} bytes); "
                       f"{redo_advice(self.root)}")
        return path

    def verify(self) -> None:
        for site in self.sites:
            for step in self.site_steps(site):
                self.check_shard(site, step)

    def read(self, site: str, step: int, rows: slice | np.ndarray | Sequence[int] | None = None) -> torch.Tensor:
        """Activations (n, C, h, w) as float32 for ``rows`` (default: all); only those rows are read from disk."""
        path = self.check_shard(site, step)
        with safe_open(str(path), framework="pt") as f:
            sl = f.get_slice("activations")
            if rows is None:
                x = sl[:]
            elif isinstance(rows, slice):
                x = sl[rows]
            else:
                idx = np.asarray(rows, dtype=np.int64)
                if len(idx) and np.all(np.diff(idx) == 1):
                    x = sl[int(idx[0]): int(idx[-1]) + 1]
                elif len(idx) and np.all(np.diff(idx) > 0) and idx[-1] - idx[0] < 2 * len(idx):
                    x = sl[int(idx[0]): int(idx[-1]) + 1][torch.from_numpy(idx - idx[0])]   # dense: one read
                else:
                    x = torch.stack([sl[int(i): int(i) + 1][0] for i in idx]) if len(idx) else sl[0:0]
        return x.float()

    def iter_rows(self, site: str, step: int, rows: np.ndarray, chunk: int = 64) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield (row indices, activations (b, C, h, w)) in chunks: bounded memory for any N."""
        rows = np.asarray(rows)
        for i in range(0, len(rows), chunk):
            r = rows[i:i + chunk]
            yield r, self.read(site, step, r)


def finish_manifest(root: Path, manifest: dict) -> Path:
    """Write ``manifest.json`` last (atomically): its presence marks the store complete."""
    atomic_write_json(Path(root) / "manifest.json", manifest)
    return Path(root) / "manifest.json"


def load_labels(protocol_root: Path) -> dict[str, np.ndarray]:
    """Labels beside the stores of a protocol: ``labels.safetensors`` with ``depth`` (N, H, W) float32,
    ``saliency`` (N, H, W) uint8 in {0, 1} and ``split`` (N,) int8 (0 train, 1 val, 2 test), rows aligned with the
    stores' rows."""
    from safetensors.numpy import load_file
    path = Path(protocol_root) / "labels.safetensors"
    if not path.is_file():
        raise fail(f"labels file {path} is missing; run `sceneprobe capture` (noised) or label the generated images first")
    try:
        return load_file(str(path))
    except Exception as e:          # safetensors' SafetensorError (truncated, garbage header) has no common base
        if not (type(e).__name__ == "SafetensorError" or isinstance(e, (OSError, ValueError))):
            raise
        redo = (redo_advice(Path(protocol_root) / "ldm") if Path(protocol_root).name == "noised" else
                f"label the images again with `sceneprobe label --images {Path(protocol_root) / 'samples.safetensors'} "
                f"--force`")
        raise fail(f"labels file {path} is damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                   f"{redo}") from None


def save_labels(protocol_root: Path, depth: np.ndarray, saliency: np.ndarray, split: np.ndarray, **extra: np.ndarray) -> Path:
    from safetensors.numpy import save_file
    path = Path(protocol_root) / "labels.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".labels.tmp.safetensors")
    save_file({"depth": np.ascontiguousarray(depth, np.float32), "saliency": np.ascontiguousarray(saliency, np.uint8),
               "split": np.ascontiguousarray(split, np.int8), **{k: np.ascontiguousarray(v) for k, v in extra.items()}},
              str(tmp))
    os.replace(tmp, path)
    return path


SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
