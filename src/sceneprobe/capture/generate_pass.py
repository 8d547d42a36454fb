"""The ``generate`` protocol's pass: one sampling pass from x_T that records every site at every step (the VAE sites
on each step's update), with the image read-out and an early stop."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ..sample import decode, denoise, to_uint8
from .images import X0Sink
from .input_site import INPUT_SITE, input_rows
from .recorder import Recorder
from .store_fill import Emit
from .vae_decodes import decode_readout, decode_to_mid

@torch.no_grad()  # without it autograd kept every activation of the pass for a backward that never comes (+30 %)
def sample_and_record(unet_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], unet, vae, scheduler,
                      z: torch.Tensor, sample_ids: Sequence[int], seed: int, steps: int, unet_sites: Sequence[str],
                      vae_sites: Sequence[str], kind: str, vae_input: str, emit: Emit,
                      keep_half: str | None = None, x0_rows: Sequence[int] = (),
                      x0_sink: X0Sink | None = None, stop_after: int | None = None,
                      input_window: int = 0) -> np.ndarray | None:
    """One sampling pass from x_T = ``z`` (B, c, h, w) recording every site at every step; returns uint8 images.

    ``unet_fn`` calls ``unet`` exactly once per step (twice the batch with CFG: ``keep_half="cond"``). The VAE sites
    at step i read ``scheduler.step``'s ``prev_sample`` (``vae_input="latent"``) or ``pred_original_sample``
    (``"x0"``). ``x0_sink(step, images)`` (optional) receives the decoded x̂₀ of the batch rows ``x0_rows``.
    ``stop_after``: stop sampling after that step (its sites recorded) and return None — no final images.
    ``input_window`` k > 0 also records :data:`INPUT_SITE`, the U-Net's input with its k×k neighbourhood.
    """
    cur = {"step": 0, "mute": False}
    final: dict[str, torch.Tensor] = {}
    rows = list(x0_rows)
    if input_window:
        inner = unet_fn

        def unet_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            emit(INPUT_SITE, cur["step"], input_rows(x, input_window))
            return inner(x, t)

    def on_out(site: str, y: torch.Tensor) -> None:
        if not cur["mute"]:
            emit(site, cur["step"], y)

    only_mid = all(v.startswith("vae.dec.mid.") for v in vae_sites)

    def callback(i: int, t: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        img = None
        if vae_sites:  # the per-step decode is the dominant extra cost of capture: only when a VAE site is asked for
            src = x if vae_input == "latent" else x0
            # A whole image is needed only as the final image (the last step's latent) or as the read-out rows' x̂₀
            # in the same batch decode (x0 input); otherwise the decoder stops after its mid block (the site).
            whole = (i == steps - 1 and vae_input == "latent") or (vae_input == "x0" and x0_sink is not None
                                                                    and bool(rows)) or not only_mid
            if whole:
                img = decode(vae, src)  # (B, 3, H, W): records the VAE sites at step i
            else:
                decode_to_mid(vae, src)  # records the VAE sites at step i, no image
            if i == steps - 1 and vae_input == "latent":
                final["img"] = img  # the last step's latent is the final latent: reuse its decode
        if x0_sink is not None and rows:
            if img is not None and vae_input == "x0":
                x0_sink(i, img[rows])
            else:
                cur["mute"] = True  # the read-out decode is not a capture of the VAE site
                try:
                    x0_sink(i, decode_readout(vae, x0[rows]))  # (k, 3, H, W)
                finally:
                    cur["mute"] = False
        cur["step"] = i + 1  # the next U-Net call is step i + 1
        if stop_after is not None and i >= stop_after:
            raise _Stop

    try:
        with Recorder({"unet": unet}, unet_sites, kind, on_out, keep_half=keep_half), \
                Recorder({"vae": vae}, vae_sites, kind, on_out):
            x = denoise(unet_fn, scheduler, z, sample_ids, seed, steps, 0.0, callback)
    except _Stop:
        return None
    img = final.get("img")
    if img is None:
        img = decode(vae, x)
    return to_uint8(img)


class _Stop(Exception):
    """Raised by the sampling callback to end a pass early (``stop_after``)."""
