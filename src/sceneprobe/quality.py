"""Sample quality: Fréchet Scene Distance (FSD) in a small, fixed, hand-defined feature space.

No pretrained Inception network can be had offline, so the feature vector of an image (H, W, 3) uint8 is defined
here, from things a scene's look depends on:

* its 8×8 area-downsampled RGB in [0, 1] (192 numbers: layout and colour),
* per-channel mean and std (6: global colour),
* a 8-bin histogram of gradient magnitude on the 32×32 grey image (8: edges and texture).

FSD = ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^{1/2}) between the feature Gaussians of two image sets (the FID formula).
Reference points printed beside it: real-vs-real (held-out vs training scenes, the floor), VAE reconstructions
vs real (what the decoder alone costs) and noise-vs-real. Colour statistics and border bands find casts and stripes;
``ground_detail`` measures whether the ground's checker texture is drawn.
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F


def scene_features(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 → (N, 206) float64 features."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255.0  # (N, 3, H, W)
    small = F.adaptive_avg_pool2d(x, 8).flatten(1)  # (N, 192)
    stats = torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)  # (N, 6)
    grey = F.adaptive_avg_pool2d(x.mean(1, keepdim=True), 32)  # (N, 1, 32, 32)
    gx, gy = grey[..., :, 1:] - grey[..., :, :-1], grey[..., 1:, :] - grey[..., :-1, :]
    mag = torch.sqrt(gx[..., :-1, :] ** 2 + gy[..., :, :-1] ** 2).flatten(1)  # (N, 961)
    edges = torch.tensor([0, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 10], dtype=torch.float64)
    hist = torch.stack([((mag >= lo) & (mag < hi)).double().mean(1) for lo, hi in zip(edges[:-1], edges[1:])], 1)
    return torch.cat([small, stats, hist], 1).numpy()


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets (N1, D) and (N2, D)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    with warnings.catch_warnings():  # 64 images in 206 dimensions: Σ is rank-deficient by construction, as in FID
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def fsd(generated: np.ndarray, reference: np.ndarray) -> float:
    return frechet_distance(scene_features(generated), scene_features(reference))


def colour_stats(images: np.ndarray) -> dict:
    """Per-channel mean and std of (N, H, W, 3) uint8 images in grey levels, and the cast index (R + B)/2 − G
    (purple/pink > 0, green < 0; rendered scenes sit near 1.5)."""
    x = images.astype(np.float64)
    m = x.mean((0, 1, 2))
    return {"mean_rgb": [round(float(v), 2) for v in m], "std_rgb": [round(float(v), 2) for v in x.std((0, 1, 2))],
            "cast": round(float((m[0] + m[2]) / 2 - m[1]), 2)}


BANDS = {"top": (slice(0, 2), slice(None)), "bottom": (slice(-2, None), slice(None)),
         "left": (slice(None), slice(0, 2)), "right": (slice(None), slice(-2, None))}


def edge_bands(images: np.ndarray, reference: np.ndarray) -> dict:
    """Border stripes: for each 2-pixel band along an edge, the largest per-channel difference (grey levels) between
    the band's mean colour in ``images`` and in ``reference``, minus the same difference over whole images (so a
    global cast is not counted as a stripe)."""
    glob = np.abs(images.astype(np.float64).mean((0, 1, 2)) - reference.astype(np.float64).mean((0, 1, 2)))
    out = {}
    for name, (r, c) in BANDS.items():
        a = images[:, r, c].astype(np.float64).mean((0, 1, 2))
        b = reference[:, r, c].astype(np.float64).mean((0, 1, 2))
        out[name] = round(float((np.abs(a - b) - glob).max()), 2)
    return out


def ground_detail_per_image(images: np.ndarray) -> np.ndarray:
    """Fine detail of the ground per image: mean |g − box₃(g)| (grey levels) over the bottom third of the image, where
    g is the grey image and box₃ its 3×3 mean (replicate padding); the 2-pixel border bands are left out (they are
    :func:`edge_bands`' business). On rendered scenes the bottom third is mostly near ground, so this is
    dominated by the checker's edges; a blurry or textureless ground scores far lower. (N, H, W, 3) uint8 → (N,)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double().mean(1, keepdim=True)  # (N, 1, H, W)
    hp = (x - F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)).abs()
    H = x.shape[2]
    return hp[..., 2 * H // 3: H - 2, 2:-2].mean((1, 2, 3)).numpy()


def ground_detail(images: np.ndarray) -> float:
    """Mean of :func:`ground_detail_per_image` over the images (grey levels)."""
    return round(float(ground_detail_per_image(images).mean()), 3)


def ground_detail_ratio(samples: np.ndarray, reference: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """Ground detail of the samples over that of reference images (the VAE's reconstructions: the most a sampler
    can reach), with a 95 % percentile bootstrap CI. The two sets are different images, so each is resampled on its
    own: ratio* = mean(s*) / mean(r*). The detail of a few dozen images varies a lot (how much near ground each
    shows), so a point estimate near a goal line says nothing without this interval."""
    s, r = ground_detail_per_image(samples), ground_detail_per_image(reference)  # (N,), (M,)
    if not r.any():  # a reference without any detail: no share of it is defined
        return {"value": None, "ci95": None}
    rng = np.random.default_rng(seed)
    with np.errstate(divide="ignore", invalid="ignore"):  # a resample of only detail-free references: ±inf, nan
        boot = s[rng.integers(0, len(s), (n_boot, len(s)))].mean(1) / r[rng.integers(0, len(r), (n_boot, len(r)))].mean(1)
    lo, hi = np.nanpercentile(boot, [2.5, 97.5])
    return {"value": round(float(s.mean() / r.mean()), 3), "ci95": [round(float(lo), 3), round(float(hi), 3)]}


def texture_verdict(ratio: dict, line: float = 0.8) -> str:
    """Issue 11's texture goal as a rule on the CI of :func:`ground_detail_ratio`: ``met`` when the whole CI is at or
    above ``line``, ``not met`` when it is wholly below, else ``undecided`` (more samples needed)."""
    if ratio["ci95"] is None:
        return "undecided"
    lo, hi = ratio["ci95"]
    return "met" if lo >= line else "not met" if hi < line else "undecided"


def quality_summary(samples: np.ndarray, heldout: np.ndarray, train: np.ndarray,
                    reconstructions: np.ndarray | None = None, seed: int = 0) -> dict:
    """Everything the issue's goals are stated in, for samples (N, H, W, 3) uint8 against held-out scenes.

    FSD of the samples, with its floors (training scenes vs held-out: what two real sets differ by; VAE
    reconstructions of the held-out scenes vs held-out: what the decoder alone costs) and the noise ceiling; colour
    statistics of samples, data and reconstructions, with a 95 % CI of the samples' per-channel mean difference (normal
    approximation over per-image means); border-band stripes with their real-vs-real floor (the largest
    band excess of up to 5 disjoint sets of n training scenes); ground detail (:func:`ground_detail`) of
    samples, data and reconstructions (the VAE's is the most the sampler can reach), and the samples' share of the
    reconstructions' with a bootstrap CI (:func:`ground_detail_ratio`). Set sizes are matched to the samples'.
    """
    n = len(samples)
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, size=samples.shape, dtype=np.uint8)
    out = {"n_samples": int(n), "fsd_samples_vs_heldout": fsd(samples, heldout),
           "fsd_train_vs_heldout": fsd(train[:n], heldout), "fsd_noise_vs_heldout": fsd(noise, heldout)}
    if reconstructions is not None:
        out["fsd_vae_recon_vs_heldout"] = fsd(reconstructions[:n], heldout)
    out["colour_samples"] = colour_stats(samples)
    out["colour_heldout"] = colour_stats(heldout)
    if reconstructions is not None:
        out["colour_vae_recon"] = colour_stats(reconstructions)
    out["mean_rgb_diff_samples_vs_heldout"] = [round(a - b, 2) for a, b in
                                               zip(out["colour_samples"]["mean_rgb"], out["colour_heldout"]["mean_rgb"])]
    # 64 images' mean colour is itself noisy (64 real scenes differ from the held-out mean by up to ±6 grey levels):
    # a normal-approximation 95 % CI of the difference from the per-image channel means of both sets
    a, b = samples.astype(np.float64).mean((1, 2)), heldout.astype(np.float64).mean((1, 2))  # (N, 3), (M, 3)
    half = 1.96 * np.sqrt(a.var(0, ddof=1) / len(a) + b.var(0, ddof=1) / len(b))
    d = a.mean(0) - b.mean(0)
    out["mean_rgb_diff_ci95"] = [[round(float(x - h), 2), round(float(x + h), 2)] for x, h in zip(d, half)]
    out["edge_stripe_samples"] = edge_bands(samples, heldout)
    # what n real scenes differ by: band means of n images are noisy (objects at the border), so a band excess of a
    # few grey levels is no stripe; the floor is the largest excess over up to 5 disjoint training sets of n
    sets = [train[i * n:(i + 1) * n] for i in range(min(5, len(train) // max(n, 1)))] or [train[:n]]
    out["edge_stripe_real_floor"] = round(max(max(edge_bands(t, heldout).values()) for t in sets), 2)
    if reconstructions is not None:
        out["edge_stripe_vae_recon"] = edge_bands(reconstructions, heldout)
    out["ground_detail"] = {"samples": ground_detail(samples), "heldout": ground_detail(heldout)}
    if reconstructions is not None:
        out["ground_detail"]["vae_recon"] = ground_detail(reconstructions)
        out["ground_detail_ratio_vs_vae_recon"] = ground_detail_ratio(samples, reconstructions, seed=seed)
    return out


def comparison_grid(samples: np.ndarray, real: np.ndarray, cols: int = 8, gap: int = 12) -> np.ndarray:
    """The sample grid beside a grid of as many real scenes, with a white gap between: (H, W, 3) uint8."""
    from .sample import image_grid
    n = min(len(samples), len(real))
    a, b = image_grid(samples[:n], cols=cols), image_grid(real[:n], cols=cols)
    return np.concatenate([a, np.full((a.shape[0], gap, 3), 255, np.uint8), b], axis=1)
