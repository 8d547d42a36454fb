"""The processes of ``accelerate launch`` (one when not launched): rank, count, device, barriers.

accelerate decides whether the processes it finds form a group from where they run: on a machine without a GPU it
only forms one (``MULTI_CPU``, gloo) when told ``cpu=True``; otherwise each process of ``accelerate launch
--multi_gpu --num_processes K`` (or ``torchrun``) believes it is alone and does all the work. (``accelerate launch
--cpu`` starts a single process.) Every place that asks "which process am I" goes through here.
"""
from __future__ import annotations


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
