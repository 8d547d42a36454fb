"""A synthetic run folder with planted linear signal, for tests, benchmarks and trying the report without a model.

Scenes: a tilted ground-plane depth gradient plus one disk-shaped object nearer than the background; saliency is the
disk. Features of site s at step t (native h×w) are ``x = α_t · A [d̄, m̄ − ½, 1] + σ ε`` with d̄, m̄ the
area-downsampled standardised depth and mask, α_t rising with the step (information "emerges"), so a no-bias
linear probe can recover both labels up to the block structure. ``vae.*`` sites carry only the mask, and only at late steps (the paper's VAE
finding); control models (``permuted``, ``fresh``) carry no signal at all.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..capture.store import create_shard, finish_manifest, save_labels, shard_path, write_rows

DEFAULT_SITES = {"unet.down0.attn0": 8, "unet.mid.attn0": 4, "vae.dec.mid.attn0": 8}


def synthetic_labels(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(depth (n, S, S) float32, saliency (n, S, S) uint8, split (n,) int8 70/15/15, rgb (n, S, S, 3) uint8)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    depth = np.empty((n, size, size), np.float32)
    sal = np.empty((n, size, size), np.uint8)
    rgb = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(0.25, 0.75, 2)
        r = rng.uniform(0.12, 0.3)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        ground = 8.0 - 5.0 * yy + rng.uniform(-1, 1) * (xx - 0.5)
        depth[i] = np.where(disk, rng.uniform(1.5, 3.0) + 0.5 * (yy - cy), ground)
        sal[i] = disk
        base = rng.uniform(40, 200, 3)
        rgb[i] = np.clip(np.where(disk[..., None], 255 - base, base * (0.5 + 0.5 * yy[..., None])), 0, 255)
    n_val = n_test = max(1, round(0.15 * n))
    split = np.zeros(n, np.int8)
    split[rng.permutation(n)[: n_val + n_test]] = [1] * n_val + [2] * n_test
    return depth, sal, split, rgb


def synthetic_run(run: Path, n: int = 48, channels: int = 16, size: int = 32, steps: int = 3,
                  sites: dict[str, int] | None = None, models: tuple[str, ...] = ("ldm", "permuted"),
                  protocol: str = "noised", noise: float = 0.5, seed: int = 0, shuffle_labels: bool = False,
                  dtype: str = "float16") -> Path:
    """Write ``run/captures/<protocol>/{labels.safetensors, <model>/...}``; returns the run folder.

    ``sites`` maps site name → native size (square); ``shuffle_labels`` permutes the label rows afterwards, so the
    features carry no information about their labels (probes must score at chance)."""
    sites = dict(DEFAULT_SITES if sites is None else sites)
    run = Path(run)
    proto = run / "captures" / protocol
    depth, sal, split, rgb = synthetic_labels(n, size, seed)
    dstd = (depth - depth[split == 0].mean()) / depth[split == 0].std()
    gen = torch.Generator().manual_seed(seed + 1)
    timesteps = [int(t) for t in np.linspace(999, 0, steps).round()]
    for m_i, model in enumerate(models):
        root = proto / model
        for s_i, (site, hw) in enumerate(sites.items()):
            d_n = F.adaptive_avg_pool2d(torch.from_numpy(dstd)[:, None], hw)            # (n, 1, h, w)
            m_n = F.adaptive_avg_pool2d(torch.from_numpy(sal).float()[:, None], hw) - 0.5
            mix = torch.randn(channels, 3, generator=gen)                              # (C, 3)
            for t in range(steps):
                alpha = (t + 1) / steps
                if model != "ldm":
                    alpha = 0.0
                sig_d = 0.0 if site.startswith("vae.") else alpha
                sig_m = alpha if not site.startswith("vae.") or t == steps - 1 else 0.0
                basis = torch.cat([sig_d * d_n, 3 * sig_m * m_n, torch.ones_like(d_n)], 1)  # (n, 3, h, w)
                x = torch.einsum("ck,nkhw->nchw", mix, basis) + noise * torch.randn(n, channels, hw, hw, generator=gen)
                path = shard_path(root, site, t)
                create_shard(path, (n, channels, hw, hw), dtype)
                write_rows(path, 0, x)
        finish_manifest(root, {"protocol": protocol, "model": model, "n": n, "steps": list(range(steps)),
                               "timesteps": timesteps, "dtype": dtype, "pool": 1, "site_kind": "attn",
                               "sites": {s: {"shape": [channels, hw, hw]} for s, hw in sites.items()},
                               "sample_ids": list(range(n)), "seeds": list(range(n)), "model_hash": f"synthetic-{m_i}"})
    if shuffle_labels:
        perm = np.random.default_rng(seed + 2).permutation(n)
        depth, sal, rgb = depth[perm], sal[perm], rgb[perm]
    save_labels(proto, depth, sal, split, rgb=rgb)
    return run
