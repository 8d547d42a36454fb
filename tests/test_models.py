"""The latent diffusion model: folders loadable by plain diffusers, exact resume, batch-independent sampling."""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel

from sceneprobe.models.io import load_ldm, model_hash
from sceneprobe.sample import decode, denoise, generate, initial_noise, to_latent
from sceneprobe.models.latents import images_to_tensor


def test_vae_latent_stats_round_trip(tiny_run, tiny_data):
    """encode → normalise → denormalise → decode equals decode(encode); the per-channel statistics (diffusers'
    latents_mean / latents_std keys) give every channel zero mean and unit std on the images they were computed on."""
    ldm = load_ldm(tiny_run)
    cfg = ldm.vae.config
    assert len(cfg.latents_mean) == cfg.latent_channels == len(cfg.latents_std)
    x = images_to_tensor(tiny_data.rgb[:4])
    with torch.no_grad():
        z = ldm.vae.encode(x).latent_dist.mode()
        direct = ldm.vae.decode(z).sample.clamp(-1, 1)
        via_scaled = decode(ldm.vae, to_latent(ldm.vae, z))
    assert torch.allclose(direct, via_scaled, atol=1e-5)
    from sceneprobe.models.latents import encode_mode
    zs = to_latent(ldm.vae, encode_mode(ldm.vae, tiny_data.subset("train").rgb))  # (N, c, h, w)
    assert torch.allclose(zs.mean(dim=(0, 2, 3)), torch.zeros(cfg.latent_channels), atol=1e-4)
    assert torch.allclose(zs.std(dim=(0, 2, 3)), torch.ones(cfg.latent_channels), atol=1e-3)


def test_scalar_latent_keys_still_work(tiny_run):
    """A folder with only scaling_factor / shift_factor (Stable Diffusion's layout) maps z → (z − shift)·scale."""
    ldm = load_ldm(tiny_run)
    ldm.vae.register_to_config(latents_mean=None, latents_std=None, scaling_factor=0.5, shift_factor=0.25)
    z = torch.randn(2, ldm.vae.config.latent_channels, 4, 4)
    assert torch.allclose(to_latent(ldm.vae, z), (z - 0.25) * 0.5)
    ldm.vae.register_to_config(shift_factor=None)
    assert torch.allclose(to_latent(ldm.vae, z), z * 0.5)


def test_plain_diffusers_loads_the_same_model(tiny_run):
    """The run's folders load with plain diffusers (local_files_only) and sample exactly like sceneprobe's path."""
    vae = AutoencoderKL.from_pretrained(tiny_run / "vae", local_files_only=True)
    unet = UNet2DModel.from_pretrained(tiny_run / "unet", local_files_only=True)
    sched = DDIMScheduler.from_pretrained(tiny_run / "scheduler", local_files_only=True)
    ldm = load_ldm(tiny_run)
    assert model_hash(vae) == model_hash(ldm.vae) and model_hash(unet) == model_hash(ldm.unet)
    assert sched.config.prediction_type == "v_prediction" and sched.config.timestep_spacing == "trailing"
    ids = [0, 1]
    ours, _ = generate(ldm, ids, seed=3, steps=3)
    c, s = unet.config.in_channels, unet.config.sample_size
    with torch.no_grad():
        z = denoise(lambda x, t: unet(x, t).sample, sched, initial_noise(ids, 3, (c, s, s)), ids, 3, steps=3)
        # diffusers' per-channel convention (as its SDXL pipelines): z = z·std_c/scaling_factor + mean_c
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
        z = z * std / vae.config.scaling_factor + mean
        img = ((vae.decode(z).sample.clamp(-1, 1) + 1) * 127.5).round()
    assert np.array_equal(ours, img.to(torch.uint8).permute(0, 2, 3, 1).numpy())


def test_sample_does_not_depend_on_its_batch(tiny_run):
    """Each sample's noise comes from its own generator, so batching changes nothing but float rounding: oneDNN may
    block a convolution differently for another batch size (last-bit differences in the latents, at most one grey
    level in the image). Same batching, same bytes (see the reproducibility tests)."""
    ldm = load_ldm(tiny_run)
    batch, zb = generate(ldm, [0, 1, 2, 3], seed=7, steps=2)
    alone, za = generate(ldm, [2], seed=7, steps=2)
    assert torch.allclose(zb[2], za[0], atol=1e-5)
    assert np.abs(batch[2].astype(int) - alone[0].astype(int)).max() <= 1
    again, _ = generate(ldm, [0, 1, 2, 3], seed=7, steps=2)
    assert np.array_equal(batch, again)
    ddpm_batch, zb = generate(ldm, [0, 1], seed=7, steps=2, sampler="ddpm")
    ddpm_alone, za = generate(ldm, [1], seed=7, steps=2, sampler="ddpm")
    assert torch.allclose(zb[1], za[0], atol=1e-5)
    assert np.abs(ddpm_batch[1].astype(int) - ddpm_alone[0].astype(int)).max() <= 1
    other_seed, _ = generate(ldm, [2], seed=8, steps=2)
    assert not np.array_equal(other_seed[0], alone[0])


class Killed(Exception):
    pass


@pytest.mark.parametrize("stage", ["vae", "ldm"])
def test_resume_after_kill_gives_identical_weights(tmp_path, tiny_cfg, tiny_data, tiny_run, stage, monkeypatch):
    """Kill training mid-way (after a checkpoint), resume: the final weights equal an uninterrupted run's."""
    import sceneprobe.train.loop as loop
    from sceneprobe.train.ldm import train_ldm
    from sceneprobe.train.vae import train_vae
    train = train_vae if stage == "vae" else train_ldm
    cfg = tiny_cfg
    full, part = tmp_path / "full", tmp_path / "part"
    for r in (full, part):
        if stage == "ldm":
            r.mkdir()
            shutil.copytree(tiny_run / "vae", r / "vae")
    train(cfg, tiny_data, full, progress=False)

    real = loop._save_checkpoint

    def save_then_die(path, model, opt, ema, step):
        real(path, model, opt, ema, step)
        if step == cfg.train_vae.checkpoint_every:
            raise Killed()
    monkeypatch.setattr(loop, "_save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train(cfg, tiny_data, part, progress=False)
    monkeypatch.setattr(loop, "_save_checkpoint", real)
    train(cfg, tiny_data, part, resume=True, progress=False)
    name = "vae" if stage == "vae" else "unet"
    a = (full / name / "diffusion_pytorch_model.safetensors").read_bytes()
    b = (part / name / "diffusion_pytorch_model.safetensors").read_bytes()
    assert a == b
    lines_full = [ln.split('"elapsed_s"')[0] for ln in (full / f"train_{stage}" / "metrics.jsonl").read_text().splitlines()]
    lines_part = [ln.split('"elapsed_s"')[0] for ln in (part / f"train_{stage}" / "metrics.jsonl").read_text().splitlines()]
    assert lines_full == lines_part


def test_training_is_reproducible(tmp_path, tiny_cfg, tiny_data):
    from sceneprobe.train.vae import train_vae
    cfg = dataclasses.replace(tiny_cfg, train_vae=dataclasses.replace(tiny_cfg.train_vae, steps=2))
    a, b = tmp_path / "a", tmp_path / "b"
    train_vae(cfg, tiny_data, a, progress=False)
    train_vae(cfg, tiny_data, b, progress=False)
    assert (a / "vae/diffusion_pytorch_model.safetensors").read_bytes() == \
        (b / "vae/diffusion_pytorch_model.safetensors").read_bytes()
