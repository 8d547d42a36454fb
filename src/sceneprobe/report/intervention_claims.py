"""The interventions' claims for the paper table: read from ``interventions/results.json`` (the intervention stage
computes the gains, CIs and verdicts; the report only quotes them) as table claims and result rows.
"""
from __future__ import annotations

import math

from ..probe.sweep import _fmt_value
from .estimates import Est
from .results_index import EST_TAG, TASKS


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
