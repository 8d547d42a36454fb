"""The store engine: a store's plan (:class:`StoreSpec`), its shards filled batch by batch as the hooks produce
rows (:func:`fill_store`), the manifest written last (:func:`finish_store`).

Every shard is created once with its full (N, C, h, w) shape, then each batch's rows are written in place, so peak
memory does not grow with N (format: :mod:`sceneprobe.capture.store`).

Scale and resume
----------------
Under ``accelerate launch`` the batches are dealt out to the processes (``PartialState``): rank 0 creates the shards,
every rank writes its own rows, rank 0 writes the manifest last. Each rank lists its finished batches (row ranges) in
``progress/rank<r>.json``; a rerun with the same options skips them (after checking every shard with
``CaptureStore.check_shard``). A finished store whose fingerprint matches is skipped; a store made with other options
is an error unless ``force=True``, which redoes it.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..atomic import atomic_write_json
from ..errors import fail
from .store import CaptureStore, create_shard, finish_manifest, shard_path, write_rows

Emit = Callable[[str, int, torch.Tensor], None]  # (site, step, rows (b, C, h, w))


@dataclass
class StoreSpec:
    """What one store holds: stored (C, h, w) per site (after pooling), N rows, steps, dtype, identity."""
    root: Path
    shapes: dict[str, tuple[int, int, int]]
    n: int
    n_steps: int
    batch_size: int
    dtype: str
    pool: int
    fingerprint: str
    site_steps: dict[str, list[int]] | None = None   # steps stored per site (default: all); step-independent: [0]

    def steps_of(self, site: str) -> list[int]:
        return list((self.site_steps or {}).get(site, range(self.n_steps)))

    def pairs(self) -> list[tuple[str, int]]:
        """Every (site, step) shard of the store."""
        return [(s, t) for s in self.shapes for t in self.steps_of(s)]


class _PendingStore(CaptureStore):
    """A store being written: the same shard checks as a finished one, against the planned manifest."""

    def __init__(self, spec: StoreSpec):
        self.root = Path(spec.root)
        self.manifest = {"sites": {s: {"shape": list(sh), "steps": spec.steps_of(s)} for s, sh in spec.shapes.items()},
                         "steps": list(range(spec.n_steps)), "timesteps": [], "n": spec.n, "dtype": spec.dtype}
        self.sites, self.steps, self.timesteps, self.n = list(spec.shapes), list(range(spec.n_steps)), [], spec.n


def _state():
    from ..processes import process_state
    return process_state()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise fail(f"{path} is unreadable or not valid JSON; rerun the capture with --force") from None


def fill_store(spec: StoreSpec, run_batch: Callable[[int, int, Emit], None], force: bool = False,
               progress: bool = True, desc: str = "capture") -> bool:
    """Create the shards and fill them batch by batch; returns False if a finished, matching store was skipped.

    ``run_batch(start, stop, emit)`` computes rows [start, stop) and calls ``emit(site, step, rows)`` exactly once per
    stored (site, step) (``spec.pairs()``). Every process of an ``accelerate launch`` calls this; rank 0 creates and removes files.
    """
    state = _state()
    root, main = Path(spec.root), state.is_main_process
    mpath = root / "manifest.json"
    if mpath.is_file() and not force:
        have = _read_json(mpath).get("fingerprint")
        if have != spec.fingerprint:
            raise fail(f"capture store {root} was made with other options or another model (fingerprint {have} ≠ "
                       f"{spec.fingerprint}); pass --force to redo it, or capture into another run folder")
        CaptureStore(root).verify()
        return False
    state.wait_for_everyone()
    if force and main and root.exists():
        shutil.rmtree(root)
    state.wait_for_everyone()

    # Resume: union of every rank's finished row ranges (the world size may have changed since).
    done = np.zeros(spec.n, bool)
    own: list[list[int]] = []
    for f in sorted((root / "progress").glob("rank*.json")):
        p = _read_json(f)
        if p.get("fingerprint") != spec.fingerprint:
            raise fail(f"unfinished capture store {root} was started with other options or another model; "
                       f"pass --force to start it again")
        for a, b in p["done"]:
            done[a:b] = True
        if f.name == f"rank{state.process_index}.json":
            own = [list(r) for r in p["done"]]
    missing = [(s, t) for s, t in spec.pairs() if not shard_path(root, s, t).is_file()]
    if done.any():
        pending = _PendingStore(spec)
        for site, step in spec.pairs():
            if (site, step) not in missing:
                pending.check_shard(site, step)  # names a truncated or mismatched shard
        if missing:  # a lost shard lost its rows: every batch is redone
            done[:], own = False, []
    state.wait_for_everyone()
    if main:
        if not done.any():
            shutil.rmtree(root / "progress", ignore_errors=True)
            missing = spec.pairs()
        for site, step in missing:
            create_shard(shard_path(root, site, step), (spec.n, *spec.shapes[site]), spec.dtype)
    state.wait_for_everyone()

    starts = range(0, spec.n, spec.batch_size)
    todo = [s for s in starts if not done[s:s + spec.batch_size].all()]
    mine = todo[state.process_index::state.num_processes]
    ppath = root / "progress" / f"rank{state.process_index}.json"
    tdtype = getattr(torch, spec.dtype)
    stored = set(spec.pairs())
    for start in tqdm(mine, desc=desc, unit="batch", disable=not progress or not main, dynamic_ncols=True):
        stop = min(spec.n, start + spec.batch_size)
        seen: set[tuple[str, int]] = set()

        def emit(site: str, step: int, rows: torch.Tensor, start: int = start, seen: set = seen) -> None:
            if (site, step) not in stored:  # a step this store does not keep (``store_steps``)
                return
            if spec.pool > 1:
                rows = F.avg_pool2d(rows.float(), spec.pool)  # (b, C, h/p, w/p)
            write_rows(shard_path(root, site, step), start, rows.to(tdtype).cpu())
            seen.add((site, step))

        run_batch(start, stop, emit)
        if seen != set(spec.pairs()):
            raise RuntimeError(f"batch {start}: {len(seen)} of {len(spec.pairs())} shards written")
        own.append([start, stop])
        atomic_write_json(ppath, {"fingerprint": spec.fingerprint, "batch_size": spec.batch_size, "done": own})
    state.wait_for_everyone()
    return True


def finish_store(root: Path, manifest: dict) -> None:
    """Rank 0: write the manifest last and drop the progress files; then every process waits."""
    state = _state()
    if state.is_main_process:
        finish_manifest(root, manifest)
        shutil.rmtree(Path(root) / "progress", ignore_errors=True)
    state.wait_for_everyone()
