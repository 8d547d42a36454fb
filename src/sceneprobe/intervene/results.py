"""What the intervention stage writes and the report quotes: ``results.csv`` (one row per output), the per-dose
verdicts and claim of each task (:func:`summarise`) and ``results.json`` (:func:`verdicts_json`).

``results.json``::

    {"protocol": "generate", "rule": str, "dose_rule": str, "min_effect": float, "visible_change": float,
     "n_boot": int, "ci_level": float, "config": {intervene config}, "steps_total": int, "notes": [str],
     "headline_kind": "attn" (the paper's site when edited, else the first kind),
     "claims": {task: {"answer": "yes"|"no"|"inconclusive", "sentence": str, "site_kind": str}},   # headline kind
     "kinds": {kind: {task: {"answer", "sentence", "dose" (the dose the claim quotes), "metric", "definition",
                             "gain": {arm: {"mean", "lo", "hi", "n"}}         # relative gain at that dose
                             "probe_minus": {control: {"mean", "lo", "hi", "n"}}, "strongest_control",
                             "beats_controls", "moved", "n_edits", "sites", "steps", "eligible_samples",
                             "regeneration_max_abs_diff", "notes", "headroom" (mean H),
                             "natural": {arm: {"ratio", "loss_before", "loss_after"}},   # the optimiser's own edit
                             "doses": [{"dose", "verdict", "rule_reading", "visible", "beats_controls", "moved",
                                        "strongest_control", "relative_gain", "minus_control", "raw_gain",
                                        "pixel_change", "delta_ratio", "probe_loss", "headroom", "n_edits",
                                        "sentence"}]}}}}

(one dict per (kind, task) has the keys answer / gain / probe_minus — the report's paper table reads exactly those;
the per-dose entries say ``verdict``, not ``answer``.)
"""
from __future__ import annotations

import csv
import io
import math

import numpy as np

from .context import PROTOCOL
from .task import TaskResult
from .verdicts import DOSE_RULE, REL_DEFINITION, REL_NAME, RULE, dose_claim, dose_verdict

COLUMNS = ("site_kind", "task", "edit", "sample_id", "condition", "dose", "transform", "n_edits_applied",
           "delta_ratio", "natural_ratio", "delta_norm", "act_norm", "probe_loss_before", "probe_loss_after",
           "dice_cf", "dice_orig", "iou_cf", "iou_orig", "spearman_cf", "spearman_orig", "gain", "gain_vs_unedited",
           "headroom", "pixel_change", "psnr_bg")


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def results_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(COLUMNS)
    for r in rows:
        vals = [r.get(c, float("nan")) for c in COLUMNS]
        wr.writerow([_fmt(float(v)) if isinstance(v, (float, np.floating)) else str(v) for v in vals])
    return buf.getvalue()


def _stats(x) -> dict:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return {"mean": None, "sem": None, "n": 0}
    sem = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None
    return {"mean": round(float(x.mean()), 6), "sem": None if sem is None else round(sem, 6), "n": int(len(x))}


def summarise(res: TaskResult, rc=None, ic=None) -> dict:
    """Per dose the verdict (:func:`.verdicts.dose_verdict`: relative gains with CIs, image change, ‖Δa‖/‖a‖), the
    claim (:func:`.verdicts.dose_claim`), the optimiser's own edit size, and the headroom by counterfactual kind."""
    from ..config import InterveneConfig, ReportConfig
    rc, ic = rc or ReportConfig(), ic or InterveneConfig()
    kw = dict(n_boot=rc.n_boot, seed=rc.boot_seed, level=rc.ci_level)
    per_dose = [dose_verdict(res.rows, res.task, d, rc.min_edit, ic.visible_change, **kw) for d in res.doses]
    claim = dose_claim(res.task, per_dose)
    unedited = [r for r in res.rows if r["condition"] == "unedited"]
    by_kind = {}
    for r in unedited:
        by_kind.setdefault(r["transform"].split("(")[0], []).append(r["headroom"])
    return {"site_kind": res.kind, "sites": res.sites, "steps": res.steps, "n_edits": len(unedited),
            "eligible_samples": res.eligible, "regeneration_max_abs_diff": res.regen_max_diff,
            "doses": per_dose, "claim": claim,
            "natural": {a: {k: _stats(v) for k, v in d.items()} for a, d in res.natural.items()},
            "headroom": {"all": _stats([r["headroom"] for r in unedited]),
                         **{k: _stats(v) for k, v in sorted(by_kind.items())}},
            "notes": res.notes}


DOSE_KEYS = ("dose", "verdict", "rule_reading", "visible", "beats_controls", "moved", "strongest_control",
             "relative_gain", "minus_control", "raw_gain", "pixel_change", "delta_ratio", "probe_loss", "headroom",
             "n_edits", "sentence")


def task_entry(task: str, t: dict) -> dict:
    """One (kind, task) of ``results.json``: the claim with the estimates of the dose it quotes, and every dose."""
    claim = t["claim"]
    at = next((d for d in t["doses"] if claim["dose"] is not None and d["dose"] == claim["dose"]), None)
    empty = {"gain": {}, "probe_minus": {}, "strongest_control": None, "beats_controls": "inconclusive",
             "moved": "inconclusive", "visible": False, "pixel_change": {}}
    quoted = empty if at is None else {"gain": at["relative_gain"], "probe_minus": at["minus_control"],
                                       "strongest_control": at["strongest_control"],
                                       "beats_controls": at["beats_controls"], "moved": at["moved"],
                                       "visible": at["visible"], "pixel_change": at["pixel_change"]}
    metric = REL_NAME[task] + (f" at dose {claim['dose']:.0%} of ‖a‖" if claim["dose"] is not None else "")
    return {"answer": claim["answer"], "sentence": claim["sentence"], "dose": claim["dose"], "metric": metric,
            "definition": REL_DEFINITION[task], **quoted, "n_edits": t["n_edits"], "sites": t["sites"],
            "steps": t["steps"], "eligible_samples": t["eligible_samples"],
            "regeneration_max_abs_diff": t["regeneration_max_abs_diff"], "notes": t["notes"],
            "headroom": t["headroom"],
            "natural": {a: {k: v["mean"] for k, v in s.items()} for a, s in t["natural"].items()},
            "doses": [{k: d[k] for k in DOSE_KEYS} for d in t["doses"]]}


def verdicts_json(summary: dict, rc) -> dict:
    """``interventions/results.json``: everything the report quotes (keys: module docstring)."""
    kinds = {kind: {task: task_entry(task, t) for task, t in k["tasks"].items()} for kind, k in summary["kinds"].items()}
    head = "attn" if "attn" in kinds else next(iter(kinds))
    return {"protocol": PROTOCOL, "rule": RULE, "dose_rule": DOSE_RULE, "min_effect": rc.min_edit,
            "visible_change": summary["config"].get("visible_change"), "n_boot": rc.n_boot, "ci_level": rc.ci_level,
            "config": summary["config"], "steps_total": summary["steps_total"], "notes": summary["notes"],
            "kind_notes": {kind: k.get("notes", []) for kind, k in summary["kinds"].items()},
            "headline_kind": head,
            "claims": {task: {"answer": v["answer"], "sentence": v["sentence"], "site_kind": head}
                       for task, v in kinds[head].items()},
            "kinds": kinds}
