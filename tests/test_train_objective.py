"""The U-Net's objective: v-prediction with min-SNR-γ weights on a zero-terminal-SNR schedule; ε kept as an option."""
from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from sceneprobe.config import TrainLDMConfig
from sceneprobe.errors import SceneprobeError
from sceneprobe.models.build import build_train_scheduler, sampling_scheduler
from sceneprobe.train.ldm import diffusion_loss


def test_zero_terminal_snr_schedule_and_trailing_steps():
    sched = build_train_scheduler(TrainLDMConfig())
    assert float(sched.alphas_cumprod[-1]) == 0.0  # the last training timestep is pure noise
    ddim = sampling_scheduler(dict(sched.config))
    ddim.set_timesteps(15)
    assert int(ddim.timesteps[0]) == 999  # trailing: sampling starts where the training input is pure noise
    assert ddim.config.prediction_type == "v_prediction"


def test_epsilon_with_zero_terminal_snr_is_refused():
    with pytest.raises(SceneprobeError, match="zero_terminal_snr"):
        build_train_scheduler(TrainLDMConfig(prediction_type="epsilon", zero_terminal_snr=True))
    sched = build_train_scheduler(TrainLDMConfig(prediction_type="epsilon", zero_terminal_snr=False))
    assert float(sched.alphas_cumprod[-1]) > 0


@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon"])
def test_min_snr_weighted_loss_matches_its_formula(prediction):
    """L = mean_b w_b‖pred_b − target_b‖²/n, target v = √ᾱ ε − √(1−ᾱ) x₀ (or ε), w = min(SNR + 1, γ)/(SNR + 1) for v
    (1 at t = 999, where SNR = 0) and min(SNR, γ)/SNR for ε, computed here from ᾱ by hand."""
    cfg = TrainLDMConfig(prediction_type=prediction, zero_terminal_snr=prediction == "v_prediction")
    sched = build_train_scheduler(cfg)
    g = torch.Generator().manual_seed(0)
    x0, noise, pred = (torch.randn(5, 4, 3, 3, generator=g) for _ in range(3))
    t = torch.tensor([0, 10, 300, 700, 999 if prediction == "v_prediction" else 998])
    ab = sched.alphas_cumprod[t].double()[:, None, None, None]
    if prediction == "v_prediction":
        target = ab.sqrt() * noise.double() - (1 - ab).sqrt() * x0.double()
    else:
        target = noise.double()
    snr = (ab / (1 - ab)).flatten()
    s = snr + 1 if prediction == "v_prediction" else snr
    w = torch.clamp(s, max=5.0) / s
    if prediction == "v_prediction":
        assert w[-1] == 1.0  # the zero-SNR step is learned
    want = (w * ((pred.double() - target) ** 2).mean(dim=(1, 2, 3))).mean()
    got = diffusion_loss(sched, pred, x0, noise, t, snr_gamma=5.0)
    assert torch.allclose(got.double(), want, rtol=1e-4)
    plain = diffusion_loss(sched, pred, x0, noise, t, snr_gamma=0.0)
    assert torch.allclose(plain.double(), ((pred.double() - target) ** 2).mean(), rtol=1e-4)


def test_epsilon_model_trains_and_samples(tmp_path, tiny_cfg, tiny_data, tiny_run):
    """The ε option still trains, saves a scheduler that says so, and samples through the same scheduler path."""
    from sceneprobe.models.io import load_ldm
    from sceneprobe.sample import generate
    from sceneprobe.train.ldm import train_ldm
    cfg = dataclasses.replace(tiny_cfg, train_ldm=dataclasses.replace(
        tiny_cfg.train_ldm, prediction_type="epsilon", zero_terminal_snr=False, steps=2))
    run = tmp_path / "eps"
    run.mkdir()
    shutil.copytree(tiny_run / "vae", run / "vae")
    train_ldm(cfg, tiny_data, run, progress=False)
    ldm = load_ldm(run)
    assert ldm.scheduler_config["prediction_type"] == "epsilon"
    imgs, z = generate(ldm, [0, 1], seed=0, steps=2)
    assert imgs.shape[0] == 2 and torch.isfinite(z).all()



def test_tune_decoder_moves_only_the_decoder(tmp_path, tiny_cfg, tiny_data, tiny_run):
    """The decoder-only phase changes decoder weights, leaves encoder, quant_conv and the latent statistics alone
    (so a U-Net trained on the latents stays valid), and records border stripes before and after."""
    import json

    from sceneprobe.models.io import load_vae
    from sceneprobe.train.vae import tune_decoder
    cfg = dataclasses.replace(tiny_cfg, train_vae=dataclasses.replace(tiny_cfg.train_vae, decoder_steps=2))
    vae = load_vae(tiny_run / "vae")
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    tuned = tune_decoder(cfg, tiny_data, vae, tmp_path / "tune_decoder", progress=False)
    after = tuned.state_dict()
    for k, v in before.items():
        same = torch.equal(v, after[k])
        assert same if k.startswith(("encoder.", "quant_conv.")) else True
    assert any(not torch.equal(v, after[k]) for k, v in before.items() if k.startswith("decoder."))
    assert list(tuned.config.latents_mean) == list(load_vae(tiny_run / "vae").config.latents_mean)
    rec = json.loads((tmp_path / "tune_decoder" / "eval.json").read_text())
    assert set(rec["before"]["edge_stripe_recon"]) == {"top", "bottom", "left", "right"} and rec["steps"] == 2


def test_flip_augmentation_uses_the_mirrored_scenes_latents(tmp_path, tiny_run, tiny_data):
    """The VAE is not flip-equivariant (stride-2 convolutions pad one side), so mirroring a latent is not the latent of
    the mirrored scene; the cache holds enc(mirror(x)), which differs from mirror(enc(x)) on this VAE."""
    import numpy as np

    from sceneprobe.models.io import load_vae
    from sceneprobe.models.latents import encode_mode
    from sceneprobe.sample import to_latent
    from sceneprobe.train.ldm import cached_latents
    vae = load_vae(tiny_run / "vae")
    train = tiny_data.subset("train")
    z, zm = cached_latents(vae, train, tmp_path)
    want = to_latent(vae, encode_mode(vae, np.ascontiguousarray(train.rgb[:, :, ::-1])))
    assert torch.equal(zm, want) and zm.shape == z.shape
    assert not torch.allclose(zm, z.flip(-1), atol=1e-3)  # the old augmentation would have trained on other latents
    z2, zm2 = cached_latents(vae, train, tmp_path)  # read back from the cache
    assert torch.equal(z2, z) and torch.equal(zm2, zm)
