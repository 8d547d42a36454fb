"""The saliency probe's logistic problem as the sweep solves it (:class:`LogisticSolver`): solved in the rows' span
when the rows are fewer than the features, its path's Hessian read at a stride coprime to the grid."""
from __future__ import annotations

import math
from typing import Iterable

import torch

from .logistic import Chunks, NewtonInfo, logistic_path, logistic_refine


def coprime_stride(k: int, period: int) -> int:
    """The smallest stride ≥ max(k, 1) that is 1 or coprime to ``period`` (every position of a period is read)."""
    k = max(int(k), 1)
    while k > 1 and math.gcd(k, max(int(period), 1)) != 1:
        k += 1
    return k


class LogisticSolver:
    """The saliency probe's weighted logistic problem, ready for :func:`logistic_path` and :func:`logistic_refine`.

    When the train rows are fewer than the penalised features (a small study: few images, or a deep site whose grid
    is 2×2 at 64 px, with C = 1280), the problem is solved exactly in the rows' span. Write u = √pen ⊙ θ_F for the
    penalised features F (the penalty is then ‖u‖²) and X̃ = X_F diag(pen_F^{-1/2}) = U S Vᵀ (thin SVD, rank r ≤ m):
    a component of u orthogonal to the rows of X̃ changes no logit and only adds penalty, so at the optimum u = V β
    and the problem is the same logistic regression on the r columns Z = U S (penalty ‖β‖², the unpenalised columns
    kept as they are) — for every λ > 0 the same minimiser, at cost r³ + m r² per Newton step instead of d³ + m d².
    Singular values below 1e-13 of the largest are dropped (their directions move no logit by more than that).
    Paths agree with the unreduced solver to its path tolerance (1e-3 relative); refined probes to 1e-10.

    ``period``: rows per image (the rows come in (image, position) order). The path's strided Hessian takes every
    k-th row with k coprime to it, so the rows it reads cycle through every position of the grid: a stride that
    shares a factor with the grid (k = 16 on a 16×16 grid reads column x = 0 of every image, and nothing else)
    estimates the Hessian of the layout channels from a few positions only, its steps overshoot, and the path
    ran into its iteration cap at every λ.
    """

    def __init__(self, chunks: Chunks, P: float, penalty: torch.Tensor, rows: int, period: int = 1):
        self.P, self.d, self.period = P, len(penalty), max(int(period), 1)
        self.full_penalty = penalty.double()
        pen_f = torch.nonzero(self.full_penalty > 0)[:, 0]
        self.reduced = 0 < rows < len(pen_f)
        if not self.reduced:
            self.chunks, self.penalty, self.rows = chunks, self.full_penalty, rows
            return
        dev = penalty.device
        parts = list(chunks())
        X = torch.cat([(c[3] if len(c) > 3 else c[0]).to(dev, torch.float64) for c in parts])   # (m, d)
        n = torch.cat([c[1].to(dev, torch.float64) for c in parts])
        pos = torch.cat([c[2].to(dev, torch.float64) for c in parts])
        self.F = pen_f
        self.U = torch.nonzero(self.full_penalty <= 0)[:, 0]
        self.w = self.full_penalty[pen_f].rsqrt()                                  # pen_F^{-1/2}
        Us, S, Vh = torch.linalg.svd(X[:, pen_f] * self.w, full_matrices=False)   # (m, k), (k,), (k, |F|)
        keep = S > (S[0] * 1e-13 if len(S) and S[0] > 0 else float("inf"))
        self.V = Vh[keep].T                                                        # (|F|, r)
        Z = torch.cat([Us[:, keep] * S[keep], X[:, self.U]], 1)                   # (m, r + |U|)
        self.chunks = lambda: [(Z.float(), n, pos, Z)]
        self.penalty = torch.cat([torch.ones(int(keep.sum()), dtype=torch.float64, device=dev),
                                  torch.zeros(len(self.U), dtype=torch.float64, device=dev)])
        self.rows = len(Z)

    def to_solver(self, theta: torch.Tensor) -> torch.Tensor:
        """θ (…, d) → the solver's coordinates (β, θ_U) (the projection; exact for θ in the rows' span)."""
        if not self.reduced:
            return theta
        theta = theta.to(self.penalty.device, torch.float64)
        return torch.cat([(theta[..., self.F] / self.w) @ self.V, theta[..., self.U]], -1)

    def from_solver(self, beta: torch.Tensor) -> torch.Tensor:
        """(β, θ_U) (…, r + |U|) → θ (…, d) in the caller's coordinates."""
        if not self.reduced:
            return beta
        r = self.V.shape[1]
        theta = torch.zeros(*beta.shape[:-1], self.d, dtype=torch.float64, device=beta.device)
        theta[..., self.F] = (beta[..., :r] @ self.V.T) * self.w
        theta[..., self.U] = beta[..., r:]
        return theta

    def path(self, lambdas: Iterable[float], init: torch.Tensor | None = None) -> tuple[torch.Tensor, NewtonInfo]:
        """(θ (L, d), its :class:`NewtonInfo`) of :func:`logistic_path` to its path tolerance, unrefined but where
        float32 stalled; the Hessian from every k-th row when there are more than max(4096, 64 d) rows (it sets the
        step, not the fixed point). ``info.converged[i]`` False: λ at or below the floor (not a minimiser)."""
        d = len(self.penalty)
        stride = coprime_stride(self.rows // max(4096, 64 * d), self.period)
        theta, info = logistic_path(self.chunks, self.P, lambdas, self.penalty,
                                    init=None if init is None else self.to_solver(init), refine=False,
                                    hess_stride=stride)
        return self.from_solver(theta), info

    def refine(self, lam: float, theta: torch.Tensor) -> torch.Tensor:
        """The float64 minimiser for λ, from θ (d,) (:func:`logistic_refine`)."""
        return self.from_solver(logistic_refine(self.chunks, self.P, lam, self.penalty, self.to_solver(theta))[0])

    def converged_path(self, lambdas: Iterable[float], init: torch.Tensor | None = None,
                       tol: float = 1e-10) -> tuple[torch.Tensor, list[bool]]:
        """Every λ's float64 minimiser (refined to ``tol``) and whether it converged: (θ (L, d), [bool] * L).

        The path only starts where the fit is well posed. λ runs from large to small; the first λ whose refinement
        does not converge (:func:`logistic_refine`) and every smaller one are marked not converged (their θ are
        the path's, unrefined) — the data fix a *floor* on λ below which the penalised fit is too ill-conditioned
        (nearly flat directions, separable rows: no minimiser at λ → 0) for its minimiser to be computed, and a
        probe from there depends on the last bits of the inputs. Callers choose among converged λ only. The
        converged ones are float64 minimisers to ``tol`` relative, so they depend on the start point only to ``tol``
        (the path's, to 1e-3): statistics that differ in their last bits (another grouping of the additions) give
        probes, val logits and choices of λ that agree to about ``tol``, not to 1e-3."""
        lambdas = list(lambdas)
        theta, info = self.path(lambdas, init)
        ok = [False] * len(lambdas)
        for i in sorted(range(len(lambdas)), key=lambda i: -lambdas[i]):
            if not info.converged[i]:                                          # the path's floor
                break
            if info.polish[i]:                                                 # refined on the path already
                ok[i] = True
                continue
            th, _, conv = logistic_refine(self.chunks, self.P, lambdas[i], self.penalty, self.to_solver(theta[i]),
                                          tol)
            if not conv:
                break
            theta[i], ok[i] = self.from_solver(th), True
        return theta, ok
