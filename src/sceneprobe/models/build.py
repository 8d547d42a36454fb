"""Build diffusers models from sceneprobe's config sections (config is the constructor).

Shapes: an image (B, 3, S, S) becomes a latent (B, latent_channels, S/f, S/f) with f = 2**(len(vae blocks) − 1);
the U-Net works on those latents, so its ``sample_size`` is S/f and its in/out channels are the latent channels.
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DModel

from ..config import TrainLDMConfig, UNetConfig, VAEConfig


def latent_size(vae_cfg: VAEConfig, image_size: int) -> int:
    """Spatial size of the latent: each VAE block but the last halves the resolution."""
    return image_size // 2 ** (len(vae_cfg.block_out_channels) - 1)


def build_vae(cfg: VAEConfig, image_size: int = 64) -> AutoencoderKL:
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups, sample_size=image_size,
        mid_block_add_attention=cfg.mid_block_add_attention, scaling_factor=1.0,
    )


def init_vae_logvar(vae: AutoencoderKL, logvar: float) -> None:
    """Start with a small posterior std: the log-variance half of ``quant_conv``'s bias set to ``logvar``.

    With diffusers' default init the posterior std starts near 1, the decoder sees very noisy latents and short runs
    plateau near 16 dB (reference/cpu-calibration.md §2.5); std ≈ exp(−6/2) ≈ 0.05 trains much faster.
    """
    c = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.bias[c:] = logvar


def build_unet(cfg: UNetConfig, latent_channels: int, sample_size: int) -> UNet2DModel:
    if len(cfg.down_block_types) != len(cfg.block_out_channels) or len(cfg.up_block_types) != len(cfg.block_out_channels):
        from ..errors import fail
        raise fail("config unet: down_block_types and up_block_types need one entry per block_out_channels entry")
    return UNet2DModel(
        sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        down_block_types=tuple(cfg.down_block_types), up_block_types=tuple(cfg.up_block_types),
        attention_head_dim=cfg.attention_head_dim, norm_num_groups=cfg.norm_num_groups,
    )


def build_train_scheduler(cfg: TrainLDMConfig) -> DDPMScheduler:
    """The training noise schedule; its config (saved as ``run/scheduler``) is what every sampler is built from.

    ``zero_terminal_snr``: betas rescaled so that ᾱ_T = 0 (Lin et al. 2024, diffusers' ``rescale_betas_zero_snr``)
    with ``trailing`` timestep spacing, so sampling starts from the pure noise it was trained on. Needs v-prediction
    (ε is not identifiable from pure noise).
    """
    if cfg.prediction_type not in ("epsilon", "v_prediction"):
        from ..errors import fail
        raise fail(f"config key train_ldm.prediction_type must be epsilon or v_prediction, got {cfg.prediction_type!r}")
    if cfg.zero_terminal_snr and cfg.prediction_type != "v_prediction":
        from ..errors import fail
        raise fail("config train_ldm: zero_terminal_snr needs prediction_type v_prediction; set one of them differently")
    extra = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if cfg.zero_terminal_snr else {}
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type, clip_sample=False, **extra)


def sampling_scheduler(train_scheduler_config: dict, sampler: str = "ddim"):
    """A sampling scheduler sharing the training scheduler's noise schedule, prediction type and spacing.

    DDIM gets ``set_alpha_to_one`` (the final step lands on the clean latent); a zero-terminal-SNR schedule keeps its
    trailing spacing (from the saved config), so step 0 is t = T − 1, where the input is pure noise.
    """
    if sampler == "ddim":
        return DDIMScheduler.from_config(train_scheduler_config, set_alpha_to_one=True, clip_sample=False)
    if sampler == "ddpm":
        return DDPMScheduler.from_config(train_scheduler_config, clip_sample=False)
    from ..errors import fail
    raise fail(f"unknown sampler {sampler!r}; choose ddim or ddpm")
