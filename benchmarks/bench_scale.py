"""What the paper's study costs on each family at its native size: sites, store bytes, streamed statistics, GPU fit.

Arithmetic, not a timing: every figure is computed from the published configs of the real models (written below as
in each model's ``*/config.json``; no weights, no download) by building the denoiser, the VAE and the text encoders
on the meta device and reading their canonical sites (:mod:`sceneprobe.models.sites`) and parameter counts. For each
family and each site selection it prints

* **sites** and (site, step) pairs; image tokens × channels of each site at the native resolution;
* **full store**: activations on disk per image (``capture.dtype`` float16, every site, every step) and for the
  paper's 617 prompts;
* **streamed** (``capture.store: streamed``, :mod:`sceneprobe.probe.streamed`): on the GPU, the float64 Gram matrix
  G = XᵀX of every (site, step), (C+1)² × 8 bytes, and the per-position sums of the layout-fair fit, C × tokens × 8
  bytes (column "G"), beside the weights (fp16/bf16; the text encoders are freed after
  the prompts are encoded, so they count only while encoding); in RAM, the saliency subsample
  (``capture.subsample`` = 64 positions × (C+1) float16 per train image and (site, step)), the validation
  predictions (2 tasks × 11 λ × tokens float64 per val image and pair) and the test predictions (2 × tokens);
* **what fits on one 80 GB GPU** — the largest streamed batch beside the weights, G and a 2 GB margin (a batch
  keeps every step's float32 readings until its images are labelled).

The splits are the project's 60 / 15 / 25 % of 617 prompts (370 / 93 / 154). Steps: the paper's 15 for every
family (``--steps``); FLUX.1-dev's own default is 28, schnell's 4.

    .venv/bin/python benchmarks/bench_scale.py
    .venv/bin/python benchmarks/bench_scale.py --steps 28 --gpu-gb 141    # an H200
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

PAPER_N, N_TRAIN, N_VAL, N_TEST, N_LAMBDAS, SUBSAMPLE = 617, 370, 93, 154, 11, 64
GB = 1e9

# The published denoiser configs (the keys that shape the model; the rest are diffusers' defaults).
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
PIXART_SIGMA = dict(sample_size=128, in_channels=4, out_channels=8, patch_size=2, num_layers=28,
                    num_attention_heads=16, attention_head_dim=72, cross_attention_dim=1152, caption_channels=4096,
                    norm_type="ada_norm_single", num_embeds_ada_norm=1000, activation_fn="gelu-approximate",
                    attention_bias=True, use_additional_conditions=False, interpolation_scale=2)
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                  attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                  caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
SD35_LARGE = dict(SD3_MEDIUM, num_layers=38, num_attention_heads=38, caption_projection_dim=2432, qk_norm="rms_norm")
FLUX1_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=(16, 56, 56))
VAE4 = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4)
VAE16 = dict(VAE4, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 projection_dim=1280)
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, vocab_size=32128,
              feed_forward_proj="gated-gelu")


@dataclass
class Model:
    name: str
    family: str           # sites.py family key
    denoiser: str         # diffusers class
    config: dict
    px: int               # native image side
    vae: dict
    texts: tuple          # ("clip", cfg) / ("t5", cfg)


MODELS = (
    Model("SD v1.5", "sd", "UNet2DConditionModel", SD15_UNET, 512, VAE4, (("clip", CLIP_L),)),
    Model("SDXL base", "sdxl", "UNet2DConditionModel", SDXL_UNET, 1024, VAE4, (("clip", CLIP_L), ("clip", CLIP_BIGG))),
    Model("PixArt-Σ 1024", "pixart", "PixArtTransformer2DModel", PIXART_SIGMA, 1024, VAE4, (("t5", T5_XXL),)),
    Model("SD3 medium", "sd3", "SD3Transformer2DModel", SD3_MEDIUM, 1024, VAE16,
          (("clip", CLIP_L), ("clip", CLIP_BIGG), ("t5", T5_XXL))),
    Model("SD3.5 large", "sd3", "SD3Transformer2DModel", SD35_LARGE, 1024, VAE16,
          (("clip", CLIP_L), ("clip", CLIP_BIGG), ("t5", T5_XXL))),
    Model("FLUX.1-dev", "flux", "FluxTransformer2DModel", FLUX1_DEV, 1024, VAE16, (("clip", CLIP_L), ("t5", T5_XXL))),
)


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build(m: Model):
    """Denoiser, VAE and text encoders on the meta device (no memory, no weights)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    with torch.device("meta"):
        den = getattr(diffusers, m.denoiser).from_config(m.config)
        vae = diffusers.AutoencoderKL.from_config(m.vae)
        text = 0
        for kind, cfg in m.texts:
            text += params(CLIPTextModelWithProjection(CLIPTextConfig(**cfg)) if kind == "clip"
                           else T5EncoderModel(T5Config(**cfg)))
    return den, vae, text


def site_table(m: Model, den, vae) -> list[tuple[str, int, int]]:
    """(site, image tokens, channels) of every canonical site at the native size: denoiser sites, then the VAE's
    decoder mid-attention (the paper's VAE site, at the latent's resolution)."""
    from sceneprobe.models.sites import list_sites, resolve, site_channels, token_grid
    latent = m.px // 8
    rows = []
    for site in list_sites(den, "transformer" if m.family in ("pixart", "sd3", "flux") else "unet"):
        key = "transformer" if m.family in ("pixart", "sd3", "flux") else "unet"
        g = token_grid(site, m.config, (latent, latent))
        rows.append((site, g.rows * g.cols, site_channels(resolve(den, key, site))))
    for site in list_sites(vae, "vae"):
        if site.startswith("vae.dec"):
            rows.append((site, latent * latent, site_channels(resolve(vae, "vae", site))))
    return rows


def arithmetic(rows, steps: int, weights_b: float, text_b: float, gpu_gb: float) -> dict:
    pairs = len(rows) * steps
    store = sum(t * c * 2 for _, t, c in rows) * steps                         # bytes per image, float16
    gram = sum((c + 1) ** 2 * 8 for _, _, c in rows) * steps                    # bytes on the GPU, per model
    gram += sum(c * t * 8 for _, t, c in rows) * steps       # + the layout-fair per-position sums Σ_i x_i(j)
    sub = sum(SUBSAMPLE * (c + 1) * 2 for _, _, c in rows) * steps * N_TRAIN     # RAM
    val = sum(2 * N_LAMBDAS * t * 8 for _, t, _ in rows) * steps * N_VAL        # RAM
    test = sum(2 * t * 8 for _, t, _ in rows) * steps * N_TEST                   # RAM
    # a streamed batch keeps every step's readings (float32, streamed_sd.run) until its images are labelled
    per_image = sum(t * c * 4 for _, t, c in rows) * steps
    base = weights_b + gram + 2 * GB                                              # 2 GB working margin
    batch = max(0, int((gpu_gb * GB - base) // per_image))
    return dict(pairs=pairs, store=store, gram=gram, sub=sub, val=val, test=test, base=base, per_image=per_image,
                batch=batch)


def subsets(rows):
    """Site selections a user would try: every site, and about a dozen denoiser sites spread over the depth."""
    yield "all sites", rows
    den = [r for r in rows if not r[0].startswith("vae.")]
    vae = [r for r in rows if r[0].startswith("vae.")]
    if len(den) > 8:
        every = max(2, len(den) // 12)
        nth = {2: "2nd", 3: "3rd"}.get(every, f"{every}th")
        yield f"every {nth} denoiser site + VAE", den[::every] + vae


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=15, help="denoising steps (the paper: 15)")
    ap.add_argument("--gpu-gb", type=float, default=80.0, help="GPU memory (80: H100; 141: H200)")
    a = ap.parse_args()
    print(f"paper-scale study: {PAPER_N} prompts ({N_TRAIN} train / {N_VAL} val / {N_TEST} test), {a.steps} steps, "
          f"{N_LAMBDAS} λ, subsample {SUBSAMPLE}; one model (the permuted control is a second, sequential pass); "
          f"GPU {a.gpu_gb:g} GB. Arithmetic from published configs, not a measurement.\n")
    head = (f"{'model':<14} {'selection':<32} {'sites':>5} {'pairs':>6} {'tokens×C (largest)':>19} "
            f"{'store/img':>9} {'store 617':>9} {'G (GPU)':>8} {'weights':>8} {'+text':>6} {'batch/img':>9} "
            f"{'max batch':>9} {'RAM sub':>8} {'RAM val':>8} {'RAM test':>8}")
    print(head)
    print("-" * len(head))
    for m in MODELS:
        den, vae, text_p = build(m)
        weights_b = 2 * (params(den) + params(vae))                                  # fp16 / bf16
        rows = site_table(m, den, vae)
        for label, sel in subsets(rows):
            r = arithmetic(sel, a.steps, weights_b, 2 * text_p, a.gpu_gb)
            big = max(sel, key=lambda x: x[1] * x[2])
            print(f"{m.name:<14} {label:<32} {len(sel):>5} {r['pairs']:>6} {f'{big[1]}×{big[2]}':>19} "
                  f"{r['store'] / GB:>7.2f}GB {r['store'] * PAPER_N / 1e12:>7.1f}TB {r['gram'] / GB:>6.1f}GB "
                  f"{weights_b / GB:>6.1f}GB {2 * text_p / GB:>5.1f}G {r['per_image'] / GB:>7.1f}GB "
                  f"{r['batch'] if r['batch'] else 'NONE':>9} {r['sub'] / GB:>6.1f}GB {r['val'] / GB:>6.1f}GB "
                  f"{r['test'] / GB:>6.1f}GB")
        del den, vae
    print("\nstore/img: every site's activations of every step for one image (float16); G: the streamed float64 "
          "statistics, (C+1)² per (site, step), and the layout-fair per-position sums, C × tokens, held on the GPU for the "
          "whole train pass; batch/img: the float32 "
          "readings of every step one image of a streamed batch holds on the GPU until it is labelled; max batch: "
          "images per batch that fit beside weights + G + 2 GB (NONE: not even one — choose fewer sites or steps "
          "with capture.sites / capture.steps). The text encoders (+text) are loaded only while the prompts are "
          "encoded. RAM: the streamed mode's host memory for the saliency subsample and the val/test predictions.")


if __name__ == "__main__":
    main()
