"""Logistic probes (saliency): the L2-penalised weighted logistic path by float32 Newton steps over streamed chunks,
warm-started along λ, and its float64 refinement to the exact minimiser."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from .cpu_fast_path import _numpy_path
from .ridge import _solve_spd, penalty_mask

Chunks = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]


@dataclass
class NewtonInfo:
    iterations: list[int]     # float32 Newton iterations per λ
    polish: list[int]         # float64 refinement passes per λ (0 without refine)
    converged: list[bool]


def _solve_scaled(H: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Solve H x = g after symmetric diagonal scaling (features of very different magnitude stay well conditioned)."""
    s = torch.sqrt(torch.clamp(torch.diagonal(H), min=1e-300))
    return _solve_spd(H / (s[:, None] * s[None, :]), (g / s)[:, None])[:, 0] / s


def _pass32(chunks: Chunks, theta: torch.Tensor, want_h: bool, stride: int = 1):
    """One float32 pass (f64 accumulation across chunks): Σ CE, Xᵀ(nσ − pos), Xᵀ diag(nσ(1−σ)) X.

    ``stride`` > 1 estimates the Hessian from every stride-th row (scaled up): it only sets the step, not the
    fixed point, and costs 1/stride of the exact one."""
    t32 = theta.float()
    d, dev = len(theta), theta.device
    f, g = 0.0, torch.zeros(d, dtype=torch.float64, device=dev)
    H = torch.zeros(d, d, dtype=torch.float64, device=dev) if want_h else None
    for X, n, pos, *_ in chunks():
        X = X.to(dev, torch.float32)                                           # no-op when already there
        n32, pos32 = n.to(dev, torch.float32), pos.to(dev, torch.float32)
        z = X @ t32                                                            # (m,)
        # CE of pos positives and (n − pos) negatives = n·softplus(z) − pos·z
        f += float((n32 * F.softplus(z) - pos32 * z).double().sum())
        p = torch.sigmoid(z)
        g += ((n32 * p - pos32) @ X).double()
        if want_h:
            Y = X[::stride] * torch.sqrt(n32 * p * (1 - p))[::stride, None]    # (m / stride, d)
            H += (Y.T @ Y).double() * stride
    return f, g, H


def _grad64(chunks: Chunks, theta: torch.Tensor) -> torch.Tensor:
    """Exact float64 gradient sum Xᵀ(nσ(Xθ) − pos): the fixed point the refinement converges to.

    (On the CPU numpy's float64 matrix-vector products are several times faster than torch's.)"""
    dev = theta.device
    if _numpy_path(theta):
        th = theta.numpy()
        gn = np.zeros(len(th))
        for X, n, pos, *x64 in chunks():
            X = (x64[0] if x64 else X.double()).numpy()
            z = torch.from_numpy(X @ th)
            gn += (n.double() * torch.sigmoid(z) - pos.double()).numpy() @ X
        return torch.from_numpy(gn)
    g = torch.zeros(len(theta), dtype=torch.float64, device=dev)
    for X, n, pos, *x64 in chunks():
        X = (x64[0] if x64 else X).to(dev, torch.float64)
        g += (n.to(dev, torch.float64) * torch.sigmoid(X @ theta) - pos.to(dev, torch.float64)) @ X
    return g


def logistic_first_step(G: torch.Tensor, xt_pos: torch.Tensor, xt_n: torch.Tensor, P: float, lam: float,
                        penalty: torch.Tensor) -> torch.Tensor:
    """The first Newton step from θ = 0, free from the ridge statistics: at θ = 0, σ = ½, so
    H = ¼ XᵀDX/P + λM and g = Xᵀ(n/2 − pos)/P (G = XᵀDX with D = diag(n))."""
    return -_solve_scaled(0.25 * G / P + lam * torch.diag(penalty), (0.5 * xt_n - xt_pos) / P)


def _rel(step: torch.Tensor, theta: torch.Tensor) -> float:
    return float(step.abs().max()) / (1.0 + float(theta.abs().max()))


def logistic_path(chunks: Chunks, P: float, lambdas: Iterable[float], penalty: torch.Tensor,
                  init: torch.Tensor | None = None, refine: bool = True, tol: float = 1e-10,
                  max_iter: int = 50, path_tol: float = 1e-3,
                  hess_stride: int = 1) -> tuple[torch.Tensor, NewtonInfo]:
    """L2-penalised weighted logistic regression for each λ; returns θ (L, d) in the chunks' coordinates.

    Minimises ``(1/P) Σ_j [pos_j·softplus(−x_jᵀθ) + (n_j − pos_j)·softplus(x_jᵀθ)] + (λ/2) Σ_i penalty_i θ_i²``.
    ``chunks()`` yields (X (m, d), n (m,) pixel counts, pos (m,) positive counts, fractional allowed[, X as
    float64]); ``penalty`` is the diagonal of the penalty (s² per feature for scaled coordinates, 0 for a bias).

    λ runs from large to small, each warm-started from the previous solution (``init`` for the first) with the
    previous data Hessian (exact up to the λ shift). Newton steps run in float32 — the Hessian only sets the
    convergence rate, not the solution — until the step is below ``path_tol`` relative. With ``hess_stride`` 1 the
    Hessian is recomputed only after steps larger than 1 % (a nearby Hessian still contracts); with a stride k > 1
    it is estimated from every k-th row at every step (k× cheaper, linear convergence at about √(d·k/m)).
    With ``refine`` every θ is then refined by float64 gradient passes (:func:`logistic_refine`): the result is
    the float64 minimiser. Without it, θ is within about ``path_tol`` relative — enough to choose λ on validation
    data (a 0.1 % change of the weights moves only pixels whose logit is within 0.1 % of zero); refine the chosen
    one.
    """
    lambdas = list(lambdas)
    order = sorted(range(len(lambdas)), key=lambda i: -lambdas[i])
    d = len(penalty)
    M = penalty.double()
    dev = M.device
    theta = torch.zeros(d, dtype=torch.float64, device=dev) if init is None else init.to(dev, torch.float64).clone()
    out = torch.zeros(len(lambdas), d, dtype=torch.float64, device=dev)
    info = NewtonInfo([0] * len(lambdas), [0] * len(lambdas), [False] * len(lambdas))
    Hd = None                                                                  # data Hessian / P, near θ
    for i in order:
        pen = lambdas[i] * M
        f, g, H = _pass32(chunks, theta, Hd is None, hess_stride)
        if H is not None:
            Hd = H / P
        f, g = f / P + 0.5 * float((pen * theta * theta).sum()), g / P + pen * theta
        for it in range(1, max_iter + 1):
            step = _solve_scaled(Hd + torch.diag(pen), g)
            info.iterations[i] = it
            r = _rel(step, theta)
            if r < path_tol:
                theta = theta - step
                break
            t, slope = 1.0, float(g @ step)
            while True:                                                        # Armijo backtracking (far from θ*)
                cand = theta - t * step
                fc, gc, Hc = _pass32(chunks, cand, hess_stride > 1 or t * r > 1e-2, hess_stride)
                fc = fc / P + 0.5 * float((pen * cand * cand).sum())
                if t * r < 1e-3 or fc <= f - 1e-4 * t * slope or t < 1e-6:
                    break
                t *= 0.5
            theta, f, g = cand, fc, gc / P + pen * cand
            if Hc is not None:
                Hd = Hc / P
        out[i] = theta
    if refine:
        for i, lam in enumerate(lambdas):
            out[i], info.polish[i], info.converged[i] = logistic_refine(chunks, P, lam, penalty, out[i], tol)
    return out, info


def logistic_refine(chunks: Chunks, P: float, lam: float, penalty: torch.Tensor, theta: torch.Tensor,
                    tol: float = 1e-10, max_passes: int = 10) -> tuple[torch.Tensor, int, bool]:
    """Float64 refinement: θ ← θ − H⁻¹∇f(θ) with exact float64 gradients and a float32 Hessian at the start point.

    The fixed point is the float64 minimiser; the iteration contracts at a rate ρ of about the Hessian's relative
    error (~1e-4 near θ*). Stops when the remaining error, bounded by ``|step|·ρ/(1 − ρ)``, is below ``tol``
    relative. Not converged (False) when it has not within ``max_passes``, or when θ stops being finite: on an
    ill-conditioned problem (λ far below the data's curvature in some direction, separable rows) the float32
    Hessian's error exceeds the penalty there, the iteration stops contracting, and the result depends on the last
    bits of its inputs — such a θ is no minimiser to report."""
    pen = lam * penalty.double()
    theta = theta.to(pen.device, torch.float64).clone()
    H = _pass32(chunks, theta, True)[2] / P + torch.diag(pen)
    prev = None
    for k in range(1, max_passes + 1):
        step = _solve_scaled(H, _grad64(chunks, theta) / P + pen * theta)
        theta = theta - step
        if not bool(torch.isfinite(theta).all()):
            return theta, k, False
        r = _rel(step, theta)
        rate = min(r / prev, 0.5) if prev else 0.5
        if r < tol or (prev is not None and r * rate / (1 - rate) < tol):
            return theta, k, True
        prev = max(r, 1e-300)
    return theta, max_passes, False


def fit_logistic(X: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, lam: float, bias: bool = False,
                 weight: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
    """Convenience: weighted binary logistic regression on plain rows; ``y`` in [0, 1] (soft labels allowed)."""
    X = torch.as_tensor(np.asarray(X)).double()
    if bias:
        X = torch.cat([X, torch.ones(len(X), 1, dtype=torch.float64)], 1)
    y = torch.as_tensor(np.asarray(y)).double().reshape(-1)
    n = torch.ones(len(X), dtype=torch.float64) if weight is None else torch.as_tensor(np.asarray(weight)).double()
    theta, _ = logistic_path(lambda: [(X, n, n * y)], float(n.sum()), [lam], penalty_mask(X.shape[1], bias))
    return theta[0]
