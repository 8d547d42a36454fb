"""A diffusion transformer's study at its native width (random weights, no download): cost per image, peak memory.

Builds a random-weight PixArt-Σ pipeline — the published transformer (28 blocks × 1152 channels, patch 2, 16 heads;
``sample_size`` = size / 8), SD's VAE, and a 1-layer T5 encoder of T5-XXL's width (4096, what the transformer's
caption projection reads; the other 23 layers change nothing the capture sees) with a character tokenizer made here —
saves it as a diffusers folder and runs, on ``--prompts`` prompts at ``--size`` px:

* **plain**: the family's own pipeline (``PixArtSigmaPipeline.__call__``), no hooks — the reference;
* **study**: ``sceneprobe run --model FOLDER --prompts CSV --store streamed`` — sampling with every site recorded,
  the labels (the shipped labeller), the streamed probes, the report — for the model and (``--controls``) its
  permuted control.

Prints seconds per image of each, their ratio, the study's peak GPU memory (or peak RSS on a CPU) and the projection
to the paper's 617 prompts × (1 + controls) models (arithmetic on the measured per-image time). ``--tiny``: 2 blocks
of width 64 and a 64-wide T5 — a smoke test of the script on a CPU, not PixArt's figures.

    .venv/bin/python benchmarks/bench_dit.py --tiny --size 64 --prompts 8          # CPU smoke test, ~1 min
    python3 benchmarks/bench_dit.py --size 512 --prompts 24 --batch 8              # one GPU (benchmarks/gpu_check.sh)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PAPER_N = 617
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def build_pixart_sigma(folder: Path, size: int, tiny: bool) -> dict:
    """Save a random-weight PixArt-Σ pipeline at ``folder``; returns the parameter counts (millions)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel, T5Tokenizer
    torch.manual_seed(0)
    width, heads, layers = (64, 2, 2) if tiny else (1152, 16, 28)
    t5 = 64 if tiny else 4096
    tr = PixArtTransformer2DModel(sample_size=size // 8, patch_size=2, in_channels=4, out_channels=8,
                                  num_layers=layers, attention_head_dim=width // heads, num_attention_heads=heads,
                                  cross_attention_dim=width, caption_channels=t5, norm_type="ada_norm_single",
                                  num_embeds_ada_norm=1000, activation_fn="gelu-approximate", attention_bias=True,
                                  use_additional_conditions=False, interpolation_scale=max(1, size // 512))
    vch = (16, 32, 64, 64) if tiny else (128, 256, 512, 512)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=vch,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=16 if tiny else 32, sample_size=size)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -0.5)] + [(c, -1.0) for c in LETTERS]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    enc = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=t5, d_kv=64, d_ff=t5 * 5 // 2, num_layers=1,
                                  num_heads=max(1, t5 // 64), pad_token_id=0, eos_token_id=1,
                                  feed_forward_proj="gated-gelu"))
    pipe = PixArtSigmaPipeline(tokenizer=tok, text_encoder=enc, vae=vae, transformer=tr,
                               scheduler=DPMSolverMultistepScheduler())
    pipe.save_pretrained(folder)
    return {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in
            (("transformer", tr), ("vae", vae), ("text", enc))}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="image size in pixels (PixArt-Σ: 512, 1024)")
    ap.add_argument("--prompts", type=int, default=16, help="number of prompts (≥ 7 for train/val/test rows)")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=8, help="prompts per batch")
    ap.add_argument("--controls", default="permuted", help="permuted or none")
    ap.add_argument("--tiny", action="store_true", help="a smoke test of the script (not PixArt's figures)")
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    from sceneprobe.cli import main as cli_main
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_dit_"))
    work.mkdir(parents=True, exist_ok=True)
    folder = work / "pixart"
    t = time.time()
    if not (folder / "model_index.json").is_file():
        counts = build_pixart_sigma(folder, args.size, args.tiny)
    else:
        counts = {}
    print(f"built {'TINY ' if args.tiny else ''}PixArt-Σ architecture (random weights) {counts} M params in "
          f"{time.time() - t:.0f} s; device {torch.cuda.get_device_name() if cuda else 'cpu'}", flush=True)
    N = args.prompts
    csv = work / "prompts.csv"
    csv.write_text("prompt,seed\n" + "".join(f"a photo of object {i} on a table,{1000 + 7 * i}\n" for i in range(N)))
    fig: dict = {"size": args.size, "prompts": N, "steps": args.steps, "device": str(device), "params_m": counts}

    # plain: the family's own pipeline, no hooks
    from diffusers import PixArtSigmaPipeline
    dtype = torch.float16 if cuda else torch.float32
    pipe = PixArtSigmaPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
    prompts = [f"a photo of object {i} on a table" for i in range(N)]
    with torch.no_grad():
        opts = dict(num_inference_steps=args.steps, height=args.size, width=args.size, output_type="np",
                    use_resolution_binning=False, clean_caption=False)     # as the study's sampler asks
        pipe(prompts[:1], **opts)
        _sync()
        t = time.time()
        for i in range(0, N, args.batch):
            gens = [torch.Generator().manual_seed(1000 + 7 * j) for j in range(i, min(N, i + args.batch))]
            pipe(prompts[i:i + args.batch], generator=gens, **opts)
        _sync()
    fig["plain_s_per_image"] = (time.time() - t) / N
    del pipe
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    print(f"plain sampling: {fig['plain_s_per_image']:.3f} s/image", flush=True)

    # the study, streamed
    cfg = work / "bench.yaml"
    cfg.write_text(f"capture: {{steps: {args.steps}, batch_size: {args.batch}, height: {args.size}, "
                   f"width: {args.size}}}\n")
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    t = time.time()
    rc = cli_main(["run", "--model", str(folder), "--prompts", str(csv), "--out", str(run), "--config", str(cfg),
                   "--store", "streamed", "--controls", args.controls, "--no-progress"])
    _sync()
    models = 1 + (0 if args.controls in ("", "none") else len(args.controls.split(",")))
    dt = time.time() - t
    fig.update(rc=rc, study_s=dt, models=models, study_s_per_image_model=dt / (N * models))
    fig["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
    fig["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    ratio = fig["study_s_per_image_model"] / fig["plain_s_per_image"]
    fig["ratio_to_plain"] = ratio
    fig["projected_617_min"] = PAPER_N * models * fig["study_s_per_image_model"] / 60
    mem = f"peak GPU {fig['peak_gpu_gb']:.1f} GB" if cuda else f"peak RSS {fig['peak_rss_gb']:.1f} GB (no GPU)"
    print(f"study (sampling + every site + labels + streamed probes + report), exit {rc}: "
          f"{fig['study_s_per_image_model']:.3f} s per image per model = {ratio:.1f}x plain sampling; {mem}; "
          f"projection (arithmetic on this per-image time) to the paper's {PAPER_N} prompts x {models} models: "
          f"{fig['projected_617_min']:.1f} min on this device", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=1))
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
