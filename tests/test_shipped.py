"""The shipped default checkpoint: small, loadable by plain diffusers, and as good as its record says."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sceneprobe.models.io import load_ldm, shipped_root

ROOT = shipped_root("cpu")


def test_shipped_files_are_small_fp16_and_load_with_plain_diffusers():
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel
    files = [p for p in ROOT.rglob("*.safetensors")]
    assert files, f"no shipped weights under {ROOT}"
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    vae = AutoencoderKL.from_pretrained(ROOT / "vae", local_files_only=True)
    unet = UNet2DModel.from_pretrained(ROOT / "unet", local_files_only=True)
    DDIMScheduler.from_pretrained(ROOT / "scheduler", local_files_only=True)
    assert vae.config.latent_channels == unet.config.in_channels
    from safetensors import safe_open
    with safe_open(str(ROOT / "vae" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16


def test_shipped_vae_reaches_its_recorded_psnr_on_fresh_scenes():
    """Scenes rendered now from the recorded seed (never seen in training) reconstruct at the recorded PSNR."""
    from sceneprobe.models.latents import evaluate_vae
    from sceneprobe.world.render import render_scenes
    record = json.loads((ROOT / "training.json").read_text())
    check = record["shipped_vae_check"]
    ldm = load_ldm(ROOT)
    rgb = render_scenes(seed=check["render_seed"], indices=range(check["n_images"]), size=ldm.vae.config.sample_size)["rgb"]
    got = evaluate_vae(ldm.vae, rgb)
    assert got["psnr_db"] >= check["psnr_db"] - 0.05, (got, check)
    # and it is within reach of the held-out figure measured at the end of training (fp32 weights, other scenes)
    assert got["psnr_db"] >= record["train_vae"]["eval"]["psnr_db"] - 1.0
    assert np.isfinite(got["ssim"]) and got["ssim"] > 0.5


@pytest.mark.parametrize("n", [2])
def test_shipped_model_samples(n):
    from sceneprobe.sample import generate
    imgs, _ = generate(load_ldm(ROOT), list(range(n)), seed=0, steps=3)
    assert imgs.shape == (n, 64, 64, 3) and imgs.dtype == np.uint8 and imgs.std() > 1
