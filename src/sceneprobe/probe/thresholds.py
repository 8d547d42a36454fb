"""The saliency decision threshold τ (salient ⇔ logit > τ), chosen on val Dice: the candidates, every probe's best τ
from one sort per image, and τ folded into a probe's intercept (:func:`with_val_threshold`)."""
from __future__ import annotations

import numpy as np
import torch

from ..capture.store import CaptureStore
from .metrics import EPS, NearestScorer
from .protocol_labels import ProtocolLabels
from .split_features import SplitFeatures, _predict


def tune_threshold(sc: NearestScorer, logits: np.ndarray, n_cand: int = 47) -> tuple[float, float]:
    """(best mean val Dice, its threshold τ) of the rule salient ⇔ logit > τ, over τ = 0, quantiles of the logits
    and one below all of them (all salient); ties → the τ nearest 0. ``logits`` (n, h, w) on val."""
    best, tau = tune_thresholds(sc, np.asarray(logits)[:, None], n_cand)
    return float(best[0]), float(tau[0])


def threshold_candidates(v: np.ndarray, n_cand: int = 47) -> np.ndarray:
    """τ = 0, ``n_cand`` quantiles of the logits ``v`` (any shape) and one below all of them; sorted, distinct."""
    return _candidate_rows(np.asarray(v, dtype=np.float64).reshape(1, -1), n_cand)[0]


def _candidate_rows(flat: np.ndarray, n_cand: int) -> list[np.ndarray]:
    """:func:`threshold_candidates` of every row of ``flat`` (L, N), from one quantile call."""
    q = np.quantile(flat, np.linspace(0.005, 0.995, n_cand), axis=1).T        # (L, n_cand)
    return [np.unique(np.concatenate([[0.0, row.min() - 1.0], qi])) for row, qi in zip(flat, q)]


def tune_thresholds(sc: NearestScorer, logits: np.ndarray, n_cand: int = 47) -> tuple[np.ndarray, np.ndarray]:
    """:func:`tune_threshold` for each of L probes at once: ``logits`` (n, L, h, w) → (best Dice (L,), τ (L,))."""
    v = np.asarray(logits, dtype=np.float64)
    n, L = v.shape[:2]
    cands = _candidate_rows(np.moveaxis(v, 1, 0).reshape(L, -1), n_cand)     # one row of logits per probe
    dice = dice_at_thresholds(sc, v.reshape(n, L, -1), cands)                  # [(n, K_i)] per probe
    best, tau = np.full(L, np.nan), np.zeros(L)
    for i, (c, d) in enumerate(zip(cands, dice)):
        ok = np.isfinite(d)
        score = np.where(ok, d, 0.0).sum(0) / np.maximum(ok.sum(0), 1)        # (K,) NaN-free mean
        score[ok.sum(0) == 0] = np.nan
        if not np.isfinite(score).any():
            continue
        best[i] = np.nanmax(score)
        good = np.flatnonzero(score >= best[i] - 1e-12)
        tau[i] = c[good[np.argmin(np.abs(c[good]))]]
    return best, tau


def dice_at_thresholds(sc: NearestScorer, v: np.ndarray, cands: list[np.ndarray]) -> list[np.ndarray]:
    """Per-image Dice (n, K_l) of the rule "logit > τ" at every candidate τ of ``cands[l]``, for native logits
    ``v`` (n, L, h·w) — from one sort per image and probe instead of one scoring pass per τ.

    With the native values of an image sorted together with the candidates (a value before an equal candidate),
    the pixels at or below τ are a prefix: cumulative sums of the pixel counts n_j and the positive counts M_j give
    ``|P(τ)| = Σ_j n_j − Σ_{v_j ≤ τ} n_j`` and ``|P(τ) ∩ G| = Σ_j M_j − Σ_{v_j ≤ τ} M_j`` for every τ at once, and
    Dice = (2|P∩G| + ε)/(|P| + |G| + ε) as :meth:`NearestScorer.saliency`. Both sums are of whole pixel counts, so
    they are exact in float64 and the Dice values equal the per-threshold scoring's bit for bit (``v − τ > 0`` ⇔
    ``v > τ`` in IEEE arithmetic; a NaN logit is never salient in either). Cost O(L·n·(q + K) log(q + K)) against
    O(L·K·n·q) for q = h·w positions."""
    n, L, q = v.shape
    v = np.where(np.isnan(v), -np.inf, v)
    cnt = np.broadcast_to(sc.cnt.reshape(-1, 1, q), (n, L, q))
    M = np.broadcast_to(sc.M[:, None, :], (n, L, q))
    total_c, total_m = cnt.sum(-1), M.sum(-1)                                  # (n, L) whole counts
    out = []
    for K in sorted({len(c) for c in cands}):                                  # probes with as many candidates
        ls = [i for i, c in enumerate(cands) if len(c) == K]
        key = np.concatenate([v[:, ls], np.broadcast_to(np.stack([cands[i] for i in ls])[None], (n, len(ls), K))], -1)
        order = np.argsort(key, axis=-1, kind="stable")                       # values first among equals
        pad = np.zeros((n, len(ls), K))
        below_c = np.cumsum(np.take_along_axis(np.concatenate([cnt[:, ls], pad], -1), order, -1), -1)
        below_m = np.cumsum(np.take_along_axis(np.concatenate([M[:, ls], pad], -1), order, -1), -1)
        where = np.empty_like(order)
        np.put_along_axis(where, order, np.arange(q + K), -1)                 # sorted position of every entry
        at = where[..., q:]                                                    # (n, |ls|, K) the candidates'
        size = total_c[:, ls, None] - np.take_along_axis(below_c, at, -1)
        inter = total_m[:, ls, None] - np.take_along_axis(below_m, at, -1)
        dice = (2 * inter + EPS) / (size + sc.G[:, None, None] + EPS)
        for j, i in enumerate(ls):
            out.append((i, dice[:, j]))
    return [d for _, d in sorted(out, key=lambda t: t[0])]


def with_val_threshold(store: CaptureStore, site: str, step: int, labels: ProtocolLabels,
                       theta: torch.Tensor, layout: torch.Tensor | None = None,
                       val: SplitFeatures | None = None) -> tuple[torch.Tensor, float]:
    """(θ, τ): the saliency probe with its decision threshold τ chosen on val folded into the intercept (last entry
    of θ): the probe stays linear and "salient ⇔ logit > 0" now means "logit > τ" of the maximum-likelihood fit."""
    _, h, w = store.shape(site)
    val = val if val is not None else SplitFeatures(store, site, step, labels.idx(1))
    z = _predict(val, theta[None], True, layout).numpy()[:, 0]                                   # (n, h, w)
    _, tau = tune_threshold(labels.scorer(1, h, w), z)
    out = theta.clone()
    out[-1] -= tau
    return out, tau
