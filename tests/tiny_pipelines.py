"""Tiny random-weight diffusers pipeline folders of every family sceneprobe captures, built offline for the tests.

Each builder saves a whole pipeline (``save_pretrained``) that the family's own pipeline class loads back: tiny
denoiser (1–2 blocks, 16 channels, latent 8×8), tiny ``AutoencoderKL`` (8, 16) with a mid attention, 1-layer CLIP
and T5 text encoders and tokenizers made here from a character vocabulary (no files, no downloads).
"""
from __future__ import annotations

from pathlib import Path

import torch

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def clip_tokenizer(max_length: int = 16):
    """A character-level CLIP BPE tokenizer (no merges), as in the SD tests."""
    from transformers import CLIPTokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in LETTERS:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def clip_config(hidden: int = 8, projection: int = 8):
    from transformers import CLIPTextConfig
    return CLIPTextConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, projection_dim=projection)


def t5_parts(d_model: int = 16):
    """A 1-layer ``T5EncoderModel`` and a character-level Unigram T5 tokenizer (<pad> 0, </s> 1, <unk> 2)."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -0.5)] + [(c, -1.0) for c in LETTERS]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    enc = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                                  num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))
    return enc, tok


def tiny_vae(latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=latent_channels, norm_num_groups=4,
                         sample_size=16, **extra)


def build_tiny_sdxl(folder: Path) -> Path:
    """SDXL: U-Net with a 2-block transformer stack (``tb0``, ``tb1``), added time ids, two CLIP encoders."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=4 * 6 + 8,
        use_linear_projection=True)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=CLIPTextModel(clip_config()),
                                     text_encoder_2=CLIPTextModelWithProjection(clip_config()),
                                     tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet,
                                     scheduler=sched)
    pipe.save_pretrained(folder)
    return folder


def build_tiny_pixart(folder: Path, sigma: bool = True) -> Path:
    """PixArt-Σ (or -α): 2 transformer blocks, patch 2, learned sigma (out_channels 8), T5 encoder."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline, \
        PixArtTransformer2DModel
    torch.manual_seed(0)
    tr = PixArtTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
                                  attention_head_dim=8, num_attention_heads=2, cross_attention_dim=16,
                                  caption_channels=16, norm_num_groups=2)
    enc, tok = t5_parts(16)
    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    pipe = cls(tokenizer=tok, text_encoder=enc, vae=tiny_vae(), transformer=tr,
               scheduler=DPMSolverMultistepScheduler())
    pipe.save_pretrained(folder)
    return folder


def build_tiny_sd3(folder: Path) -> Path:
    """SD3.5-like: 2 joint blocks (block 0 with SD3.5's extra image self-attention ``attn2``), flow matching, two CLIP
    encoders with projection and a T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection
    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                               attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                               caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=16,
                               dual_attention_layers=(0,))
    enc3, tok3 = t5_parts(16)
    pipe = StableDiffusion3Pipeline(
        transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=CLIPTextModelWithProjection(clip_config()), tokenizer=clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(clip_config()), tokenizer_2=clip_tokenizer(),
        text_encoder_3=enc3, tokenizer_3=tok3)
    pipe.save_pretrained(folder)
    return folder


def build_tiny_flux(folder: Path) -> Path:
    """FLUX.1-dev-like: 1 double- and 1 single-stream block, guidance embedding, 2×2 packed latents, CLIP + T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel
    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    enc2, tok2 = t5_parts(16)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=tr, scheduler=sched,
                        vae=tiny_vae(scaling_factor=0.3611, shift_factor=0.1159),
                        text_encoder=CLIPTextModel(clip_config()), tokenizer=clip_tokenizer(),
                        text_encoder_2=enc2, tokenizer_2=tok2)
    pipe.save_pretrained(folder)
    return folder


BUILDERS = {"sdxl": build_tiny_sdxl, "pixart": build_tiny_pixart, "sd3": build_tiny_sd3, "flux": build_tiny_flux}
