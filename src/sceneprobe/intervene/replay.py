"""Replaying the capture's sampling (same sample ids, seed, DDIM steps) with an editor's hooks on the U-Net."""
from __future__ import annotations

import numpy as np
import torch

from .context import Context
from .editor import Editor


class _Stop(Exception):
    """Raised by the step callback to end a replay after its last edited step."""


@torch.no_grad()
def generate_edited(ctx: Context, rows: list[int], editor: Editor | None,
                    stop_after: int | None = None) -> np.ndarray | None:
    """Replay the capture's sampling of store rows ``rows`` (same ids, seed, DDIM steps), with ``editor``'s hooks.

    ``rows`` may repeat a row (several edits of one sample in a batch). With ``stop_after`` the replay ends after
    that step (no decode) and returns None — for edit functions that only record."""
    from ..models.build import sampling_scheduler
    from ..sample import decode, denoise, initial_noise, to_uint8
    m, unet, vae = ctx.manifest, ctx.ldm.unet, ctx.ldm.vae
    ids = [int(m["sample_ids"][r]) for r in rows]
    c, s = unet.config.in_channels, unet.config.sample_size
    dev = next(unet.parameters()).device
    sched = sampling_scheduler(ctx.ldm.scheduler_config, "ddim")
    z = initial_noise(ids, int(m["seed"]), (c, s, s)).to(dev)                     # (B, c, s, s)

    def fn(x, t):
        return unet(x, t).sample

    def stop(step, *_):
        if stop_after is not None and step >= stop_after:
            raise _Stop

    try:
        if editor is None:
            x = denoise(fn, sched, z, ids, int(m["seed"]), ctx.steps, 0.0, callback=stop)
        else:
            with editor:
                x = denoise(fn, sched, z, ids, int(m["seed"]), ctx.steps, 0.0, callback=stop)
    except _Stop:
        return None
    return to_uint8(decode(vae, x))
