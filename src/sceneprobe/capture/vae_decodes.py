"""The capture's VAE decodes that make no final image: the site's decode stopped after the decoder's mid block
(:func:`decode_to_mid`) and the image read-out's decode of x̂₀ rows (:func:`decode_readout`)."""
from __future__ import annotations

from typing import Callable

import torch

from ..sample import decode

class _MidDone(Exception):
    """Raised by :func:`decode_to_mid`'s hook once the decoder's mid block has run."""


def decode_to_mid(vae, latents: torch.Tensor, decode_fn: Callable | None = None) -> None:
    """Run ``decode_fn(vae, latents)`` (B, c, h, w) (default :func:`sceneprobe.sample.decode`) only as far as the
    decoder's mid block; no image is made.

    The mid block's self-attention (``vae.dec.mid.attn*``) sees exactly what it sees in a full decode — the same
    operations on the same batch, so its hooks record the same bytes — and the up blocks, which hold most of the
    decoder's FLOPs (they run at up to the image's resolution), are skipped: the cost of the VAE site falls from one
    decode per step to post_quant_conv + conv_in + mid block at the latent's grid.
    """
    def stop(module, args, output):
        raise _MidDone
    handle = vae.decoder.mid_block.register_forward_hook(stop)  # after the sites' hooks, which fire inside it
    try:
        (decode_fn or decode)(vae, latents)
    except _MidDone:
        return
    finally:
        handle.remove()
    raise RuntimeError("the VAE decoder never ran its mid block")


def decode_readout(vae, latents: torch.Tensor) -> torch.Tensor:
    """The image read-out's decode of x̂₀ rows (k, c, h, w) → (k, 3, H, W): :func:`sceneprobe.sample.decode`, under
    its own name so that a profile (benchmarks/bench_capture.py) can tell it from the sites' and the final decodes."""
    return decode(vae, latents)
