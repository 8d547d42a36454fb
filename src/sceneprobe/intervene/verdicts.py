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
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..probe.stats import VERDICT_RULE, fmt_ci, paired_bootstrap, verdict

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


__all__ = ["GAIN", "GAIN_DEFINITION", "GAIN_NAME", "RULE", "edit_verdict", "gain", "sentence"]
