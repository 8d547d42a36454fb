"""The labeller network: a small encoder-decoder CNN with a depth head and a saliency head.

Architecture (config is the constructor; a saved folder rebuilds it)::

    x (B, 3, H, W) in [−1, 1] ── conv_in ──► level 0 (c₀, H) ──down──► level 1 (c₁, H/2) ─ … ─► level L (c_L, H/2^L)
                                             │ skip                     │ skip                      │ + mid ResBlock
    out (B, 2, H, W) ◄── GN·SiLU·conv ◄── ResBlock([up, skip₀]) ◄── … ◄── ResBlock([up(h), skip_{L−1}]) ◄┘

ResBlock = GroupNorm → SiLU → conv3×3 → GroupNorm → SiLU → conv3×3, plus the input (1×1 conv where channels change).
Channel 0 of the output is standardised log-depth z, channel 1 the saliency logit. Depth in the dataset's units
(camera-space z) is ``exp(log_depth_mean + log_depth_std · z)`` clipped to [0, far_depth]; the two statistics are
those of the training depth, stored in the config. Images whose sides are not multiples of 2^L are padded
(replicate) and the outputs cropped back, so any size can be labelled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..errors import fail
from ..world.render import FAR_DEPTH


def _norm(ch: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, ch), ch)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


@dataclass
class LabellerOutput:
    depth: torch.Tensor            # (B, H, W) camera-space z, clipped to [0, far_depth]
    saliency_logits: torch.Tensor  # (B, H, W) logit of "pixel belongs to an object"
    log_depth_z: torch.Tensor      # (B, H, W) standardised log-depth (what the depth loss sees)


class Labeller(ModelMixin, ConfigMixin):
    """Dense depth + saliency network for images (B, 3, H, W) in [−1, 1].

    Parameters:
        channels: channels per resolution level (each level after the first halves H and W).
        layers_per_block: ResBlocks per level in the encoder and the decoder.
        norm_num_groups: GroupNorm groups (reduced to gcd(groups, channels) where they do not divide).
        far_depth: depth of the sky; predictions are clipped to [0, far_depth].
        log_depth_mean, log_depth_std: statistics of log(depth) on the training set (set by training).
    """

    depth_kind = "depth"   # what label_images' depth is: camera-space z in the dataset's units

    @register_to_config
    def __init__(self, channels: tuple[int, ...] = (32, 64, 128), layers_per_block: int = 1, norm_num_groups: int = 8,
                 far_depth: float = FAR_DEPTH, log_depth_mean: float = 2.0, log_depth_std: float = 0.7):
        super().__init__()
        ch = list(channels)
        self.conv_in = nn.Conv2d(3, ch[0], 3, padding=1)
        self.down_blocks, self.downsamplers = nn.ModuleList(), nn.ModuleList()
        prev = ch[0]
        for i, c in enumerate(ch):
            self.down_blocks.append(nn.Sequential(*[ResBlock(prev if k == 0 else c, c, norm_num_groups)
                                                    for k in range(layers_per_block)]))
            prev = c
            if i < len(ch) - 1:
                self.downsamplers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid = ResBlock(ch[-1], ch[-1], norm_num_groups)
        self.up_blocks = nn.ModuleList()
        for i in reversed(range(len(ch) - 1)):   # decoder levels L−1 … 0
            self.up_blocks.append(nn.Sequential(*[ResBlock(prev + ch[i] if k == 0 else ch[i], ch[i], norm_num_groups)
                                                  for k in range(layers_per_block)]))
            prev = ch[i]
        self.norm_out = _norm(ch[0], norm_num_groups)
        self.conv_out = nn.Conv2d(ch[0], 2, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)     # start at the mean log-depth and p(salient) = 0.5
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor) -> LabellerOutput:
        H, W = x.shape[-2:]
        m = 2 ** (len(self.config.channels) - 1)
        ph, pw = (-H) % m, (-W) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        h = self.conv_in(x)                                              # (B, c0, H, W)
        skips = []
        for i, block in enumerate(self.down_blocks):
            h = block(h)
            if i < len(self.downsamplers):
                skips.append(h)
                h = self.downsamplers[i](h)                              # (B, c_i, H/2^(i+1), ...)
        h = self.mid(h)
        for block in self.up_blocks:
            h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = block(torch.cat([h, skips.pop()], dim=1))               # (B, c_i, H/2^i, W/2^i)
        out = self.conv_out(F.silu(self.norm_out(h)))[..., :H, :W]       # (B, 2, H, W)
        z = out[:, 0]
        c = self.config
        log_d = (c.log_depth_mean + c.log_depth_std * z).clamp(max=math.log(c.far_depth) + 1.0)
        return LabellerOutput(depth=log_d.exp().clamp(0.0, c.far_depth), saliency_logits=out[:, 1], log_depth_z=z)


# ----------------------------------------------------------------------------------------------- loading, labelling
def load_labeller(folder: Path) -> Labeller:
    """A labeller folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) as float32, in eval mode."""
    from ..models.io import _load
    model = _load(Labeller, Path(folder), "labeller")
    model.path = Path(folder)        # where it came from (recorded beside labels it makes)
    return model


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 → (N, 3, H, W) float32 in [−1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def check_images(images) -> np.ndarray:
    """Refuse anything but an (N, H, W, 3) uint8 array with N ≥ 1."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 \
            or len(images) == 0:
        desc = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise fail(f"images to label must be a non-empty (N, H, W, 3) uint8 array, got {desc}")
    return images


@torch.no_grad()
def label_images(labeller, images: np.ndarray, batch: int = 64) -> dict:
    """Label uint8 images (N, H, W, 3): ``depth`` (N, H, W) float32 and ``saliency`` (N, H, W) uint8 in {0, 1}.

    ``labeller`` is a :class:`Labeller` (depth = camera-space z) or a
    :class:`~sceneprobe.labeller.dpt.DepthModelLabeller` (depth = relative inverse depth; saliency None when it has
    no saliency labeller). ``labeller.depth_kind`` says which.
    """
    if not isinstance(labeller, Labeller):
        return labeller.label(images, batch=batch)
    check_images(images)
    labeller.eval()
    depth, sal = [], []
    for i in range(0, len(images), batch):
        out = labeller(images_to_tensor(images[i:i + batch]))
        depth.append(out.depth.float().numpy())
        sal.append((out.saliency_logits > 0).to(torch.uint8).numpy())
    return {"depth": np.concatenate(depth).astype(np.float32), "saliency": np.concatenate(sal)}
