"""Work split into chunks and mapped, in order, over a pool of spawned processes (rendering and writing scenes)."""
from __future__ import annotations

import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable, Sequence


def chunked(items: Sequence[Any], workers: int, max_chunk: int = 256) -> list[list[Any]]:
    """Split ``items`` in order into chunks: ~8 per worker so the pool stays busy, at most ``max_chunk`` each."""
    size = max(1, min(max_chunk, math.ceil(len(items) / (8 * max(workers, 1)))))
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def map_chunks(fn: Callable[[Any], Any], jobs: list[Any], workers: int = 1, progress: bool = False,
               counts: Iterable[int] | None = None, desc: str = "scenes") -> list[Any]:
    """``[fn(job) for job in jobs]``, in order, over a pool of ``workers`` spawned processes when ``workers > 1``.

    ``spawn`` (not fork) because the parent may hold torch's threads; ``fn`` must be a module-level function.
    ``counts`` (items per job) drives the progress bar.
    """
    from tqdm.auto import tqdm

    counts = list(counts) if counts is not None else [1] * len(jobs)
    bar = tqdm(total=sum(counts), unit="scene", desc=desc, disable=not progress)
    try:
        if workers <= 1 or len(jobs) <= 1:
            out = []
            for job, c in zip(jobs, counts):
                out.append(fn(job))
                bar.update(c)
            return out
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
            out = []
            for res, c in zip(pool.map(fn, jobs), counts):
                out.append(res)
                bar.update(c)
            return out
    finally:
        bar.close()
