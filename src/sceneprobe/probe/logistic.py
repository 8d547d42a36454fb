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
            if _numpy_path(theta):
                Yn = Y.numpy()
                H += torch.from_numpy(Yn.T @ Yn).double() * stride             # numpy's YᵀY is a syrk: half the work
            else:
                H += (Y.T @ Y).double() * stride
    return f, g, H


def _grad64(chunks: Chunks, theta: torch.Tensor, want_h: bool = False):
    """Exact float64 gradient sum Xᵀ(nσ(Xθ) − pos): the fixed point the refinement converges to; with ``want_h``
    also the float64 data Hessian Xᵀ diag(nσ(1−σ)) X from the same logits: (g, H).

    (On the CPU numpy's float64 products are several times faster than torch's.)"""
    dev = theta.device
    d = len(theta)
    if _numpy_path(theta):
        th = theta.numpy()
        gn, Hn = np.zeros(d), (np.zeros((d, d)) if want_h else None)
        for X, n, pos, *x64 in chunks():
            X = (x64[0] if x64 else X.double()).numpy()
            p = torch.sigmoid(torch.from_numpy(X @ th)).numpy()
            nn = n.double().numpy()
            gn += (nn * p - pos.double().numpy()) @ X
            if want_h:
                Y = X * np.sqrt(nn * p * (1 - p))[:, None]
                Hn += Y.T @ Y                                                  # a syrk in numpy
        return torch.from_numpy(gn) if not want_h else (torch.from_numpy(gn), torch.from_numpy(Hn))
    g = torch.zeros(d, dtype=torch.float64, device=dev)
    H = torch.zeros(d, d, dtype=torch.float64, device=dev) if want_h else None
    for X, n, pos, *x64 in chunks():
        X = (x64[0] if x64 else X).to(dev, torch.float64)
        n = n.to(dev, torch.float64)
        p = torch.sigmoid(X @ theta)
        g += (n * p - pos.to(dev, torch.float64)) @ X
        if want_h:
            Y = X * torch.sqrt(n * p * (1 - p))[:, None]
            H += Y.T @ Y
    return g if not want_h else (g, H)


def logistic_first_step(G: torch.Tensor, xt_pos: torch.Tensor, xt_n: torch.Tensor, P: float, lam: float,
                        penalty: torch.Tensor) -> torch.Tensor:
    """The first Newton step from θ = 0, free from the ridge statistics: at θ = 0, σ = ½, so
    H = ¼ XᵀDX/P + λM and g = Xᵀ(n/2 − pos)/P (G = XᵀDX with D = diag(n))."""
    return -_solve_scaled(0.25 * G / P + lam * torch.diag(penalty), (0.5 * xt_n - xt_pos) / P)


def _rel(step: torch.Tensor, theta: torch.Tensor) -> float:
    return float(step.abs().max()) / (1.0 + float(theta.abs().max()))


def logistic_path(chunks: Chunks, P: float, lambdas: Iterable[float], penalty: torch.Tensor,
                  init: torch.Tensor | None = None, refine: bool = True, tol: float = 1e-10,
                  max_iter: int = 50, path_tol: float = 1e-3, hess_stride: int = 1,
                  stall: float = 0.5, stall_iter: int = 12) -> tuple[torch.Tensor, NewtonInfo]:
    """L2-penalised weighted logistic regression for each λ; returns θ (L, d) in the chunks' coordinates.

    Minimises ``(1/P) Σ_j [pos_j·softplus(−x_jᵀθ) + (n_j − pos_j)·softplus(x_jᵀθ)] + (λ/2) Σ_i penalty_i θ_i²``.
    ``chunks()`` yields (X (m, d), n (m,) pixel counts, pos (m,) positive counts, fractional allowed[, X as
    float64]); ``penalty`` is the diagonal of the penalty (s² per feature for scaled coordinates, 0 for a bias).

    λ runs from large to small, each warm-started from the previous solution (``init`` for the first) with the
    previous data Hessian (exact up to the λ shift). Newton steps run in float32 — the Hessian only sets the
    convergence rate, not the solution — until the step is below ``path_tol`` relative. The Hessian is recomputed
    only after steps larger than 1 % (a nearby Hessian still contracts); with ``hess_stride`` k > 1 it is estimated
    from every k-th row (k× cheaper, linear convergence at about √(d·k/m)).
    With ``refine`` every θ is then refined by float64 gradient passes (:func:`logistic_refine`): the result is
    the float64 minimiser. Without it, θ is within about ``path_tol`` relative — enough to choose λ on validation
    data (a 0.1 % change of the weights moves only pixels whose logit is within 0.1 % of zero); refine the chosen
    one.

    Float32 has a floor: at a small λ the weights grow along nearly flat directions of the data, the float32 logits
    lose digits to cancellation, and the step stops shrinking at some 1e-3..1e-2 relative, however many Newton
    steps follow (they used to run into ``max_iter``, and θ kept the last bits of a float32 GEMM). A λ whose full
    Newton steps stop contracting (``stall`` times the last relative step, from the 3rd step on, once closer than
    2 %) or that has taken ``stall_iter`` steps (float32 noise in the line search keeps it far) is handed to the
    float64 refinement from where it stands: it converges in a few passes where the fit is well posed (θ is then
    that λ's float64 minimiser), and where it does not, the data fix a floor on λ (see
    :meth:`.LogisticSolver.converged_path`): that λ and every smaller one are marked not converged
    (``info.converged`` False, θ as the path left it) and the path stops. Converged λ (``info.converged`` True) are
    within ``path_tol`` of their minimiser, or refined.
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
    floor = False
    for i in order:
        if floor:                                                              # below the floor: not attempted
            out[i] = theta
            continue
        pen = lambdas[i] * M
        f, g, H = _pass32(chunks, theta, Hd is None, hess_stride)
        if H is not None:
            Hd = H / P
        f, g = f / P + 0.5 * float((pen * theta * theta).sum()), g / P + pen * theta
        prev_r, full = None, False
        for it in range(1, max_iter + 1):
            step = _solve_scaled(Hd + torch.diag(pen), g)
            info.iterations[i] = it
            r = _rel(step, theta)
            if r < path_tol:
                theta = theta - step
                info.converged[i] = True
                break
            if (r < 2e-2 and it >= 3 and full and r > stall * prev_r) or it >= stall_iter:
                # the float32 floor: finish (or give up on) this λ in float64
                th, info.polish[i], info.converged[i] = logistic_refine(chunks, P, lambdas[i], penalty, theta, tol,
                                                                        hessian64=True)
                if info.converged[i]:
                    theta = th
                floor = not info.converged[i]
                break
            prev_r = r
            t, slope = 1.0, float(g @ step)
            while True:                                                        # Armijo backtracking (far from θ*)
                cand = theta - t * step
                fc, gc, Hc = _pass32(chunks, cand, t * r > 1e-2, hess_stride)
                fc = fc / P + 0.5 * float((pen * cand * cand).sum())
                if t * r < 1e-3 or fc <= f - 1e-4 * t * slope or t < 1e-6:
                    break
                t *= 0.5
            full = t == 1.0
            theta, f, g = cand, fc, gc / P + pen * cand
            if Hc is not None:
                Hd = Hc / P
        else:
            floor = True                                                       # max_iter without contracting
        out[i] = theta
    if refine:
        for i, lam in enumerate(lambdas):
            if info.converged[i] and info.polish[i] == 0:
                out[i], info.polish[i], info.converged[i] = logistic_refine(chunks, P, lam, penalty, out[i], tol)
    return out, info


def logistic_refine(chunks: Chunks, P: float, lam: float, penalty: torch.Tensor, theta: torch.Tensor,
                    tol: float = 1e-10, max_passes: int = 20,
                    hessian64: bool = False) -> tuple[torch.Tensor, int, bool]:
    """Float64 refinement: θ ← θ − H⁻¹∇f(θ) with exact float64 gradients; H a float32 Hessian at the start point.

    The fixed point is the float64 minimiser; the iteration contracts at a rate ρ of about the Hessian's relative
    error: ~1e-4 near θ* where the fit is well posed. Where it contracts by less than 20× a pass — the start was
    some % away, or λ is so small that the float32 Hessian's rounding (~1e-6 of its norm) is not small next to the
    penalty along the data's flattest directions — the Hessian is read again at the current θ in float64 (exact
    Newton from there; at most four times). Stops when the remaining error, bounded by ``|step|·ρ/(1 − ρ)``, is below
    ``tol`` relative. Not converged (False) when it has not within ``max_passes`` (or cannot at the rate it has
    after the float64 Hessians), or when θ stops being finite: the fit has no well-defined minimiser to compute
    (nearly separable rows, λ → 0) — such a θ is no minimiser to report. The float64 Hessian makes that verdict a
    property of the problem, not of the last bits of a float32 product. ``hessian64``: start with the float64
    Hessian (where the float32 one is known to be too coarse: a path that stalled in float32)."""
    pen = lam * penalty.double()
    theta = theta.to(pen.device, torch.float64).clone()
    if hessian64:
        g, H = _grad64(chunks, theta, True)
        H = H / P + torch.diag(pen)
    else:
        H, g = _pass32(chunks, theta, True)[2] / P + torch.diag(pen), None
    prev, fresh, since = None, 0, 0
    for k in range(1, max_passes + 1):
        if g is None:
            g = _grad64(chunks, theta)
        step = _solve_scaled(H, g / P + pen * theta)
        theta, g, since = theta - step, None, since + 1
        if not bool(torch.isfinite(theta).all()):
            return theta, k, False
        r = _rel(step, theta)
        rate = min(r / prev, 0.5) if prev else 0.5
        if r < tol or (prev is not None and r * rate / (1 - rate) < tol):
            return theta, k, True
        if prev is not None and r > 0.05 * prev:
            if fresh < 4:                                                      # exact Newton from here
                g, H = _grad64(chunks, theta, True)
                H, fresh, since = H / P + torch.diag(pen), fresh + 1, 0
            elif since >= 2 and r * rate ** (max_passes - k) > tol:
                return theta, k, False               # even at this rate the passes left cannot reach tol
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
