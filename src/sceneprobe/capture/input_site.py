"""The input control's site: the U-Net's input x_t at each step, each position with its k×k neighbourhood as
channels."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# The input control: the U-Net's input x_t at each step, every position with its k×k neighbourhood as channels
# (channel c·k² + dy·k + dx, zero-padded at the border), so a linear probe on it sees what a small local filter of the
# input could read. Stored for the trained model only (the controls' inputs add nothing to compare against).
INPUT_SITE = "input.xt"


@torch.no_grad()
def input_rows(x: torch.Tensor, window: int) -> torch.Tensor:
    """The input control's rows: x (b, c, h, w) → (b, c·k², h, w), each position with its k×k neighbourhood."""
    b, c, h, w = x.shape
    return F.unfold(x.float(), window, padding=window // 2).reshape(b, c * window * window, h, w)
