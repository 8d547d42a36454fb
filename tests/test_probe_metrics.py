"""Metrics and baselines: by hand, and against scipy."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from sceneprobe.probe import metrics
from sceneprobe.probe.baselines import Prior, all_salient_logits, choose_threshold, fit_prior

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


def test_position_prior_is_the_train_mean_and_threshold_is_chosen_on_val():
    rng = np.random.default_rng(1)
    depth = rng.normal(size=(6, 4, 4))
    sal = np.zeros((6, 4, 4), np.uint8)
    sal[:, 1:3, 1:3] = 1
    sal[0, 0, 0] = 1                                          # a rare salient corner (rate 1/3 on train)
    split = np.array([0, 0, 0, 1, 2, 2], np.int8)
    ones = np.ones((4, 4))
    dmap, rate = fit_prior(ones, depth, sal.astype(float), split == 0)
    np.testing.assert_allclose(dmap, depth[:3].mean(0))
    assert rate[1, 1] == 1.0 and rate[0, 0] == pytest.approx(1 / 3) and rate[3, 3] == 0.0
    sc = metrics.NearestScorer(depth[3:4], sal[3:4], 4, 4)
    thr = choose_threshold(rate, lambda z: sc.saliency(np.broadcast_to(z[None], (1, *z.shape)))["dice"])
    assert 1 / 3 < thr <= 1.0                                 # the corner is not salient on val: excluded
    p = Prior(dmap, rate, thr)
    assert ((p.logits(1)[0, 0] > 0) == (rate >= thr)).all()
    # nothing reaches 0.5 → the val-chosen threshold still predicts the most frequent pixels, never an empty mask
    low = np.full((4, 4), 0.1)
    low[1:3, 1:3] = 0.3
    t2 = choose_threshold(low, lambda z: metrics.NearestScorer(depth[3:4], sal[3:4], 4, 4).saliency(
        np.broadcast_to(z[None], (1, *z.shape)))["dice"])
    assert t2 == pytest.approx(0.3)
    assert metrics.NearestScorer(depth[3:4], sal[3:4], 1, 1).saliency(all_salient_logits(1))["dice"][0, 0] == \
        pytest.approx(2 * 4 / (16 + 4))


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


def test_ranking_metrics_match_sklearn_on_upsampled_predictions():
    """AUROC / average precision (also with ties from upsampling) and masked (non-sky) depth metrics at native
    resolution equal the metrics of the upsampled arrays restricted to the valid pixels."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    from sceneprobe.probe.fit import upsample_nearest
    rng = np.random.default_rng(5)
    for H, h in ((16, 4), (10, 4), (8, 8)):
        depth = rng.normal(size=(4, H, H))
        mask = rng.random((4, H, H)) > 0.6
        mask[3] = False                                                         # no positives → NaN
        valid = rng.random((4, H, H)) > 0.3
        pred = rng.normal(size=(4, 2, h, h))
        pred[1, 1] = np.round(pred[1, 1])                                       # ties
        up = upsample_nearest(torch.from_numpy(pred), H, H).numpy()
        got = metrics.NearestScorer(depth, mask, h, h).saliency(pred, ranking=True)
        masked = metrics.NearestScorer(depth, mask, h, h, valid=valid).depth(pred)
        for i in range(4):
            for lam in range(2):
                if mask[i].any():
                    assert got["auroc"][i, lam] == pytest.approx(roc_auc_score(mask[i].ravel(), up[i, lam].ravel()))
                    assert got["ap"][i, lam] == pytest.approx(
                        average_precision_score(mask[i].ravel(), up[i, lam].ravel()))
                else:
                    assert np.isnan(got["auroc"][i, lam]) and np.isnan(got["ap"][i, lam])
                v = valid[i]
                ref = metrics.depth_metrics(up[i, lam][v][None], depth[i][v][None])
                for k in ("rmse", "pearson", "spearman"):
                    assert masked[k][i, lam] == pytest.approx(ref[k][0], abs=1e-10), (k, H, h)
        np.testing.assert_allclose(metrics.auroc(up[:, 0], mask)[:3], got["auroc"][:3, 0])
        np.testing.assert_allclose(metrics.average_precision(up[:, 0], mask)[:3], got["ap"][:3, 0])


def test_depth_ratio_metrics_by_hand():
    gt = np.array([[[1.0, 2.0], [4.0, 10.0]]])
    pred = np.array([[[1.1, 3.0], [-1.0, 10.0]]])
    m = metrics.depth_ratio_metrics(pred, gt)
    assert m["absrel"][0] == pytest.approx((0.1 + 0.5 + 1.25 + 0) / 4)
    assert m["delta1"][0] == pytest.approx(2 / 4)                               # 1.1/1 ok, 3/2 no, −1 fails, 10 ok
    v = metrics.depth_ratio_metrics(pred, gt, valid=np.array([[[True, False], [False, True]]]))
    assert v["absrel"][0] == pytest.approx(0.05) and v["delta1"][0] == 1.0
