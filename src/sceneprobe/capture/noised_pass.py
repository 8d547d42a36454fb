"""The ``noised`` protocol's pass: the test scenes it captures, encoded, forward-diffused with one fixed ε per sample
to every sampler timestep, the U-Net run once per timestep and every site recorded."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import fail
from ..sample import decode, generators, to_latent
from .images import X0Sink
from .input_site import INPUT_SITE, input_rows
from .recorder import Recorder
from .store_fill import Emit
from .vae_decodes import decode_readout, decode_to_mid

NOISE_STREAM = 2  # sample.generators stream of the noised protocol's fixed ε (0: x_T, 1: DDPM/η steps)


def _test_scenes(data, n_noised: int, image_size: int):
    """The first ``n_noised`` scenes of the dataset's test split, checked for labels and size."""
    if data is None:
        raise fail("protocol noised needs a dataset with depth and saliency: pass --data (from `sceneprobe scenes`)")
    test = data.subset("test")
    if test.rgb.shape[0] == 0:
        raise fail(f"dataset {getattr(data, 'root', '')} has no test split; the noised protocol captures test scenes")
    if test.depth is None or test.saliency is None:
        raise fail(f"dataset {getattr(data, 'root', '')} has no depth or saliency labels; "
                   f"the noised protocol needs both")
    if test.rgb.shape[1] != image_size or test.rgb.shape[2] != image_size:
        raise fail(f"dataset {getattr(data, 'root', '')} has {test.rgb.shape[1]}x{test.rgb.shape[2]} images but "
                   f"the VAE expects {image_size}x{image_size}; render scenes at that size")
    n = min(n_noised, test.rgb.shape[0])
    return _Rows(test.names[:n], test.rgb[:n], test.depth[:n], test.saliency[:n])


@dataclass
class _Rows:
    names: Sequence[str]
    rgb: np.ndarray        # (N, H, W, 3) uint8
    depth: np.ndarray      # (N, H, W) float32
    saliency: np.ndarray   # (N, H, W) bool


@torch.no_grad()
def _noised_batch(unet, vae, sched, rgb: np.ndarray, ids: Sequence[int], seed: int, unet_sites, vae_sites,
                  kind: str, vae_input: str, emit: Emit, device, x0_rows: Sequence[int] = (),
                  x0_sink: X0Sink | None = None, input_window: int = 0) -> None:
    """Encode, then x_t = add_noise(z0, ε, t) at every timestep with one fixed ε per sample; record every site.

    The decoder reads ``scheduler.step(unet(x_t), t, x_t)``'s ``prev_sample`` (``vae_input="latent"``) or
    ``pred_original_sample`` (``"x0"``): the update computed with *this* U-Net's prediction. The encoder site is
    emitted once, as step 0.
    """
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(device)
    enc = [v for v in vae_sites if v.startswith("vae.enc")]
    dec = [v for v in vae_sites if not v.startswith("vae.enc")]
    with Recorder({"vae": vae}, enc, kind, on_output=lambda site, y: emit(site, 0, y)):
        z0 = to_latent(vae, vae.encode(x).latent_dist.mode())  # (b, c, h, w) in the diffusion space
    eps = torch.stack([torch.randn(z0.shape[1:], generator=g) for g in generators(ids, seed, NOISE_STREAM)]).to(device)
    cur = {"step": 0, "mute": False}
    rows = list(x0_rows)

    def on_dec(site: str, y: torch.Tensor) -> None:
        if not cur["mute"]:
            emit(site, cur["step"], y)

    with Recorder({"unet": unet}, unet_sites, kind, lambda s, y: emit(s, cur["step"], y)), \
            Recorder({"vae": vae}, dec, kind, on_dec):
        for i, t in enumerate(sched.timesteps):
            cur["step"] = i
            xt = sched.add_noise(z0, eps, t.reshape(1).expand(len(ids)).to(device))  # (b, c, h, w)
            x_in = sched.scale_model_input(xt, t)
            if input_window:
                emit(INPUT_SITE, i, input_rows(x_in, input_window))
            pred = unet(x_in, t).sample                                            # ε̂ or v̂: the scheduler knows
            if not dec and not (x0_sink is not None and rows):
                continue
            out = sched.step(pred, t, xt)                                           # stateless for DDIM (η = 0)
            src = out.prev_sample if vae_input == "latent" else out.pred_original_sample
            img = None
            if dec and vae_input == "x0" and x0_sink is not None and rows:          # the read-out reuses this decode
                img = decode(vae, src)
            elif dec:
                decode_to_mid(vae, src)                                             # the site only: no image needed
            if x0_sink is not None and rows:
                if img is not None:
                    x0_sink(i, img[rows])
                else:
                    cur["mute"] = True
                    try:
                        x0_sink(i, decode_readout(vae, out.pred_original_sample[rows]))
                    finally:
                        cur["mute"] = False
