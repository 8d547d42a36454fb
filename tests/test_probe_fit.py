"""Probe solvers: exact against sklearn, nearest-upsample sufficient statistics against brute force."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression, Ridge

from sceneprobe.probe import fit

torch.set_num_threads(1)


def _data(seed=0, m=400, C=6, scales=(1, 3, 0.3, 1, 2, 1)):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(m, C)) * np.asarray(scales) + 0.5
    w = rng.normal(size=C) / np.asarray(scales)
    return rng, X, w


@pytest.mark.parametrize("bias", [False, True])
def test_ridge_matches_sklearn(bias):
    rng, X, w = _data()
    y = X @ w + 0.3 * rng.normal(size=len(X)) + 0.7
    lam = 0.05
    ours = fit.fit_ridge(X, y, lam, bias=bias).numpy()
    sk = Ridge(alpha=lam * len(X), fit_intercept=bias, solver="cholesky").fit(X, y)   # (1/P)·SSE + λ‖w‖² ≡ α = λP
    ref = np.r_[sk.coef_, sk.intercept_] if bias else sk.coef_
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)


def test_weighted_ridge_matches_sklearn_sample_weight():
    rng, X, w = _data(1)
    y = X @ w + rng.normal(size=len(X))
    wt = rng.integers(1, 5, len(X)).astype(float)
    ours = fit.fit_ridge(X, y, 0.1, weight=wt).numpy()
    sk = Ridge(alpha=0.1 * wt.sum(), fit_intercept=False, solver="cholesky").fit(X, y, sample_weight=wt)
    np.testing.assert_allclose(ours, sk.coef_, rtol=1e-10)


@pytest.mark.parametrize("bias", [False, True])
def test_logistic_matches_sklearn(bias):
    rng, X, w = _data(2)
    y = (X @ w + 0.5 * rng.normal(size=len(X)) > 0.3).astype(float)
    lam = 0.01
    ours = fit.fit_logistic(X, y, lam, bias=bias).numpy()
    # (1/P)·ΣCE + (λ/2)‖w‖²  ≡  ½‖w‖² + C·ΣCE with C = 1/(λP); sklearn leaves the intercept unpenalised (lbfgs)
    sk = LogisticRegression(C=1 / (lam * len(X)), fit_intercept=bias, tol=1e-12, max_iter=10_000).fit(X, y)
    ref = np.r_[sk.coef_[0], sk.intercept_] if bias else sk.coef_[0]
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_logistic_is_stationary_to_float64_precision():
    rng, X, w = _data(3)
    y = (X @ w + rng.normal(size=len(X)) > 0).astype(float)
    lam = 1e-3
    th = fit.fit_logistic(X, y, lam).double()
    Xt = torch.from_numpy(X)
    grad = Xt.T @ (torch.sigmoid(Xt @ th) - torch.from_numpy(y)) / len(X) + lam * th
    assert float(grad.abs().max()) < 1e-12


def test_weighted_soft_logistic_equals_replicated_rows():
    """n copies with pos positives ≡ one row with counts (the nearest-upsampling sufficient data)."""
    rng, X, w = _data(4, m=60)
    n = rng.integers(1, 6, len(X)).astype(float)
    pos = np.array([rng.integers(0, k + 1) for k in n]).astype(float)
    ours = fit.fit_logistic(X, pos / n, 0.02, weight=n).numpy()
    Xr = np.concatenate([np.repeat(X[i:i + 1], int(n[i]), 0) for i in range(len(X))])
    yr = np.concatenate([[1.0] * int(pos[i]) + [0.0] * int(n[i] - pos[i]) for i in range(len(X))])
    brute = fit.fit_logistic(Xr, yr, 0.02).numpy()
    np.testing.assert_allclose(ours, brute, atol=1e-10)


def test_logistic_path_equals_single_fits_and_streaming():
    rng, X, w = _data(5)
    y = (X @ w > 0).astype(float)
    Xt = torch.from_numpy(X)
    n = torch.ones(len(X), dtype=torch.float64)
    pos = torch.from_numpy(y)
    chunks = lambda: [(Xt[i:i + 64].float(), n[i:i + 64], pos[i:i + 64]) for i in range(0, len(X), 64)]
    lams = [1.0, 1e-2, 1e-1]
    path, info = fit.logistic_path(chunks, len(X), lams, torch.ones(X.shape[1], dtype=torch.float64))
    assert all(info.converged)
    for i, lam in enumerate(lams):
        np.testing.assert_allclose(path[i].numpy(), fit.fit_logistic(X, y, lam).numpy(), atol=1e-9)


@pytest.mark.parametrize("bias", [False, True])
def test_logistic_in_the_rows_span_equals_the_full_problem(bias):
    """Fewer rows than features (m = 24, C = 60): the solver works on the rows' span (rank ≤ 24) and must give the
    same probes — refined to 1e-9, the path to its own tolerance — with an unequal penalty and an unpenalised bias."""
    rng = np.random.default_rng(6)
    m, C = 24, 60
    X = torch.from_numpy(rng.normal(size=(m, C)) * rng.uniform(0.2, 3, C) + 0.3)
    if bias:
        X = torch.cat([X, torch.ones(m, 1, dtype=torch.float64)], 1)
    n = torch.from_numpy(rng.integers(1, 9, m).astype(float))
    pos = torch.floor(n * torch.from_numpy(rng.uniform(0, 1, m)))
    pen = torch.from_numpy(rng.uniform(0.5, 4, X.shape[1]))
    if bias:
        pen[-1] = 0.0
    chunks = lambda: [(X[:10].float(), n[:10], pos[:10], X[:10]), (X[10:].float(), n[10:], pos[10:], X[10:])]
    P, lams = float(n.sum()), [10.0, 1e-1, 1e-3]
    red = fit.LogisticSolver(chunks, P, pen, m)
    whole = fit.LogisticSolver(chunks, P, pen, 10 * C)                      # told there are many rows: unreduced
    assert red.reduced and not whole.reduced and len(red.penalty) <= m + int(bias)
    (pr, _), (pw, _) = red.path(lams), whole.path(lams)
    assert float((pr - pw).abs().max()) < 2e-3 * (1 + float(pw.abs().max()))
    for i, lam in enumerate(lams):
        exact = fit.logistic_refine(chunks, P, lam, pen, pw[i])[0]
        np.testing.assert_allclose(red.refine(lam, pr[i]).numpy(), exact.numpy(), rtol=1e-9, atol=1e-9)
        grad = X.T @ (n * torch.sigmoid(X @ exact) - pos) / P + lam * pen * exact
        assert float(grad.abs().max()) < 1e-10                                 # and it is the minimiser


def test_nearest_index_matches_interpolate():
    for H, h in ((16, 4), (12, 5), (7, 3), (4, 4)):
        x = torch.randn(2, 3, h, h)
        np.testing.assert_array_equal(fit.upsample_nearest(x, H, H).numpy(),
                                      F.interpolate(x, size=(H, H), mode="nearest").numpy())


@pytest.mark.parametrize("H,h", [(8, 4), (10, 4)])          # integer and non-integer factors
def test_nearest_sufficient_statistics_equal_brute_force(H, h):
    """Fitting on native positions weighted by their blocks = fitting every pixel of the upsampled features."""
    g = torch.Generator().manual_seed(0)
    n, C = 6, 5
    x = torch.randn(n, C, h, h, generator=g, dtype=torch.float64)
    depth = torch.randn(n, H, H, generator=g, dtype=torch.float64)
    mask = (torch.rand(n, H, H, generator=g) > 0.6).double()
    # brute force: upsample features, one row per label pixel
    xu = fit.upsample_nearest(x, H, H)
    Xb = xu.permute(0, 2, 3, 1).reshape(-1, C)
    # sufficient statistics: one row per native position, weight = block size, target = block sum
    cnt = fit.block_count(H, H, h, h).reshape(1, -1).expand(n, -1).reshape(-1)
    Xn = fit.to_rows(x, bias=False)
    dsum = fit.block_sum(depth, h, h).reshape(-1)
    psum = fit.block_sum(mask, h, h).reshape(-1)
    assert float(cnt.sum()) == n * H * H
    lam = 0.03
    np.testing.assert_allclose(fit.fit_ridge(Xn, dsum / cnt, lam, weight=cnt).numpy(),
                               fit.fit_ridge(Xb, depth.reshape(-1), lam).numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(fit.fit_logistic(Xn, psum / cnt, lam, weight=cnt).numpy(),
                               fit.fit_logistic(Xb, mask.reshape(-1), lam).numpy(), atol=1e-9)


def test_area_equals_nearest_for_integer_factor():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64)
    depth = torch.randn(4, 8, 8, generator=g, dtype=torch.float64)
    cnt = fit.block_count(8, 8, 4, 4).reshape(1, -1).expand(4, -1).reshape(-1)
    Xn = fit.to_rows(x, bias=False)
    near = fit.fit_ridge(Xn, fit.block_sum(depth, 4, 4).reshape(-1) / cnt, 0.1, weight=cnt)
    area = fit.fit_ridge(Xn, fit.area_downsample(depth, 4, 4).reshape(-1), 0.1)
    np.testing.assert_allclose(near.numpy(), area.numpy(), rtol=1e-10)


def test_adam_trainer_learns_planted_signal_and_selects_on_val():
    g = torch.Generator().manual_seed(0)
    n, C, h, H = 24, 4, 4, 8
    x = torch.randn(n, C, h, h, generator=g)
    w = torch.tensor([1.0, -2.0, 0.5, 0.0])
    z = fit.upsample_nearest(torch.einsum("nchw,c->nhw", x, w), H, H)
    res = fit.fit_adam(x[:16], z[:16], x[16:], z[16:], "depth", epochs=40, lr=5e-2)
    assert res.weight.shape == (C, 1) and 1 <= res.best_epoch <= 40
    assert res.val_losses[res.best_epoch - 1] == min(res.val_losses)
    np.testing.assert_allclose(res.weight[:, 0].numpy(), w.numpy(), atol=0.1)
    sal = fit.fit_adam(x[:16], (z[:16] > 0).float(), x[16:], (z[16:] > 0).float(), "saliency", epochs=20, lr=5e-2)
    logit = sal.weight[:, 1] - sal.weight[:, 0]
    assert torch.nn.functional.cosine_similarity(logit.float(), w, dim=0) > 0.9


def _gram(seed, m=300, C=12, free=3):
    """A weighted Gram matrix over rows [features of unequal scale | free columns (layout-like, last = ones)]."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(m, C)) * rng.uniform(0.1, 5, C) + rng.uniform(-1, 1, C)
    F_ = [rng.normal(size=(m, 1)) * 2 for _ in range(free - 1)] + ([np.ones((m, 1))] if free else [])
    X = np.concatenate([X, *F_], 1)
    wt = rng.integers(1, 5, m).astype(float)
    return rng, torch.from_numpy(X), torch.from_numpy(wt)


@pytest.mark.parametrize("free", [0, 1, 3])
def test_ridge_eigen_path_equals_direct_solve_per_lambda(free):
    """One eigendecomposition of the Schur complement gives every λ's solution of (A + λM)θ = b — penalised
    columns with unequal penalties, free columns (bias, layout channels) by back-substitution — equal to a direct
    float64 solve per λ to 1e-8 relative, from λ = 1e-7 to 1e3."""
    rng, X, wt = _gram(free, free=free)
    Y = torch.from_numpy(rng.normal(size=(len(X), 2)))
    A = X.T @ (X * wt[:, None]) / wt.sum()
    b = X.T @ (Y * wt[:, None]) / wt.sum()
    m = torch.from_numpy(rng.uniform(0.3, 3, X.shape[1]))
    if free:
        m[-free:] = 0.0
    lams = [1e-7, 1e-5, 1e-3, 1e-1, 1.0, 10.0, 1e3]
    path = fit.ridge_eigen(A, b, m, lams)                                      # (L, d, 2)
    for i, lam in enumerate(lams):
        direct = torch.linalg.solve(A + lam * torch.diag(m), b)
        assert float((path[i] - direct).norm() / direct.norm()) < 1e-8, lam


def test_ridge_path_is_the_scaled_fit_with_free_columns():
    """ridge_path (statistics, RMS scale, mask with free layout columns) = the direct solve of the scaled normal
    equations per λ, returned in raw units."""
    rng, X, wt = _gram(7, free=3)
    y = X[:, :4] @ torch.from_numpy(rng.normal(size=4)) + torch.from_numpy(rng.normal(size=len(X)))
    st = fit.RidgeStats(X.shape[1], 1)
    st.add(X, wt, (y * wt)[:, None])
    C = X.shape[1] - 3
    s = fit.feature_scale(st.G, st.P, C)
    mask = fit.penalty_mask(X.shape[1], True)
    mask[C:] = 0.0
    lams = [1e-6, 1e-2, 10.0]
    got = fit.ridge_path(st, lams, True, s, mask)[:, :, 0]
    Gs, Bs = st.G / (s[:, None] * s[None, :]) / st.P, st.B[:, 0] / s / st.P
    for i, lam in enumerate(lams):
        want = torch.linalg.solve(Gs + lam * torch.diag(mask), Bs) / s
        assert float((got[i] - want).norm() / want.norm()) < 1e-8


def test_ridge_eigen_planted_and_singular_cases():
    """Planted: noise-free y = Xθ* — as λ → 0 the path reaches θ*, free columns included. Singular: a dead
    channel (all-zero column) gets weight 0 at every λ > 0; free columns that repeat each other (A_uu singular)
    still solve the system, with the fitted values of the least-squares solution."""
    rng, X, wt = _gram(3, free=3)
    theta = torch.from_numpy(rng.normal(size=X.shape[1]))
    A = X.T @ (X * wt[:, None]) / wt.sum()
    b = (X.T @ ((X @ theta) * wt) / wt.sum())[:, None]
    m = torch.ones(X.shape[1], dtype=torch.float64)
    m[-3:] = 0.0
    path = fit.ridge_eigen(A, b, m, [1e-10, 1.0])
    np.testing.assert_allclose(path[0, :, 0].numpy(), theta.numpy(), rtol=1e-5, atol=1e-6)
    assert float((path[1, :-3, 0]).norm()) < float(theta[:-3].norm())           # shrunk toward 0 at λ = 1
    Xd = X.clone()
    Xd[:, 0] = 0.0                                                             # a dead channel
    Ad = Xd.T @ Xd / len(X)
    bd = Xd.T @ torch.from_numpy(rng.normal(size=(len(X), 1))) / len(X)
    pd = fit.ridge_eigen(Ad, bd, m, [1e-3, 1.0])
    assert float(pd[:, 0].abs().max()) == 0.0 or float(pd[:, 0].abs().max()) < 1e-14
    Xs = torch.cat([X, X[:, -1:]], 1)                                          # the ones column twice: A_uu singular
    As, ms = Xs.T @ Xs / len(X), torch.cat([m, torch.zeros(1, dtype=torch.float64)])
    bs = Xs.T @ torch.from_numpy(rng.normal(size=(len(X), 1))) / len(X)
    ps = fit.ridge_eigen(As, bs, ms, [0.1])[0]
    # not unique (the two columns may share their weight in any way): it solves the system, and fits the same values
    assert float((As @ ps + 0.1 * ms[:, None] * ps - bs).norm()) < 1e-8 * float(bs.norm())
    ref = torch.linalg.lstsq(As + 0.1 * torch.diag(ms), bs, driver="gelsd").solution
    np.testing.assert_allclose((Xs @ ps).numpy(), (Xs @ ref).numpy(), rtol=1e-7, atol=1e-9)


def test_strided_hessian_reads_every_grid_position():
    """The path's Hessian stride is coprime to the positions per image, so its rows cycle through the whole grid."""
    assert fit.coprime_stride(16, 256) == 17 and fit.coprime_stride(14, 256) == 15 and fit.coprime_stride(1, 256) == 1
    assert fit.coprime_stride(0, 64) == 1 and fit.coprime_stride(6, 1) == 6
    for k, period in ((16, 256), (14, 64), (9, 144), (4, 16)):
        s = fit.coprime_stride(k, period)
        assert len(set((np.arange(0, 64 * period, s) % period).tolist())) == period


def test_a_stalled_float32_path_is_finished_in_float64():
    """Nearly collinear features at a tiny λ: float32 logits lose the digits the minimiser needs, so the float32
    Newton steps stop contracting; the path hands that λ to the float64 refinement (with a float64 Hessian where
    the float32 one is too coarse), which must return the float64 minimiser (gradient ~0 in float64)."""
    rng = np.random.default_rng(11)
    m = 4000
    a = rng.normal(size=m)
    X = torch.from_numpy(np.stack([a, a + 1e-4 * rng.normal(size=m), rng.normal(size=m), np.ones(m)], 1))
    p = 1 / (1 + np.exp(-(2 * a + 0.5 * X[:, 2].numpy())))
    n = torch.full((m,), 4.0, dtype=torch.float64)
    pos = torch.from_numpy(rng.binomial(4, p).astype(float))
    chunks = lambda: [(X.float(), n, pos, X)]
    pen = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    lams = [1.0, 1e-3, 1e-7]
    theta, info = fit.logistic_path(chunks, float(n.sum()), lams, pen, refine=False)
    assert all(info.converged)
    assert info.polish[2] > 0                                                 # handed over, not run to max_iter
    assert info.iterations[2] < 50
    grad = X.T @ (n * torch.sigmoid(X @ theta[2]) - pos) / float(n.sum()) + 1e-7 * pen * theta[2]
    assert float(grad.abs().max()) < 1e-9


def test_the_saliency_lambda_is_chosen_between_float64_minimisers(monkeypatch):
    """Every λ within CHOICE_MARGIN of the path's best is refined and scored again before the choice: a path-best
    that loses once refined is not chosen; a λ far below the best is never refined; a failed refinement drops that
    λ and every smaller one."""
    from sceneprobe.probe import exact_fit
    lams = [1e-3, 1e-2, 1e-1, 1.0]
    thetas = torch.arange(4, dtype=torch.float64)[:, None].repeat(1, 3)
    refined_calls = []

    def refine(chunks, P, lam, pen, theta, *a):
        refined_calls.append(lam)
        return theta + 0.5, 1, lam != 1e-3                                     # λ = 1e-3 does not converge

    monkeypatch.setattr(exact_fit.fit, "logistic_refine", refine)

    class Solver:
        chunks, P, penalty = None, 1.0, None
        to_solver = from_solver = staticmethod(lambda t: t)

    after = {0.5: 0.6, 1.5: 0.495, 2.5: 0.499, 3.5: 0.30}                     # score of a refined θ, by θ[0]
    rescore = lambda th: [after[float(t[0])] for t in th]
    # path scores: λ=1e-2 best (0.500), λ=1e-1 within the margin (0.499), λ=1 far below (0.30)
    i, th = exact_fit._refined_choice(Solver(), lams, [0.501, 0.500, 0.499, 0.30], thetas, [0, 0, 0, 0], rescore)
    assert lams[i] == 1e-1 and float(th[0]) == 2.5                            # the refined best
    assert 1.0 not in refined_calls                                          # never a contender
    assert 1e-3 in refined_calls                                             # tried, did not converge: dropped
    # already-refined θ are not refined again, and win on their (float64) scores
    refined_calls.clear()
    i, th = exact_fit._refined_choice(Solver(), lams, [0.2, 0.500, 0.3, 0.30], thetas, [0, 1, 0, 0], rescore)
    assert lams[i] == 1e-2 and float(th[0]) == 1.0 and refined_calls == []
