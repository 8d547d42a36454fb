"""Did the edit work? Scores per edit, paired bootstrap CIs over edits, the verdict rule, and a sentence in plain words.

Score of one generated output (the run's labeller labels it; "original" = the unedited output's label, "counterfactual"
= that label moved / mirrored, the edit's target):

* saliency — the **moved-mask gain** g = Dice(mask, moved mask) − Dice(mask, original mask). The unedited output
  scores Dice(original, moved) − 1 (≈ −1 for a clearly moved object); an edit that moves the object scores > 0; one
  that merely erases or smears the object scores near 0 from below, which is why "higher than the unedited output" is
  not enough and the gain itself must be positive.
* depth — the **depth gain** g = ρ(depth, counterfactual depth) − ρ(depth, original depth) (Spearman ρ per image):
  > 0 when the output's depth follows the counterfactual more than the original.

Every condition gets its mean gain with a 95 % paired-bootstrap CI over edits (:func:`sceneprobe.probe.stats
.paired_bootstrap`; an edit is the unit, as a test image is for the probes). The **strongest control** is the
condition other than ``probe`` with the highest mean gain (``unedited``; ``random``: a random direction with the
probe edit's ‖Δa‖; ``permuted_probe``: the same optimisation through the permuted U-Net's probe, rescaled to the probe
edit's ‖Δa‖). Two rule readings (:func:`sceneprobe.probe.stats.verdict`):

* ``beats_controls`` = verdict(gain(probe) − gain(strongest control), ``report.min_edit``);
* ``moved`` = verdict(gain(probe), 0): the edited outputs match the counterfactual better than the original.

``answer`` is "yes" when both are "yes", "no" when either is "no", else "inconclusive". :func:`sentence` states it in
plain words; an edit that fails is said to fail, with what happened instead: the object damaged rather than moved (the
original-mask Dice drops by at least the minimum effect, by the verdict rule), or the output unchanged (its agreement
with the original drops by less than the minimum effect, CI included).

**Dose–response (issue 20).** An edit of relative size ``dose`` = ‖Δa‖/‖a‖ is scored against the *headroom* of its
counterfactual. With s the similarity of the task (Dice, Spearman ρ), "orig" the labeller's label of the unedited
output and "cf" its counterfactual, the gain of an output X is g(X) = s(X, cf) − s(X, orig); the unedited output
scores g₀ = s(orig, cf) − 1 and a perfect edit (its label *is* cf) g* = 1 − s(cf, orig), so the headroom is

    H = g* − g₀ = 2 (1 − s(orig, cf))          (what a perfect edit could gain over the unedited output)

and the **relative gain** of an arm over the edits k is R = Σ_k (g_k − g₀_k) / Σ_k H_k — 0 for the unedited output (an
edit of zero dose scores exactly 0), 1 when every output's label is its counterfactual, < 0 when the label moves away.
A ratio of sums, so edits with little headroom (a mirror of a nearly symmetric depth map) weigh little instead of
dividing by ≈ 0; its CI is the paired bootstrap of the sums over edits (:func:`sceneprobe.probe.stats
.bootstrap_sums`, the same resamples for every arm). Per dose, with the controls ``unedited`` (R = 0), ``random``
(a random direction) and ``permuted_probe`` (the permuted U-Net's probe direction), both at the same dose:

* ``beats_controls`` = verdict(R(probe) − R(strongest control), ``report.min_edit``) — the minimum effect is a
  fraction of the headroom;
* ``moved`` = verdict(R(probe), 0); the rule reading is "yes" when both are yes, "no" when either is no;
* **image change** = mean over pixels and channels of |edited output − unedited output| (grey levels of 0…255), mean
  over edits of the probe arm. A dose *visibly changes the image* when that mean is ≥ ``intervene.visible_change``.
  A rule reading "no" at a dose that does not visibly change the image is reported "inconclusive" (the edit was too
  small to tell), so a "no" always means the image changed and the property did not follow.

The claim of a (site kind, task) — :func:`dose_claim` — is "yes" when some dose reads yes (the smallest such dose is
quoted; no visibility guard is needed, the property moved beyond the controls of equal size), "no" when at least one
dose visibly changes the image and every such dose reads "no" (the largest is quoted), else "inconclusive". Taking
the best of several doses favours "yes" slightly (several looks at the data); the per-dose table shows every one.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..probe.stats import VERDICT_RULE, bootstrap_sums, fmt_ci, paired_bootstrap, verdict

GAIN = {"saliency": ("dice_cf", "dice_orig"), "depth": ("spearman_cf", "spearman_orig")}
GAIN_NAME = {"saliency": "moved-mask gain", "depth": "depth gain"}
GAIN_DEFINITION = {
    "saliency": "moved-mask gain = Dice(labeller mask of the output, moved mask) − Dice(labeller mask of the output, "
                "original mask); > 0: the object sits where the counterfactual puts it rather than where it was",
    "depth": "depth gain = Spearman ρ(labeller depth of the output, counterfactual depth) − ρ(labeller depth of the "
             "output, original depth); > 0: the depth follows the counterfactual more than the original",
}
CONTROLS = ("unedited", "random", "permuted_probe")
CONTROL_WORDS = {"unedited": "the unedited outputs", "random": "equal-norm random edits",
                 "permuted_probe": "norm-matched edits through the permuted U-Net's probes"}
RULE = (VERDICT_RULE + " Interventions: answer yes only when both the gain over the strongest control (minimum effect "
        "report.min_edit) and the gain itself (minimum 0) read yes; no when either reads no.")


def gain(row: dict, task: str) -> float:
    """The per-edit score of one output row (see the module docstring)."""
    cf, orig = GAIN[task]
    a, b = float(row.get(cf, math.nan)), float(row.get(orig, math.nan))
    return a - b


def _by_edit(rows: Sequence[dict], cond: str, key) -> dict[int, float]:
    return {int(r["edit"]): float(key(r)) for r in rows if r["condition"] == cond}


def _aligned(rows, a: str, b: str | None, key) -> tuple[np.ndarray, np.ndarray | None]:
    """Values of condition ``a`` (and ``b``) on the edits both have, in edit order (the pairing of the bootstrap)."""
    xa = _by_edit(rows, a, key)
    if b is None:
        k = sorted(xa)
        return np.array([xa[e] for e in k]), None
    xb = _by_edit(rows, b, key)
    k = sorted(set(xa) & set(xb))
    return np.array([xa[e] for e in k]), np.array([xb[e] for e in k])


def edit_verdict(rows: Sequence[dict], task: str, min_effect: float, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> dict:
    """Gains with CIs, differences to each control, the strongest control, the rule readings and a sentence.

    ``rows``: per-output rows of one task with ``edit``, ``condition`` and the metric columns of :data:`GAIN`.
    """
    conds = [c for c in ("probe", *CONTROLS) if any(r["condition"] == c for r in rows)]
    kw = dict(n_boot=n_boot, seed=seed, level=level)
    g = {c: paired_bootstrap(_aligned(rows, c, None, lambda r: gain(r, task))[0], **kw) for c in conds}
    vs, raw = {}, {}
    for c in conds:
        if c == "probe":
            continue
        a, b = _aligned(rows, "probe", c, lambda r: gain(r, task))
        vs[c] = paired_bootstrap(a, b, **kw)
        for m in GAIN[task]:                                 # the two halves of the gain, probe − control
            a, b = _aligned(rows, "probe", c, lambda r, m=m: r.get(m, math.nan))
            raw[f"{m} probe - {c}"] = paired_bootstrap(a, b, **kw)
    means = {c: {m: paired_bootstrap(_aligned(rows, c, None, lambda r, m=m: r.get(m, math.nan))[0], **kw)
                 for m in GAIN[task]} for c in conds}
    ctrl = [c for c in conds if c != "probe" and math.isfinite(g[c]["mean"])]
    strongest = max(ctrl, key=lambda c: g[c]["mean"]) if ctrl else None
    beats = verdict(vs[strongest], min_effect) if strongest and "probe" in g else "inconclusive"
    moved = verdict(g["probe"], 0.0) if "probe" in g else "inconclusive"
    answer = "yes" if beats == moved == "yes" else ("no" if "no" in (beats, moved) else "inconclusive")
    out = {"metric": GAIN_NAME[task], "definition": GAIN_DEFINITION[task], "gain": g, "means": means,
           "probe_minus": vs, "components": raw, "strongest_control": strongest, "min_effect": float(min_effect),
           "beats_controls": beats, "moved": moved, "answer": answer, "n_edits": int(g.get("probe", {}).get("n", 0))}
    out["sentence"] = sentence(task, out)
    return out


def _ci(est: dict | None, digits: int = 2) -> str:
    if not est or not math.isfinite(est.get("mean", math.nan)):
        return "n/a"
    if not (math.isfinite(est.get("lo", math.nan)) and math.isfinite(est.get("hi", math.nan))):
        return f"{est['mean']:.{digits}f}"
    return fmt_ci(est, digits)


def sentence(task: str, v: dict, where: str = "") -> str:
    """The verdict of :func:`edit_verdict` in plain words (``where``: e.g. "at the attention output")."""
    name, s = GAIN_NAME[task], v["strongest_control"]
    subj = ("Saliency edits" if task == "saliency" else "Depth edits") + (f" {where}" if where else "")
    if "probe" not in v["gain"]:
        return f"{subj}: no probe edits were scored."
    gp = v["gain"]["probe"]
    cmp = (f"{name} {_ci(gp)} vs {_ci(v['gain'][s])} after {CONTROL_WORDS[s]} (the strongest control; difference "
           f"{_ci(v['probe_minus'][s])}, minimum effect {v['min_effect']:g})") if s else f"{name} {_ci(gp)}"
    if v["answer"] == "yes":
        what = "move the object" if task == "saliency" else "change the depth toward the counterfactual"
        return f"{subj} {what}: {cmp}."
    cf, orig = GAIN[task]
    m = v["means"]
    d_orig = v["components"].get(f"{orig} probe - unedited")
    d_cf = v["components"].get(f"{cf} probe - unedited")
    unit = "Dice with the" if task == "saliency" else "ρ with the"
    o_name, c_name = ("original mask", "moved mask") if task == "saliency" else ("original depth", "counterfactual depth")
    change = (f"{unit} {o_name} {_ci(m['unedited'][orig])} unedited → {_ci(m['probe'][orig])} edited, {unit} "
              f"{c_name} {_ci(m['unedited'][cf])} → {_ci(m['probe'][cf])}") if "unedited" in m else ""
    fails = "fail" if v["answer"] == "no" else "do not clearly work (inconclusive)"
    no_move = d_cf is not None and verdict(d_cf, v["min_effect"]) != "yes"
    # "damaged" needs a drop of the original-mask Dice of at least the minimum effect (verdict rule on the drop); a
    # drop bounded below the minimum effect is "almost nothing", however significant (0.005 on 32 edits can be)
    drop = {"mean": -d_orig["mean"], "lo": -d_orig["hi"], "hi": -d_orig["lo"]} if d_orig else None
    if task == "saliency" and no_move and drop and verdict(drop, v["min_effect"]) == "yes":
        why = "they damage the object instead of moving it"
    elif no_move and d_orig and math.isfinite(d_orig["lo"]) and d_orig["lo"] > -v["min_effect"]:
        why = ("the object stays where it was — the edits change almost nothing" if task == "saliency" else
               "the edited depth still follows the original — the edits change almost nothing")
    elif v["moved"] != "yes":
        why = (f"the edited outputs do not match the counterfactual better than the original "
               f"({'moved mask' if task == 'saliency' else 'counterfactual depth'} vs original)")
    elif s is None:
        why = "there is no control to compare them with"
    else:
        why = f"the {name} is not resolvably larger than after {CONTROL_WORDS[s]}"
    return f"{subj} {fails}: {why}" + (f" ({change})" if change else "") + f"; {cmp}."


# ------------------------------------------------------------------------------------------------------ dose-response
ARMS = ("probe", "random", "permuted_probe")
REL_NAME = {"saliency": "relative moved-mask gain", "depth": "relative depth gain"}
REL_DEFINITION = {
    task: f"relative {GAIN_NAME[task]} R = Σ(g − g₀) / ΣH over edits, where g is the {GAIN_NAME[task]} of the output, "
          f"g₀ the unedited output's and the headroom H = 2(1 − {'Dice' if task == 'saliency' else 'ρ'}(original, "
          f"counterfactual)) what a perfect edit gains over the unedited output; R = 0: no change, 1: every label "
          f"is its counterfactual" for task in ("saliency", "depth")}
DOSE_RULE = ("Per dose: yes when R(probe) − R(strongest control at the same dose, the unedited output's R = 0 "
             "included) reads yes with minimum effect report.min_edit (a fraction of the headroom) and R(probe) reads "
             "yes against 0; no when either reads no, but only if the dose visibly changes the image (mean "
             "|edited − unedited| over pixels ≥ intervene.visible_change grey levels), else inconclusive. Claim: yes if "
             "some dose reads yes (the smallest is quoted); no if some dose visibly changes the image and every such "
             "dose reads no (the largest is quoted); inconclusive otherwise.")


def _close(a: float, b: float) -> bool:
    return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)), abs(float(b)))


def doses_of(rows: Sequence[dict]) -> list[float]:
    """The doses of the edited rows, ascending."""
    out: list[float] = []
    for r in rows:
        if r["condition"] != "unedited" and not any(_close(r["dose"], d) for d in out):
            out.append(float(r["dose"]))
    return sorted(out)


def _zero(n: int) -> dict:
    return {"mean": 0.0, "lo": 0.0, "hi": 0.0, "n": int(n)}


def dose_verdict(rows: Sequence[dict], task: str, dose: float, min_effect: float, visible_change: float,
                 n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """The verdict at one dose (module docstring) from per-output rows of one task.

    ``rows`` need ``edit``, ``condition``, ``dose``, ``gain``, ``headroom`` (per edit, on every row of it) and
    ``pixel_change``; ``delta_ratio`` and the probe-loss columns are summarised when present. Edits are kept where
    every arm at this dose, the unedited output and the headroom are finite (the bootstrap pairs them).
    """
    unedited = {int(r["edit"]): r for r in rows if r["condition"] == "unedited"}
    at = {c: {int(r["edit"]): r for r in rows if r["condition"] == c and _close(r["dose"], dose)} for c in ARMS}
    arms = [c for c in ARMS if at[c]]
    edits = sorted(set(unedited).intersection(*[set(at[c]) for c in arms])) if arms else []

    def fin(*xs) -> bool:
        return all(math.isfinite(float(x)) for x in xs)
    edits = [k for k in edits if fin(unedited[k]["gain"], unedited[k]["headroom"])
             and all(fin(at[c][k]["gain"]) for c in arms)]
    kw = dict(n_boot=n_boot, seed=seed, level=level)
    H = np.array([float(unedited[k]["headroom"]) for k in edits])
    x = {c: np.array([float(at[c][k]["gain"]) - float(unedited[k]["gain"]) for k in edits]) for c in arms}
    rel = {c: bootstrap_sums(lambda a, h: a / h, [x[c], H], **kw) for c in arms}
    rel["unedited"] = _zero(len(edits))
    minus = {"unedited": dict(rel["probe"])} if "probe" in rel else {}
    for c in arms:
        if c != "probe" and "probe" in rel:
            minus[c] = bootstrap_sums(lambda a, b, h: (a - b) / h, [x["probe"], x[c], H], **kw)
    raw = {c: paired_bootstrap([float(at[c][k]["gain"]) for k in edits], **kw) for c in arms}
    raw["unedited"] = paired_bootstrap([float(unedited[k]["gain"]) for k in edits], **kw)
    pixel = {c: paired_bootstrap([float(at[c][k].get("pixel_change", math.nan)) for k in edits], **kw) for c in arms}
    ratio = {c: _mean([at[c][k].get("delta_ratio", math.nan) for k in edits]) for c in arms}
    loss = {c: [_mean([at[c][k].get("probe_loss_before", math.nan) for k in edits]),
                _mean([at[c][k].get("probe_loss_after", math.nan) for k in edits])] for c in arms}
    ctrl = [c for c in ("unedited", *ARMS[1:]) if c in rel and math.isfinite(rel[c]["mean"])]
    strongest = max(ctrl, key=lambda c: rel[c]["mean"]) if "probe" in rel else None
    beats = verdict(minus[strongest], min_effect) if strongest else "inconclusive"
    moved = verdict(rel["probe"], 0.0) if "probe" in rel else "inconclusive"
    reading = "yes" if beats == moved == "yes" else ("no" if "no" in (beats, moved) else "inconclusive")
    px = pixel.get("probe", {}).get("mean", math.nan)
    visible = bool(math.isfinite(px) and px >= visible_change)
    answer = "inconclusive" if reading == "no" and not visible else reading
    out = {"dose": float(dose), "verdict": answer, "rule_reading": reading, "beats_controls": beats, "moved": moved,
           "visible": visible, "visible_change": float(visible_change), "strongest_control": strongest,
           "relative_gain": rel, "minus_control": minus, "raw_gain": raw, "pixel_change": pixel,
           "delta_ratio": ratio, "probe_loss": loss, "headroom": _mean(H), "n_edits": len(edits),
           "min_effect": float(min_effect)}
    out["sentence"] = dose_sentence(task, out)
    return out


def _mean(v) -> float:
    a = np.asarray([float(x) for x in v], np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if len(a) else float("nan")


def dose_sentence(task: str, d: dict) -> str:
    """One dose's reading in words."""
    s = d["strongest_control"]
    if s is None:
        return f"at {d['dose']:.0%} of ‖a‖: no probe edits were scored"
    px = d["pixel_change"]["probe"]
    cmp = (f"{REL_NAME[task]} {_ci(d['relative_gain']['probe'])} vs {_ci(d['relative_gain'][s])} "
           f"{'for' if s == 'unedited' else 'after'} {CONTROL_WORDS[s]} (difference {_ci(d['minus_control'][s])}, "
           f"minimum effect {d['min_effect']:g}); image change {_ci(px, 1)} grey levels")
    why = {"yes": "the edit moves the property",
           "no": "the edit does not move the property although the image changes",
           "inconclusive": (f"the image barely changes (below the visible-change threshold of "
                            f"{d['visible_change']:g} grey levels), so a failure would say nothing"
                            if d["rule_reading"] == "no" else "the edit's effect is not resolved either way")
           }[d["verdict"]]
    return f"at {d['dose']:.0%} of ‖a‖ {why}: {cmp}"


def dose_claim(task: str, per_dose: Sequence[dict]) -> dict:
    """The (site kind, task) claim from the per-dose verdicts (module docstring): answer, the quoted dose, a sentence."""
    subj = "Saliency edits" if task == "saliency" else "Depth edits"
    scored = [d for d in per_dose if d["strongest_control"] is not None]
    yes = [d for d in scored if d["verdict"] == "yes"]
    vis = [d for d in scored if d["visible"]]
    if not scored:
        return {"answer": "inconclusive", "dose": None, "sentence": f"{subj}: no probe edits were scored."}
    if yes:
        d = min(yes, key=lambda d: d["dose"])
        what = "move the object" if task == "saliency" else "change the depth toward the counterfactual"
        return {"answer": "yes", "dose": d["dose"],
                "sentence": f"{subj} {what}: {d['sentence']} (the smallest dose that reads yes)."}
    if vis and all(d["verdict"] == "no" for d in vis):
        d = max(vis, key=lambda d: d["dose"])
        doses = ", ".join(f"{v['dose']:.0%}" for v in vis)
        return {"answer": "no", "dose": d["dose"],
                "sentence": f"{subj} fail: at every dose that visibly changes the image ({doses} of ‖a‖) the property "
                            f"does not follow; {d['sentence']} (the largest such dose)."}
    d = max(vis or scored, key=lambda d: d["dose"])
    why = ("no dose changes the image visibly (largest mean change "
           f"{max(v['pixel_change']['probe']['mean'] for v in scored):.1f} grey levels < {d['visible_change']:g})"
           if not vis else "some doses that visibly change the image are unresolved")
    return {"answer": "inconclusive", "dose": d["dose"],
            "sentence": f"{subj} do not clearly work (inconclusive): {why}; {d['sentence']}."}


__all__ = ["ARMS", "DOSE_RULE", "GAIN", "GAIN_DEFINITION", "GAIN_NAME", "REL_DEFINITION", "REL_NAME", "RULE",
           "dose_claim", "dose_sentence", "dose_verdict", "doses_of", "edit_verdict", "gain", "sentence"]
