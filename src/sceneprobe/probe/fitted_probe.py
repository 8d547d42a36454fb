"""A fitted probe (:class:`Probe`): raw-space weights of both tasks, what was chosen on val, the layout channels it
reads (:func:`layout_of`); and its tensors in the probe file's format (:func:`probe_tensors`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ProbeConfig
from . import layout as lay
from .protocol_labels import ProtocolLabels


@dataclass
class Probe:
    """A fitted (site, step): raw-space weights θ (d,) per task (d = C [+2 layout] [+1 bias]) and what was chosen."""
    depth: torch.Tensor
    saliency: torch.Tensor           # logit weights (x·θ > 0 ⇔ salient)
    scale: torch.Tensor
    lam: tuple[float, float]
    selected: dict[str, tuple[str, float]]   # task → (selection metric name, value), e.g. ("lambda", 0.01)
    nonfinite: int = 0
    threshold: float = 0.0           # val-chosen logit threshold τ, already folded into the saliency intercept
    layout: torch.Tensor | None = None   # (2, h, w) layout channels the probe reads (None: a plain probe)


def layout_of(labels: ProtocolLabels, h: int, w: int, cfg: ProbeConfig) -> torch.Tensor | None:
    """The layout channels (2, h, w) float64 a probe at native size h×w reads (None with ``probe.layout: none``)."""
    return lay.maps(labels.prior(h, w, cfg.upsample)) if cfg.layout == "input" else None


def probe_tensors(probe: Probe, C: int, bias: bool, labels: ProtocolLabels) -> dict[str, torch.Tensor]:
    """Weights in raw activation units, saliency in the paper's 2-class format (symmetric halves of the logit).

    A layout-fair probe also stores ``layout`` (2, h, w), the layout channels it reads, ``<task>.layout_weight``
    and their contribution as a per-position offset ``depth.offset`` (1, h, w) / ``saliency.offset`` (2, h, w):
    output = x·W + b + offset[:, y, x]."""
    k = 0 if probe.layout is None else probe.layout.shape[0]
    wd, ws = probe.depth[:C], probe.saliency[:C]
    bd = probe.depth[-1:] if bias else torch.zeros(1, dtype=torch.float64)
    bs = probe.saliency[-1:] if bias else torch.zeros(1, dtype=torch.float64)
    t = {"depth.weight": wd[:, None], "depth.bias": bd.reshape(1),
         "saliency.weight": torch.stack([-ws / 2, ws / 2], 1), "saliency.bias": torch.cat([-bs / 2, bs / 2]),
         "feature_scale": probe.scale[:C], "lambda": torch.tensor(probe.lam, dtype=torch.float64),
         "saliency.threshold": torch.tensor([probe.threshold], dtype=torch.float64),
         "depth_norm": torch.tensor([labels.depth_mean, labels.depth_std], dtype=torch.float64)}
    if k:
        vd, vs = probe.depth[C:C + k], probe.saliency[C:C + k]
        od, os_ = lay.offset(probe.layout, vd), lay.offset(probe.layout, vs)
        t.update({"layout": probe.layout, "depth.layout_weight": vd, "saliency.layout_weight": vs,
                  "depth.offset": od[None], "saliency.offset": torch.stack([-os_ / 2, os_ / 2])})
    return {k_: v.float().contiguous() for k_, v in t.items()}
