"""Layout-fair probes: the position-only prior as two input channels of every probe.

A probe is a per-position linear map with one global intercept. Features that carry no position — a permuted or
fresh U-Net, the VAE decoder's mid attention, the input latent x_t — cannot represent the dataset's layout (sky on
top, ground below, the object near the middle), while the trained U-Net's features carry position and get it for
free. A plain probe's score therefore mixes "knows this image's scene" with "knows where it is". So every probe gets
the layout prior at its native position j as two more input channels::

    L_j = (d̄_j, logit r̄_j)

with d̄ the mean standardised depth target and r̄ the salient rate of the probe-train images at j — the
position-only baseline of :mod:`.baselines` at the same native size — the log-odds clipped to [ε, 1 − ε]. Their
weights, like the intercept, are not penalised: at every λ the probe can reproduce the position-only baseline
exactly (weight 1 on its own task's channel, 0 elsewhere), so on train it never does worse than the layout, and
what it scores beyond the baseline comes from the features. (Channels rather than a fixed offset — a fit on
y − prior — because their weights are fitted: features that already carry the layout are not charged for it twice,
and the exact solvers take them as two more unpenalised columns.)

Design rows per native position: ``[features (C) | layout (2) | 1]``; probe files keep the layout's contribution as
a per-position offset map (``<task>.offset``), so ``logits = x·W + b + offset[:, y, x]``.
"""
from __future__ import annotations

import numpy as np
import torch

from .baselines import Prior

CHANNELS = 2                 # (mean depth, salient log-odds)
LOGIT_EPS = 1e-3             # rates clipped to [ε, 1 − ε] before the log-odds (a cell that is never salient)
PLAIN = "noprior"            # model-name suffix of the probe fitted without the prior: "<model>.noprior"


def maps(prior: Prior) -> torch.Tensor:
    """The two layout channels at the prior's native size: (2, h, w) float64."""
    r = np.clip(np.asarray(prior.rate, dtype=np.float64), LOGIT_EPS, 1 - LOGIT_EPS)
    return torch.from_numpy(np.stack([np.asarray(prior.depth, dtype=np.float64), np.log(r) - np.log1p(-r)]))


def rows(layout: torch.Tensor) -> torch.Tensor:
    """Design rows of the layout channels of one image, row order (y, x): (h·w, k)."""
    return layout.permute(1, 2, 0).reshape(-1, layout.shape[0])


def offset(layout: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layout's contribution to a probe's output per native position: Σ_k weight_k · L_k → (h, w)."""
    return torch.einsum("khw,k->hw", layout.to(weight.dtype), weight)


def plain_model(model: str) -> str:
    """Result-table model name of the probe without the prior (``ldm`` → ``ldm.noprior``)."""
    return f"{model}.{PLAIN}"


def is_plain(model: str) -> bool:
    return model.endswith(f".{PLAIN}")


def base_model(model: str) -> str:
    return model[: -len(PLAIN) - 1] if is_plain(model) else model
