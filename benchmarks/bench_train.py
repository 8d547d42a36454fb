"""Training throughput: sceneprobe's loop vs a plain loop written like diffusers' unconditional training example.

Same model, same batch, same process, interleaved (A, B, A, B) to share the machine's noise. Prints images/s for the
VAE and the U-Net with each loop and the ratio ours/plain (goal ≥ 1.0).

    .venv/bin/python benchmarks/bench_train.py [--preset cpu] [--steps 20]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sceneprobe.config import load_config
from sceneprobe.models.build import build_train_scheduler, build_unet, build_vae, init_vae_logvar
from sceneprobe.train.loop import LoopSpec, train_loop


def plain_unet_loop(unet, latents, sched, steps, batch):
    """The shape of diffusers' examples/unconditional_image_generation/train_unconditional.py."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    acc = Accelerator()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr_sched = get_scheduler("cosine", optimizer=opt, num_warmup_steps=10, num_training_steps=steps)
    ema = EMAModel(unet.parameters(), decay=0.999, model_cls=type(unet), model_config=unet.config)
    unet, opt, lr_sched = acc.prepare(unet, opt, lr_sched)
    for _ in range(steps):
        clean = latents[torch.randint(len(latents), (batch,))]
        noise = torch.randn(clean.shape)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,)).long()
        noisy = sched.add_noise(clean, noise, t)
        with acc.accumulate(unet):
            loss = F.mse_loss(unet(noisy, t, return_dict=False)[0], noise)
            acc.backward(loss)
            acc.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            lr_sched.step()
            opt.zero_grad()
        ema.step(unet.parameters())


def plain_vae_loop(vae, images, steps, batch, crop):
    from accelerate import Accelerator
    acc = Accelerator()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-4)
    vae, opt = acc.prepare(vae, opt)
    for _ in range(steps):
        x = images[torch.randint(len(images), (batch,))]
        o = torch.randint(images.shape[-1] - crop + 1, (2,))
        x = x[..., o[0]:o[0] + crop, o[1]:o[1] + crop]
        post = vae.encode(x).latent_dist
        loss = F.l1_loss(vae.decode(post.sample()).sample, x) + 1e-6 * post.kl().mean()
        acc.backward(loss)
        acc.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(2)
    cfg = load_config(a.preset)
    size = cfg.world.size
    ls = size // 2 ** (len(cfg.vae.block_out_channels) - 1)
    images = torch.rand(256, 3, size, size) * 2 - 1
    latents = torch.randn(256, cfg.vae.latent_channels, ls, ls)
    sched = build_train_scheduler(cfg.train_ldm)
    tv, tl = cfg.train_vae, cfg.train_ldm
    crop = tv.crop or size
    res = {k: [] for k in ("vae-ours", "vae-plain", "unet-ours", "unet-plain")}
    for _ in range(a.rounds):
        with tempfile.TemporaryDirectory() as d:
            torch.manual_seed(0)
            vae = build_vae(cfg.vae, size)
            init_vae_logvar(vae, tv.logvar_init)
            from sceneprobe.train.vae import _batch, vae_loss
            u8 = ((images + 1) * 127.5).to(torch.uint8)
            t0 = time.perf_counter()
            train_loop(vae, lambda m, g, s: vae_loss(m, _batch(u8, g, tv.batch_size, crop), g, tv.recon, tv.kl_weight),
                       LoopSpec(out=Path(d) / "v", steps=a.steps, lr=1e-4, checkpoint_every=10**9, log_every=10**9),
                       progress=False)
            res["vae-ours"].append(a.steps * tv.batch_size / (time.perf_counter() - t0))
            torch.manual_seed(0)
            vae = build_vae(cfg.vae, size)
            t0 = time.perf_counter()
            plain_vae_loop(vae, images, a.steps, tv.batch_size, crop)
            res["vae-plain"].append(a.steps * tv.batch_size / (time.perf_counter() - t0))

            torch.manual_seed(0)
            unet = build_unet(cfg.unet, cfg.vae.latent_channels, ls)

            def unet_loss(m, g, s):
                x0 = latents[torch.randint(len(latents), (tl.batch_size,), generator=g)]
                noise = torch.randn(x0.shape, generator=g)
                t = torch.randint(0, tl.num_train_timesteps, (tl.batch_size,), generator=g)
                return F.mse_loss(m(sched.add_noise(x0, noise, t), t).sample, noise), {}
            t0 = time.perf_counter()
            train_loop(unet, unet_loss, LoopSpec(out=Path(d) / "u", steps=a.steps, lr=1e-4, ema_decay=0.999,
                                                 checkpoint_every=10**9, log_every=10**9), progress=False)
            res["unet-ours"].append(a.steps * tl.batch_size / (time.perf_counter() - t0))
            torch.manual_seed(0)
            unet = build_unet(cfg.unet, cfg.vae.latent_channels, ls)
            t0 = time.perf_counter()
            plain_unet_loop(unet, latents, sched, a.steps, tl.batch_size)
            res["unet-plain"].append(a.steps * tl.batch_size / (time.perf_counter() - t0))
    best = {k: max(v) for k, v in res.items()}
    print(f"preset {a.preset!r}: {a.steps} steps x {a.rounds} rounds, best round; VAE batch {tv.batch_size} "
          f"(crop {crop}), U-Net batch {tl.batch_size}")
    for k, v in best.items():
        print(f"{k:11s} {v:8.1f} images/s")
    print(f"VAE loop ratio ours/plain: {best['vae-ours'] / best['vae-plain']:.2f}")
    print(f"U-Net loop ratio ours/plain: {best['unet-ours'] / best['unet-plain']:.2f}")


if __name__ == "__main__":
    main()
