"""Probe jobs in worker processes (the CPU sweep): each (site, step) fitted, scored and written by one of
``probe.workers`` processes.

Why processes: a probe is many small solves, and on threads their Python and small-tensor steps queue on the
interpreter lock (two threads got well short of twice one thread's rate on the cpu preset's probes). A process has
its own interpreter. Each worker is started with ``spawn`` (a parent that has run torch may hold
thread pools a forked child cannot use), pins torch and BLAS to ``threads`` for its whole life, and opens the
labels and stores itself, once, from the paths of its jobs: every product is summed in the same order as in a
one-thread sequential run, so the probe files are byte-identical for any number of workers (tested). What the
worker writes is the probe file; the parent reads it back (:func:`.probe_files._finished_rows`), in job order.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable

from ..errors import fail

_STATE: dict = {}


def _start(cfg, threads: int) -> None:
    """Worker initializer: the probe config, and torch and BLAS at ``threads`` threads for the worker's life."""
    import torch
    from threadpoolctl import threadpool_limits
    torch.set_num_threads(threads)
    _STATE.update(cfg=cfg, limits=threadpool_limits(threads), labels={}, stores={})


def _job(spec: tuple) -> Path:
    """One probe in a worker: ``spec`` = (run, protocol folder, rows, store folder, site, step, fingerprint)."""
    from ..capture.store import CaptureStore
    from .protocol_labels import load_protocol_labels
    from .sweep import fit_and_write
    run, proto, n, store_dir, site, step, fingerprint = spec
    cfg = _STATE["cfg"]
    if proto not in _STATE["labels"]:
        _STATE["labels"][proto] = load_protocol_labels(Path(proto), n, cfg.depth_target)
    if store_dir not in _STATE["stores"]:
        _STATE["stores"][store_dir] = CaptureStore(Path(store_dir))
    return fit_and_write(Path(run), _STATE["labels"][proto], _STATE["stores"][store_dir], site, step, cfg, "cpu",
                         fingerprint)


def map_probe_jobs(specs: list[tuple], workers: int, cfg, threads: int,
                   on_done: Callable[[int, Path], None]) -> None:
    """Run :func:`_job` on every spec over ``workers`` processes; ``on_done(index, path)`` in the calling process,
    in spec order, as results arrive. An exception in a job is raised here (the pool is shut down first)."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(specs)), mp_context=ctx, initializer=_start,
                             initargs=(cfg, threads)) as pool:
        futures = [pool.submit(_job, s) for s in specs]
        try:
            for i, fut in enumerate(futures):
                on_done(i, fut.result())
        except BrokenProcessPool as e:
            raise fail("a probe worker process ended abruptly (out of memory, or run_probes called from a script "
                       "without `if __name__ == \"__main__\":`, which spawned workers re-import); set "
                       "probe.workers: 1 to probe in this process") from e
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
