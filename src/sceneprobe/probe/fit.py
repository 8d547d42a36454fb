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
than torch's (``NUMPY_ON_CPU``); everywhere else, and on the CPU with that switch off (as the tests run it), the same
code runs in torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

Chunks = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]
NUMPY_ON_CPU = True     # the CPU fast path of XᵀDX and the float64 gradient; False: torch's path, as on a GPU


def _numpy_path(t: torch.Tensor) -> bool:
    return NUMPY_ON_CPU and t.device.type == "cpu"


# ---------------------------------------------------------------- resolution maps ---------------------------------
def nearest_index(out_size: int, in_size: int) -> np.ndarray:
    """Source index of each output index under nearest upsampling (PyTorch's ``mode="nearest"``: floor(i·in/out))."""
    return np.minimum((np.arange(out_size) * in_size) // out_size, in_size - 1)


def _onehot(out_size: int, in_size: int) -> torch.Tensor:
    """(in, out) float64 one-hot matrix A with A[s(i), i] = 1, so block sums are ``A_r Y A_cᵀ``."""
    a = torch.zeros(in_size, out_size, dtype=torch.float64)
    a[torch.from_numpy(nearest_index(out_size, in_size)), torch.arange(out_size)] = 1.0
    return a


def block_sum(labels: torch.Tensor | np.ndarray, h: int, w: int) -> torch.Tensor:
    """Sum of the label pixels that read each native position under nearest upsampling: (n, H, W) → (n, h, w) f64."""
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).double()
    ar, ac = _onehot(y.shape[-2], h), _onehot(y.shape[-1], w)
    return torch.einsum("iH,nHW,jW->nij", ar, y, ac)                            # (n, h, w)


def block_count(H: int, W: int, h: int, w: int) -> torch.Tensor:
    """Number of label pixels per native position, (h, w) float64 (all (H/h)² for an integer factor)."""
    return block_sum(torch.ones(1, H, W, dtype=torch.float64), h, w)[0]


def upsample_nearest(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(..., h, w) → (..., H, W) by nearest neighbour; identical to ``F.interpolate(mode="nearest")``."""
    r = torch.from_numpy(nearest_index(H, x.shape[-2]))
    c = torch.from_numpy(nearest_index(W, x.shape[-1]))
    return x[..., r, :][..., c]


def area_downsample(labels: torch.Tensor | np.ndarray, h: int, w: int) -> torch.Tensor:
    """Label means over adaptive-average-pooling cells: (n, H, W) → (n, h, w) float64."""
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).double()
    return F.adaptive_avg_pool2d(y[:, None], (h, w))[:, 0]


def to_rows(x: torch.Tensor, bias: bool) -> torch.Tensor:
    """Activations (n, C, h, w) → design rows (n·h·w, C [+1]) float64, row order (image, y, x)."""
    rows = x.double().permute(0, 2, 3, 1).reshape(-1, x.shape[1])              # (n·h·w, C)
    if bias:
        rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=torch.float64)], 1)
    return rows


# ---------------------------------------------------------------- ridge --------------------------------------------
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


# ---------------------------------------------------------------- logistic (IRLS / Newton) -------------------------
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

    def path(self, lambdas: Iterable[float], init: torch.Tensor | None = None) -> torch.Tensor:
        """θ (L, d) of :func:`logistic_path` to its path tolerance, unrefined; the Hessian from every k-th row when
        there are more than max(4096, 64 d) rows (it sets the step, not the fixed point)."""
        d = len(self.penalty)
        stride = coprime_stride(self.rows // max(4096, 64 * d), self.period)
        theta, _ = logistic_path(self.chunks, self.P, lambdas, self.penalty,
                                 init=None if init is None else self.to_solver(init), refine=False,
                                 hess_stride=stride)
        return self.from_solver(theta)

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
        theta = self.path(lambdas, init)
        ok = [False] * len(lambdas)
        for i in sorted(range(len(lambdas)), key=lambda i: -lambdas[i]):
            th, _, conv = logistic_refine(self.chunks, self.P, lambdas[i], self.penalty, self.to_solver(theta[i]),
                                          tol)
            if not conv:
                break
            theta[i], ok[i] = self.from_solver(th), True
        return theta, ok


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


# ---------------------------------------------------------------- the paper's trainer (parity) --------------------
@dataclass
class AdamResult:
    weight: torch.Tensor       # (C, k) float64: k = 1 (depth) or 2 (saliency, paper format)
    bias: torch.Tensor         # (k,) float64 (zeros without bias)
    best_epoch: int            # 1-based epoch with the lowest validation loss
    val_losses: list[float]


def _adam_loss(pred: torch.Tensor, y: torch.Tensor, task: str, upsample: str) -> torch.Tensor:
    """pred (b, k, h, w) at native resolution; y (b, H, W) labels ("nearest") or (b, h, w) area means ("area")."""
    if upsample == "nearest":
        pred = upsample_nearest(pred, y.shape[-2], y.shape[-1])               # (b, k, H, W): loss at label resolution
    if task == "depth":
        return F.huber_loss(pred[:, 0], y, delta=1.0)
    if upsample == "nearest":
        return F.cross_entropy(pred, y.long())
    return F.cross_entropy(pred, torch.stack([1 - y, y], 1))                  # soft (area) labels: probability targets


def fit_adam(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, task: str, *,
             upsample: str = "nearest", bias: bool = False, epochs: int = 30, lr: float = 1e-3, batch_size: int = 4,
             seed: int = 0) -> AdamResult:
    """The paper's probe trainer: ``nn.Linear(C, k)`` per position, Adam, shuffled batches of images, Huber (δ=1) on
    standardised depth or 2-class CE, loss at label resolution after nearest upsampling of the predictions.

    Differences from the paper: the kept checkpoint is the epoch with the lowest *validation* loss (the paper used
    the test split). ``x_*`` (n, C, h, w) float32; ``y_*`` (n, H, W) standardised depth or {0, 1} masks.
    """
    C, (h, w) = x_train.shape[1], x_train.shape[-2:]
    if upsample == "area":
        y_train, y_val = area_downsample(y_train, h, w).float(), area_downsample(y_val, h, w).float()
    else:
        y_train, y_val = y_train.float(), y_val.float()
    k = 1 if task == "depth" else 2
    torch.manual_seed(seed)
    lin = torch.nn.Linear(C, k, bias=bias)
    opt = torch.optim.Adam(lin.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)

    def predict(x):
        return torch.einsum("nchw,kc->nkhw", x, lin.weight) + (lin.bias[None, :, None, None] if bias else 0)

    best, best_state, losses = math.inf, None, []
    for epoch in range(1, epochs + 1):
        for idx in torch.randperm(len(x_train), generator=gen).split(batch_size):
            opt.zero_grad(set_to_none=True)
            _adam_loss(predict(x_train[idx]), y_train[idx], task, upsample).backward()
            opt.step()
        with torch.no_grad():
            tot = sum(float(_adam_loss(predict(x_val[i:i + 32]), y_val[i:i + 32], task, upsample))
                      * len(x_val[i:i + 32]) for i in range(0, len(x_val), 32))
        losses.append(tot / max(len(x_val), 1))
        if losses[-1] < best:
            best = losses[-1]
            best_state = (epoch, lin.weight.detach().clone(), lin.bias.detach().clone() if bias else None)
    epoch, W, b = best_state
    return AdamResult(W.T.double(), b.double() if b is not None else torch.zeros(k, dtype=torch.float64), epoch, losses)

