"""The seed's claim, measured: the same U-Net design on 64×64×3 pixels vs on 16×16×4 latents.

Prints time and peak memory per denoising step (forward, no grad) and per training step (forward + backward + AdamW),
and the pixel/latent ratios. Each configuration runs in its own subprocess so that peak RSS (ru_maxrss) is its own.

    .venv/bin/python benchmarks/bench_latent_vs_pixel.py [--preset cpu] [--batch 16] [--reps 5]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(2)
from sceneprobe.config import load_config
from sceneprobe.models.build import build_unet
space, preset, batch, reps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cfg = load_config(preset)
c, s = (3, cfg.world.size) if space == "pixel" else (cfg.vae.latent_channels, cfg.world.size // 2 ** (len(cfg.vae.block_out_channels) - 1))
torch.manual_seed(0)
unet = build_unet(cfg.unet, c, s)
x = torch.randn(batch, c, s, s); t = torch.randint(0, 1000, (batch,))
opt = torch.optim.AdamW(unet.parameters(), 1e-4)
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base = rss()
mode = sys.argv[5]
def step():
    if mode == "denoise":
        with torch.no_grad():
            unet(x, t)
    else:
        loss = (unet(x, t).sample - x).pow(2).mean(); loss.backward(); opt.step(); opt.zero_grad()
step()
t0 = time.perf_counter()
for _ in range(reps): step()
dt = (time.perf_counter() - t0) / reps
print(json.dumps({"s_per_step": dt, "peak_mib": rss() - base, "shape": [c, s, s]}))
"""


def measure(space: str, preset: str, batch: int, reps: int, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, space, preset, str(batch), str(reps), mode],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    rows = {}
    for mode in ("denoise", "train"):
        for space in ("latent", "pixel"):
            rows[(mode, space)] = measure(space, a.preset, a.batch, a.reps, mode)
    print(f"U-Net of preset {a.preset!r}, batch {a.batch}, {a.reps} reps, 2 threads")
    print(f"{'':10s} {'space':7s} {'input':>10s} {'s/step':>9s} {'peak MiB':>9s}")
    for (mode, space), r in rows.items():
        print(f"{mode:10s} {space:7s} {'x'.join(map(str, r['shape'])):>10s} {r['s_per_step']:9.4f} {r['peak_mib']:9.1f}")
    for mode in ("denoise", "train"):
        p, l = rows[(mode, "pixel")], rows[(mode, "latent")]
        print(f"{mode} step: pixel/latent time ratio {p['s_per_step'] / l['s_per_step']:.1f}x, "
              f"peak memory ratio {max(p['peak_mib'], 1e-3) / max(l['peak_mib'], 1e-3):.1f}x")


if __name__ == "__main__":
    main()
