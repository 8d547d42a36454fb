"""Sample-quality figures: colour statistics, border stripes (planted on both sides of the rule), FSD floors."""
from __future__ import annotations

import numpy as np

from sceneprobe.quality import colour_stats, comparison_grid, edge_bands, fsd, quality_summary


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
    grid = comparison_grid(held[:8], train[:8], cols=4)
    assert grid.shape[1] > 2 * grid.shape[0] - 20 and grid.dtype == np.uint8
