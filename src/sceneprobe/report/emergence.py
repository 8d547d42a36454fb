"""From which step does the scene appear — with uncertainty.

The emergence step at fraction f is the first step whose gain over the position-only baseline reaches f × the
largest gain over the steps (saliency: Dice − Dice(position-only); depth: skill over it). The report's point k is
chosen on val (:func:`sceneprobe.report.analysis.emergence_step`). How firm it is comes from the test images: on
each bootstrap resample (the same seeded resamples as every CI of the report) the per-step test gains of the
val-chosen sites are recomputed and k is found again, which gives a distribution of k — its mode, a 95 % interval
and the probability that k falls in a window of steps (e.g. the first third of sampling). A resample on which no
step gains (every gain ≤ 0) has no k; it is counted as "none".

Stated rule for a claim "present by step s": **yes** when the interval's upper end is ≤ s, **no** when its lower end
is > s, else **inconclusive** (a claim is not tested when the probe does not encode the property at all).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..probe.stats import resample_indices

FRACTIONS = (0.5, 0.75, 0.9)          # the sensitivity the report shows beside ``report.step_fraction``


@dataclass
class KDist:
    """The bootstrap distribution of the emergence step at one fraction."""
    fraction: float
    steps: list[int]
    probs: dict[int, float]           # step → share of resamples whose k is that step
    p_none: float                     # share of resamples with no positive gain
    lo: float                         # percentile interval of k (over resamples that have one); NaN if none
    hi: float
    mode: int | None

    def p_by(self, step: int) -> float:
        """P(k ≤ step) over all resamples (a resample without k counts as not by ``step``)."""
        return float(sum(p for s, p in self.probs.items() if s <= step))


def step_gains(kind: str, parts: list[np.ndarray], idx: np.ndarray) -> np.ndarray:
    """Per-step gains on every resample: (S, B).

    ``kind`` "mean": ``parts = [d]`` with d (S, n) per-image gains (e.g. Dice − Dice(position-only)); "skill":
    ``parts = [mse, mse_ref]`` (S, n) each, gain = 1 − Σ mse / Σ mse_ref over the resampled images."""
    if kind == "mean":
        return parts[0][:, idx].mean(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1.0 - parts[0][:, idx].sum(-1) / parts[1][:, idx].sum(-1)


def first_steps(gains: np.ndarray, steps: list[int], fraction: float) -> np.ndarray:
    """k per column of ``gains`` (S, B): the first step whose gain ≥ fraction × the column's best; −1 if best ≤ 0."""
    best = np.nanmax(np.where(np.isfinite(gains), gains, -np.inf), axis=0)                  # (B,)
    ok = np.isfinite(gains) & (gains >= fraction * best[None])                              # (S, B)
    first = np.argmax(ok, axis=0)
    k = np.asarray(steps)[first]
    return np.where(best > 0, k, -1)


def k_distribution(kind: str, parts: list[np.ndarray], steps: list[int], fraction: float, n_boot: int,
                   seed: int, level: float = 0.95) -> KDist:
    """The bootstrap distribution of k for per-image arrays ``parts`` (S, n) (see :func:`step_gains`)."""
    xs = [np.asarray(p, dtype=np.float64) for p in parts]
    keep = np.logical_and.reduce([np.isfinite(x).all(0) for x in xs])                     # images finite everywhere
    xs = [x[:, keep] for x in xs]
    n = xs[0].shape[1]
    if n < 2:
        return KDist(fraction, list(steps), {}, 1.0, float("nan"), float("nan"), None)
    ks = first_steps(step_gains(kind, xs, resample_indices(n, n_boot, seed)), steps, fraction)   # (B,)
    have = ks[ks >= 0]
    probs = {int(s): float((ks == s).mean()) for s in steps if (ks == s).any()}
    if len(have):
        lo = np.percentile(have, 50 * (1 - level), method="lower")               # steps are discrete: the
        hi = np.percentile(have, 50 * (1 + level), method="higher")              # interval's ends are steps
        vals, counts = np.unique(have, return_counts=True)
        mode = int(vals[np.argmax(counts)])
    else:
        lo = hi = float("nan")
        mode = None
    return KDist(fraction, list(steps), probs, float((ks < 0).mean()), float(lo), float(hi), mode)


def by_step_verdict(d: KDist, step: int) -> str:
    """The stated rule for "present by ``step``": yes ⇔ hi ≤ step; no ⇔ lo > step (or no k at all); else inconclusive."""
    if d.mode is None:
        return "no"
    if d.hi <= step:
        return "yes"
    if d.lo > step:
        return "no"
    return "inconclusive"
