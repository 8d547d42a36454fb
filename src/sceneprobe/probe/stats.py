"""Uncertainty and verdicts: a paired bootstrap over test images, and the rule that turns a CI into an answer.

Every number the report interprets is a mean over test images of a per-image metric (or a difference of two such
means on the *same* images). Its uncertainty comes from which images happened to be drawn, so we resample images
with replacement: ``B`` resamples of the image indices, the statistic on each, and the percentile interval
``[q_{(1−level)/2}, q_{(1+level)/2}]`` of the ``B`` values (``numpy.percentile``, linear interpolation). Resampling
the *same* indices for both arms (paired) keeps the between-image correlation, which is what makes a difference of
0.01 resolvable when both means move by 0.03 from image to image.

The verdict rule (:func:`verdict`), for an estimated effect ``d`` (e.g. probe − strongest baseline) with CI
``[lo, hi]`` and a minimum effect ``m ≥ 0`` fixed in the config before the run:

* **yes**: ``lo > 0`` and ``d ≥ m`` — the effect is resolvable from zero and at least as large as the minimum;
* **no**: ``hi < m`` — an effect as large as the minimum is excluded (this covers a negative effect, e.g. a baseline
  that beats the probe, and a real but too small one);
* **inconclusive**: anything else (the CI still admits both "none" and "big enough").
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..errors import fail

VERDICT_RULE = ("yes: the 95 % CI of the difference excludes 0 (lower bound > 0) and the mean difference is at "
                "least the minimum effect; no: the CI's upper bound is below the minimum effect (an effect that "
                "large is excluded, which includes a negative difference); inconclusive: otherwise.")


def _as_1d(a, name: str) -> np.ndarray:
    x = np.asarray(a, dtype=np.float64)
    if x.ndim != 1:
        raise fail(f"bootstrap input {name} must be one value per test image (1-D), got shape {x.shape}")
    return x


def resample_indices(n: int, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """(n_boot, n) image indices drawn with replacement from a seeded ``numpy.random.Generator``."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def paired_bootstrap(a, b=None, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of ``a − b`` (or of ``a`` when ``b`` is None) over images with a paired percentile bootstrap CI.

    ``a``, ``b``: per-test-image metric values (1-D, same images in the same order). Images where either value is
    NaN are dropped (both arms, so the pairing holds). Returns ``{"mean", "lo", "hi", "n"}``; with fewer than two
    images the interval is NaN.
    """
    x = _as_1d(a, "a")
    if b is not None:
        y = _as_1d(b, "b")
        if y.shape != x.shape:
            raise fail(f"paired bootstrap needs the same images in both arms, got {len(x)} and {len(y)} values")
        x = x - y
    x = x[np.isfinite(x)]
    n = len(x)
    if n == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    mean = float(x.mean())
    if n < 2:
        return {"mean": mean, "lo": float("nan"), "hi": float("nan"), "n": n}
    boots = x[resample_indices(n, n_boot, seed)].mean(axis=1)                 # (n_boot,)
    lo, hi = np.percentile(boots, [50 * (1 - level), 50 * (1 + level)])
    return {"mean": mean, "lo": float(lo), "hi": float(hi), "n": n}


def bootstrap_stat(fn: Callable[..., float], arrays: Sequence, n_boot: int = 2000, seed: int = 0,
                   level: float = 0.95) -> dict:
    """Percentile CI of any statistic ``fn(*arrays)`` of per-image arrays, resampling images jointly.

    For statistics that are not a mean of per-image values, e.g. skill ``1 − Σ MSE_probe / Σ MSE_prior``. Every
    array's first axis is the image; images with a NaN in any array are dropped. Returns ``{"mean", "lo", "hi",
    "n"}`` where ``mean`` is ``fn`` on all images.
    """
    xs = [np.asarray(a, dtype=np.float64) for a in arrays]
    n = len(xs[0])
    if any(len(x) != n for x in xs):
        raise fail(f"bootstrap arrays must share the image axis, got lengths {[len(x) for x in xs]}")
    keep = np.ones(n, dtype=bool)
    for x in xs:
        keep &= np.isfinite(x.reshape(n, -1)).all(axis=1)
    xs = [x[keep] for x in xs]
    n = int(keep.sum())
    if n == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    est = float(fn(*xs))
    if n < 2:
        return {"mean": est, "lo": float("nan"), "hi": float("nan"), "n": n}
    boots = np.array([fn(*[x[i] for x in xs]) for i in resample_indices(n, n_boot, seed)])
    lo, hi = np.nanpercentile(boots, [50 * (1 - level), 50 * (1 + level)])
    return {"mean": est, "lo": float(lo), "hi": float(hi), "n": n}


def bootstrap_sums(fn: Callable[..., np.ndarray], arrays: Sequence, n_boot: int = 2000, seed: int = 0,
                   level: float = 0.95) -> dict:
    """Percentile CI of a statistic of per-image *sums*, vectorised: ``fn(*sums)`` must accept arrays.

    E.g. depth skill ``1 − Σ MSE_probe / Σ MSE_prior`` is ``fn = lambda p, r: 1 − p / r`` on the arrays
    (MSE_probe, MSE_prior); a difference of two skills takes four arrays. Images with a NaN anywhere are dropped;
    each resample draws the same image indices for every array (paired). Same resamples as :func:`paired_bootstrap`
    for the same ``n``, ``n_boot`` and ``seed``.
    """
    xs = [np.asarray(a, dtype=np.float64) for a in arrays]
    n = len(xs[0])
    if any(x.shape != (n,) for x in xs):
        raise fail(f"bootstrap arrays must be one value per test image, got shapes {[x.shape for x in xs]}")
    keep = np.logical_and.reduce([np.isfinite(x) for x in xs])
    xs = [x[keep] for x in xs]
    n = int(keep.sum())
    if n == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    est = float(fn(*[x.sum() for x in xs]))
    if n < 2:
        return {"mean": est, "lo": float("nan"), "hi": float("nan"), "n": n}
    idx = resample_indices(n, n_boot, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        boots = np.asarray(fn(*[x[idx].sum(axis=1) for x in xs]), dtype=np.float64)
    lo, hi = np.nanpercentile(boots, [50 * (1 - level), 50 * (1 + level)])
    return {"mean": est, "lo": float(lo), "hi": float(hi), "n": n}


def verdict(est: dict, min_effect: float) -> str:
    """"yes" | "no" | "inconclusive" for an effect estimate ``{"mean", "lo", "hi"}`` (see the module docstring).

    yes ⇔ lo > 0 and mean ≥ min_effect; no ⇔ hi < min_effect; inconclusive otherwise (also for a NaN interval).
    """
    if min_effect < 0:
        raise fail(f"minimum effect must be ≥ 0, got {min_effect}")
    mean, lo, hi = (float(est[k]) for k in ("mean", "lo", "hi"))
    if np.isfinite(lo) and lo > 0 and mean >= min_effect:
        return "yes"
    if np.isfinite(hi) and hi < min_effect:
        return "no"
    return "inconclusive"


def fmt_ci(est: dict, digits: int = 3) -> str:
    """``0.812 [0.790, 0.833]`` — how the report prints an estimate with its CI."""
    return f"{est['mean']:.{digits}f} [{est['lo']:.{digits}f}, {est['hi']:.{digits}f}]"
