"""The report's interpreted numbers: :class:`Est` (one number with its 95 % paired-bootstrap CI, the results.csv
row it belongs to and, for a difference, its verdict) and :class:`Analyzer`, which computes them from the per-test-image
arrays — headlines, differences to baselines, to other probes and to the image read-out, gains by step.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import ReportConfig
from ..probe import stats
from ..probe.baselines import BASELINE_MODEL, MEAN_MAP
from ..probe.layout import is_plain, plain_model
from ..probe.metrics import HEADLINE
from ..probe.sweep import per_image_key
from . import emergence as emg
from .results_index import EST_TAG, Point, Results


@dataclass
class Est:
    """One interpreted number: its CI, the row it belongs to in results.csv, and (for differences) a verdict."""
    protocol: str
    model: str
    site: str
    step: int
    timestep: int
    task: str
    metric: str              # results.csv metric; a difference: "<metric>-minus-<reference>"
    mean: float
    lo: float
    hi: float
    min_effect: float | None = None
    verdict: str | None = None

    @property
    def ci(self) -> dict:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi}

    def row(self) -> dict:
        return {"protocol": self.protocol, "model": self.model, "site": self.site, "step": self.step,
                "timestep": self.timestep, "task": self.task, "split": "test", "metric": self.metric,
                "value": self.mean, "lo": self.lo, "hi": self.hi, "lambda_edge": ""}


class Analyzer:
    """Computes the estimates of one protocol from the result rows and the per-test-image arrays."""

    def __init__(self, res: Results, arrays: dict[str, np.ndarray], rc: ReportConfig, positions: dict[str, str]):
        self.res, self.a, self.rc = res, arrays, rc
        self.positions = positions      # "protocol/site" → its position-only baseline's site name
        self.ests: list[Est] = []

    # ------------------------------------------------------------------ per-image arrays
    def arr(self, protocol, model, site, step, task, metric) -> np.ndarray | None:
        if self.res.plain and model not in (BASELINE_MODEL, "readout"):
            model = plain_model(model)
        return self.a.get(per_image_key(protocol, model, site, step, task, metric))

    def position(self, protocol: str, site: str) -> str:
        return self.positions.get(f"{protocol}/{site}", MEAN_MAP)

    def _boot(self, fn, arrays) -> dict:
        return stats.bootstrap_sums(fn, arrays, self.rc.n_boot, self.rc.boot_seed, self.rc.ci_level)

    def _mean(self, a, b=None) -> dict:
        return stats.paired_bootstrap(a, b, self.rc.n_boot, self.rc.boot_seed, self.rc.ci_level)

    def ests_add(self, e: Est) -> Est:
        if self.res.plain and e.model not in (BASELINE_MODEL, "readout") and not is_plain(e.model):
            e.model = plain_model(e.model)             # results.csv rows of the plain probes keep their own name
        self.ests.append(e)
        return e

    def min_effect(self, task: str) -> float:
        return self.rc.min_dice if task == "saliency" else self.rc.min_skill

    # ------------------------------------------------------------------ estimates
    def headline(self, protocol: str, p: Point, task: str) -> Est:
        """The test headline of a probe with its CI (Dice, or skill over its position-only baseline)."""
        if task == "saliency":
            ci = self._mean(self.arr(protocol, p.model, p.site, p.step, task, "dice"))
        else:
            ci = self._skill([(protocol, p.model, p.site, p.step)], [(protocol, BASELINE_MODEL,
                                                                       self.position(protocol, p.site), -1)])
        return Est(protocol, p.model, p.site, p.step, p.timestep, task, HEADLINE[task], **_ci(ci))

    def _skill(self, num: list[tuple], den: list[tuple], metric: str = "mse") -> dict:
        """Skill 1 − ΣMSE(num[0]) / ΣMSE(den[0]); with two of each, skill(num[0]/den[0]) − skill(num[1]/den[1]).
        ``metric``: "mse", or "mse_centred" / "mse_ssi" for the offset- / scale-and-shift-invariant skills."""
        arrs = [self.arr(*k, "depth", metric) for k in num + den]
        if any(a is None for a in arrs):
            return _nan()
        if len(num) == 1:
            return self._boot(lambda p, r: 1 - p / r, arrs)
        return self._boot(lambda p, q, r, s: (1 - p / r) - (1 - q / s), [arrs[0], arrs[1], arrs[2], arrs[3]])

    def vs_baseline(self, protocol: str, p: Point, task: str, base: str) -> Est:
        """Probe − baseline (saliency: Dice difference; depth: skill of the probe over that baseline)."""
        if task == "saliency":
            ci = self._mean(self.arr(protocol, p.model, p.site, p.step, task, "dice"),
                            self.arr(protocol, BASELINE_MODEL, base, -1, task, "dice"))
        else:
            ci = self._skill([(protocol, p.model, p.site, p.step)], [(protocol, BASELINE_MODEL, base, -1)])
        metric = f"{HEADLINE[task]}{EST_TAG}baseline:{base}"
        return self._verdict(Est(protocol, p.model, p.site, p.step, p.timestep, task, metric, **_ci(ci)), task)

    def vs_probe(self, protocol: str, p: Point, q: Point, task: str, tag: str) -> Est:
        """Probe p − probe q on the same test images (Dice difference; depth: difference of skills)."""
        if task == "saliency":
            ci = self._mean(self.arr(protocol, p.model, p.site, p.step, task, "dice"),
                            self.arr(protocol, q.model, q.site, q.step, task, "dice"))
        else:
            ci = self._skill([(protocol, p.model, p.site, p.step), (protocol, q.model, q.site, q.step)],
                             [(protocol, BASELINE_MODEL, self.position(protocol, p.site), -1),
                              (protocol, BASELINE_MODEL, self.position(protocol, q.site), -1)])
        metric = f"{HEADLINE[task]}{EST_TAG}{tag}"
        return self._verdict(Est(protocol, p.model, p.site, p.step, p.timestep, task, metric, **_ci(ci)), task)

    def relative_skill(self, protocol: str, p: Point, kind: str) -> Est:
        """Depth skill over the position-only baseline on the centred (``kind`` "centred") or scale-and-shift-
        invariant ("ssi") error, with its CI (row ``skill_<kind>``)."""
        ci = self._skill([(protocol, p.model, p.site, p.step)],
                         [(protocol, BASELINE_MODEL, self.position(protocol, p.site), -1)], f"mse_{kind}")
        return Est(protocol, p.model, p.site, p.step, p.timestep, "depth", f"skill_{kind}", **_ci(ci))

    def k_dist(self, protocol: str, curve: list[Point], task: str, fraction: float) -> emg.KDist | None:
        """Bootstrap distribution of the emergence step over the val-chosen sites of ``curve`` (test images)."""
        steps = [p.step for p in curve]
        if task == "saliency":
            d = [self.arr(protocol, p.model, p.site, p.step, task, "dice") for p in curve]
            b = [self.arr(protocol, BASELINE_MODEL, self.position(protocol, p.site), -1, task, "dice") for p in curve]
            if any(x is None for x in d + b):
                return None
            kind, parts = "mean", [np.stack([x - y for x, y in zip(d, b)])]
        else:
            m = [self.arr(protocol, p.model, p.site, p.step, task, "mse") for p in curve]
            r = [self.arr(protocol, BASELINE_MODEL, self.position(protocol, p.site), -1, task, "mse") for p in curve]
            if any(x is None for x in m + r):
                return None
            kind, parts = "skill", [np.stack(m), np.stack(r)]
        return emg.k_distribution(kind, parts, steps, fraction, self.rc.n_boot, self.rc.boot_seed, self.rc.ci_level)

    def gain(self, protocol: str, p: Point, task: str) -> Est:
        """Gain over the position-only baseline at the probe's resolution (saliency: Dice difference; depth: skill)."""
        return self.vs_baseline(protocol, p, task, self.position(protocol, p.site))

    def step_vs_best(self, protocol: str, p: Point, best: Point, task: str) -> Est:
        """Gain at step p − gain at the best step (each over its own position-only baseline), same test images."""
        if task == "saliency":
            pa, pb = self.position(protocol, p.site), self.position(protocol, best.site)
            a = self.arr(protocol, p.model, p.site, p.step, task, "dice") - \
                self.arr(protocol, BASELINE_MODEL, pa, -1, task, "dice")
            b = self.arr(protocol, best.model, best.site, best.step, task, "dice") - \
                self.arr(protocol, BASELINE_MODEL, pb, -1, task, "dice")
            ci = self._mean(a, b)
        else:
            ci = self._skill([(protocol, p.model, p.site, p.step), (protocol, best.model, best.site, best.step)],
                             [(protocol, BASELINE_MODEL, self.position(protocol, p.site), -1),
                              (protocol, BASELINE_MODEL, self.position(protocol, best.site), -1)])
        return Est(protocol, p.model, p.site, p.step, p.timestep, task, f"gain{EST_TAG}step{best.step}", **_ci(ci))

    def readout(self, protocol: str, ro, step_index: int, task: str) -> Est | None:
        """The image read-out at one step: saliency Dice (CI); depth skill over the mean map (CI)."""
        step, ts = ro.steps[step_index], ro.timesteps[step_index]
        if task == "saliency":
            v = ro.values.get(("saliency", "dice"))
            ci = None if v is None else self._mean(v[step_index])
        else:
            v, m = ro.values.get(("depth", "mse")), self.arr(protocol, BASELINE_MODEL, MEAN_MAP, -1, "depth", "mse")
            ci = None if v is None or m is None else self._boot(lambda p, r: 1 - p / r, [v[step_index], m])
        if ci is None:
            return None
        return Est(protocol, "readout", getattr(ro, "site", "labeller(x0)"), step, ts, task, HEADLINE[task], **_ci(ci))

    def vs_readout(self, protocol: str, p: Point, ro, step_index: int, task: str) -> Est | None:
        """Probe − image read-out at the same step (saliency: Dice; depth: skill difference over the mean map,
        (ΣMSE_readout − ΣMSE_probe) / ΣMSE_mean-map)."""
        if task == "saliency":
            v = ro.values.get(("saliency", "dice"))
            if v is None:
                return None
            ci = self._mean(self.arr(protocol, p.model, p.site, p.step, task, "dice"), v[step_index])
        else:
            v, m = ro.values.get(("depth", "mse")), self.arr(protocol, BASELINE_MODEL, MEAN_MAP, -1, "depth", "mse")
            pm = self.arr(protocol, p.model, p.site, p.step, task, "mse")
            if v is None or m is None or pm is None:
                return None
            ci = self._boot(lambda a, r, mm: (r - a) / mm, [pm, v[step_index], m])
        e = Est(protocol, p.model, p.site, p.step, p.timestep, task, f"{HEADLINE[task]}{EST_TAG}readout", **_ci(ci))
        return self._verdict(e, task)

    def _verdict(self, e: Est, task: str) -> Est:
        e.min_effect = self.min_effect(task)
        e.verdict = stats.verdict(e.ci, e.min_effect)
        return e


def _ci(d: dict) -> dict:
    return {"mean": float(d["mean"]), "lo": float(d["lo"]), "hi": float(d["hi"])}


def _nan() -> dict:
    return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
