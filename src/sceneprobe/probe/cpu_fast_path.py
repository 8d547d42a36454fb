"""The switch of the solvers' CPU fast path: on the CPU two float64 products (XᵀDX and the exact gradient) and the
float32 Hessians YᵀY of the logistic path take numpy's BLAS, several times (the Hessians 1.2–1.8×: numpy runs
a·aᵀ as a symmetric rank-k update) faster there than torch's. Off (``NUMPY_ON_CPU = False``, as a test runs it), the CPU
runs the same torch code a GPU runs."""
from __future__ import annotations

import torch

NUMPY_ON_CPU = True     # the CPU fast path of XᵀDX and the float64 gradient; False: torch's path, as on a GPU


def _numpy_path(t: torch.Tensor) -> bool:
    return NUMPY_ON_CPU and t.device.type == "cpu"
