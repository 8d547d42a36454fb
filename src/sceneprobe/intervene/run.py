"""``run_interventions``: probe-guided edits during generation with a dose, scored by the labeller against counterfactuals.

For each edit k (k = 0 … n_edits − 1) of a task, on a test-split sample of the generate protocol (same sample id,
seed, DDIM steps as the capture):

1. ``unedited`` — the plain sample (it reproduces the captured image; the max difference is recorded); the labeller's
   label of it is the "original", its counterfactual (the mask moved; the depth moved or mirrored) the edit's target.
2. The edit direction, once per edit: the sampling is replayed up to the last edited step (no decode) and at each
   planned (site, step) the activation is optimised through that (site, step)'s ``ldm`` probe toward the target (Adam,
   the paper's edit) and, on the same activation, through the permuted-weights control's probe; only the unit
   directions u = Δ/‖Δ‖ are kept, and the optimiser's own size ‖Δ‖/‖a‖ is reported (``natural_ratio``).
3. For every dose d of ``intervene.doses`` and every arm — ``probe`` (u of the run's probe), ``random`` (a random
   unit direction per edit, site and step) and ``permuted_probe`` (u of the permuted U-Net's probe) — the sample is
   generated again with a′ = a + d · ‖a‖ · u at every planned (site, step) (:class:`~.editor.DoseEdit`), ‖a‖ the norm
   of the activation being replaced, so ‖Δa‖/‖a‖ = d for every arm (``delta_ratio``, measured).

Cost: one unedited generation, one partial replay for the directions and 3 · len(doses) edited generations per batch
of edits; the edited generations of a batch run in chunks of ``batch_size`` rows mixing doses and arms.

The labeller labels every output. Saliency: Dice / IoU of the output's mask with the counterfactual (moved) mask and
with the original mask; depth: Spearman ρ of the output's depth with the counterfactual and the original depth maps.
``gain`` = Dice(moved) − Dice(original) or ρ(counterfactual) − ρ(original); ``gain_vs_unedited`` = gain − the
unedited output's gain; ``headroom`` = what a perfect edit would gain over the unedited output
(:mod:`.verdicts`: 2(1 − s(original, counterfactual))). Scores per dose: the relative gain Σ(g − g₀)/ΣH with paired
bootstrap CIs, the verdict per dose and the claim per task (:func:`.verdicts.dose_verdict`, :func:`.verdicts
.dose_claim`). ``pixel_change``: mean |output − unedited output| over pixels and channels (grey levels), the measure
of "visibly changes the image"; ``psnr_bg``: PSNR (dB) vs the unedited output outside the union of the original and
counterfactual masks (saliency) or over the whole image (depth).

Site kinds (``intervene.site_kinds``): ``attn`` edits the attention output before the residual (``to_out[0]``, the
paper's), ``block`` the residual stream (the ``Attention`` module's output, residual included). Each kind is edited
through probes fitted on *that* reading: the capture's own kind uses the run's probes; another kind gets a small
capture of the edited U-Net sites at the edited steps and its own probes (same sweep, same labels) under
``run/interventions/probes_<kind>/`` (:func:`prepare_kind`).

Plan (the paper's defaults): saliency edits at the decoder-side sites (``unet.up*``) at the first
``round(steps · saliency_step_fraction)`` steps; depth edits at every U-Net site at the first ``depth_steps`` steps.
Eligible samples for saliency are test samples whose labelled object covers 1–60 % of the image (all test samples if
none does; noted in the summary). Outputs: ``run/interventions/results.csv`` (one row per output, ``site_kind``
first), ``summary.json`` (every statistic), ``results.json`` (everything the report quotes; keys: :mod:`.results`),
``images_<kind>.safetensors``, ``run/report/extra/interventions.md``, ``run/report/figures/interventions.png``
(examples) and ``run/report/figures/interventions_dose.png`` (relative gain vs dose per arm, with CIs).

Modules: :mod:`.context` (the run folder, the plan), :mod:`.task` (one task's edits and scored rows, with
:mod:`.replay` and :mod:`.scores`), :mod:`.results` (the tables and ``results.json``, its keys in that module's
docstring).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..config import Config, to_dict
from ..errors import fail
from .context import PROTOCOL, check_config, load_context, plan
from .editor import TASKS
from .results import results_csv, summarise, verdicts_json
from .task import run_task
from .verdicts import DOSE_RULE, RULE


def run_interventions(cfg: Config, run: Path, task: str = "both", progress: bool = True,
                      log: Callable[[str], None] | None = None) -> Path:
    """Edit, score, and write the results and the report section; returns ``run/report/extra/interventions.md``."""
    from safetensors.numpy import save as np_save

    from .report import write_dose_figure, write_figure, write_markdown
    if task not in (*TASKS, "both"):
        raise fail(f"option --task must be saliency, depth or both, got {task!r}")
    from .kinds import prepare_kind
    ic, rc = cfg.intervene, cfg.report
    check_config(ic)
    run = Path(run)
    main = load_context(run)
    tasks = TASKS if task == "both" else (task,)
    results, kinds, seconds = [], {}, {}
    for kind in dict.fromkeys(getattr(ic, "site_kinds", (main.kind,))):
        t0 = time.perf_counter()
        if kind == main.kind:
            ctx = main
        else:                       # another reading of the same sites: its own capture of the edited sites and probes
            plans = [plan(main, t, ic) for t in tasks]
            sites = [s for s in main.unet_sites if any(s in p[0] for p in plans)]
            steps = sorted({i for p in plans for i in p[1]})
            ctx = load_context(run, prepare_kind(cfg, run, main, kind, sites, steps, progress))
            seconds[f"{kind}.probes"] = round(time.perf_counter() - t0, 1)
        done = []
        for t in tasks:
            t0 = time.perf_counter()
            done.append(run_task(ctx, t, ic, cfg.capture.batch_size, progress))
            seconds[f"{kind}.{t}"] = round(time.perf_counter() - t0, 1)
        results += done
        kinds[kind] = {"notes": ctx.notes, "tasks": {res.task: summarise(res, rc, ic) for res in done}}
    out = run / "interventions"
    atomic_write_text(out / "results.csv", results_csv([r for res in results for r in res.rows]))
    summary = {"protocol": PROTOCOL, "config": to_dict(ic), "report": to_dict(rc), "rule": RULE, "dose_rule": DOSE_RULE,
               "capture_site_kind": main.kind, "steps_total": main.steps, "notes": main.notes, "kinds": kinds,
               "seconds": seconds}                                              # wall time per part (machine-dependent)
    atomic_write_json(out / "summary.json", summary)
    verdicts = verdicts_json(summary, rc)
    atomic_write_json(out / "results.json", verdicts)
    for kind in kinds:
        arrays = {f"{res.task}.{k}": np.ascontiguousarray(v) for res in results if res.kind == kind
                  for k, v in res.arrays.items()}
        atomic_write_bytes(out / f"images_{kind}.safetensors", np_save(arrays))
    figs = run / "report" / "figures"
    fig = write_figure(results, figs / "interventions.png")
    dose_fig = write_dose_figure(verdicts, figs / "interventions_dose.png")
    md = write_markdown(verdicts, fig, dose_fig, run / "report" / "extra" / "interventions.md")
    if log:
        log(f"[interventions] {out / 'results.csv'}")
    return md


__all__ = ["run_interventions"]
