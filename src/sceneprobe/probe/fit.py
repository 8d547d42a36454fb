"""Linear probe solvers: exact ridge and logistic (IRLS) from native-resolution data, and the paper's Adam trainer.

A probe is a per-position linear map over channels, ``ŷ(p) = x_{s(p)}ᵀ W (+ b)``, applied at the site's native
resolution h×w; its output is nearest-upsampled to the label grid H×W, and the loss is taken over label pixels p.
``s(p)`` is the native position a label pixel reads under nearest upsampling (``F.interpolate(mode="nearest")``:
``floor(i·h/H)`` per axis). Upsampling the *features* and applying W per pixel gives the same thing, so the exact
solution is a regression on native positions j where each position carries its block of label pixels:

* squared loss: ``Σ_p (y_p − x_{s(p)}ᵀw)² = Σ_j [n_j (x_jᵀw)² − 2 (x_jᵀw) S_j] + const`` with ``n_j`` = pixels in the
  block and ``S_j`` = sum of their labels → normal equations ``(Xᵀ diag(n) X + λP·I) w = Xᵀ S``;
* cross-entropy is linear in the label, so a binary block is exactly ``pos_j`` positive and ``n_j − pos_j`` negative
  copies of row j (weighted logistic regression with the same minimiser as the brute-force fit on upsampled features).

``upsample="area"`` instead area-downsamples the labels to h×w and fits one unit-weight row per native position
(target = block mean). For an integer factor H/h the blocks are equal (``n_j = (H/h)²``) and both objectives differ
from each other by a constant factor and an additive constant, so the *exact* fits coincide; they differ for
non-integer factors and for the Adam trainer (Huber is not quadratic).

Objectives (P = total weight = number of label pixels, or of native positions in area mode; the bias is unpenalised):

* depth, ridge:        ``(1/P) Σ_p (y_p − x_pᵀw − b)² + λ‖w‖²``      ≡ sklearn ``Ridge(alpha=λ·P)``
* saliency, logistic:  ``(1/P) Σ_p CE(y_p, x_pᵀw + b) + (λ/2)‖w‖²``  ≡ sklearn ``LogisticRegression(C=1/(λ·P))``

The paper's saliency probe is a 2-class softmax ``W ∈ R^{C×2}`` without bias. Softmax CE depends only on the logit
difference ``z = (w₁ − w₀)ᵀx`` (``CE = softplus(−z)`` for a positive pixel, ``softplus(z)`` for a negative one) and
argmax is ``z > 0``, so it is a logistic regression on ``w = w₁ − w₀``; with penalty ``(μ/2)(‖w₀‖² + ‖w₁‖²)`` the
optimum is ``w₀ = −w₁`` and the penalty equals ``(μ/4)‖w‖²``, i.e. λ = μ/2. We fit ``w`` and store the symmetric
``(−w/2, w/2)`` pair, which gives the paper's probe format with identical logits differences and predictions.

Devices: the statistics and solvers run wherever their tensors are (``RidgeStats(device=…)``, chunks and penalty on
that device; see :mod:`.parallel`). On the CPU two products take numpy's float64 BLAS, several times faster there
than torch's (``NUMPY_ON_CPU``, in :mod:`.cpu_fast_path`); everywhere else, and on the CPU with that switch off (as
the tests run it), the same code runs in torch.

The pieces: :mod:`.resolution_maps` (native grid ↔ label grid: block sums and counts, upsampling, design rows),
:mod:`.ridge` (the statistics and the ridge path), :mod:`.logistic` (the Newton path and its float64 refinement),
:mod:`.logistic_solver` (the sweep's logistic problem, in the rows' span when they are few), :mod:`.adam_trainer`
(the paper's trainer), :mod:`.cpu_fast_path` (the numpy switch). Every name is importable from here.
"""
from __future__ import annotations

from .adam_trainer import AdamResult, fit_adam
from .logistic import Chunks, NewtonInfo, fit_logistic, logistic_first_step, logistic_path, logistic_refine
from .logistic_solver import LogisticSolver, coprime_stride
from .resolution_maps import area_downsample, block_count, block_sum, nearest_index, to_rows, upsample_nearest
from .ridge import RidgeStats, feature_scale, fit_ridge, penalty_mask, ridge_eigen, ridge_path


__all__ = ["AdamResult", "Chunks", "LogisticSolver", "NewtonInfo", "RidgeStats", "area_downsample", "block_count",
           "block_sum", "coprime_stride", "feature_scale", "fit_adam", "fit_logistic", "fit_ridge",
           "logistic_first_step", "logistic_path", "logistic_refine", "nearest_index", "penalty_mask", "ridge_eigen",
           "ridge_path", "to_rows", "upsample_nearest"]
