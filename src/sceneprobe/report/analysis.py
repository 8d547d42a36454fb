"""Every interpreted number of the report, with its 95 % paired-bootstrap CI and its verdict — computed once here,
written into ``results.csv`` (so the summary quotes only numbers that are in that table) and rendered by
:mod:`.summary`.

Rules (fixed in advance; the minimum effects are ``report.*`` in the config):

* **best site / step** of a group is chosen on the *validation* headline metric (saliency Dice; depth skill over the
  position-only baseline), reported with its *test* value and CI;
* **strongest baseline** of a task: the baseline with the best *validation* score (saliency: highest Dice among
  position-only probes, the mean map with a val threshold and all-salient; depth: lowest MSE among position-only
  probes and the mean map);
* **verdict** (:func:`sceneprobe.probe.stats.verdict`) on a difference with CI [lo, hi]: yes ⇔ lo > 0 and the mean
  ≥ the minimum effect; no ⇔ hi < the minimum effect; else inconclusive. Saliency differences are in Dice
  (``report.min_dice``); depth differences are in skill (``report.min_skill``): against a baseline,
  ``1 − ΣMSE(probe)/ΣMSE(baseline)``; between two probes, the difference of their skills over the position-only
  baseline;
* **from step k**: the first step whose *validation* gain over the position-only baseline (Dice − Dice(position-only);
  depth: skill) reaches ``report.step_fraction`` × the best step's gain; reported with that step's test gain (CI) and
  its test difference to the best step (CI).

All CIs resample test images (the same images for both arms of a difference), ``report.n_boot`` times, seeded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..config import ReportConfig
from ..probe import stats
from ..probe.baselines import ALL_SALIENT, BASELINE_MODEL, MEAN_MAP
from ..probe.metrics import HEADLINE
from ..probe.layout import base_model, is_plain, plain_model
from ..probe.sweep import _fmt_value, per_image_key
from . import emergence as emg

TASKS = ("depth", "saliency")
CONTROLS = ("permuted", "fresh")
MAIN_MODEL = "ldm"
FAMILIES = ("unet", "vae.dec", "vae.enc", "input")
EST_TAG = "-vs-"             # metric names of comparison rows the report adds to results.csv


def family(site: str) -> str:
    """'unet' / 'vae.enc' / 'vae.dec' from a canonical name (``vae.dec.mid.attn0``) or a raw path."""
    if site.startswith("vae.enc") or site.startswith("vae:encoder"):
        return "vae.enc"
    if site.startswith("vae"):
        return "vae.dec"
    for sep in (".", ":"):
        if sep in site:
            return site.split(sep, 1)[0]
    return site


def group_label(model: str, fam: str) -> str:
    names = {("ldm", "unet"): "U-Net", ("ldm", "vae.dec"): "VAE decoder (mid self-attention)",
             ("ldm", "vae.enc"): "VAE encoder (clean image, step-independent)",
             ("permuted", "unet"): "U-Net, permuted weights", ("fresh", "unet"): "U-Net, fresh init",
             ("permuted", "vae.dec"): "VAE decoder on the permuted U-Net's latents",
             ("fresh", "vae.dec"): "VAE decoder on the fresh U-Net's latents",
             ("ldm", "input"): "input x_t (5×5 neighbourhood; the input control)"}
    return names.get((model, fam), f"{model} / {fam}")


def baseline_label(site: str) -> str:
    if site == MEAN_MAP:
        return "mean map (val threshold)"
    if site == ALL_SALIENT:
        return "all-salient"
    return f"position-only probe {site.split('@', 1)[1]}"


@dataclass(frozen=True)
class Point:
    model: str
    site: str
    step: int
    timestep: int
    val: float
    test: float


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


class Results:
    """Index of long-form result rows: (protocol, model, site, step, task, split, metric) → value."""

    def __init__(self, rows: list[dict], plain: bool = False):
        """``plain``: index the probes fitted without the layout prior (``<model>.noprior``) under their base model
        names (the baselines as they are); default: the layout-fair probes, the plain ones left out."""
        rows = [r for r in rows if EST_TAG not in r["metric"]]
        if plain:
            rows = [{**r, "model": base_model(r["model"])} for r in rows
                    if is_plain(r["model"]) or r["model"] == BASELINE_MODEL]
        else:
            rows = [r for r in rows if not is_plain(r["model"])]
        self.rows = rows
        self.plain = plain
        self.v = {(r["protocol"], r["model"], r["site"], r["step"], r["task"], r["split"], r["metric"]): r["value"]
                  for r in self.rows}
        self.timestep = {(r["protocol"], r["model"], r["step"]): r["timestep"] for r in self.rows}
        self.protocols = sorted({r["protocol"] for r in self.rows})
        self.edge = {(r["protocol"], r["model"], r["site"], r["step"], r["task"]): r.get("lambda_edge", "")
                     for r in self.rows if r["model"] != BASELINE_MODEL}

    def models(self, protocol: str) -> list[str]:
        ms = {r["model"] for r in self.rows if r["protocol"] == protocol and r["model"] != BASELINE_MODEL}
        order = [MAIN_MODEL, *CONTROLS]
        return sorted(ms, key=lambda m: (order.index(m) if m in order else len(order), m))

    def groups(self, protocol: str) -> list[tuple[str, str]]:
        """(model, family) pairs; the encoder only for the main model (a control's encoder is the same network)."""
        out = []
        for m in self.models(protocol):
            fams = {family(r["site"]) for r in self.rows if r["protocol"] == protocol and r["model"] == m}
            out += [(m, f) for f in FAMILIES if f in fams and (f != "vae.enc" or m == MAIN_MODEL)]
            out += [(m, f) for f in sorted(fams - set(FAMILIES))]
        return out

    def sites(self, protocol: str, model: str, fam: str | None = None) -> list[str]:
        return sorted({r["site"] for r in self.rows if r["protocol"] == protocol and r["model"] == model
                       and (fam is None or family(r["site"]) == fam)})

    def steps(self, protocol: str, model: str | None = None, fam: str | None = None) -> list[int]:
        return sorted({r["step"] for r in self.rows if r["protocol"] == protocol and r["model"] != BASELINE_MODEL
                       and (model is None or r["model"] == model) and (fam is None or family(r["site"]) == fam)})

    def get(self, protocol, model, site, step, task, split, metric=None) -> float | None:
        return self.v.get((protocol, model, site, step, task, split, metric or HEADLINE[task]))

    def baseline(self, protocol: str, site: str, task: str, split: str = "test", metric: str | None = None):
        return self.get(protocol, BASELINE_MODEL, site, -1, task, split, metric)

    def baselines(self, protocol: str, task: str) -> list[str]:
        return sorted({r["site"] for r in self.rows if r["protocol"] == protocol and r["model"] == BASELINE_MODEL
                       and r["task"] == task})

    def point(self, protocol, model, site, step, task) -> Point | None:
        val = self.get(protocol, model, site, step, task, "val")
        test = self.get(protocol, model, site, step, task, "test")
        if val is None or test is None:
            return None
        return Point(model, site, step, self.timestep.get((protocol, model, step), -1), val, test)

    def curve(self, protocol: str, model: str, fam: str, task: str) -> list[Point]:
        """Per step, the site with the best *validation* headline metric (its test metric is what is reported)."""
        out = []
        for step in self.steps(protocol, model, fam):
            pts = [p for s in self.sites(protocol, model, fam) if (p := self.point(protocol, model, s, step, task))]
            pts = [p for p in pts if p.val == p.val]                          # NaN never wins
            if pts:
                out.append(max(pts, key=lambda p: (p.val, -p.step, p.site)))
        return out

    def best(self, protocol: str, model: str, fam: str, task: str, steps=None) -> Point | None:
        c = [p for p in self.curve(protocol, model, fam, task) if steps is None or p.step in steps]
        return max(c, key=lambda p: (p.val, -p.step)) if c else None

    def strongest_baseline(self, protocol: str, task: str) -> str | None:
        """The baseline with the best validation score (saliency: Dice; depth: lowest MSE)."""
        metric, sign = ("dice", 1) if task == "saliency" else ("mse", -1)
        c = [(sign * v, s) for s in self.baselines(protocol, task)
             if (v := self.baseline(protocol, s, task, "val", metric)) is not None and v == v]
        return max(c)[1] if c else None

    def edges(self, protocol: str, model: str) -> tuple[int, int, int]:
        """(probes whose val-chosen λ is the grid's smallest, ... largest, probes) over (site, step, task)."""
        keys = [k for k in self.edge if k[0] == protocol and k[1] == model]
        return (sum(1 for k in keys if self.edge[k] == "low"), sum(1 for k in keys if self.edge[k] == "high"),
                len(keys))


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


def val_gain(res: Results, protocol: str, p: Point, task: str, pos_site: str) -> float | None:
    """Validation gain over the position-only baseline: Dice − Dice(position-only); depth: skill (already a gain)."""
    if task == "depth":
        return p.val
    b = res.baseline(protocol, pos_site, task, "val", "dice")
    return None if b is None else p.val - b


def emergence_step(gains: list[tuple[Point, float]], fraction: float) -> tuple[Point, Point] | None:
    """(first point whose val gain ≥ fraction × the best val gain, best point); None without a positive gain."""
    good = [(p, g) for p, g in gains if g is not None and g == g]
    if not good:
        return None
    best_p, best_g = max(good, key=lambda x: (x[1], -x[0].step))
    if best_g <= 0:
        return None
    first = next(p for p, g in good if g >= fraction * best_g)
    return first, best_p


# ---------------------------------------------------------------------------------------------- one protocol
def thirds(steps: list[int]) -> tuple[list[int], list[int]]:
    """(early, late) steps: the first and the last third of sampling (at least one step each)."""
    k = max(1, len(steps) // 3)
    return steps[:k], steps[-k:]


def analyse_protocol(an: Analyzer, protocol: str, readout=None) -> dict:
    """Estimates (added to ``an.ests``) and the structured findings the summary renders for one protocol."""
    res = an.res
    f: dict = {"groups": {}, "strongest": {}, "encodes": {}, "controls": {}, "vae_enc": {}, "vae_dec_steps": {},
               "unet_vs_vae": {}, "emergence": {}, "readout": {}, "edges": {}, "baselines": {}, "vs_input": {}}
    groups = res.groups(protocol)
    f["positions"] = {s: an.position(protocol, s) for m in res.models(protocol) for s in res.sites(protocol, m)}
    steps = res.steps(protocol, MAIN_MODEL, "unet") or res.steps(protocol)
    early, late = thirds(steps)
    f["steps"], f["early"], f["late"] = steps, early, late
    for m in res.models(protocol):
        f["edges"][m] = res.edges(protocol, m)
    for task in TASKS:
        strongest = res.strongest_baseline(protocol, task)
        f["strongest"][task] = strongest
        f["baselines"][task] = {s: res.baseline(protocol, s, task) for s in res.baselines(protocol, task)}
        for model, fam in groups:
            best = res.best(protocol, model, fam, task)
            if best is None:
                continue
            g = f["groups"].setdefault((model, fam), {})
            g[task] = {"best": best, "headline": an.ests_add(an.headline(protocol, best, task))}
            if strongest is not None:
                g[task]["vs_strongest"] = an.ests_add(an.vs_baseline(protocol, best, task, strongest))
            if task == "depth":
                for kind in ("centred", "ssi"):
                    g[task][kind] = an.ests_add(an.relative_skill(protocol, best, kind))
        u = f["groups"].get((MAIN_MODEL, "unet"), {}).get(task)
        if u and strongest is not None:
            f["encodes"][task] = u["vs_strongest"]
        # controls: the main model's group against the same family of each control model
        for model, fam in groups:
            main = f["groups"].get((MAIN_MODEL, fam), {}).get(task)
            other = f["groups"].get((model, fam), {}).get(task)
            if model != MAIN_MODEL and main and other:
                f["controls"].setdefault(task, {})[(model, fam)] = an.ests_add(
                    an.vs_probe(protocol, main["best"], other["best"], task, f"{model}:{other['best'].site}"
                                f"@{other['best'].step}"))
        enc = f["groups"].get((MAIN_MODEL, "vae.enc"), {}).get(task)
        if enc and strongest is not None:
            f["vae_enc"][task] = enc["vs_strongest"]
        if (MAIN_MODEL, "vae.dec") in groups and strongest is not None:
            f["vae_dec_steps"][task] = [an.ests_add(an.vs_baseline(protocol, p, task, strongest))
                                        for p in res.curve(protocol, MAIN_MODEL, "vae.dec", task)]
            for name, window in (("early", early), ("late", late)):
                pu = res.best(protocol, MAIN_MODEL, "unet", task, window)
                pv = res.best(protocol, MAIN_MODEL, "vae.dec", task, window)
                if pu and pv:
                    f["unet_vs_vae"].setdefault(task, {})[name] = an.ests_add(
                        an.vs_probe(protocol, pu, pv, task, f"vae.dec:{pv.site}@{pv.step}"))
        # the input control: what a linear read of x_t (5×5 neighbourhood, with the layout) already gives
        inp = f["groups"].get((MAIN_MODEL, "input"), {}).get(task)
        if inp:
            for fam in ("unet", "vae.dec"):
                other = f["groups"].get((MAIN_MODEL, fam), {}).get(task)
                if other:
                    f["vs_input"].setdefault(task, {})[fam] = an.ests_add(an.vs_probe(
                        protocol, other["best"], inp["best"], task, f"input:{inp['best'].site}@{inp['best'].step}"))
            by_step = {p.step: p for p in res.curve(protocol, MAIN_MODEL, "input", task)}
            f["vs_input"].setdefault(task, {})["steps"] = [
                (p.step, an.ests_add(an.vs_probe(protocol, p, by_step[p.step], task, f"input@{p.step}")))
                for p in res.curve(protocol, MAIN_MODEL, "unet", task) if p.step in by_step]
        curve = res.curve(protocol, MAIN_MODEL, "unet", task)
        gains = [(p, val_gain(res, protocol, p, task, an.position(protocol, p.site))) for p in curve]
        em = emergence_step(gains, an.rc.step_fraction)
        if em is not None:
            k, best = em
            fractions = sorted({*emg.FRACTIONS, an.rc.step_fraction})
            points = {fr: e[0] for fr in fractions if (e := emergence_step(gains, fr))}
            dists = {fr: an.k_dist(protocol, curve, task, fr) for fr in fractions}
            for fr, d in dists.items():       # into results.csv: k on val with the bootstrap interval of k
                if d is not None:
                    pt = points.get(fr)
                    an.ests_add(Est(protocol, MAIN_MODEL, "unet", -1, -1, task, f"k{EST_TAG}fraction{fr:g}",
                                    float(pt.step) if pt else math.nan, d.lo, d.hi))
            f["emergence"][task] = {"k": k, "best": best, "gain_k": an.ests_add(an.gain(protocol, k, task)),
                                    "gain_best": an.ests_add(an.gain(protocol, best, task)),
                                    "k_vs_best": an.ests_add(an.step_vs_best(protocol, k, best, task))
                                    if k.step != best.step else None,
                                    "curve": [(p, an.ests_add(an.headline(protocol, p, task))) for p in curve],
                                    "points": points, "dists": dists, "fraction": an.rc.step_fraction}
        if readout is not None and curve and len(readout.rows) == len(
                an.a.get(per_image_key(protocol, "test-rows"), [])):
            by_step = {p.step: p for p in curve}
            out = []
            for i, st in enumerate(readout.steps):
                p = by_step.get(st)
                r = an.readout(protocol, readout, i, task)
                d = an.vs_readout(protocol, p, readout, i, task) if p else None
                if r is not None:
                    out.append((st, an.ests_add(r), an.ests_add(d) if d else None))
            f["readout"][task] = out
    return f


def analyse(rows: list[dict], arrays: dict[str, np.ndarray], positions: dict[str, str], rc: ReportConfig,
            readouts: dict | None = None) -> tuple[Results, Analyzer, dict]:
    """(results index, analyzer holding every estimate in ``.ests``, {protocol: findings})."""
    res = Results(rows)
    an = Analyzer(res, arrays, rc, positions)
    findings = {p: analyse_protocol(an, p, (readouts or {}).get(p)) for p in res.protocols}
    plain = Results(rows, plain=True)       # the probes without the layout prior, by the same rules (for comparison)
    if any(r["model"] != BASELINE_MODEL for r in plain.rows):
        an_p = Analyzer(plain, arrays, rc, positions)
        for p in plain.protocols:
            if p in findings:
                findings[p]["noprior"] = analyse_protocol(an_p, p, None)
        an.ests += an_p.ests
    return res, an, findings


def merge_rows(rows: list[dict], ests: list[Est]) -> list[dict]:
    """The sweep's rows with the CIs filled in (lo, hi of the row an estimate belongs to) and the comparison rows
    appended; old comparison rows and CIs are dropped first, so the report can be rewritten any number of times."""
    import math
    out = {}
    for r in rows:
        if EST_TAG in r["metric"] or r["model"] in ("readout", "intervention"):        # the report's own rows
            continue
        out[(r["protocol"], r["model"], r["site"], r["step"], r["task"], r["split"], r["metric"])] = \
            {**r, "lo": math.nan, "hi": math.nan}
    for e in ests:
        e.mean, e.lo, e.hi = (_fmt_value(x) for x in (e.mean, e.lo, e.hi))   # what results.csv shows
        key = (e.protocol, e.model, e.site, e.step, e.task, "test", e.metric)
        if key in out and EST_TAG not in e.metric:
            out[key]["lo"], out[key]["hi"] = e.lo, e.hi
            e.mean = out[key]["value"]            # quote the table's own (rounded) value
        else:
            out[key] = e.row()
    return list(out.values())


# ---------------------------------------------------------------------------------------------- interventions
def _verdict_blocks(node, path=()):
    """Every dict in the interventions summary that holds a verdict of :func:`sceneprobe.intervene.verdicts
    .edit_verdict` (keys ``answer``, ``gain``, ``probe_minus``), with its path of keys."""
    if isinstance(node, dict):
        if {"answer", "gain", "probe_minus"} <= set(node):
            yield path, node
            return
        for k, v in node.items():
            yield from _verdict_blocks(v, path + (str(k),))


KIND_WORDS = {"attn": "edits of the attention output", "block": "edits of the residual stream"}


def intervention_claims(summary: dict | None) -> tuple[list[dict], list[Est]]:
    """Claims for the paper table and result rows from ``interventions/results.json`` (or ``summary.json``), written
    by the intervention stage, which computes the gains, CIs and verdicts; the report only quotes them."""
    if not summary:
        return [], []
    protocol = summary.get("protocol", "generate")
    claims, ests = [], []
    for path, v in _verdict_blocks(summary):
        task = next((p for p in path if p in TASKS), None)
        if task is None:
            continue
        where = "/".join(p for p in path if p not in (task, "kinds", "tasks", "verdict", "verdicts")) or "attn"
        g = v["gain"].get("probe")
        s = v.get("strongest_control")
        d = v["probe_minus"].get(s) if s else None
        for metric, est in (("gain", g), (f"gain{EST_TAG}{s}", d)):
            if est:
                ests.append(Est(protocol, "intervention", where, -1, -1, task, metric,
                                *(_fmt_value(float(est.get(k, math.nan))) for k in ("mean", "lo", "hi"))))
        e_g, e_d = (ests[-2], ests[-1]) if g and d else (ests[-1] if g else None, None)
        text = f"{v.get('metric', 'gain')} {_fmt_est(e_g)}" + \
            (f"; probe − strongest control ({s}) {_fmt_est(e_d)}" if e_d else "")
        claims.append({"protocol": protocol, "claim": "moves the object" if task == "saliency" else "changes depth",
                       "where": KIND_WORDS.get(where, where),
                       "task": task, "text": text, "answer": v.get("answer", "inconclusive")})
    return claims, ests


def _fmt_est(e: Est | None) -> str:
    if e is None or e.mean != e.mean:
        return "n/a"
    if e.lo != e.lo or e.hi != e.hi:
        return f"{e.mean:.3f}"
    return f"{e.mean:.3f} [{e.lo:.3f}, {e.hi:.3f}]"
