"""The interventions' report section (``report/extra/interventions.md``) and figure (``report/figures/interventions.png``).

The markdown is the small subset ``report/html.py`` renders: ``####`` headings, pipe tables, one image. Per site kind
and task: a table of every condition (mean over edits with a 95 % paired-bootstrap CI), then the verdict in plain
words (:func:`sceneprobe.intervene.verdicts.sentence`) — an edit that fails is said to fail — and the rule it follows.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..atomic import atomic_write_text  # noqa: E402

LABELS = {"unedited": "unedited", "probe": "probe edit", "random": "random direction, equal ‖Δa‖",
          "permuted_probe": "probe of the permuted U-Net, equal ‖Δa‖"}
COLS = {"saliency": (("gain", "moved-mask gain"), ("dice_cf", "Dice with moved mask"),
                     ("dice_orig", "Dice with original mask"), ("psnr_bg", "PSNR outside masks (dB)")),
        "depth": (("gain", "depth gain"), ("spearman_cf", "ρ with moved/mirrored depth"),
                  ("spearman_orig", "ρ with original depth"), ("psnr_bg", "PSNR whole image (dB)"))}
TITLES = {"saliency": "Saliency: move the object", "depth": "Depth: move or mirror the depth map"}
KIND_WORDS = {"attn": "attention output (`to_out[0]`, before the residual; the paper's site)",
              "block": "residual stream (the `Attention` module's output, residual included)"}
ANSWER = {"yes": "**yes**", "no": "**no — the edit fails**", "inconclusive": "**inconclusive**"}


def _pm(s: dict | None, digits: int = 3) -> str:
    if not s or s.get("mean") is None:
        return "–"
    return f"{s['mean']:.{digits}f}" + (f" ± {s['sem']:.{digits}f}" if s.get("sem") is not None else "")


def _ci(e: dict | None, digits: int = 3) -> str:
    if not e or not math.isfinite(e.get("mean", math.nan)):
        return "–"
    if math.isfinite(e.get("lo", math.nan)) and math.isfinite(e.get("hi", math.nan)):
        return f"{e['mean']:.{digits}f} [{e['lo']:.{digits}f}, {e['hi']:.{digits}f}]"
    return f"{e['mean']:.{digits}f}"


def _steps(steps: list[int], total: int) -> str:
    return (f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}–{steps[-1]}") + f" of {total}"


def _cell(t: dict, cond: str, m: str, digits: int) -> str:
    v = t["verdict"]
    if m == "gain":
        return _ci(v["gain"].get(cond), digits)
    if m in v["means"].get(cond, {}):
        return _ci(v["means"][cond][m], digits)
    return _pm(t["conditions"][cond].get(m), digits)


def write_markdown(summary: dict, figure: Path | None, path: Path) -> Path:
    cfg = summary["config"]
    lines = ["# Interventions: do the probed representations cause the picture?", "",
             "Probe-guided edits during generation (the paper's §5): at each edited (site, step) the activation is "
             f"replaced by the result of Adam on the activation itself (lr {cfg['lr']:g}, {cfg['iters']} "
             "iterations) toward a counterfactual label through that (site, step)'s probe; the run's labeller then "
             "labels the outputs. Controls: an edit of the same norm per site, step and sample along a random "
             "direction, and the same optimisation through the probes fitted on the permuted-weights U-Net, applied "
             "to the real U-Net and rescaled to the real edit's norm (so only its direction differs). Test-split "
             "samples of the generate protocol; mean over edits with a 95 % paired-bootstrap CI "
             f"({summary['report']['n_boot']} resamples of the edits).", "",
             "Score of an edit: " + "; ".join(
                 f"{k}: {v}" for k, v in (("saliency", _definition("saliency")), ("depth", _definition("depth")))) + ".",
             "", f"Verdict rule: {summary['rule']}", ""]
    for kind, k in summary["kinds"].items():
        for task, t in k["tasks"].items():
            v = t["verdict"]
            shift = f"shift of {cfg['shift_min']:.0%}–{cfg['shift_max']:.0%} of the image per axis"
            lines += [f"#### {TITLES[task]} — edits of the {kind} reading", "",
                      f"Edited: the {KIND_WORDS.get(kind, kind)}. {t['n_edits']} edits ({shift}"
                      f"{', or a left-right mirror' if task == 'depth' else ''}) at {len(t['sites'])} sites "
                      f"({', '.join(f'`{s}`' for s in t['sites'])}), {_steps(t['steps'], summary['steps_total'])}.", ""]
            cols = COLS[task]
            lines.append("| condition | " + " | ".join(h for _, h in cols) + " | ‖Δa‖ | probe loss before → after |")
            lines.append("|---" * (len(cols) + 3) + "|")
            for cond, s in t["conditions"].items():
                loss = "–" if cond == "unedited" else f"{_pm(s['probe_loss_before'])} → {_pm(s['probe_loss_after'])}"
                norm = "0" if cond == "unedited" else _pm(s["delta_norm"])
                lines.append(f"| {LABELS[cond]} | " + " | ".join(_cell(t, cond, m, 1 if m == "psnr_bg" else 3)
                                                                 for m, _ in cols) + f" | {norm} | {loss} |")
            lines += ["", f"**Does the edit work?** {ANSWER[v['answer']]}. {v['sentence']}", ""]
            for n in t["notes"]:
                lines += [f"- {n}"]
            if t["regeneration_max_abs_diff"] not in (None, 0):
                lines += [f"- the unedited replay differs from the captured images by up to "
                          f"{t['regeneration_max_abs_diff']} grey levels"]
            lines.append("")
        for n in k.get("notes", []):
            if n not in summary["notes"]:
                lines.append(f"- {n}")
    for n in summary["notes"]:
        lines.append(f"- {n}")
    if figure is not None:
        lines += ["", "![Interventions: original output, counterfactual target, edited output, the labeller's label of "
                      "the edited output](figures/interventions.png)", ""]
    lines += ["Per-edit rows: `interventions/results.csv`; every statistic: `interventions/summary.json`; the verdicts: "
              "`interventions/results.json`. For the random control the probe-loss columns give the *probe's* loss "
              "before and after the random step.", ""]
    atomic_write_text(path, "\n".join(lines))
    return path


def _definition(task: str) -> str:
    from .verdicts import GAIN_DEFINITION
    return GAIN_DEFINITION[task]


def write_figure(results: list, path: Path) -> Path | None:
    """Rows of scenes: original output / counterfactual target / edited output / labeller's label of the edited output."""
    per = 4 if len(results) <= 2 else 2                                   # at most 8 rows
    rows = [(res, i) for res in results for i in range(min(per, len(res.examples.get("original", []))))]
    if not rows:
        return None
    titles = ("original output", "counterfactual target", "edited output (probe)", "labeller on edited output")
    fig, axes = plt.subplots(len(rows), 4, figsize=(6.4, 1.6 * len(rows) + 0.4), squeeze=False)
    for r, (res, i) in enumerate(rows):
        ex = res.examples
        if res.task == "saliency":
            kw = dict(cmap="gray", vmin=0, vmax=1)
            target, label = ex["target"][i], ex["edited_label"][i]
        else:
            target, label = ex["target"][i], ex["edited_label"][i]
            lo, hi = float(min(target.min(), label.min())), float(max(target.max(), label.max()))
            kw = dict(cmap="magma_r", vmin=lo, vmax=hi if hi > lo else lo + 1)
        panels = ((ex["original"][i], {}), (target, kw), (ex["edited"][i], {}), (label, kw))
        for j, (arr, k) in enumerate(panels):
            ax = axes[r, j]
            ax.imshow(np.asarray(arr, dtype=np.float32) / (255.0 if arr.ndim == 3 else 1.0), **k)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[j], fontsize=7)
        axes[r, 0].set_ylabel(f"{res.task} ({res.kind})\n{ex['transforms'][i]}", fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path
