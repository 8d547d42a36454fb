"""The capture's options checked in one line each, and the U-Net a store is made with (the model or a control)."""
from __future__ import annotations

from ..errors import fail
from .recorder import KINDS

CONTROLS = ("permuted", "fresh")
DTYPES = ("float16", "float32")
VAE_INPUTS = ("latent", "x0")


def check_capture_options(site_kind: str, vae_input: str, dtype: str, pool: int, batch_size: int, steps: int) -> None:
    if site_kind not in KINDS:
        raise fail(f"capture.site_kind {site_kind!r} is unknown; choose attn or block")
    if vae_input not in VAE_INPUTS:
        raise fail(f"capture.vae_input {vae_input!r} is unknown; choose latent or x0")
    if dtype not in DTYPES:
        raise fail(f"capture.dtype {dtype!r} is not supported; choose float16 or float32")
    if pool < 1 or batch_size < 1 or steps < 1:
        raise fail(f"capture.pool, capture.batch_size and capture.steps must be at least 1 "
                   f"(got {pool}, {batch_size}, {steps})")


def control_unet(unet, control: str | None, seed: int):
    """The U-Net a store is made with: the model itself, or a permuted / fresh control (models/controls.py)."""
    from ..models.controls import fresh_copy, permuted_copy
    if control is None:
        return unet
    if control not in CONTROLS:
        raise fail(f"unknown control {control!r}; choose permuted or fresh")
    return permuted_copy(unet, seed) if control == "permuted" else fresh_copy(unet, seed)
