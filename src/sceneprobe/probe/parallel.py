"""Where probes run: the solver's device (``probe.device``) and the pool of workers over (site, step) probes.

Each probe — one (site, step), both tasks — is an independent job. On the CPU the jobs run on ``probe.workers``
threads (0: every core this process may use), each job on one thread: torch and BLAS are pinned to one thread for
the whole pool, so every matrix product is summed in the same order whatever the worker count, and the results are
byte-identical for 1 or 16 workers (and identical to a one-thread sequential run). Threads, not processes: the heavy
parts (matrix products, Cholesky, numpy reductions) release the GIL, and the jobs share the labels, the scorers and,
in the streamed mode, the statistics in memory, without copies.

On a GPU (``probe.device: cuda``, or ``auto`` with one present) the solvers' tensors live on the device; workers
still overlap one probe's CPU part (metrics on numpy) with another's device part. GPU results equal the CPU's to
floating-point tolerance, not in bytes (other kernels sum in another order).
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import torch

from ..errors import fail

T = TypeVar("T")
R = TypeVar("R")


def resolve_device(name: str) -> torch.device:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` without one is the user's error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise fail("probe.device is cuda but no CUDA GPU is visible to torch; use probe.device: auto or cpu")
    if name not in ("cpu", "cuda"):
        raise fail(f"probe.device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


@contextlib.contextmanager
def single_threaded(threads: int | None = 1) -> Iterator[None]:
    """torch's and BLAS's thread pools at ``threads`` inside the block (restored after; None leaves them)."""
    if threads is None:
        yield
        return
    old = torch.get_num_threads()
    try:
        from threadpoolctl import threadpool_limits
        limit = threadpool_limits(threads)
    except ImportError:                                                        # sklearn's dependency; optional here
        limit = contextlib.nullcontext()
    torch.set_num_threads(threads)
    try:
        with limit:
            yield
    finally:
        torch.set_num_threads(old)


def map_ordered(fn: Callable[[T], R], jobs: Iterable[T], workers: int,
                on_done: Callable[[T, R], None] | None = None) -> list[R]:
    """``[fn(job) for job in jobs]`` in order, over ``workers`` threads; ``on_done(job, result)`` runs in the
    calling thread, in job order, as results arrive (progress bars, writing files). An exception in a job is raised
    here, after the jobs already started have finished."""
    jobs = list(jobs)
    if workers <= 1 or len(jobs) <= 1:
        out = []
        for job in jobs:
            out.append(fn(job))
            if on_done is not None:
                on_done(job, out[-1])
        return out
    with ThreadPoolExecutor(max_workers=min(workers, len(jobs)), thread_name_prefix="probe") as pool:
        futures = [pool.submit(fn, job) for job in jobs]
        out = []
        try:
            for job, fut in zip(jobs, futures):
                out.append(fut.result())
                if on_done is not None:
                    on_done(job, out[-1])
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
        return out
