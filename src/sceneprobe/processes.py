"""The processes of ``accelerate launch`` (one when not launched): rank, count, device, barriers.

accelerate decides whether the processes it finds form a group from where they run: on a machine without a GPU it
only forms one (``MULTI_CPU``, gloo) when told ``cpu=True``; otherwise each process of ``accelerate launch
--multi_gpu --num_processes K`` (or ``torchrun``) believes it is alone and does all the work. (``accelerate launch
--cpu`` starts a single process.) Every place that asks "which process am I" goes through here.
"""
from __future__ import annotations

import os


def use_cpu() -> bool:
    """Run on the CPU: ``accelerate launch --cpu`` (ACCELERATE_USE_CPU), or no GPU (CUDA or Apple's MPS)."""
    import torch
    from accelerate.utils import parse_flag_from_env
    gpu = torch.cuda.is_available() or torch.backends.mps.is_available()
    return parse_flag_from_env("ACCELERATE_USE_CPU") or not gpu


def process_state():
    """accelerate's ``PartialState`` of this process (shared: the first call sets it up)."""
    from accelerate import PartialState
    return PartialState(cpu=use_cpu())


def usable_cores() -> int:
    """The cores this process may use (its CPU affinity, which a container or ``taskset`` narrows)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:                                                     # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_workers(workers: int) -> int:
    """``0`` → every core this process may use (:func:`usable_cores`); any other count as it is."""
    return usable_cores() if workers <= 0 else workers
