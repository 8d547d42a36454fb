"""The interventions' report section (``report/extra/interventions.md``) and figure (``report/figures/interventions.png``).

The markdown is the small subset ``report/html.py`` renders: ``####`` headings, pipe tables, one image. Each table is
followed by one generated sentence that reads the numbers against the controls; "clearly" means the paired
difference (probe edit − control, per edit) exceeds twice its standard error.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..atomic import atomic_write_text  # noqa: E402

LABELS = {"unedited": "unedited", "probe": "probe edit", "random": "random direction, equal ‖Δa‖",
          "permuted_probe": "probe of the permuted U-Net"}
COLS = {"saliency": (("dice_cf", "Dice with moved mask"), ("dice_orig", "Dice with original mask"),
                     ("iou_cf", "IoU moved"), ("iou_orig", "IoU original"), ("psnr_bg", "PSNR outside masks (dB)")),
        "depth": (("spearman_cf", "Spearman ρ with moved/mirrored depth"), ("spearman_orig", "ρ with original depth"),
                  ("psnr_bg", "PSNR whole image (dB)"))}
TITLES = {"saliency": "Saliency: move the object", "depth": "Depth: move or mirror the depth map"}


def _pm(s: dict | None, digits: int = 3) -> str:
    if not s or s.get("mean") is None:
        return "–"
    return f"{s['mean']:.{digits}f}" + (f" ± {s['sem']:.{digits}f}" if s.get("sem") is not None else "")


def _steps(steps: list[int], total: int) -> str:
    return (f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}–{steps[-1]}") + f" of {total}"


def _verdict(d: dict | None) -> str:
    """How a paired difference (probe edit − control) reads: clearly higher / about the same / lower (2 s.e.)."""
    if not d or d.get("mean") is None:
        return "not comparable"
    m, se = d["mean"], d.get("sem")
    if se is None:
        return "higher" if m > 0 else "not higher"
    if m > 2 * se:
        return "clearly higher"
    if m < -2 * se:
        return "lower"
    return "about the same"


def reading(task: str, t: dict) -> str:
    """One sentence: what the probe edit did to the headline metric, against the controls."""
    cf, orig = ("dice_cf", "dice_orig") if task == "saliency" else ("spearman_cf", "spearman_orig")
    what = "Dice with the moved mask" if task == "saliency" else "Spearman ρ with the counterfactual depth"
    c, p = t["conditions"], t["paired"]
    verdict = _verdict(p.get("probe - unedited", {}).get(cf))
    verb = "raise" if verdict == "clearly higher" else ("lower" if verdict == "lower" else "do not clearly raise")
    out = (f"**Reading:** probe edits {verb} the labeller's {what} ({_pm(c.get('unedited', {}).get(cf), 2)} unedited "
           f"→ {_pm(c.get('probe', {}).get(cf), 2)} edited; with the original "
           f"{'mask' if task == 'saliency' else 'depth'}: {_pm(c.get('unedited', {}).get(orig), 2)} → "
           f"{_pm(c.get('probe', {}).get(orig), 2)})")
    ctrl = []
    for key, name in (("random", "equal-norm random edits"), ("permuted_probe", "edits through permuted-U-Net probes")):
        if key in c:
            d = p.get(f"probe - {key}", {}).get(cf)
            ctrl.append(f"{_verdict(d)} than after {name} ({_pm(c[key].get(cf), 2)}; paired difference {_pm(d, 2)})"
                        .replace("about the same than", "about the same as"))
    if ctrl:
        out += "; the edited score is " + " and ".join(ctrl)
    bg = c.get("probe", {}).get("psnr_bg")
    if bg and bg.get("mean") is not None:
        out += (f"; the {'rest of the image' if task == 'saliency' else 'image'} stays at {bg['mean']:.1f} dB PSNR "
                f"from the unedited output")
    return out + "."


def write_markdown(summary: dict, figure: Path | None, path: Path) -> Path:
    cfg = summary["config"]
    lines = ["# Interventions: do the probed representations cause the picture?", "",
             "Probe-guided edits during generation (the paper's §5): at each edited (site, step) the self-attention "
             f"output (`{'to_out[0]`, before the residual' if summary['site_kind'] == 'attn' else 'Attention` output'})"
             f" is replaced by the result of Adam on the activation itself (lr {cfg['lr']:g}, {cfg['iters']} "
             "iterations) toward a counterfactual label through that (site, step)'s probe; the run's labeller then "
             "labels the outputs. Controls: an edit of the same norm per site, step and sample along a random "
             "direction, and the same optimisation through the probes fitted on the permuted-weights U-Net, applied "
             "to the real U-Net. Test-split samples of the generate protocol; mean ± standard error over edits.", ""]
    for task, t in summary["tasks"].items():
        shift = f"shift of {cfg['shift_min']:.0%}–{cfg['shift_max']:.0%} of the image per axis"
        lines += [f"#### {TITLES[task]}", "",
                  f"{t['n_edits']} edits ({shift}{', or a left-right mirror' if task == 'depth' else ''}) at "
                  f"{len(t['sites'])} sites ({', '.join(f'`{s}`' for s in t['sites'])}), "
                  f"{_steps(t['steps'], summary['steps_total'])}.", ""]
        cols = COLS[task]
        lines.append("| condition | " + " | ".join(h for _, h in cols) + " | ‖Δa‖ | probe loss before → after |")
        lines.append("|---" * (len(cols) + 3) + "|")
        for cond, s in t["conditions"].items():
            loss = "–" if cond == "unedited" else f"{_pm(s['probe_loss_before'])} → {_pm(s['probe_loss_after'])}"
            norm = "0" if cond == "unedited" else _pm(s["delta_norm"])
            lines.append(f"| {LABELS[cond]} | " + " | ".join(_pm(s[m], 1 if m == "psnr_bg" else 3) for m, _ in cols)
                         + f" | {norm} | {loss} |")
        lines += ["", reading(task, t), ""]
        for n in t["notes"]:
            lines += [f"- {n}"]
        if t["regeneration_max_abs_diff"] not in (None, 0):
            lines += [f"- the unedited replay differs from the captured images by up to "
                      f"{t['regeneration_max_abs_diff']} grey levels"]
        lines.append("")
    for n in summary["notes"]:
        lines.append(f"- {n}")
    if figure is not None:
        lines += ["", "![Interventions: original output, counterfactual target, edited output, the labeller's label of "
                      "the edited output](figures/interventions.png)", ""]
    lines += ["Per-edit rows: `interventions/results.csv`; summary: `interventions/summary.json`. For the random "
              "control the probe-loss columns give the *probe's* loss before and after the random step.", ""]
    atomic_write_text(path, "\n".join(lines))
    return path


def write_figure(results: list, path: Path) -> Path | None:
    """Rows of scenes: original output / counterfactual target / edited output / labeller's label of the edited output."""
    rows = [(res, i) for res in results for i in range(len(res.examples.get("original", [])))]
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
        axes[r, 0].set_ylabel(f"{res.task}\n{ex['transforms'][i]}", fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path
