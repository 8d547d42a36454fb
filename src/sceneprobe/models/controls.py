"""Control models for probing: the same architecture without the learned structure.

* ``permuted_copy`` — the paper's control: every module's ``.weight`` tensor is permuted element-wise (a random
  permutation of all its entries, seeded), so each layer keeps its weight *distribution* but loses its structure.
  Biases are untouched (as in the paper's script, which permutes ``weight`` only).
* ``fresh_copy`` — a freshly initialised model of the same config (diffusers' default init), seeded.

Both return a new model in eval mode on the original's device and dtype; the original is never modified.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


@torch.no_grad()
def permuted_copy(model: nn.Module, seed: int) -> nn.Module:
    """Deep copy of ``model`` with every ``.weight`` tensor's entries shuffled by a permutation drawn from ``seed``."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(int(seed))
    seen: set[int] = set()
    for _, module in out.named_modules():
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor) or id(w) in seen or w.numel() < 2:
            continue
        seen.add(id(w))  # a shared (tied) weight is permuted once
        perm = torch.randperm(w.numel(), generator=g).to(w.device)
        w.copy_(w.reshape(-1)[perm].reshape(w.shape))
    return out.eval()


def fresh_copy(model: nn.Module, seed: int) -> nn.Module:
    """A new model from ``model.config`` (a diffusers model), initialised under ``torch.manual_seed(seed)``.

    The global RNG is forked, so the caller's random state is unchanged.
    """
    param = next(model.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        out = type(model).from_config(model.config)
    if next(out.parameters()).dtype != param.dtype:  # diffusers warns on any .to(dtype), so only when needed
        out = out.to(dtype=param.dtype)
    return out.to(param.device).eval()
