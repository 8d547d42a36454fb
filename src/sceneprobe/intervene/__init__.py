"""Interventions (issue #7): do the probed representations *cause* the picture?

During generation, the self-attention output at chosen (site, step)s is replaced by the activation optimised through
that (site, step)'s probe toward a counterfactual label (the object moved; the depth map moved or mirrored), and the
labeller scores the edited outputs against the counterfactual and the original, next to two controls (an equal-norm
random edit and an edit through a probe of the permuted-weights U-Net, rescaled to the same norm). ``sceneprobe intervene --run RUN``.

* :mod:`.editor` — :class:`Editor` (owned hooks), probes as differentiable heads, the Adam-on-activation edit;
* :mod:`.targets` — counterfactual masks and depth maps;
* :mod:`.run` — :func:`run_interventions`: every task and site kind, then ``run/interventions/*``;
* :mod:`.context` — the run folder an edit reads (model, labeller, capture, probes) and the plan of edited sites;
* :mod:`.task` — one task's edits: targets, directions per arm, dose runs, a scored row per output (with
  :mod:`.replay`, the replayed sampling, and :mod:`.scores`, PSNR / pixel change / headroom);
* :mod:`.results` — ``results.csv``, the per-dose verdicts and ``results.json``;
* :mod:`.verdicts` — the score of an edit (moved-mask gain, depth gain), CIs over edits, the verdict rule, plain words;
* :mod:`.kinds` — probes of the residual stream (``site_kind: block``) for edits beside the attention output;
* :mod:`.report` — ``run/report/extra/interventions.md`` and ``run/report/figures/interventions.png``.

The verdicts for the report's paper-comparison table are in ``run/interventions/results.json`` (keys: :mod:`.results`).
"""
from __future__ import annotations

from .editor import (TASKS, DirectionRecorder, DoseEdit, Editor, ProbeEdit, ProbeHead, RandomEdit, load_probe_head,
                     optimise_activation)
from .run import run_interventions

__all__ = ["TASKS", "DirectionRecorder", "DoseEdit", "Editor", "ProbeEdit", "ProbeHead", "RandomEdit", "load_probe_head",
           "optimise_activation", "run_interventions"]
