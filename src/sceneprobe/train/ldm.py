"""Train the latent U-Net on normalised latents: x_t = √ᾱ_t z + √(1−ᾱ_t) ε, target v (default) or ε, min-SNR-γ weights.

The training latents z = (mode(q(z|x)) − mean_c)·scaling_factor/std_c (per-channel statistics of the VAE folder,
see :func:`sceneprobe.sample.to_latent`) are encoded once and cached (``train_ldm/latents.safetensors``,
keyed by the VAE's weights hash), with the latents of the mirrored scenes for flip augmentation: the VAE is not
flip-equivariant (its stride-2 convolutions pad one side only), so a mirrored latent is not the latent of the mirrored
scene — it decodes with ±8 grey levels of error in the border columns, and a U-Net trained on mirrored latents drew
a left-dark/right-bright border gradient of ±4. Sampling uses EMA weights: ``run/unet`` holds the EMA copy.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ..atomic import atomic_write_json, atomic_write_text
from ..config import Config, dump_yaml
from ..errors import fail
from ..models.build import build_train_scheduler, build_unet, latent_size
from ..models.io import LDM, load_vae, model_hash, save_model
from .loop import LoopSpec, on_model_device, preflight, train_loop
from ..sample import to_latent
from ..models.latents import encode_mode


def cached_latents(vae, data, folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled training latents of the scenes and of the mirrored scenes, each (N, c, h, w), encoded once per
    (VAE weights, dataset)."""
    key = {"version": 2, "vae": model_hash(vae), "n": len(data), "names": data.names[:3] + data.names[-3:],
           "scaling_factor": vae.config.scaling_factor, "shift_factor": getattr(vae.config, "shift_factor", None),
           "latents_mean": getattr(vae.config, "latents_mean", None), "latents_std": getattr(vae.config, "latents_std", None)}
    key = json.loads(json.dumps(key))  # tuples → lists, as the saved copy reads back
    path, meta = folder / "latents.safetensors", folder / "latents.json"
    if path.exists() and meta.exists() and json.loads(meta.read_text()) == key:
        t = load_file(path)
        return t["latents"], t["latents_mirrored"]
    # contiguous: a strided (channels-last) z would pick other conv kernels than the cached copy and break bitwise resume
    z = to_latent(vae, encode_mode(vae, data.rgb)).contiguous()
    zm = to_latent(vae, encode_mode(vae, np.ascontiguousarray(data.rgb[:, :, ::-1]))).contiguous()  # (N, H, W, 3): W mirrored
    tmp = path.with_name(f".latents.tmp-{os.getpid()}.safetensors")  # several processes may race here
    save_file({"latents": z, "latents_mirrored": zm}, tmp)
    tmp.replace(path)
    atomic_write_json(meta, key)
    return z, zm


def diffusion_loss(sched, pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   snr_gamma: float) -> torch.Tensor:
    """MSE to the scheduler's target (ε, or v = √ᾱ ε − √(1−ᾱ) x₀), per sample weighted by min-SNR-γ.

    With SNR = ᾱ/(1−ᾱ), the min-SNR-γ weight (Hang et al. 2023) is min(SNR, γ)/SNR for ε. For v it is
    min(SNR + 1, γ)/(SNR + 1), as in diffusers' training examples ("the velocity objective requires that we add one
    to SNR"): the v error is √(SNR + 1) times the x₀ error, so this caps the x₀ weight at γ and gives the plain v loss
    at high noise. The literal min(SNR, γ)/(SNR + 1) would weigh the zero-SNR step t = 999 by 0: the model never
    learns E[x₀] from pure noise, and its samples' per-channel means drift (measured: ≈ 0.1 std per channel, 5–9 grey
    levels too dark). ``snr_gamma`` = 0 gives the plain mean squared error.
    """
    if sched.config.prediction_type == "v_prediction":
        target = sched.get_velocity(x0, noise, t)
    else:
        target = noise
    per = ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))  # (B,)
    if not snr_gamma:
        return per.mean()
    from diffusers.training_utils import compute_snr
    snr = compute_snr(sched, t)  # (B,)
    if sched.config.prediction_type == "v_prediction":
        snr = snr + 1
    w = torch.minimum(snr, torch.full_like(snr, snr_gamma)) / snr
    return (per * w).mean()


def train_ldm(cfg: Config, data, run: Path, resume: bool = False, force: bool = False, progress: bool = True) -> Path:
    """Train on the latents of ``data``'s training split with ``run/vae``; write ``run/unet`` and ``run/scheduler``."""
    run = Path(run)
    tc = cfg.train_ldm
    if (run / "unet").exists() and not (resume or force):
        raise fail(f"{run / 'unet'} already exists; pass --resume to continue its training, --force to retrain, "
                   f"or choose another --out")
    vae = load_vae(run / "vae")
    train = data.subset("train")
    if len(train) < tc.batch_size:
        raise fail(f"dataset {data.root} has {len(train)} training images, fewer than the batch size {tc.batch_size}; "
                   f"render more scenes or lower train_ldm.batch_size")
    if train.rgb.shape[1] != vae.config.sample_size:
        raise fail(f"dataset {data.root} has {train.rgb.shape[1]}px images but the VAE in {run / 'vae'} was trained on "
                   f"{vae.config.sample_size}px; render scenes at that size")
    tdir = run / "train_ldm"
    if force and not resume:  # start over: the old checkpoint is dropped, not resumed
        (tdir / "checkpoint.pt").unlink(missing_ok=True)
    preflight(tdir, resume)  # before writing anything: --resume needed, checkpoint readable
    tdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(tdir / "config.yaml", dump_yaml(cfg))
    z, z_mirrored = cached_latents(vae, train, tdir)  # (N, c, h, w) each
    sched = build_train_scheduler(tc)
    torch.manual_seed(tc.seed)
    unet = build_unet(cfg.unet, vae.config.latent_channels, latent_size(cfg.vae, vae.config.sample_size))
    if unet.config.sample_size != z.shape[-1]:
        raise fail(f"config vae.block_out_channels gives latent size {unet.config.sample_size} but {run / 'vae'} makes "
                   f"{z.shape[-1]}; use the VAE's config")

    def loss_fn(model, g, step):
        idx = torch.randint(len(z), (tc.batch_size,), generator=g)
        x0 = z[idx]  # (B, c, h, w)
        if tc.flip:  # the scenes have no preferred left/right: half the batch are the mirrored scenes' latents (drawn
            flip = torch.rand(tc.batch_size, generator=g) < 0.5  # from g, so resumable); never z.flip(-1), see above
            x0 = torch.where(flip[:, None, None, None], z_mirrored[idx], x0)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, tc.num_train_timesteps, (tc.batch_size,), generator=g)
        x0, noise, t = on_model_device(model, x0, noise, t)
        pred = model(sched.add_noise(x0, noise, t), t).sample  # (B, c, h, w)
        return diffusion_loss(sched, pred, x0, noise, t, tc.snr_gamma), {}

    spec = LoopSpec(out=tdir, steps=tc.steps, lr=tc.lr, lr_min_ratio=tc.lr_min_ratio, checkpoint_every=tc.checkpoint_every,
                    log_every=tc.log_every, seed=tc.seed, ema_decay=tc.ema_decay, desc="train-ldm")
    unet, ema = train_loop(unet, loss_fn, spec, resume=resume, progress=progress)
    from ..processes import process_state
    if not process_state().is_main_process:  # under `accelerate launch` one process evaluates and saves
        return run / "unet"
    if ema is not None:
        ema.copy_to(unet.parameters())
    save_model(unet, run / "unet")
    sched.save_pretrained(run / "scheduler")
    evaluate_ldm(LDM(vae=vae, unet=unet.eval(), scheduler_config=dict(sched.config), root=run), data, tdir, cfg)
    return run / "unet"


def evaluate_ldm(ldm: LDM, data, tdir: Path, cfg: Config, n: int = 64) -> dict:
    """64 DDIM samples vs held-out scenes: :func:`sceneprobe.quality.quality_summary` (FSD with the real-vs-real and
    VAE-reconstruction floors, colour statistics, border stripes) in ``eval.json``; ``samples_grid.png`` and
    ``samples_vs_real.png`` (the sample grid beside as many held-out scenes)."""
    metrics = sample_quality(ldm, data, n=n, seed=cfg.sample.seed, steps=cfg.sample.steps)
    imgs = metrics.pop("_samples")
    real = metrics.pop("_heldout")
    from ..quality import comparison_grid
    from ..sample import image_grid
    Image.fromarray(image_grid(imgs, cols=8)).save(tdir / "samples_grid.png")
    Image.fromarray(comparison_grid(imgs, real)).save(tdir / "samples_vs_real.png")
    atomic_write_json(tdir / "eval.json", metrics)
    return metrics


@torch.no_grad()
def sample_quality(ldm: LDM, data, n: int = 64, seed: int = 0, steps: int = 15, sampler: str = "ddim",
                   samples: np.ndarray | None = None) -> dict:
    """Sample ``n`` images (or take ``samples``, (N, H, W, 3) uint8, made with these settings) and measure them against
    ``data``'s held-out scenes (test split, else all)."""
    from ..models.latents import images_to_tensor
    from ..quality import quality_summary
    from ..sample import generate, to_uint8
    imgs = samples if samples is not None else np.concatenate(
        [generate(ldm, list(range(i, min(n, i + 32))), seed=seed, steps=steps, sampler=sampler)[0] for i in range(0, n, 32)])
    n = len(imgs)
    test = data.subset("test")
    held = test.rgb if len(test) >= 8 else data.rgb
    train = data.subset("train").rgb if len(data.subset("train")) else data.rgb
    recon = np.concatenate([to_uint8(ldm.vae.decode(ldm.vae.encode(images_to_tensor(held[i:i + 64])).latent_dist.mode()).sample)
                            for i in range(0, min(len(held), max(n, 64)), 64)])
    metrics = quality_summary(imgs, held, train, recon)
    metrics.update({"sampler": sampler, "sampling_steps": steps, "prediction_type":
                    ldm.scheduler_config.get("prediction_type", "epsilon"), "_samples": imgs, "_heldout": held[:n]})
    return metrics
