"""Interventions (issue #7): do the probed representations *cause* the picture?

During generation, the self-attention output at chosen (site, step)s is replaced by the activation optimised through
that (site, step)'s probe toward a counterfactual label (the object moved; the depth map moved or mirrored), and the
labeller scores the edited outputs against the counterfactual and the original, next to two controls (an equal-norm
random edit and an edit through a probe of the permuted-weights U-Net, rescaled to the same norm). ``sceneprobe intervene --run RUN``.

* :mod:`.editor` — :class:`Editor` (owned hooks), probes as differentiable heads, the Adam-on-activation edit;
* :mod:`.targets` — counterfactual masks and depth maps;
* :mod:`.run` — :func:`run_interventions`: generation, controls, scoring, ``run/interventions/*``;
* :mod:`.verdicts` — the score of an edit (moved-mask gain, depth gain), CIs over edits, the verdict rule, plain words;
* :mod:`.kinds` — probes of the residual stream (``site_kind: block``) for edits beside the attention output;
* :mod:`.report` — ``run/report/extra/interventions.md`` and ``run/report/figures/interventions.png``.

The verdicts for the report's paper-comparison table are in ``run/interventions/results.json`` (keys: :mod:`.run`).
"""
from __future__ import annotations

from .editor import (TASKS, DirectionRecorder, DoseEdit, Editor, ProbeEdit, ProbeHead, RandomEdit, load_probe_head,
                     optimise_activation)
from .run import run_interventions

__all__ = ["TASKS", "DirectionRecorder", "DoseEdit", "Editor", "ProbeEdit", "ProbeHead", "RandomEdit", "load_probe_head",
           "optimise_activation", "run_interventions"]
