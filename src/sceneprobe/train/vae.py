"""Train the KL-VAE: reconstruction (L1 or MSE) + β·KL, on random crops of the training scenes.

The VAE is convolutional but for its mid-block attention, so training on 32×32 crops of 64×64 scenes costs ~4×
less per sample and transfers to full images (reference/cpu-calibration.md §2.4). After training, per-channel latent
statistics over training latents are stored in the saved config (``latents_mean``/``latents_std``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_write_json, atomic_write_text
from ..config import Config, dump_yaml
from ..errors import fail
from ..models.build import build_vae, init_vae_logvar
from ..models.io import save_model
from ..models.latents import evaluate_vae, images_to_tensor, set_latent_stats
from .loop import LoopSpec, on_model_device, preflight, train_loop


def _batch(rgb: torch.Tensor, g: torch.Generator, batch: int, crop: int) -> torch.Tensor:
    """Random batch (B, 3, c, c) of uint8 images (N, 3, H, W) → float in [−1, 1], with per-sample random crops."""
    idx = torch.randint(len(rgb), (batch,), generator=g)
    x = rgb[idx]  # (B, 3, H, W) uint8
    if crop and crop < x.shape[-1]:
        off = torch.randint(x.shape[-1] - crop + 1, (batch, 2), generator=g)
        x = torch.stack([xi[:, int(o[0]):int(o[0]) + crop, int(o[1]):int(o[1]) + crop] for xi, o in zip(x, off)])
    return x.float().div(127.5).sub(1.0)


def vae_loss(vae, x: torch.Tensor, g: torch.Generator, recon: str, kl_weight: float) -> tuple[torch.Tensor, dict]:
    post = vae.encode(x).latent_dist
    z = post.sample(generator=g)  # (B, c, h, w)
    rec = vae.decode(z).sample
    r = F.l1_loss(rec, x) if recon == "l1" else F.mse_loss(rec, x)
    kl = post.kl().mean() / x[0].numel()
    return r + kl_weight * kl, {"recon": float(r.detach()), "kl": float(kl.detach())}


def train_vae(cfg: Config, data, run: Path, resume: bool = False, force: bool = False, progress: bool = True) -> Path:
    """Train on ``data`` (a :class:`~sceneprobe.world.dataset.SceneData`) and write ``run/vae`` and ``run/train_vae``."""
    run = Path(run)
    tc = cfg.train_vae
    if (run / "vae").exists() and not (resume or force):
        raise fail(f"{run / 'vae'} already exists; pass --resume to continue its training, --force to retrain, "
                   f"or choose another --out")
    train = data.subset("train")
    if len(train) < tc.batch_size:
        raise fail(f"dataset {data.root} has {len(train)} training images, fewer than the batch size {tc.batch_size}; "
                   f"render more scenes or lower train_vae.batch_size")
    if tc.recon not in ("l1", "mse"):
        raise fail(f"config key train_vae.recon must be l1 or mse, got {tc.recon!r}")
    size = train.rgb.shape[1]
    torch.manual_seed(tc.seed)
    vae = build_vae(cfg.vae, size)
    init_vae_logvar(vae, tc.logvar_init)
    rgb = torch.from_numpy(train.rgb).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) uint8
    crop = tc.crop if tc.crop and tc.crop < size else 0
    tdir = run / "train_vae"
    if force and not resume:  # start over: the old checkpoint is dropped, not resumed
        (tdir / "checkpoint.pt").unlink(missing_ok=True)
    preflight(tdir, resume, vae)  # before writing anything: --resume needed, checkpoint readable and fitting
    tdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(tdir / "config.yaml", dump_yaml(cfg))

    def loss_fn(model, g, step):
        x, = on_model_device(model, _batch(rgb, g, tc.batch_size, crop))
        return vae_loss(model, x, g, tc.recon, tc.kl_weight)

    spec = LoopSpec(out=tdir, steps=tc.steps, lr=tc.lr, lr_min_ratio=tc.lr_min_ratio, checkpoint_every=tc.checkpoint_every,
                    log_every=tc.log_every, seed=tc.seed, desc="train-vae")
    vae, _ = train_loop(vae, loss_fn, spec, resume=resume, progress=progress)
    from ..processes import process_state
    if not process_state().is_main_process:  # under `accelerate launch` one process evaluates and saves
        return run / "vae"
    # Normalise the latents per channel for the diffusion model (diffusers' latents_mean / latents_std keys).
    set_latent_stats(vae, train.rgb[:1024])
    if tc.decoder_steps:
        vae = tune_decoder(cfg, data, vae, run / "tune_decoder", resume=resume, progress=progress)
    heldout = next((data.subset(s) for s in ("test", "val", "train") if len(data.subset(s))))  # a user's folder may
    # have no held-out images at all (split by name hash): then the figures are on training images
    metrics = evaluate_vae(vae, heldout.rgb)
    metrics["latents_mean"] = list(vae.config.latents_mean)
    metrics["latents_std"] = list(vae.config.latents_std)
    metrics["steps"] = tc.steps
    atomic_write_json(tdir / "eval.json", metrics)
    save_model(vae, run / "vae")
    return run / "vae"


def tune_decoder(cfg: Config, data, vae, tdir: Path, resume: bool = False, progress: bool = True):
    """Fine-tune the decoder alone on full training images: L1(decode(mode(q(z|x))), x), encoder and ``quant_conv``
    frozen, so the latents (and the U-Net trained on them) are unchanged. ``train_vae.decoder_steps`` steps at
    ``decoder_lr`` (cosine), batch ``decoder_batch_size``; resumable like every loop. Returns the tuned VAE and
    writes ``tdir/eval.json`` (held-out PSNR/SSIM and border stripes before and after)."""
    from ..quality import edge_bands
    from ..sample import to_uint8
    from .loop import preflight
    tc = cfg.train_vae
    train = data.subset("train")
    heldout = next((data.subset(s) for s in ("test", "val", "train") if len(data.subset(s))))

    @torch.no_grad()
    def figures(v) -> dict:
        rgb = heldout.rgb[:256]
        rec = np.concatenate([to_uint8(v.decode(v.encode(images_to_tensor(rgb[i:i + 64])).latent_dist.mode()).sample)
                              for i in range(0, len(rgb), 64)])
        return {**evaluate_vae(v, heldout.rgb), "edge_stripe_recon": edge_bands(rec, rgb)}

    preflight(tdir, resume, vae)
    tdir.mkdir(parents=True, exist_ok=True)
    if not (tdir / "checkpoint.pt").exists():  # figures of the untuned decoder, kept for the record across resumes
        atomic_write_json(tdir / "before.json", figures(vae))
    rgb = torch.from_numpy(train.rgb).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) uint8
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)

    def loss_fn(model, g, step):
        # full images: the decoder sees the true borders
        x, = on_model_device(model, _batch(rgb, g, tc.decoder_batch_size, 0))
        with torch.no_grad():
            z = model.encode(x).latent_dist.mode()
        rec = model.decode(z).sample
        return (F.l1_loss(rec, x) if tc.recon == "l1" else F.mse_loss(rec, x)), {}

    spec = LoopSpec(out=tdir, steps=tc.decoder_steps, lr=tc.decoder_lr, lr_min_ratio=tc.lr_min_ratio, warmup=20,
                    checkpoint_every=tc.checkpoint_every, log_every=tc.log_every, seed=tc.seed, desc="tune-decoder")
    vae, _ = train_loop(vae, loss_fn, spec, resume=resume, progress=progress)
    vae.requires_grad_(True)
    from ..processes import process_state
    if process_state().is_main_process:
        before = json.loads((tdir / "before.json").read_text())
        atomic_write_json(tdir / "eval.json", {"before": before, "after": figures(vae), "steps": tc.decoder_steps})
    return vae
