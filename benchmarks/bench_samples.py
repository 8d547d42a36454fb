"""Benchmark: is the generator good enough for the study? The shipped (or any) model's samples against the goals.

    .venv/bin/python benchmarks/bench_samples.py                        # the shipped cpu model, ~2 min on 2 cores
    .venv/bin/python benchmarks/bench_samples.py --model runs/me --data runs/me/data --n 64

Renders held-out scenes (or reads ``--data``), draws ``--n`` DDIM-15 samples (seed 0) and prints
:func:`sceneprobe.quality.quality_summary`: FSD with its floors (training vs held-out scenes; the VAE's
reconstructions) and the noise ceiling, per-channel colour of samples vs data, border-band stripes and ground detail; then each
goal of issue 11 as a line ``goal … : met / NOT met``. Writes ``samples_vs_real.png`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from PIL import Image

from sceneprobe.models.io import load_ldm, shipped_root
from sceneprobe.quality import comparison_grid, texture_verdict
from sceneprobe.train.ldm import sample_quality


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="run folder with vae/, unet/, scheduler/ (default: shipped cpu)")
    p.add_argument("--data", default=None, help="dataset folder (default: 4000 cpu-preset scenes rendered afresh)")
    p.add_argument("--n", type=int, default=64, help="samples (64 as the goals are stated; more narrows the colour CI)")
    p.add_argument("--steps", type=int, default=15, help="DDIM steps")
    p.add_argument("--out", default=".", help="folder for samples_vs_real.png")
    args = p.parse_args()
    torch.manual_seed(0)
    from sceneprobe.world.dataset import load_dataset, make_dataset
    if args.data:
        data = load_dataset(Path(args.data))
    else:
        tmp = Path(tempfile.mkdtemp()) / "scenes"
        data = load_dataset(make_dataset(tmp, n=4000, size=64, seed=0, supersample=3, workers=2, progress=False))
    ldm = load_ldm(Path(args.model) if args.model else shipped_root("cpu"))
    q = sample_quality(ldm, data, n=args.n, steps=args.steps)
    Image.fromarray(comparison_grid(q.pop("_samples"), q.pop("_heldout"))).save(Path(args.out) / "samples_vs_real.png")
    print(json.dumps(q, indent=1))
    diff = q["mean_rgb_diff_samples_vs_heldout"]
    cast = q["colour_samples"]["cast"] - q["colour_heldout"]["cast"]
    stripes = q["edge_stripe_samples"]
    goals = [("per-channel mean of samples within ±4 grey levels of the data's", max(map(abs, diff)) <= 4,
              {"diff": diff, "ci95": q["mean_rgb_diff_ci95"]}),
             ("cast index within ±4 of the data's", abs(cast) <= 4, round(cast, 2)),
             ("FSD ≤ 1.5", q["fsd_samples_vs_heldout"] <= 1.5, round(q["fsd_samples_vs_heldout"], 3)),
             ("no edge stripe (every border band within max(4, the real-vs-real floor) grey levels beyond the global "
              "difference)", max(stripes.values()) <= max(4, q["edge_stripe_real_floor"]),
              {**stripes, "real_floor": q["edge_stripe_real_floor"]}),
             # "the ground's texture visible": the VAE's reconstructions are the most a sampler can reach; 0.8 of their
             # ground detail is our line, judged on the ratio's 95 % CI (look at samples_vs_real.png too)
             ("ground texture drawn (ground detail of samples ≥ 0.8 × the VAE reconstructions', whole 95 % CI)",
              texture_verdict(q["ground_detail_ratio_vs_vae_recon"]),
              {**q["ground_detail"], "ratio": q["ground_detail_ratio_vs_vae_recon"]})]
    for name, ok, value in goals:
        verdict = ok if isinstance(ok, str) else "met" if ok else "NOT met"
        print(f"goal {name}: {verdict.replace('not met', 'NOT met')} ({value})")


if __name__ == "__main__":
    main()
