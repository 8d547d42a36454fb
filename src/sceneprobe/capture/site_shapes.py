"""The stored (C, h, w) of every site: derived from the modules' structure where that is sure, else traced by one tiny
forward pass; pooled by ``capture.pool``."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..errors import fail
from .recorder import Recorder

_DERIVABLE = {"unet": ("UNet2DModel", "UNet2DConditionModel"), "vae": ("AutoencoderKL",)}


def derived_shapes(models: dict, sites: Sequence[str], latent_hw: tuple[int, int],
                   image_hw: tuple[int, int] | None = None) -> dict[str, tuple[int, int, int]] | None:
    """Native (C, H, W) per site from the modules' structure, without running them; None where it cannot be sure.

    C is the width of the site's output projection (``to_out[0].out_features``: the reading of both kinds, since the
    residual add needs the same width). H×W is the latent's ``latent_hw`` halved once per resampler on the way:
    U-Net ``down{b}``: after the downsamplers of down blocks 0…b−1; ``mid``: after all of them; ``up{b}``: the mid
    grid doubled once per upsampler of up blocks 0…b−1. VAE decoder mid: the latent grid; encoder mid:
    ``image_hw`` halved once per encoder downsampler. Every convolution in between keeps the grid (3×3, padding 1).
    Only canonical sites of ``UNet2DModel`` / ``UNet2DConditionModel`` / ``AutoencoderKL`` with every halving exact
    are derived; anything else (raw paths, other classes, odd grids) returns None and the caller traces the shapes.
    """
    from ..models.sites import _UNET, _VAE, resolve, site_channels, site_path

    def n_res(blocks, attr: str, upto: int) -> int:
        return sum(1 for blk in list(blocks)[:upto] if getattr(blk, attr, None))

    def halve(hw: tuple[int, int], k: int) -> tuple[int, int] | None:
        if hw[0] % 2 ** k or hw[1] % 2 ** k:
            return None                         # Downsample2D rounds odd grids up, the up path then pads: trace it
        return hw[0] // 2 ** k, hw[1] // 2 ** k

    out: dict[str, tuple[int, int, int]] = {}
    for site in sites:
        key = site_path(site)[0]
        model = models.get(key)
        if model is None or type(model).__name__ not in _DERIVABLE.get(key, ()):
            return None
        mu, mv = _UNET.match(site), _VAE.match(site)
        if mu:
            downs = n_res(model.down_blocks, "downsamplers", len(model.down_blocks))
            if mu.group(1) == "down":
                hw = halve(latent_hw, n_res(model.down_blocks, "downsamplers", int(mu.group(2))))
            elif mu.group(1) == "up":
                ups = n_res(model.up_blocks, "upsamplers", int(mu.group(2)))
                hw = halve(latent_hw, downs)
                hw = hw and (hw[0] * 2 ** ups, hw[1] * 2 ** ups)
            else:
                hw = halve(latent_hw, downs)
        elif mv and mv.group(1) == "dec":
            hw = tuple(latent_hw)
        elif mv and image_hw is not None:
            hw = halve(image_hw, n_res(model.encoder.down_blocks, "downsamplers", len(model.encoder.down_blocks)))
        else:
            return None
        if hw is None:
            return None
        out[site] = (site_channels(resolve(model, key, site)), int(hw[0]), int(hw[1]))
    return out


def traced_shapes(models: dict, sites: Sequence[str], kind: str, run_once: Callable[[], None]) -> dict:
    """Native (C, H, W) per site from one tiny forward pass (``run_once``) with shape-only hooks."""
    native: dict[str, tuple[int, ...]] = {}

    def note(site: str, y: torch.Tensor) -> None:
        native.setdefault(site, tuple(y.shape[1:]))  # (C, H, W)

    with torch.no_grad(), Recorder(models, sites, kind, on_output=note):
        run_once()
    lost = [s for s in sites if s not in native]
    if lost:
        raise RuntimeError(f"sites {lost} were not called by the shape pass")
    return native


def site_shapes(models: dict, sites: Sequence[str], kind: str, run_once: Callable[[], None], pool: int,
                latent_hw: tuple[int, int] | None = None, image_hw: tuple[int, int] | None = None) -> dict:
    """Stored (C, h, w) per site (native grid // ``pool``): derived from the modules when ``latent_hw`` is given and
    :func:`derived_shapes` is sure (no forward pass), else traced by one tiny forward pass (``run_once``)."""
    native = derived_shapes(models, sites, latent_hw, image_hw) if latent_hw is not None else None
    if native is None:
        native = traced_shapes(models, sites, kind, run_once)
    out = {}
    for s in sites:
        c, h, w = native[s]
        if h // pool < 1 or w // pool < 1:
            raise fail(f"capture.pool {pool} is larger than site {s}'s {h}x{w} grid; lower capture.pool")
        out[s] = (c, h // pool, w // pool)
    return out
