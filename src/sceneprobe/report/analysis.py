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

The pieces: :mod:`.results_index` (the rows, the val-chosen best probes), :mod:`.estimates` (each number with its CI
and verdict), this module (the findings of each protocol by the rules above), :mod:`.intervention_claims` (the edits'
claims, quoted from the intervention stage).
"""
from __future__ import annotations

import math

import numpy as np

from ..config import ReportConfig
from ..probe.baselines import BASELINE_MODEL
from ..probe.sweep import _fmt_value, per_image_key
from . import emergence as emg
from .estimates import Analyzer, Est
from .results_index import EST_TAG, MAIN_MODEL, TASKS, Point, Results, is_prompt_baseline


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
               "unet_vs_vae": {}, "emergence": {}, "readout": {}, "edges": {}, "baselines": {}, "vs_input": {},
               "text": {}}
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
        # the text as a control (pipeline studies): the U-Net against the strongest text-free baseline, the
        # strongest prompt-only probe (what the prompt alone predicts, with the layout) and its unconditional half
        if u:
            text = {}
            no_text = res.strongest_baseline(protocol, task, keep=lambda s: not is_prompt_baseline(s))
            prompt = res.strongest_baseline(protocol, task, keep=is_prompt_baseline)
            if prompt is not None:
                text["layout"] = an.ests_add(an.vs_baseline(protocol, u["best"], task, no_text)) if no_text else None
                text["prompt"] = an.ests_add(an.vs_baseline(protocol, u["best"], task, prompt))
                text["prompt_site"], text["layout_site"] = prompt, no_text
            if ("uncond", "unet") in f["controls"].get(task, {}):
                text["uncond"] = f["controls"][task][("uncond", "unet")]
            if text:
                f["text"][task] = text
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
