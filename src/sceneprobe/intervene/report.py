"""The interventions' report section (``report/extra/interventions.md``) and figures (``report/figures/interventions.png``:
examples; ``report/figures/interventions_dose.png``: relative gain vs dose per arm with CIs).

The markdown is the small subset ``report/html.py`` renders: ``####`` headings, pipe tables, images. Everything it
quotes comes from ``interventions/results.json`` (:func:`sceneprobe.intervene.results.verdicts_json`). Per site kind and
task: the optimiser's own edit size, the dose–response table (every arm at every dose: ‖Δa‖/‖a‖, relative gain with
its 95 % paired-bootstrap CI, probe − arm, the raw gain, the image change, the verdict of the dose), then the claim in
plain words (:func:`sceneprobe.intervene.verdicts.dose_claim`) — an edit that fails is said to fail — and its rule.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..atomic import atomic_write_text  # noqa: E402

LABELS = {"unedited": "unedited", "probe": "probe direction", "random": "random direction",
          "permuted_probe": "permuted U-Net's probe direction"}
COLOURS = {"probe": "C0", "random": "C7", "permuted_probe": "C3"}
TITLES = {"saliency": "Saliency: move the object", "depth": "Depth: move or mirror the depth map"}
KIND_WORDS = {"attn": "attention output (`to_out[0]`, before the residual; the paper's site)",
              "block": "residual stream (the `Attention` module's output, residual included)"}
ANSWER = {"yes": "**yes**", "no": "**no — the edit fails**", "inconclusive": "**inconclusive**"}
VERDICT_CELL = {"yes": "yes", "no": "no", "inconclusive": "inconclusive"}


def _ci(e: dict | None, digits: int = 3) -> str:
    if not e or e.get("mean") is None or not math.isfinite(e.get("mean", math.nan)):
        return "–"
    if math.isfinite(e.get("lo", math.nan)) and math.isfinite(e.get("hi", math.nan)):
        return f"{e['mean']:.{digits}f} [{e['lo']:.{digits}f}, {e['hi']:.{digits}f}]"
    return f"{e['mean']:.{digits}f}"


def _pct(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{100 * x:.3g} %"


def _steps(steps: list[int], total: int) -> str:
    return (f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}–{steps[-1]}") + f" of {total}"


def _loss(pair) -> str:
    b, a = pair
    return "–" if not (math.isfinite(b) and math.isfinite(a)) else f"{b:.3f} → {a:.3f}"


def dose_table(t: dict) -> list[str]:
    """The dose–response table of one (kind, task) entry of ``results.json``."""
    lines = ["| dose | arm | ‖Δa‖/‖a‖ | relative gain [95 % CI] | probe − this arm | raw gain | image change "
             "(grey levels) | probe loss before → after | verdict of the dose |", "|---" * 9 + "|"]
    d0 = t["doses"][0] if t["doses"] else None
    if d0:
        lines.append(f"| 0 | unedited | 0 | 0 (by definition) | – | {_ci(d0['raw_gain'].get('unedited'))} | 0 | – | – |")
    for d in t["doses"]:
        for arm in ("probe", "random", "permuted_probe"):
            if arm not in d["relative_gain"]:
                continue
            minus = "–" if arm == "probe" else _ci(d["minus_control"].get(arm))
            vis = "" if d["visible"] else " (not visible)"
            cell = (VERDICT_CELL[d["verdict"]] + vis + (f"; strongest control: {d['strongest_control']}"
                                                         if d["strongest_control"] else "")) if arm == "probe" else ""
            lines.append(f"| {_pct(d['dose'])} | {LABELS[arm]} | {_pct(d['delta_ratio'].get(arm))} | "
                         f"{_ci(d['relative_gain'][arm])} | {minus} | {_ci(d['raw_gain'].get(arm))} | "
                         f"{_ci(d['pixel_change'].get(arm), 1)} | {_loss(d['probe_loss'][arm])} | {cell} |")
    return lines


def write_markdown(res: dict, figure: Path | None, dose_figure: Path | None, path: Path) -> Path:
    """``res``: the dict of ``interventions/results.json``."""
    cfg = res["config"]
    doses = ", ".join(_pct(d) for d in sorted(cfg.get("doses", [])))
    lines = ["# Interventions: do the probed representations cause the picture?", "",
             "Probe-guided edits during generation (the paper's §5) with a **dose**. Per edit the activation at each "
             f"edited (site, step) is optimised once through that (site, step)'s probe toward a counterfactual label "
             f"(Adam on the activation itself, lr {cfg['lr']:g}, {cfg['iters']} iterations, at the unedited "
             "activations; the sampling replayed up to the last edited step) and only the *direction* u = Δ/‖Δ‖ is "
             f"kept. Each dose d ({doses}) then regenerates the sample with a′ = a + d·‖a‖·u at every edited "
             "(site, step), so ‖Δa‖/‖a‖ = d exactly; the controls use the same d·‖a‖ along a random direction "
             "and along the direction optimised through the permuted-weights U-Net's probe (applied to the real "
             "U-Net). The run's labeller labels every output. Test-split samples of the generate protocol; "
             f"estimates over edits with 95 % paired-bootstrap CIs ({res['n_boot']} resamples of the edits).", "",
             "Score: the **relative gain** R = Σ(g − g₀)/ΣH over edits — g the raw gain of an output (saliency: "
             "Dice with the moved mask − Dice with the original mask; depth: ρ with the counterfactual depth − ρ with "
             "the original depth), g₀ the unedited output's, and the **headroom** H = 2(1 − s(original, "
             "counterfactual)) what a perfect edit (its label *is* the counterfactual) gains over the unedited output. "
             "R = 0: nothing changed (an edit of zero dose scores exactly 0); R = 1: every label became its "
             "counterfactual. The image change is the mean |edited − unedited| over pixels and channels in grey "
             f"levels (0–255); a dose *visibly changes the image* when the probe edit's mean is ≥ "
             f"{res['visible_change']:g}.", "",
             f"Rule: {res['dose_rule']} Minimum effect {res['min_effect']:g} of the headroom. ({res['rule']})", ""]
    for kind, k in res["kinds"].items():
        for task, t in k.items():
            shift = f"shift of {cfg['shift_min']:.0%}–{cfg['shift_max']:.0%} of the image per axis"
            hd = t["headroom"]
            hwords = ", ".join(f"{n} {v['mean']:.3f} (n = {v['n']})" for n, v in hd.items()
                               if n != "all" and v.get("mean") is not None)
            nat = t.get("natural", {})
            nwords = "; ".join(f"{LABELS[a]}: ‖Δ‖/‖a‖ = {_pct(v.get('ratio'))}, probe loss "
                               f"{v.get('loss_before', math.nan):.3f} → {v.get('loss_after', math.nan):.3f}"
                               for a, v in nat.items() if v.get("ratio") is not None)
            lines += [f"#### {TITLES[task]} — edits of the {kind} reading", "",
                      f"Edited: the {KIND_WORDS.get(kind, kind)}. {t['n_edits']} edits ({shift}"
                      f"{', or a left-right mirror' if task == 'depth' else ''}) at {len(t['sites'])} sites "
                      f"({', '.join(f'`{s}`' for s in t['sites'])}), {_steps(t['steps'], res['steps_total'])}. "
                      f"Mean headroom H {hd['all']['mean'] if hd['all']['mean'] is not None else float('nan'):.3f}"
                      + (f" ({hwords})" if hwords else "") + ".", ""]
            if nwords:
                lines += [f"The optimiser's own edit (the paper's, not rescaled): {nwords}.", ""]
            lines += dose_table(t)
            lines += ["", f"**Does the edit work?** {ANSWER[t['answer']]}. {t['sentence']}", ""]
            lines += [f"- {d['sentence']}" for d in t["doses"]]
            for n in t["notes"]:
                lines += [f"- {n}"]
            if t["regeneration_max_abs_diff"] not in (None, 0):
                lines += [f"- the unedited replay differs from the captured images by up to "
                          f"{t['regeneration_max_abs_diff']} grey levels"]
            lines.append("")
        for n in res.get("kind_notes", {}).get(kind, []):
            if n not in res["notes"]:
                lines.append(f"- {n}")
    for n in res["notes"]:
        lines.append(f"- {n}")
    if dose_figure is not None:
        lines += ["", "![Relative gain vs dose per arm (95 % CIs); filled markers: doses that visibly change the "
                      "image](figures/interventions_dose.png)", ""]
    if figure is not None:
        lines += ["", "![Interventions: original output, counterfactual target, the probe edit at each dose, a random "
                      "edit at the largest dose, the labeller's label of the probe edit at the largest dose]"
                      "(figures/interventions.png)", ""]
    lines += ["Per-output rows: `interventions/results.csv`; every statistic: `interventions/summary.json`; what "
              "this section quotes: `interventions/results.json`. The probe-loss columns give the run's probe's loss "
              "before and after each arm's step (for the controls too).", ""]
    atomic_write_text(path, "\n".join(lines))
    return path


def write_dose_figure(res: dict, path: Path) -> Path | None:
    """Relative gain vs dose, one panel per (kind, task), one line per arm with 95 % CIs."""
    panels = [(kind, task, t) for kind, k in res["kinds"].items() for task, t in k.items() if t["doses"]]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.9), squeeze=False)
    for ax, (kind, task, t) in zip(axes[0], panels):
        doses = [d["dose"] for d in t["doses"]]
        x = np.arange(len(doses))
        for j, arm in enumerate(("probe", "random", "permuted_probe")):
            est = [d["relative_gain"].get(arm) for d in t["doses"]]
            if not all(est):
                continue
            m = np.array([e["mean"] for e in est])
            lo = np.array([e["lo"] for e in est])
            hi = np.array([e["hi"] for e in est])
            xs = x + (j - 1) * 0.08
            ax.errorbar(xs, m, yerr=[np.nan_to_num(m - lo), np.nan_to_num(hi - m)], color=COLOURS[arm], lw=1,
                        capsize=2, label=LABELS[arm], marker="none")
            vis = np.array([d["visible"] for d in t["doses"]])
            ax.scatter(xs[vis], m[vis], color=COLOURS[arm], s=14, zorder=3)
            ax.scatter(xs[~vis], m[~vis], facecolor="white", edgecolor=COLOURS[arm], s=14, zorder=3)
        ax.axhline(0, color="k", lw=0.6)
        ax.axhline(res["min_effect"], color="k", lw=0.6, ls=":")
        ax.set_xticks(x)
        ax.set_xticklabels([f"{_pct(d['dose'])}\n{d['pixel_change']['probe']['mean']:.1f} gl" for d in t["doses"]],
                           fontsize=6)
        ax.set_xlabel("dose ‖Δa‖/‖a‖ (image change of the probe edit)", fontsize=6)
        ax.set_ylabel("relative gain (fraction of headroom)", fontsize=6)
        ax.tick_params(labelsize=6)
        ax.set_title(f"{task} ({kind}): {t['answer']}", fontsize=7)
    axes[0][0].legend(fontsize=5, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path


def write_figure(results: list, path: Path) -> Path | None:
    """Rows of scenes: original output / counterfactual target / the probe edit at each dose / a random edit at the
    largest dose / the labeller's label of the probe edit at the largest dose."""
    per = 4 if len(results) <= 2 else 2                                   # at most 8 rows
    rows = [(res, i) for res in results for i in range(min(per, len(res.examples.get("original", []))))]
    if not rows:
        return None
    doses = rows[0][0].examples["doses"]
    titles = ("original output", "counterfactual", *[f"probe {_pct(d)}" for d in doses], f"random {_pct(doses[-1])}",
              f"label of probe {_pct(doses[-1])}")
    ncol = len(titles)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.5 * ncol, 1.5 * len(rows) + 0.4), squeeze=False)
    for r, (res, i) in enumerate(rows):
        ex = res.examples
        target, label = ex["target"][i], ex["probe_label"][i]
        if res.task == "saliency":
            kw = dict(cmap="gray", vmin=0, vmax=1)
        else:
            lo, hi = float(min(target.min(), label.min())), float(max(target.max(), label.max()))
            kw = dict(cmap="magma_r", vmin=lo, vmax=hi if hi > lo else lo + 1)
        panels = [(ex["original"][i], {}), (target, kw), *[(im, {}) for im in ex["probe"][i]],
                  (ex["random"][i], {}), (label, kw)]
        for j, (arr, k) in enumerate(panels):
            ax = axes[r, j]
            ax.imshow(np.asarray(arr, dtype=np.float32) / (255.0 if arr.ndim == 3 else 1.0), **k)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[j], fontsize=6)
        axes[r, 0].set_ylabel(f"{res.task} ({res.kind})\n{ex['transforms'][i]}", fontsize=6)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path
