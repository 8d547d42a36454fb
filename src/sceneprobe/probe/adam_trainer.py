"""The paper's probe trainer, for parity: ``nn.Linear(C, k)`` per position, Adam, Huber (δ = 1) or 2-class CE at label
resolution, the checkpoint of the lowest validation loss."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .resolution_maps import area_downsample, upsample_nearest


@dataclass
class AdamResult:
    weight: torch.Tensor       # (C, k) float64: k = 1 (depth) or 2 (saliency, paper format)
    bias: torch.Tensor         # (k,) float64 (zeros without bias)
    best_epoch: int            # 1-based epoch with the lowest validation loss
    val_losses: list[float]


def _adam_loss(pred: torch.Tensor, y: torch.Tensor, task: str, upsample: str) -> torch.Tensor:
    """pred (b, k, h, w) at native resolution; y (b, H, W) labels ("nearest") or (b, h, w) area means ("area")."""
    if upsample == "nearest":
        pred = upsample_nearest(pred, y.shape[-2], y.shape[-1])               # (b, k, H, W): loss at label resolution
    if task == "depth":
        return F.huber_loss(pred[:, 0], y, delta=1.0)
    if upsample == "nearest":
        return F.cross_entropy(pred, y.long())
    return F.cross_entropy(pred, torch.stack([1 - y, y], 1))                  # soft (area) labels: probability targets


def fit_adam(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, task: str, *,
             upsample: str = "nearest", bias: bool = False, epochs: int = 30, lr: float = 1e-3, batch_size: int = 4,
             seed: int = 0) -> AdamResult:
    """The paper's probe trainer: ``nn.Linear(C, k)`` per position, Adam, shuffled batches of images, Huber (δ=1) on
    standardised depth or 2-class CE, loss at label resolution after nearest upsampling of the predictions.

    Differences from the paper: the kept checkpoint is the epoch with the lowest *validation* loss (the paper used
    the test split). ``x_*`` (n, C, h, w) float32; ``y_*`` (n, H, W) standardised depth or {0, 1} masks.
    """
    C, (h, w) = x_train.shape[1], x_train.shape[-2:]
    if upsample == "area":
        y_train, y_val = area_downsample(y_train, h, w).float(), area_downsample(y_val, h, w).float()
    else:
        y_train, y_val = y_train.float(), y_val.float()
    k = 1 if task == "depth" else 2
    torch.manual_seed(seed)
    lin = torch.nn.Linear(C, k, bias=bias)
    opt = torch.optim.Adam(lin.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)

    def predict(x):
        return torch.einsum("nchw,kc->nkhw", x, lin.weight) + (lin.bias[None, :, None, None] if bias else 0)

    best, best_state, losses = math.inf, None, []
    for epoch in range(1, epochs + 1):
        for idx in torch.randperm(len(x_train), generator=gen).split(batch_size):
            opt.zero_grad(set_to_none=True)
            _adam_loss(predict(x_train[idx]), y_train[idx], task, upsample).backward()
            opt.step()
        with torch.no_grad():
            tot = sum(float(_adam_loss(predict(x_val[i:i + 32]), y_val[i:i + 32], task, upsample))
                      * len(x_val[i:i + 32]) for i in range(0, len(x_val), 32))
        losses.append(tot / max(len(x_val), 1))
        if losses[-1] < best:
            best = losses[-1]
            best_state = (epoch, lin.weight.detach().clone(), lin.bias.detach().clone() if bias else None)
    epoch, W, b = best_state
    return AdamResult(W.T.double(), b.double() if b is not None else torch.zeros(k, dtype=torch.float64), epoch, losses)
