"""Ridge probes (depth): streamed weighted least-squares statistics (G = XᵀDX, B = XᵀS), the per-feature RMS scale of
the penalty, and the exact solution for every λ from one eigendecomposition (free columns profiled out)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch

from .cpu_fast_path import _numpy_path


@dataclass
class RidgeStats:
    """Streamed sufficient statistics of weighted least squares: G = XᵀDX, B = XᵀS, P = Σ weights (float64), kept
    on ``device``. Statistics of disjoint row sets add up (:meth:`merge`): that is how ranks or workers combine."""
    d: int
    k: int
    device: torch.device | str = "cpu"
    G: torch.Tensor = field(init=False)
    B: torch.Tensor = field(init=False)
    P: float = 0.0

    def __post_init__(self):
        self.G = torch.zeros(self.d, self.d, dtype=torch.float64, device=self.device)
        self.B = torch.zeros(self.d, self.k, dtype=torch.float64, device=self.device)

    def add(self, X: torch.Tensor, weight: torch.Tensor, tsum: torch.Tensor) -> None:
        """Rows X (m, d) float64, weights (m,) ≥ 0 and weighted target sums (m, k) (= weight · target); moved to the
        statistics' device."""
        dev = self.G.device
        X, weight, tsum = X.to(dev, torch.float64), weight.to(dev, torch.float64), tsum.to(dev, torch.float64)
        Y = X * torch.sqrt(weight)[:, None]                                    # XᵀDX = YᵀY
        if _numpy_path(Y):                                                     # numpy's syrk: fast float64 on the CPU
            Yn = Y.numpy()
            self.G += torch.from_numpy(Yn.T @ Yn)
            self.B += torch.from_numpy(tsum.numpy().T @ X.numpy()).T
        else:
            self.G += Y.T @ Y
            self.B += X.T @ tsum
        self.P += float(weight.sum())

    def columns(self, cols: list[int]) -> "RidgeStats":
        """The statistics of the same rows restricted to the columns ``cols`` (a sub-block of G and B)."""
        out = RidgeStats(len(cols), self.k, self.G.device)
        idx = torch.tensor(cols, device=self.G.device)
        out.G, out.B, out.P = self.G[idx][:, idx].clone(), self.B[idx].clone(), self.P
        return out

    def merge(self, other: "RidgeStats") -> None:
        """Add the statistics of another, disjoint set of rows (on any device)."""
        if (other.d, other.k) != (self.d, self.k):
            raise ValueError(f"statistics of shape ({other.d}, {other.k}) cannot join ({self.d}, {self.k})")
        self.G += other.G.to(self.G.device)
        self.B += other.B.to(self.B.device)
        self.P += other.P


def feature_scale(G: torch.Tensor, P: float, n_features: int) -> torch.Tensor:
    """Per-channel weighted RMS ``sqrt(G_cc / P)`` (dead channels → 1); ones column (bias) keeps scale 1.

    Dividing by the RMS — not subtracting a mean — keeps the model class "linear, no bias": it is a change of
    coordinates that only makes one λ grid mean the same thing at every site.
    """
    s = torch.ones(G.shape[0], dtype=torch.float64, device=G.device)
    rms = torch.sqrt(torch.clamp(torch.diagonal(G)[:n_features] / max(P, 1e-300), min=0))
    s[:n_features] = torch.where(rms > 0, rms, torch.ones_like(rms))
    return s


def penalty_mask(d: int, bias: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    m = torch.ones(d, dtype=torch.float64, device=device)
    if bias:
        m[-1] = 0.0
    return m


def ridge_path(stats: RidgeStats, lambdas: Iterable[float], bias: bool,
               scale: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exact ridge for every λ: ``(G/P + λM) θ = B/P`` in scaled coordinates; returns raw-space θ (L, d, k).

    With ``scale`` s the fit is on x/s (penalty on the scaled weights) and ``θ_raw = θ_scaled / s``. ``mask`` (d,)
    is M's diagonal (≥ 0: 0 free, default: all but the bias), e.g. 0 for the layout-prior channels.

    Every λ costs one eigendecomposition (:func:`ridge_eigen`), not one factorisation each.
    """
    dev = stats.G.device
    s = torch.ones(stats.d, dtype=torch.float64, device=dev) if scale is None else scale.to(dev)
    Gs = stats.G / (s[:, None] * s[None, :]) / stats.P                         # (d, d)
    Bs = stats.B / s[:, None] / stats.P                                        # (d, k)
    m = penalty_mask(stats.d, bias, dev) if mask is None else mask.to(dev, torch.float64)
    return ridge_eigen(Gs, Bs, m, list(lambdas)) / s[None, :, None]            # (L, d, k)


def ridge_eigen(A: torch.Tensor, b: torch.Tensor, m: torch.Tensor, lambdas: list[float]) -> torch.Tensor:
    """θ(λ) solving ``(A + λ diag(m)) θ = b`` for every λ from one eigendecomposition: (L, d, k).

    A (d, d) symmetric positive semi-definite, b (d, k), m (d,) ≥ 0. Split the columns into penalised p (m > 0) and
    free u (m = 0: bias, layout channels) and write φ = √m_p ⊙ θ_p, so the penalty is λ‖φ‖²; with
    Ã_pp = D_m^{-½} A_pp D_m^{-½}, Ã_pu = D_m^{-½} A_pu, b̃_p = D_m^{-½} b_p the system is::

        [Ã_pp + λI   Ã_pu] [φ  ]   [b̃_p]
        [Ã_up        A_uu] [θ_u] = [b_u ]

    The second row gives ``θ_u = A_uu⁻¹ (b_u − Ã_up φ)`` (back-substitution); putting it into the first profiles the
    free columns out: ``(S + λI) φ = r`` with the Schur complement ``S = Ã_pp − Ã_pu A_uu⁻¹ Ã_up`` (PSD) and
    ``r = b̃_p − Ã_pu A_uu⁻¹ b_u``. With ``S = V diag(D) Vᵀ`` (once), ``φ(λ) = V (D + λ)⁻¹ Vᵀ r`` for every λ at the
    cost of two (|p|×|p|)·k products, and ``θ_p = φ / √m_p``.

    Rounding: eigh's eigenvalues are exact to about ε·‖S‖ in absolute terms, the same backward error as a Cholesky
    factorisation of S + λI, so the two agree to about ε·‖S‖/(D_min + λ) relative (tested to 1e-8 on well-posed
    problems); eigenvalues below 0 are rounding of a PSD matrix and are read as 0. Free columns that are not
    independent (one repeats another: A_uu singular, a Cholesky pivot below 1e-10 of its largest diagonal entry)
    take A_uu's pseudo-inverse: their data vectors then agree, so do their rows of A and b, the system stays
    consistent, and θ_u is its minimum-norm solution. λ ≤ 0 (no penalty) is solved directly (:func:`_solve_spd`).
    """
    d, k = b.shape
    dev = A.device
    out = torch.zeros(len(lambdas), d, k, dtype=torch.float64, device=dev)
    p = torch.nonzero(m > 0)[:, 0]
    u = torch.nonzero(m <= 0)[:, 0]
    r = m[p].rsqrt()                                                           # (|p|,) θ_p = r ⊙ φ
    App = A[p][:, p] * r[:, None] * r[None, :]                                 # (|p|, |p|)
    Apu = A[p][:, u] * r[:, None]                                              # (|p|, |u|)
    bp = b[p] * r[:, None]                                                     # (|p|, k)
    Ku = ku = None
    if len(u):
        Auu = A[u][:, u]
        rhs_u = torch.cat([Apu.T, b[u]], 1)                                    # [Ã_up | b_u]  (|u|, |p| + k)
        Lu, info = torch.linalg.cholesky_ex(Auu)
        if int(info) == 0 and float(torch.diagonal(Lu).min() ** 2) > 1e-10 * float(torch.diagonal(Auu).max()):
            K = torch.cholesky_solve(rhs_u, Lu)                                # A_uu⁻¹ [Ã_up | b_u]
        else:
            K = _pinv_psd(Auu) @ rhs_u
        Ku, ku = K[:, :len(p)], K[:, len(p):]
        S = App - Apu @ Ku                                                     # (|p|, |p|) Schur complement
        rhs = bp - Apu @ ku                                                    # (|p|, k)
    else:
        S, rhs = App, bp
    D, V = torch.linalg.eigh(0.5 * (S + S.T))                                  # (|p|,), (|p|, |p|)
    D = torch.clamp(D, min=0.0)
    c = V.T @ rhs                                                              # (|p|, k)
    for i, lam in enumerate(lambdas):
        if lam <= 0:
            out[i] = _solve_spd(A + lam * torch.diag(m), b)
            continue
        phi = V @ (c / (D + lam)[:, None])                                     # (|p|, k)
        out[i, p] = phi * r[:, None]
        if len(u):
            out[i, u] = ku - Ku @ phi
    return out


def _pinv_psd(A: torch.Tensor, rcond: float = 1e-10) -> torch.Tensor:
    """Pseudo-inverse of a symmetric PSD matrix from its eigendecomposition (eigenvalues ≤ rcond·max dropped)."""
    E, W = torch.linalg.eigh(0.5 * (A + A.T))
    keep = E > rcond * max(float(E.max()), 1e-300)
    return (W[:, keep] / E[keep]) @ W[:, keep].T


def _solve_spd(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(b, L)
    # singular (λ = 0, dead channel): least squares, on the CPU (CUDA's lstsq assumes full rank); rare
    return torch.linalg.lstsq(A.cpu(), b.cpu()).solution.to(A.device)


def fit_ridge(X: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, lam: float, bias: bool = False,
              weight: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
    """Convenience: weighted ridge on plain rows (m, C) → θ (C [+1],) (raw coordinates, no feature scaling)."""
    X = torch.as_tensor(np.asarray(X)).double()
    if bias:
        X = torch.cat([X, torch.ones(len(X), 1, dtype=torch.float64)], 1)
    y = torch.as_tensor(np.asarray(y)).double().reshape(len(X), -1)
    wt = torch.ones(len(X), dtype=torch.float64) if weight is None else torch.as_tensor(np.asarray(weight)).double()
    st = RidgeStats(X.shape[1], y.shape[1])
    st.add(X, wt, y * wt[:, None])
    return ridge_path(st, [lam], bias)[0, :, 0]
