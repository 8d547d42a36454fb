"""Paired bootstrap against a numpy reference, and the verdict rule on planted data in both directions."""
import numpy as np
import pytest

from sceneprobe.errors import SceneprobeError
from sceneprobe.probe.stats import bootstrap_stat, paired_bootstrap, verdict


def _reference(d, n_boot, seed, level):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    boots = d[idx].mean(axis=1)
    return d.mean(), np.percentile(boots, 50 * (1 - level)), np.percentile(boots, 50 * (1 + level))


def test_paired_bootstrap_matches_numpy_reference():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.8, 0.1, 50), rng.normal(0.7, 0.1, 50)
    est = paired_bootstrap(a, b, n_boot=1000, seed=7, level=0.9)
    m, lo, hi = _reference(a - b, 1000, 7, 0.9)
    assert est["mean"] == pytest.approx(m) and est["lo"] == pytest.approx(lo) and est["hi"] == pytest.approx(hi)
    one = paired_bootstrap(a, n_boot=1000, seed=7)
    assert (one["mean"], one["lo"], one["hi"]) == pytest.approx(_reference(a, 1000, 7, 0.95))
    assert paired_bootstrap(a, b, seed=1) == paired_bootstrap(a, b, seed=1)            # seeded


def test_paired_bootstrap_pairing_narrows_the_interval():
    rng = np.random.default_rng(0)
    shared = rng.normal(0, 0.2, 200)                                           # image difficulty, common to both
    a, b = 0.7 + shared + rng.normal(0, 0.01, 200), 0.68 + shared + rng.normal(0, 0.01, 200)
    paired = paired_bootstrap(a, b)
    unpaired = paired_bootstrap(a, b[rng.permutation(200)])
    assert paired["lo"] > 0 and paired["hi"] - paired["lo"] < 0.2 * (unpaired["hi"] - unpaired["lo"])


def test_paired_bootstrap_drops_nan_pairs_and_checks_shapes():
    est = paired_bootstrap([1.0, np.nan, 3.0], [0.0, 0.0, 1.0])
    assert est["n"] == 2 and est["mean"] == pytest.approx(1.5)
    with pytest.raises(SceneprobeError):
        paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(SceneprobeError):
        paired_bootstrap(np.zeros((2, 2)))


def test_bootstrap_stat_of_a_ratio_matches_reference():
    rng = np.random.default_rng(1)
    mp, mb = rng.uniform(0.2, 0.4, 40), rng.uniform(0.5, 0.9, 40)
    fn = lambda p, b: 1 - p.sum() / b.sum()
    est = bootstrap_stat(fn, [mp, mb], n_boot=500, seed=2)
    idx = np.random.default_rng(2).integers(0, 40, size=(500, 40))
    boots = np.array([fn(mp[i], mb[i]) for i in idx])
    assert est["mean"] == pytest.approx(fn(mp, mb))
    assert (est["lo"], est["hi"]) == pytest.approx(tuple(np.percentile(boots, [2.5, 97.5])))


def _planted(effect, n=64, noise=0.05, seed=0):
    """Per-image probe and baseline scores whose true mean difference is ``effect``."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.3, 0.6, n)
    return base + effect + rng.normal(0, noise, n), base


def test_verdict_real_effect_is_yes():
    assert verdict(paired_bootstrap(*_planted(0.15)), 0.05) == "yes"


def test_verdict_no_effect_is_not_yes():
    v = verdict(paired_bootstrap(*_planted(0.0)), 0.05)
    assert v != "yes" and v == "no"                                            # CI ⊂ (−0.02, 0.02) < 0.05


def test_verdict_effect_inside_ci_is_inconclusive():
    # true effect 0.05 but very noisy images: CI spans both 0 and the minimum
    assert verdict(paired_bootstrap(*_planted(0.05, n=16, noise=0.3, seed=4)), 0.05) == "inconclusive"


def test_verdict_baseline_beating_probe_is_no():
    assert verdict(paired_bootstrap(*_planted(-0.1)), 0.05) == "no"


def test_verdict_small_but_real_effect_is_not_yes():
    # resolvable from 0 but below the minimum effect: "no" (an effect as large as the minimum is excluded)
    est = paired_bootstrap(*_planted(0.01, n=400, noise=0.01))
    assert est["lo"] > 0 and verdict(est, 0.05) == "no"


def test_verdict_rule_edges():
    assert verdict({"mean": 0.06, "lo": 0.001, "hi": 0.1}, 0.05) == "yes"
    assert verdict({"mean": 0.04, "lo": 0.001, "hi": 0.1}, 0.05) == "inconclusive"
    assert verdict({"mean": 0.06, "lo": -0.001, "hi": 0.1}, 0.05) == "inconclusive"
    assert verdict({"mean": 0.0, "lo": float("nan"), "hi": float("nan")}, 0.05) == "inconclusive"
    with pytest.raises(SceneprobeError):
        verdict({"mean": 0.1, "lo": 0.0, "hi": 0.2}, -1)


def test_bootstrap_sums_skill_matches_reference_and_pairs_with_means():
    from sceneprobe.probe.stats import bootstrap_sums
    rng = np.random.default_rng(4)
    mp, mb = rng.uniform(0.2, 0.4, 30), rng.uniform(0.5, 0.9, 30)
    est = bootstrap_sums(lambda p, r: 1 - p / r, [mp, mb], n_boot=800, seed=3)
    ref = bootstrap_stat(lambda p, r: 1 - p.sum() / r.sum(), [mp, mb], n_boot=800, seed=3)
    assert (est["mean"], est["lo"], est["hi"]) == pytest.approx((ref["mean"], ref["lo"], ref["hi"]))
    # a mean is a sum / n: same resamples as paired_bootstrap
    a = bootstrap_sums(lambda s: s / 30, [mp], n_boot=800, seed=3)
    b = paired_bootstrap(mp, n_boot=800, seed=3)
    assert (a["lo"], a["hi"]) == pytest.approx((b["lo"], b["hi"]))
