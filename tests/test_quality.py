"""Sample-quality figures: colour statistics, border stripes (planted on both sides of the rule), FSD floors."""
from __future__ import annotations

import numpy as np

from sceneprobe.quality import (colour_stats, comparison_grid, edge_bands, fsd, ground_detail, ground_detail_per_image,
                                ground_detail_ratio, quality_summary, texture_verdict)


def _scenes(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(60, 200, size=(n, 16, 16, 3), dtype=np.uint8)


def test_colour_stats_and_cast():
    img = np.zeros((2, 4, 4, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 100, 50, 120
    s = colour_stats(img)
    assert s["mean_rgb"] == [100.0, 50.0, 120.0] and s["cast"] == 60.0 and s["std_rgb"] == [0.0, 0.0, 0.0]


def test_edge_bands_find_a_stripe_but_not_a_global_cast():
    ref = _scenes()
    striped = ref.copy()
    striped[:, -2:, :, 0] = 255  # a red stripe along the bottom edge
    bands = edge_bands(striped, ref)
    assert bands["bottom"] > 50 and max(bands["top"], bands["left"], bands["right"]) < 10
    cast = np.clip(ref.astype(int) + [30, 0, 30], 0, 255).astype(np.uint8)  # a uniform pink cast, no stripe
    assert max(edge_bands(cast, ref).values()) < 3


def test_quality_summary_orders_its_reference_points():
    held, train = _scenes(40, 1), _scenes(40, 2)
    noisy = np.random.default_rng(3).integers(0, 256, size=held.shape, dtype=np.uint8)
    q = quality_summary(noisy, held, train, reconstructions=held.copy())
    assert q["fsd_vae_recon_vs_heldout"] < 1e-6 < q["fsd_train_vs_heldout"] < q["fsd_samples_vs_heldout"]
    assert abs(q["fsd_samples_vs_heldout"] - fsd(noisy, held)) < 1e-9
    assert set(q["edge_stripe_samples"]) == {"top", "bottom", "left", "right"}
    lo, hi = zip(*q["mean_rgb_diff_ci95"])
    assert all(l_ <= d <= h_ for l_, d, h_ in zip(lo, q["mean_rgb_diff_samples_vs_heldout"], hi))
    shifted = quality_summary(np.clip(held.astype(int) + 40, 0, 255).astype(np.uint8), held, train)
    assert all(l_ > 30 for l_, _ in shifted["mean_rgb_diff_ci95"])  # a real shift: the CI excludes 0 by far
    assert q["edge_stripe_real_floor"] == max(edge_bands(train, held).values())  # 40 training scenes: one set
    grid = comparison_grid(held[:8], train[:8], cols=4)
    assert grid.shape[1] > 2 * grid.shape[0] - 20 and grid.dtype == np.uint8


def test_ground_detail_sees_a_checker_and_not_a_flat_or_blurred_ground():
    """A checker ground (4-pixel squares, 80 grey levels apart) in the bottom third scores high; the same ground
    flat, or blurred to its mean, scores ≈ 0; detail in the top two thirds is not counted."""
    H = 24
    yy, xx = np.mgrid[:H, :H]
    checker = np.where(((yy // 4) + (xx // 4)) % 2 == 0, 80, 160).astype(np.uint8)
    img = np.full((3, H, H, 3), 120, np.uint8)
    img[0, 2 * H // 3:] = checker[2 * H // 3:, :, None]
    img[2, :2 * H // 3 - 1] = checker[:2 * H // 3 - 1, :, None]   # texture only above the ground band
    assert ground_detail(img[:1]) > 10
    assert ground_detail(img[1:2]) == 0.0 and ground_detail(img[2:3]) < 1
    tex, flat = np.repeat(img[:1], 8, 0), np.repeat(img[1:2], 8, 0)
    tex[4:, 2 * H // 3:] = checker[2 * H // 3:, ::-1, None]  # two kinds of image, so the FSD covariances are finite
    q = quality_summary(tex, tex, tex, reconstructions=flat)
    assert q["ground_detail"]["samples"] == q["ground_detail"]["heldout"] > q["ground_detail"]["vae_recon"] == 0.0


def test_texture_verdict_follows_the_ratio_ci_on_both_sides_of_the_line():
    """The texture goal is a rule on a CI: samples with the reference's checker → met; with half its contrast (ratio
    0.5) → not met; four samples of which two are flat (ratio 0.5 but a CI wider than the gap to 0.8) → undecided."""
    H, n = 24, 40
    yy, xx = np.mgrid[:H, :H]

    def grounds(contrast, count, seed):
        rng = np.random.default_rng(seed)
        out = np.full((count, H, H, 3), 120, np.uint8)
        for i in range(count):  # squares of 3–5 pixels: per-image detail varies, as on real grounds
            k = int(rng.integers(3, 6))
            c = np.where(((yy // k) + (xx // k)) % 2 == 0, 120 - contrast // 2, 120 + contrast // 2)
            out[i, 2 * H // 3:] = c[2 * H // 3:, :, None]
        return out

    ref = grounds(80, n, 0)
    assert np.isclose(ground_detail_per_image(ref).mean(), ground_detail(ref), atol=1e-3)
    same = ground_detail_ratio(grounds(80, n, 1), ref)
    half = ground_detail_ratio(grounds(40, n, 2), ref)
    assert same["ci95"][0] >= 0.8 and texture_verdict(same) == "met"
    assert half["ci95"][1] < 0.8 and texture_verdict(half) == "not met"
    few = np.concatenate([grounds(80, 2, 3), np.full((2, H, H, 3), 120, np.uint8)])
    mixed = ground_detail_ratio(few, ref)
    assert mixed["ci95"][0] < 0.8 <= mixed["ci95"][1] and texture_verdict(mixed) == "undecided"
    flat = ground_detail_ratio(ref, np.full((4, H, H, 3), 120, np.uint8))  # no detail to be a share of
    assert flat == {"value": None, "ci95": None} and texture_verdict(flat) == "undecided"
