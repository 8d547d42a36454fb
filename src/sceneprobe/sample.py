"""Sampling: an explicit denoising loop with a per-step callback (where capture and interventions plug in).

Determinism: sample ``i`` draws its initial noise (and any per-step noise, for DDPM or η > 0) from its own CPU
``torch.Generator`` seeded from ``(seed, i)``, so a sample never depends on its batch or on the other samples.
Steps are indexed in sampling order: step 0 is the noisiest.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .models.build import sampling_scheduler

Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def sample_seed(seed: int, sample_id: int, stream: int = 0) -> int:
    """The seed of sample ``sample_id``'s generator; ``stream`` separates independent uses (noise, DDPM steps)."""
    return (int(seed) * 1_000_003 + int(sample_id) * 7_919 + stream * 104_729) % (2**63 - 1)


def generators(sample_ids: Sequence[int], seed: int, stream: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(sample_seed(seed, i, stream)) for i in sample_ids]


def initial_noise(sample_ids: Sequence[int], seed: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """x_T ~ N(0, I) per sample, shape (B, C, h, w), independent of batching."""
    gens = generators(sample_ids, seed, stream=0)
    return torch.stack([torch.randn(shape, generator=g) for g in gens])  # (B, C, h, w)


def denoise(
    unet_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler,
    latents: torch.Tensor,
    sample_ids: Sequence[int],
    seed: int,
    steps: int = 15,
    eta: float = 0.0,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Run the reverse process from x_T = ``latents`` (B, C, h, w) and return x_0.

    ``unet_fn(x_t, t)`` (B, C, h, w) is the model output in the scheduler's ``prediction_type`` (ε or v; the U-Net,
    or a classifier-free-guidance wrapper): the update and x̂₀ come from ``scheduler.step``, never from hand-written
    ε formulas. After each step ``callback(step, timestep, latents_after_update, predicted_x0)`` is called.
    """
    scheduler.set_timesteps(steps)
    gens = generators(sample_ids, seed, stream=1)
    x = latents * scheduler.init_noise_sigma
    kwargs = {"eta": eta} if "eta" in scheduler.step.__code__.co_varnames else {}
    for i, t in enumerate(scheduler.timesteps):
        pred = unet_fn(scheduler.scale_model_input(x, t), t)  # (B, C, h, w): ε̂ or v̂
        out = scheduler.step(pred, t, x, generator=gens, **kwargs)
        x = out.prev_sample
        if callback is not None:
            callback(i, int(t), x, out.pred_original_sample)
    return x


def latent_stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std), each (1, c, 1, 1), that map VAE latents to the diffusion space.

    Folders with diffusers' per-channel keys ``latents_mean``/``latents_std`` (set by ``train-vae`` or
    :func:`~sceneprobe.models.io.set_latent_stats`) use them, with ``scaling_factor`` as an extra common gain (the
    SDXL/Playground convention: z' = (z − mean)·scaling_factor/std). Folders with only the scalar keys (Stable
    Diffusion) use mean = ``shift_factor`` (absent = 0) and std = 1: z' = (z − shift_factor)·scaling_factor.
    """
    cfg = vae.config
    c = cfg.latent_channels
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        m = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)
        return m, s
    shift = float(getattr(cfg, "shift_factor", None) or 0.0)
    return torch.full((1, c, 1, 1), shift), torch.ones(1, c, 1, 1)


def to_latent(vae, z: torch.Tensor) -> torch.Tensor:
    """VAE latents (B, c, h, w) → diffusion space: (z − mean_c)·scaling_factor/std_c (see :func:`latent_stats`)."""
    m, s = latent_stats(vae)
    return (z - m.to(z)) * vae.config.scaling_factor / s.to(z)


def from_latent(vae, x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_latent`: diffusion-space latents → what the VAE decoder reads, x·std_c/scaling_factor + mean_c."""
    m, s = latent_stats(vae)
    return x * s.to(x) / vae.config.scaling_factor + m.to(x)


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents (B, c, h, w) in the diffusion space → images (B, 3, H, W) in [−1, 1]."""
    return vae.decode(from_latent(vae, latents)).sample.clamp(-1, 1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [−1, 1] → (B, H, W, 3) uint8."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def generate(ldm, sample_ids: Sequence[int], seed: int = 0, steps: int = 15, sampler: str = "ddim", eta: float = 0.0,
             callback: Callback | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """Sample images for ``sample_ids``: returns (uint8 images (B, H, W, 3), final latents (B, c, h, w))."""
    c = ldm.unet.config.in_channels
    s = ldm.unet.config.sample_size
    sched = sampling_scheduler(ldm.scheduler_config, sampler)
    z = initial_noise(sample_ids, seed, (c, s, s))
    z = denoise(lambda x, t: ldm.unet(x, t).sample, sched, z, sample_ids, seed, steps, eta, callback)
    return to_uint8(decode(ldm.vae, z)), z


def image_grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, H, W, 3) uint8 → one grid image with ``pad`` white pixels between cells."""
    n, h, w, _ = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = images[k]
    return grid


def sample_to_folder(ldm, out: Path, n: int, seed: int = 0, steps: int = 15, sampler: str = "ddim", eta: float = 0.0,
                     batch_size: int = 32, force: bool = False, progress: bool = True) -> Path:
    """Write ``out/000000.png`` … and ``out/grid.png`` (built in a temporary folder, renamed at the end)."""
    from .owned import atomic_folder
    with atomic_folder(Path(out), force) as tmp:
        all_imgs = []
        for start in tqdm(range(0, n, batch_size), desc="sample", unit="batch", disable=not progress):
            ids = list(range(start, min(n, start + batch_size)))
            imgs, _ = generate(ldm, ids, seed, steps, sampler, eta)
            for i, im in zip(ids, imgs):
                Image.fromarray(im).save(tmp / f"{i:06d}.png")
            all_imgs.append(imgs)
        Image.fromarray(image_grid(np.concatenate(all_imgs))).save(tmp / "grid.png")
    return Path(out)
