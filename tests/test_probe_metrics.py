"""Metrics and baselines: by hand, and against scipy."""
from __future__ import annotations

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr

from sceneprobe.probe import metrics
from sceneprobe.probe.baselines import baseline_scores, mean_maps

torch.set_num_threads(1)


def test_dice_and_iou_by_hand():
    p = np.zeros((3, 2, 3), bool)
    g = np.zeros((3, 2, 3), bool)
    p[0, 0, :2] = True                       # |P| = 2
    g[0, 0, 1:] = True                       # |G| = 2, |P∩G| = 1, |P∪G| = 3
    g[1, 1, 1] = True                        # image 1: empty prediction, one true pixel → Dice ≈ 0
    # image 2: both empty → the paper's +1e-8 makes it 1
    d = metrics.dice(p, g)
    np.testing.assert_allclose(d, [(2 + 1e-8) / (4 + 1e-8), 1e-8 / (1 + 1e-8), 1.0])
    np.testing.assert_allclose(metrics.iou(p, g), [(1 + 1e-8) / (3 + 1e-8), 1e-8 / (1 + 1e-8), 1.0])


def test_correlations_match_scipy():
    rng = np.random.default_rng(0)
    gt = rng.normal(size=(4, 8, 8))
    pred = gt + rng.normal(size=gt.shape)
    pred[1] = np.round(pred[1])              # ties
    for i in range(4):
        assert abs(metrics.spearman(pred, gt)[i] - spearmanr(pred[i].ravel(), gt[i].ravel())[0]) < 1e-12
        assert abs(metrics.pearson(pred, gt)[i] - pearsonr(pred[i].ravel(), gt[i].ravel())[0]) < 1e-12
    np.testing.assert_allclose(metrics.rmse(pred, gt), np.sqrt(((pred - gt) ** 2).mean((1, 2))))


def test_constant_images_are_defined():
    gt = np.stack([np.arange(4.0).reshape(2, 2), np.ones((2, 2))])
    pred = np.stack([np.zeros((2, 2)), np.arange(4.0).reshape(2, 2)])
    r = metrics.spearman(pred, gt)
    assert r[0] == 0.0                       # constant prediction, varying truth: no credit
    assert np.isnan(r[1])                    # constant truth: undefined, left out of the mean
    assert metrics.nanmean(r) == 0.0
    assert np.isnan(metrics.nanmean(np.array([np.nan])))


def test_baselines_score_mean_maps():
    rng = np.random.default_rng(1)
    depth = rng.normal(size=(6, 4, 4)).astype(np.float32)
    sal = np.zeros((6, 4, 4), np.uint8)
    sal[:, 1:3, 1:3] = 1
    split = np.array([0, 0, 0, 1, 2, 2], np.int8)
    dmap, mask = mean_maps(depth, sal, split)
    np.testing.assert_allclose(dmap, depth[:3].mean(0), rtol=1e-6)
    assert mask.sum() == 4
    s = baseline_scores(depth, sal, split, 2)
    assert s[("saliency", "dice")] == 1.0
    np.testing.assert_allclose(s[("depth", "rmse")], np.sqrt(((depth[4:] - dmap) ** 2).mean((1, 2))).mean(), rtol=1e-6)


def test_native_scorer_equals_metrics_on_upsampled_predictions():
    """Metrics of nearest-upsampled predictions computed at native resolution (block sums, weighted ranks)."""
    from sceneprobe.probe.fit import upsample_nearest
    rng = np.random.default_rng(2)
    for H, h in ((16, 4), (10, 4), (6, 6)):
        depth = rng.normal(size=(5, H, H))
        depth[2] = np.round(depth[2])                       # tied truth
        depth[3] = 1.0                                      # constant truth → NaN correlations
        mask = rng.random((5, H, H)) > 0.5
        pred = rng.normal(size=(5, 3, h, h))
        pred[0, 1] = 0.0                                    # constant prediction → 0
        pred[1, 2] = np.round(pred[1, 2])                   # tied prediction
        sc = metrics.NearestScorer(depth, mask, h, h)
        up = upsample_nearest(torch.from_numpy(pred), H, H).numpy()
        got_d, got_s = sc.depth(pred), sc.saliency(pred)
        for lam in range(3):
            for k, ref in metrics.depth_metrics(up[:, lam], depth).items():
                np.testing.assert_allclose(got_d[k][:, lam], ref, atol=1e-10, err_msg=f"{k} {H}/{h}")
            for k, ref in metrics.saliency_metrics(up[:, lam] > 0, mask).items():
                np.testing.assert_allclose(got_s[k][:, lam], ref, atol=1e-12)
