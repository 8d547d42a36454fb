"""The exact probe fit (``probe.solver: exact``): ridge (depth) and the IRLS logistic path (saliency) from one
streamed pass over the train rows, λ chosen on val (ties → the larger λ; a choice on the grid's edge is flagged): the
saliency λ between float64 minimisers (every λ within :data:`CHOICE_MARGIN` of the path's best refined first), and
the chosen probe's val threshold folded into its intercept."""
from __future__ import annotations

import math

import torch

from ..capture.store import CaptureStore
from ..config import ProbeConfig
from . import fit
from . import layout as lay
from .fitted_probe import Probe, layout_of
from .metrics import nanmean
from .protocol_labels import ProtocolLabels
from .split_features import CACHE_BYTES, CHUNK, SplitFeatures, _features, _iter_images, _predict
from .thresholds import tune_thresholds, with_val_threshold


def _design(x: torch.Tensor, lrows: torch.Tensor | None, bias: bool, device) -> torch.Tensor:
    """Activations (b, C, h, w) → design rows (b·h·w, C [+ k] [+ 1]) float32: [features | layout | 1]."""
    C = x.shape[1]
    X = x.to(device).permute(0, 2, 3, 1).reshape(-1, C)                         # (b·h·w, C) float32
    parts = [X]
    if lrows is not None:
        parts.append(lrows.to(device, torch.float32).repeat(len(x), 1))
    if bias:
        parts.append(torch.ones(len(X), 1, device=device))
    return torch.cat(parts, 1) if len(parts) > 1 else X


def fit_exact(store: CaptureStore, site: str, step: int, labels: ProtocolLabels, cfg: ProbeConfig,
              device: torch.device | str = "cpu",
              val: SplitFeatures | None = None) -> tuple[Probe, Probe | None]:
    """Ridge (depth) and IRLS logistic (saliency) from one streamed pass over the train rows; λ chosen on val.

    Returns (the layout-fair probe, the plain probe fitted beside it from the same pass — or None): with
    ``probe.layout: input`` the design is [features | layout (2, unpenalised) | 1] (:mod:`.layout`); the plain
    probe uses the features and the intercept only (a column subset of the same statistics and rows).
    The statistics, the kept train rows and the solvers live on ``device``; metrics are computed on the CPU.
    ``val``: the validation split's activations (read here when not given)."""
    device = torch.device(device)
    val = val if val is not None else SplitFeatures(store, site, step, labels.idx(1))
    C, h, w = store.shape(site)
    layout = layout_of(labels, h, w, cfg)
    k = 0 if layout is None else layout.shape[0]
    lrows = None if layout is None else lay.rows(layout)                        # (h·w, k)
    d = C + k + int(cfg.bias)
    n_pix, dsum, pos = labels.native(h, w, cfg.upsample)
    stats = fit.RidgeStats(d, 3, device)
    cache, cached_bytes, nonfinite, over = [], 0, 0, False
    for r, x in store.iter_rows(site, step, labels.idx(0), CHUNK):
        x, nbad = _features(x)
        nonfinite += nbad
        X = _design(x, lrows, cfg.bias, device)                                # (b·h·w, d) float32
        wt = n_pix.reshape(1, -1).expand(len(r), -1).reshape(-1).to(device)   # (b·h·w,)
        ps = pos[r].reshape(-1).to(device)
        X64 = X.double()
        stats.add(X64, wt, torch.stack([dsum[r].reshape(-1), ps, wt], 1))
        cached_bytes += X.numel() * 12
        over = over or cached_bytes > CACHE_BYTES
        if over:
            cache.clear()                                                      # too big: re-read for each pass
        else:
            cache.append((X, wt, ps, X64))

    def chunks():
        return _rechunk(store, site, step, labels, cfg, n_pix, pos, lrows, device) if over else cache

    scale = fit.feature_scale(stats.G, stats.P, C)
    main = _fit_columns(store, site, step, labels, cfg, stats, chunks, C, k, scale, layout, device, nonfinite, val)
    plain = None
    if k and cfg.plain and labels.protocol in cfg.plain_protocols:
        cols = list(range(C)) + ([d - 1] if cfg.bias else [])
        idx = torch.tensor(cols, device=device)

        def cols_of(c):
            return tuple(t[:, idx] if t.dim() == 2 else t for t in c)
        kept = None if over else [cols_of(c) for c in cache]    # sliced once, not on every IRLS pass

        def sub():
            return kept if kept is not None else [cols_of(c) for c in chunks()]
        plain = _fit_columns(store, site, step, labels, cfg, stats.columns(cols), sub, C, 0, scale[idx], None, device,
                             nonfinite, val)
    return main, plain


def _fit_columns(store, site, step, labels: ProtocolLabels, cfg: ProbeConfig, stats: fit.RidgeStats, chunks,
                 C: int, k: int, scale: torch.Tensor, layout, device, nonfinite: int, val: SplitFeatures) -> Probe:
    """Both tasks' λ paths on the design columns of ``stats`` and ``chunks`` ([features (C) | layout (k) | bias]);
    λ and τ chosen on val."""
    _, h, w = store.shape(site)
    mask = fit.penalty_mask(stats.d, cfg.bias, device)
    mask[C:C + k] = 0.0                                                        # the layout's weights are free
    penalty = mask * scale ** 2                                                # λ‖s·w‖²: ridge on x/s, in raw units
    lams = list(cfg.lambdas)
    theta_d = fit.ridge_path(stats, lams, cfg.bias, scale, mask)[:, :, 0]      # (L, d)
    init = fit.logistic_first_step(stats.G, stats.B[:, 1], stats.B[:, 2], stats.P, max(lams), penalty)
    solver = fit.LogisticSolver(chunks, stats.P, penalty, len(labels.idx(0)) * h * w,     # in the rows' span if fewer
                                period=h * w)
    theta_s, info = solver.path(lams, init)                                    # to 1e-3 relative: enough to choose λ

    L, sc = len(lams), labels.scorer(1, h, w)
    z = _predict(val, torch.cat([theta_d, theta_s]), cfg.bias, layout).numpy()              # (n, 2L, h, w)
    rm = sc.depth(z[:, :L], spearman=False)["rmse"]                                              # (n, L)
    i_d = _pick([-nanmean(rm[:, i] ** 2) for i in range(L)], lams)                 # lowest val MSE (= best skill)

    def val_dice(zs) -> list[float]:
        if cfg.bias:
            return list(tune_thresholds(sc, zs)[0])                              # Dice at each λ's best threshold
        return [nanmean(d) for d in sc.saliency(zs)["dice"].T]                  # the paper's argmax rule

    dice_s = [v if ok else float("nan") for v, ok in zip(val_dice(z[:, L:]), info.converged)]  # NaN: the floor
    i_s, ts = _refined_choice(solver, lams, dice_s, theta_s, info.polish,
                              lambda th: val_dice(_predict(val, th, cfg.bias, layout).numpy()))
    selected = {"depth": ("lambda", lams[i_d]), "saliency": ("lambda", lams[i_s])}
    tau = 0.0
    if cfg.bias:
        ts, tau = with_val_threshold(store, site, step, labels, ts, layout, val)
    return Probe(theta_d[i_d].cpu(), ts.cpu(), scale.cpu(), (lams[i_d], lams[i_s]), selected, nonfinite, tau,
                 layout)


# Val-score margin within which a λ chosen from the path's θ (1e-3 relative) could lose to another once both are
# float64 minimisers: every λ within it of the best is refined before the choice. On the cpu preset's captures
# (785 λ of 78 fits) a path θ's val Dice was within 4.0e-4 of its minimiser's (99 % within 8e-5); the margin is 5×
# the largest.
CHOICE_MARGIN = 0.002


def _refined_choice(solver: fit.LogisticSolver, lams: list[float], scores: list[float], thetas: torch.Tensor,
                    refined: list[int], rescore) -> tuple[int, torch.Tensor]:
    """(index, θ): the val-best λ among float64 minimisers, and its minimiser.

    ``scores`` are val scores of the path's θ (to 1e-3 relative; NaN below the path's floor); ``refined[i]`` > 0
    where θ_i is already the float64 minimiser. Every λ within :data:`CHOICE_MARGIN` of the best score is refined
    and scored again (``rescore(θ (k, d)) → [score] * k``), until the best is a refined one: the choice is then
    made between float64 minimisers (so statistics that differ in their last bits give the same λ), and a λ too
    far below to win on the path is still too far once refined. A refinement that does not converge (an
    ill-posed fit: λ below what the data fix, nearly separable rows) is no minimiser to report: that λ and every
    smaller one are dropped (the fit only gets better posed with more penalty)."""
    scores, refined, thetas = list(scores), list(refined), thetas.clone()
    while True:
        i = _pick(scores, lams)
        if refined[i]:
            return i, thetas[i]
        if not math.isfinite(scores[i]):                       # nothing scored: the largest λ, refined as it can be
            th = fit.logistic_refine(solver.chunks, solver.P, lams[i], solver.penalty, solver.to_solver(thetas[i]))[0]
            return i, solver.from_solver(th)
        best = scores[i]
        todo = [j for j in range(len(lams)) if not refined[j] and math.isfinite(scores[j])
                and scores[j] >= best - CHOICE_MARGIN]
        done = []
        for j in sorted(todo, key=lambda j: -lams[j]):
            if not math.isfinite(scores[j]):                   # dropped below a failed refinement
                continue
            th, _, ok = fit.logistic_refine(solver.chunks, solver.P, lams[j], solver.penalty,
                                            solver.to_solver(thetas[j]))
            if ok:
                thetas[j], refined[j] = solver.from_solver(th), 1
                done.append(j)
            else:
                scores = [v if lams[q] > lams[j] else float("nan") for q, v in enumerate(scores)]
        if done:
            for j, v in zip(done, rescore(thetas[done])):
                scores[j] = v


def lambda_edge(lam: float, lams) -> str:
    """"low" / "high" when the chosen λ is the grid's smallest / largest (the optimum may lie beyond), else ""."""
    if len(lams) < 2 or lam <= 0:
        return ""
    return "low" if lam == min(lams) else ("high" if lam == max(lams) else "")


def _pick(scores: list[float], lams: list[float]) -> int:
    """Index of the best score (NaN never wins); ties go to the larger λ (the simpler probe)."""
    best = None
    for i in sorted(range(len(lams)), key=lambda i: -lams[i]):
        s = scores[i]
        if math.isfinite(s) and (best is None or s > scores[best] + 1e-12):
            best = i
    return best if best is not None else max(range(len(lams)), key=lambda i: lams[i])


def _rechunk(store, site, step, labels, cfg, n_pix, pos, lrows=None, device=torch.device("cpu")):
    """Train rows re-read from disk (when they exceed CACHE_BYTES): same chunks as the first pass."""
    for r, x in _iter_images(store, site, step, labels.idx(0)):
        X = _design(x, lrows, cfg.bias, device)
        yield (X, n_pix.reshape(1, -1).expand(len(r), -1).reshape(-1).to(device), pos[r].reshape(-1).to(device))
