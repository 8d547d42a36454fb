"""The native grid h×w and the label grid H×W: which native position each label pixel reads under nearest upsampling,
label sums and pixel counts per position (the exact fits' weights), nearest upsampling and area means, design rows."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def nearest_index(out_size: int, in_size: int) -> np.ndarray:
    """Source index of each output index under nearest upsampling (PyTorch's ``mode="nearest"``: floor(i·in/out))."""
    return np.minimum((np.arange(out_size) * in_size) // out_size, in_size - 1)


def _onehot(out_size: int, in_size: int) -> torch.Tensor:
    """(in, out) float64 one-hot matrix A with A[s(i), i] = 1, so block sums are ``A_r Y A_cᵀ``."""
    a = torch.zeros(in_size, out_size, dtype=torch.float64)
    a[torch.from_numpy(nearest_index(out_size, in_size)), torch.arange(out_size)] = 1.0
    return a


def block_sum(labels: torch.Tensor | np.ndarray, h: int, w: int) -> torch.Tensor:
    """Sum of the label pixels that read each native position under nearest upsampling: (n, H, W) → (n, h, w) f64."""
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).double()
    ar, ac = _onehot(y.shape[-2], h), _onehot(y.shape[-1], w)
    return torch.einsum("iH,nHW,jW->nij", ar, y, ac)                            # (n, h, w)


def block_count(H: int, W: int, h: int, w: int) -> torch.Tensor:
    """Number of label pixels per native position, (h, w) float64 (all (H/h)² for an integer factor)."""
    return block_sum(torch.ones(1, H, W, dtype=torch.float64), h, w)[0]


def upsample_nearest(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(..., h, w) → (..., H, W) by nearest neighbour; identical to ``F.interpolate(mode="nearest")``."""
    r = torch.from_numpy(nearest_index(H, x.shape[-2]))
    c = torch.from_numpy(nearest_index(W, x.shape[-1]))
    return x[..., r, :][..., c]


def area_downsample(labels: torch.Tensor | np.ndarray, h: int, w: int) -> torch.Tensor:
    """Label means over adaptive-average-pooling cells: (n, H, W) → (n, h, w) float64."""
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).double()
    return F.adaptive_avg_pool2d(y[:, None], (h, w))[:, 0]


def to_rows(x: torch.Tensor, bias: bool) -> torch.Tensor:
    """Activations (n, C, h, w) → design rows (n·h·w, C [+1]) float64, row order (image, y, x)."""
    rows = x.double().permute(0, 2, 3, 1).reshape(-1, x.shape[1])              # (n·h·w, C)
    if bias:
        rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=torch.float64)], 1)
    return rows
