"""The probe sweep: every capture store × site × step × task → probe files and a long-form results table.

Usage::

    sceneprobe probe --run runs/default              # exact solvers (ridge + IRLS), λ chosen on val
    sceneprobe probe --run runs/default --solver adam  # the paper's trainer, for parity

Per (protocol, model, site, step) one pass over the probe-train rows accumulates, in float64, ``G = XᵀDX`` and
``XᵀS`` for the native positions (D = pixels per position, S = label sums, see :mod:`.fit`); depth is ridge for all λ
at once, saliency an IRLS path warm-started from the same statistics (the train rows stay in memory for its passes up
to CACHE_BYTES, else they are re-read). λ is chosen on the validation split (depth: lowest MSE; saliency: highest
Dice, each λ at its own val-chosen decision threshold, from the path solved to 1e-3 relative; ties → the larger λ),
then the chosen saliency probe is solved to float64 precision and its decision threshold τ (salient ⇔ logit > τ,
highest val Dice) is folded into its intercept. The intercept (``probe.bias``, default on) is unpenalised;
``probe.bias: false`` is the paper's no-bias probe with its argmax rule (τ = 0). A λ chosen on the grid's edge is
flagged (``lambda_edge``). The test split is only ever scored. Features are divided by their train RMS inside the
penalty only (λ‖w·s‖² in raw units), so one λ grid means the same at every site.

Baselines (:mod:`.baselines`) are fitted on train and tuned on val the same way and scored with the same code; depth
skill = 1 − ΣMSE(probe)/ΣMSE(position-only baseline at the site's native size), on the same images.

Outputs::

    probes/<protocol>/<model>/<site>/step_XX.safetensors  weights of both tasks in raw activation units + metadata
    report/results.csv, report/results.json               long form, sorted, fixed formatting (byte-identical reruns)
    report/per_image.safetensors                          every metric per test image (protocol/model/site/step/...)

Probe file tensors: ``depth.weight`` (C, 1), ``depth.bias`` (1,) — standardised depth = x·w + b, depth =
``depth_norm[0] + depth_norm[1]·(x·w + b)``; ``saliency.weight`` (C, 2), ``saliency.bias`` (2,) — the paper's
2-class format, salient = argmax = (x·(w₁ − w₀) + b₁ − b₀ > 0); ``feature_scale`` (C,) the RMS used to scale the
penalty; ``lambda`` (2,) (depth, saliency; 0 for the Adam solver); ``saliency.threshold`` (1,) the val-chosen τ
already folded into ``saliency.bias``; ``test.<task>.<metric>`` per-test-image scores; ``nonfinite`` (1,) activations that were
not finite (fp16 overflow in a control) and were read as 0. Metadata: the config fingerprint and this probe's
result rows, so a rerun skips finished probes and still writes the full table.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from ..atomic import atomic_write_bytes, atomic_write_json, atomic_write_text, stable_safetensors
from ..capture.store import CaptureStore, load_labels
from ..config import ProbeConfig, fingerprint, to_dict
from ..errors import fail
from . import fit
from . import baselines as bl
from . import layout as lay
from .baselines import BASELINE_MODEL
from .metrics import EPS, METRICS, NearestScorer, depth_ratio_metrics, nanmean, ranks
from .parallel import map_ordered, resolve_device, resolve_workers, single_threaded
from .prompt_only import prompt_only_rows

# lo / hi: a CI, filled by the report for the numbers it interprets; lambda_edge: "low" / "high" when the val-chosen
# λ of that probe's task is the grid's smallest / largest (widen probe.lambdas), else empty
COLUMNS = ("protocol", "model", "site", "step", "timestep", "task", "split", "metric", "value", "lo", "hi",
           "lambda_edge")
PROBE_VERSION = 3                      # bump when the fit or the file format changes (3: layout-fair): old probes redone
SKY_DEPTH = 0.99                       # × FAR_DEPTH: labels at or beyond are sky (renderer: sky = FAR_DEPTH; = readout.py)
CHUNK = 64                             # images per streamed chunk
CACHE_BYTES = 1 << 29                  # train rows kept in memory for the IRLS passes (else re-read from disk)
SPLITS = {"val": 1, "test": 2}


# ---------------------------------------------------------------- labels -------------------------------------------
@dataclass
class ProtocolLabels:
    """One protocol's labels, depth standardised with the probe-train split's mean and std."""
    protocol: str
    depth: np.ndarray                  # (N, H, W) float32, standardised
    saliency: np.ndarray               # (N, H, W) uint8 {0, 1}
    split: np.ndarray                  # (N,) int8
    depth_mean: float
    depth_std: float
    digest: str
    sky: np.ndarray | None = None      # (N, H, W) bool: depth ≥ SKY_DEPTH·FAR_DEPTH (metrics are also given without)
    target: str = "depth"              # "depth" or "inverse" (1/depth): what ``depth`` holds, standardised
    _native: dict = field(default_factory=dict, repr=False)
    _ranks: dict = field(default_factory=dict, repr=False)
    _scorers: dict = field(default_factory=dict, repr=False)
    _priors: dict = field(default_factory=dict, repr=False)

    @property
    def size(self) -> tuple[int, int]:
        return self.depth.shape[1], self.depth.shape[2]

    def idx(self, code: int) -> np.ndarray:
        return np.flatnonzero(self.split == code)

    def native(self, h: int, w: int, upsample: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per native position of every image: (pixel weight n (h, w), depth sum (N, h, w), positive count (N, h, w)).

        nearest: n = pixels reading the position, sums over them; area: n = 1, block means (see :mod:`.fit`)."""
        key = (h, w, upsample)
        if key not in self._native:
            H, W = self.size
            if upsample == "nearest":
                self._native[key] = (fit.block_count(H, W, h, w), fit.block_sum(self.depth, h, w),
                                     fit.block_sum(self.saliency, h, w))
            else:
                self._native[key] = (torch.ones(h, w, dtype=torch.float64), fit.area_downsample(self.depth, h, w),
                                     fit.area_downsample(self.saliency, h, w))
        return self._native[key]

    def scorer(self, code: int, h: int, w: int) -> NearestScorer:
        """Exact metrics of nearest-upsampled native predictions for the rows of split ``code`` (cached)."""
        if code not in self._ranks:
            self._ranks[code] = ranks(self.depth[self.idx(code)])
        if (code, h, w) not in self._scorers:
            rows = self.idx(code)
            self._scorers[code, h, w] = NearestScorer(self.depth[rows], self.saliency[rows], h, w, self._ranks[code])
        return self._scorers[code, h, w]

    def nonsky_scorer(self, code: int, h: int, w: int) -> NearestScorer:
        """As :meth:`scorer`, restricted to the non-sky pixels of each image."""
        if (code, h, w, "nonsky") not in self._scorers:
            rows = self.idx(code)
            self._scorers[code, h, w, "nonsky"] = NearestScorer(self.depth[rows], self.saliency[rows], h, w,
                                                                valid=~self.sky[rows])
        return self._scorers[code, h, w, "nonsky"]

    def target_units(self, z: np.ndarray) -> np.ndarray:
        """Standardised values → the target's own units (depth, or inverse depth)."""
        return self.depth_mean + self.depth_std * z

    def prior(self, h: int, w: int, upsample: str) -> bl.Prior:
        """The position-only baseline at h×w: means over train, saliency threshold chosen on val Dice (cached)."""
        key = (h, w, upsample)
        if key not in self._priors:
            n_pix, dsum, pos = (t.numpy() for t in self.native(h, w, upsample))
            dmap, rate = bl.fit_prior(n_pix, dsum, pos, self.split == 0)
            sc = self.scorer(1, h, w)
            thr = bl.choose_threshold(rate, lambda z: sc.saliency(
                np.broadcast_to(z[None], (len(self.idx(1)), *z.shape)))["dice"])
            self._priors[key] = bl.Prior(dmap, rate, thr)
        return self._priors[key]


def load_protocol_labels(protocol_root: Path, n: int | None = None, target: str = "depth") -> ProtocolLabels:
    """Labels of one protocol; the depth target (depth or inverse depth) standardised with train's mean and std."""
    from ..world.render import FAR_DEPTH
    root = Path(protocol_root)
    raw = load_labels(root)
    for key in ("depth", "saliency", "split"):
        if key not in raw:
            raise fail(f"labels file {root / 'labels.safetensors'} has no {key!r} tensor; recreate it with the capture")
    depth, sal, split = raw["depth"].astype(np.float32), raw["saliency"].astype(np.uint8), raw["split"].astype(np.int8)
    if depth.ndim != 3 or sal.shape != depth.shape or split.shape != (len(depth),):
        raise fail(f"labels in {root / 'labels.safetensors'} disagree: depth {depth.shape}, saliency {sal.shape}, "
                   f"split {split.shape}; expected (N, H, W), (N, H, W), (N,)")
    if n is not None and len(depth) != n:
        raise fail(f"labels in {root / 'labels.safetensors'} have {len(depth)} rows but the capture stores have {n}; "
                   f"recapture or relabel so that rows align")
    for name, code in (("train", 0), ("val", 1), ("test", 2)):
        if not (split == code).any():
            raise fail(f"labels in {root / 'labels.safetensors'} have no {name} rows (split code {code}); probes need "
                       f"train, val and test rows")
    if not np.isfinite(depth).all():
        raise fail(f"labels in {root / 'labels.safetensors'} have non-finite depth values; fix the labels")
    if target not in ("depth", "inverse"):
        raise fail(f"probe.depth_target must be depth or inverse, got {target!r}")
    if target == "inverse":
        if (depth <= 0).any():
            raise fail(f"labels in {root / 'labels.safetensors'} have depth <= 0; inverse depth needs positive depth")
        depth_t = (1.0 / depth.astype(np.float64)).astype(np.float32)
    else:
        depth_t = depth
    train = depth_t[split == 0].astype(np.float64)
    mean, std = float(train.mean()), float(train.std())
    std = std if std > 0 else 1.0
    digest = hashlib.sha256((root / "labels.safetensors").read_bytes()).hexdigest()[:16]
    return ProtocolLabels(root.name, ((depth_t - mean) / std).astype(np.float32), (sal > 0).astype(np.uint8), split,
                          mean, std, digest, sky=depth >= SKY_DEPTH * FAR_DEPTH, target=target)


# ---------------------------------------------------------------- streaming features -------------------------------
def _features(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Non-finite activations (fp16 overflow in a control model) become 0; returns (x, how many were replaced)."""
    if bool(torch.isfinite(x.sum())):                                          # fast path: a sum of finite values
        return x, 0
    bad = ~torch.isfinite(x)
    nbad = int(bad.sum())
    return (torch.where(bad, torch.zeros((), dtype=x.dtype), x) if nbad else x), nbad


def _iter_images(store: CaptureStore, site: str, step: int,
                 rows: np.ndarray) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    for r, x in store.iter_rows(site, step, rows, CHUNK):
        yield r, _features(x)[0]                                               # (b, C, h, w) float32


class SplitFeatures:
    """The activations of one split of one (site, step) in the sweep's chunks (CHUNK images, float64): read from the
    store once and kept for every prediction the probe makes on that split (the λ path's, the threshold's, the
    scores of the layout-fair and the plain probe) when they fit in CACHE_BYTES, else re-read for each. Calling it
    gives the chunks."""

    def __init__(self, store: CaptureStore, site: str, step: int, rows: np.ndarray):
        self.store, self.site, self.step, self.rows = store, site, step, np.asarray(rows)
        C, h, w = store.shape(site)
        self.keep = len(self.rows) * C * h * w * 8 <= CACHE_BYTES
        self._kept: list[torch.Tensor] | None = None

    def _read(self) -> Iterator[torch.Tensor]:
        for _, x in _iter_images(self.store, self.site, self.step, self.rows):
            yield x.double()                                                   # (b, C, h, w)

    def __call__(self) -> Iterable[torch.Tensor]:
        if not self.keep:
            return self._read()
        if self._kept is None:
            self._kept = list(self._read())
        return self._kept


def _predict(feats: Callable[[], Iterable[torch.Tensor]], thetas: torch.Tensor, bias: bool,
             layout: torch.Tensor | None = None) -> torch.Tensor:
    """Native predictions x·θ (+ L·θ_L) (+ b) for every θ, on θ's device: (n, L, h, w) float64 on the CPU.

    ``feats()`` gives the activations in chunks (:class:`SplitFeatures`); θ = [features (C) | layout weights (k,
    with ``layout`` (k, h, w)) | bias]."""
    out = []
    k = 0 if layout is None else layout.shape[0]
    for x in feats():
        C = x.shape[1]
        z = torch.einsum("nchw,lc->nlhw", x.to(thetas.device, torch.float64), thetas[:, :C])
        if k:
            z = z + torch.einsum("khw,lk->lhw", layout.to(thetas.device, torch.float64), thetas[:, C:C + k])[None]
        if bias:
            z = z + thetas[:, -1][None, :, None, None]
        out.append(z.cpu())
    return torch.cat(out)


# ---------------------------------------------------------------- one probe ----------------------------------------
@dataclass
class Probe:
    """A fitted (site, step): raw-space weights θ (d,) per task (d = C [+2 layout] [+1 bias]) and what was chosen."""
    depth: torch.Tensor
    saliency: torch.Tensor           # logit weights (x·θ > 0 ⇔ salient)
    scale: torch.Tensor
    lam: tuple[float, float]
    selected: dict[str, tuple[str, float]]   # task → (selection metric name, value), e.g. ("lambda", 0.01)
    nonfinite: int = 0
    threshold: float = 0.0           # val-chosen logit threshold τ, already folded into the saliency intercept
    layout: torch.Tensor | None = None   # (2, h, w) layout channels the probe reads (None: a plain probe)


def layout_of(labels: ProtocolLabels, h: int, w: int, cfg: ProbeConfig) -> torch.Tensor | None:
    """The layout channels (2, h, w) float64 a probe at native size h×w reads (None with ``probe.layout: none``)."""
    return lay.maps(labels.prior(h, w, cfg.upsample)) if cfg.layout == "input" else None


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
    theta_s = solver.path(lams, init)                                          # to 1e-3 relative: enough to choose λ

    L, sc = len(lams), labels.scorer(1, h, w)
    z = _predict(val, torch.cat([theta_d, theta_s]), cfg.bias, layout).numpy()              # (n, 2L, h, w)
    rm = sc.depth(z[:, :L], spearman=False)["rmse"]                                              # (n, L)
    i_d = _pick([-nanmean(rm[:, i] ** 2) for i in range(L)], lams)                 # lowest val MSE (= best skill)
    if cfg.bias:
        dice_s = list(tune_thresholds(sc, z[:, L:])[0])                          # Dice at each λ's best threshold
    else:
        dice_s = [nanmean(d) for d in sc.saliency(z[:, L:])["dice"].T]              # the paper's argmax rule
    i_s, ts = _refined_choice(solver, lams, dice_s, theta_s)
    selected = {"depth": ("lambda", lams[i_d]), "saliency": ("lambda", lams[i_s])}
    tau = 0.0
    if cfg.bias:
        ts, tau = with_val_threshold(store, site, step, labels, ts, layout, val)
    return Probe(theta_d[i_d].cpu(), ts.cpu(), scale.cpu(), (lams[i_d], lams[i_s]), selected, nonfinite, tau,
                 layout)


def _refined_choice(solver: fit.LogisticSolver, lams: list[float], scores: list[float],
                    thetas: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(index, θ): the val-best λ whose float64 refinement converges, and its minimiser. A refinement that does not
    converge (an ill-posed fit: λ below what the data fix, nearly separable rows) is no minimiser to report; the
    next-best λ *above* it is tried instead (the fit only gets better posed with more penalty)."""
    scores = list(scores)
    while True:
        i = _pick(scores, lams)
        th, _, ok = fit.logistic_refine(solver.chunks, solver.P, lams[i], solver.penalty, solver.to_solver(thetas[i]))
        larger = [j for j in range(len(lams)) if lams[j] > lams[i]]
        if ok or not larger:
            return i, solver.from_solver(th)
        scores = [scores[j] if lams[j] > lams[i] else float("nan") for j in range(len(lams))]


def tune_threshold(sc: NearestScorer, logits: np.ndarray, n_cand: int = 47) -> tuple[float, float]:
    """(best mean val Dice, its threshold τ) of the rule salient ⇔ logit > τ, over τ = 0, quantiles of the logits
    and one below all of them (all salient); ties → the τ nearest 0. ``logits`` (n, h, w) on val."""
    best, tau = tune_thresholds(sc, np.asarray(logits)[:, None], n_cand)
    return float(best[0]), float(tau[0])


def threshold_candidates(v: np.ndarray, n_cand: int = 47) -> np.ndarray:
    """τ = 0, ``n_cand`` quantiles of the logits ``v`` (any shape) and one below all of them; sorted, distinct."""
    v = np.asarray(v, dtype=np.float64)
    return np.unique(np.concatenate([[0.0, v.min() - 1.0], np.quantile(v, np.linspace(0.005, 0.995, n_cand))]))


def tune_thresholds(sc: NearestScorer, logits: np.ndarray, n_cand: int = 47) -> tuple[np.ndarray, np.ndarray]:
    """:func:`tune_threshold` for each of L probes at once: ``logits`` (n, L, h, w) → (best Dice (L,), τ (L,))."""
    v = np.asarray(logits, dtype=np.float64)
    n, L = v.shape[:2]
    cands = [threshold_candidates(v[:, i], n_cand) for i in range(L)]
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


def fit_paper_adam(store: CaptureStore, site: str, step: int, labels: ProtocolLabels, cfg: ProbeConfig) -> Probe:
    """The paper's trainer (Adam, Huber / 2-class CE, 30 epochs, batch 4); checkpoint chosen on val loss.

    Holds the train and val rows of one (site, step) in memory, as the paper's loader does. With ``probe.layout:
    input`` the layout channels are appended to the activations (Adam has no penalty to exempt them from)."""
    C, h, w = store.shape(site)
    layout = layout_of(labels, h, w, cfg)
    tr, va = labels.idx(0), labels.idx(1)
    xt, nbad = _features(store.read(site, step, tr))
    xv, _ = _features(store.read(site, step, va))
    if layout is not None:
        xt, xv = (torch.cat([x, layout.float()[None].expand(len(x), -1, -1, -1)], 1) for x in (xt, xv))
    common = dict(upsample=cfg.upsample, bias=cfg.bias, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                  seed=cfg.seed)
    rd = fit.fit_adam(xt, torch.from_numpy(labels.depth[tr]), xv, torch.from_numpy(labels.depth[va]), "depth", **common)
    rs = fit.fit_adam(xt, torch.from_numpy(labels.saliency[tr]), xv, torch.from_numpy(labels.saliency[va]), "saliency",
                      **common)
    theta_d = torch.cat([rd.weight[:, 0], rd.bias[:1]]) if cfg.bias else rd.weight[:, 0]
    wl = rs.weight[:, 1] - rs.weight[:, 0]                                     # 2-class softmax → logit difference
    theta_s = torch.cat([wl, (rs.bias[1] - rs.bias[0])[None]]) if cfg.bias else wl
    tau = 0.0
    if cfg.bias:
        theta_s, tau = with_val_threshold(store, site, step, labels, theta_s, layout)
    return Probe(theta_d, theta_s, torch.ones(xt.shape[1], dtype=torch.float64), (0.0, 0.0),
                 {"depth": ("epoch", float(rd.best_epoch)), "saliency": ("epoch", float(rs.best_epoch))}, nbad, tau,
                 layout)


def native_metrics(labels: ProtocolLabels, code: int, h: int, w: int, zd: np.ndarray | None,
                   zs: np.ndarray | None) -> dict[tuple[str, str], np.ndarray]:
    """Every per-image metric (n,) of native predictions for the rows of split ``code``: ``zd`` (n, 1, h, w)
    standardised depth target, ``zs`` (n, 1, h', w') saliency logits (either may be None)."""
    out: dict[tuple[str, str], np.ndarray] = {}
    if zd is not None:
        d = labels.scorer(code, h, w).depth(zd)
        ns = labels.nonsky_scorer(code, h, w).depth(zd)
        rows = labels.idx(code)
        H, W = labels.size
        up = fit.upsample_nearest(torch.from_numpy(np.array(zd[:, 0], dtype=np.float64)), H, W).numpy()  # a copy
        t_hat, t = labels.target_units(up), labels.target_units(labels.depth[rows].astype(np.float64))
        for suffix, m, ratio in (("", d, depth_ratio_metrics(t_hat, t)),
                                 ("_nonsky", ns, depth_ratio_metrics(t_hat, t, ~labels.sky[rows]))):
            out[("depth", "mse" + suffix)] = m["rmse"][:, 0] ** 2
            for k in ("rmse", "spearman", "pearson"):
                out[("depth", k + suffix)] = m[k][:, 0]
            for k, v in ratio.items():
                out[("depth", k + suffix)] = v
        out.update({("depth", k): v for k, v in relative_depth_errors(up, labels.depth[rows]).items()})
    if zs is not None:
        hs, ws = zs.shape[-2:]
        for k, v in labels.scorer(code, hs, ws).saliency(zs, ranking=True).items():
            out[("saliency", k)] = v[:, 0]
    return out


def relative_depth_errors(pred: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image errors that ignore what a per-image offset (and scale) explains, on standardised depth (n, H, W):

    * ``mse_centred`` = mean_p ((ŷ_p − ȳ̂) − (y_p − ȳ))²: the spatial error once each image's mean depth is removed
      (a third of the layout prior's error is the per-image mean);
    * ``mse_ssi`` = min_{a, b} mean_p (a·ŷ_p + b − y_p)² = var(y)·(1 − r²) (r = Pearson): the scale-and-shift-
      invariant error with which the field scores relative depth (MiDaS's least-squares alignment).
    Both become skills (``skill_centred``, ``skill_ssi``) over the position-only baseline like the headline."""
    p = pred.reshape(len(pred), -1).astype(np.float64)
    t = y.reshape(len(y), -1).astype(np.float64)
    pc, tc = p - p.mean(1, keepdims=True), t - t.mean(1, keepdims=True)
    mse_c = ((pc - tc) ** 2).mean(1)
    vp, vt, cov = (pc ** 2).mean(1), (tc ** 2).mean(1), (pc * tc).mean(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ssi = np.where(vp > 0, vt - cov ** 2 / np.where(vp > 0, vp, 1.0), vt)       # residual of the best a·ŷ + b
    return {"mse_centred": mse_c, "mse_ssi": np.maximum(ssi, 0.0)}


def skill(mse: np.ndarray, mse_ref: np.ndarray) -> float:
    """1 − Σ MSE / Σ MSE_ref over the images (both finite): the share of the reference's squared error removed."""
    ok = np.isfinite(mse) & np.isfinite(mse_ref)
    den = float(mse_ref[ok].sum())
    return 1.0 - float(mse[ok].sum()) / den if den > 0 else float("nan")


def prior_site(labels: ProtocolLabels, h: int, w: int) -> str:
    """Result-table name of the position-only baseline at h×w (``mean-map`` at the label resolution)."""
    return bl.MEAN_MAP if (h, w) == labels.size else bl.position_site(h, w)


def prior_metrics(labels: ProtocolLabels, code: int, h: int, w: int, upsample: str) -> dict:
    """Per-image metrics of the position-only baseline at h×w on split ``code`` (cached on the labels)."""
    key = ("metrics", code, h, w, upsample)
    if key not in labels._priors:
        pr = labels.prior(h, w, upsample)
        n = len(labels.idx(code))
        labels._priors[key] = native_metrics(labels, code, h, w, pr.depth_pred(n), pr.logits(n))
    return labels._priors[key]


def score(store: CaptureStore, site: str, step: int, labels: ProtocolLabels, probe: Probe, cfg: ProbeConfig,
          device: torch.device | str = "cpu", feats: dict[int, SplitFeatures] | None = None,
          ) -> tuple[dict[tuple[str, str, str], float], dict[tuple[str, str], np.ndarray]]:
    """({(task, split, metric): mean over images} on val and test, {(task, metric): per-test-image values}).

    Depth skill is over the position-only baseline at this site's native resolution, on the same images.
    ``feats``: split code → its activations (:class:`SplitFeatures`; read here when not given)."""
    out, per_image = {}, {}
    _, h, w = store.shape(site)
    feats = feats or {}
    for split, code in SPLITS.items():
        f = feats.get(code) or SplitFeatures(store, site, step, labels.idx(code))
        z = _predict(f, torch.stack([probe.depth, probe.saliency]).to(device), cfg.bias,
                     probe.layout).numpy()                                                      # (n, 2, h, w)
        m = native_metrics(labels, code, h, w, z[:, :1], z[:, 1:])
        ref = prior_metrics(labels, code, h, w, cfg.upsample)
        for task, metric in list(m):
            out[(task, split, metric)] = nanmean(m[(task, metric)])
        out[("depth", split, "skill")] = skill(m[("depth", "mse")], ref[("depth", "mse")])
        out[("depth", split, "skill_nonsky")] = skill(m[("depth", "mse_nonsky")], ref[("depth", "mse_nonsky")])
        for kind in ("centred", "ssi"):
            out[("depth", split, f"skill_{kind}")] = skill(m[("depth", f"mse_{kind}")], ref[("depth", f"mse_{kind}")])
        if split == "test":
            per_image = m
    for task, (name, value) in probe.selected.items():
        out[(task, "val", name)] = value
    out[("saliency", "val", "threshold")] = probe.threshold
    return out, per_image


def probe_tensors(probe: Probe, C: int, bias: bool, labels: ProtocolLabels) -> dict[str, torch.Tensor]:
    """Weights in raw activation units, saliency in the paper's 2-class format (symmetric halves of the logit).

    A layout-fair probe also stores ``layout`` (2, h, w), the layout channels it reads, ``<task>.layout_weight``
    and their contribution as a per-position offset ``depth.offset`` (1, h, w) / ``saliency.offset`` (2, h, w):
    output = x·W + b + offset[:, y, x]."""
    k = 0 if probe.layout is None else probe.layout.shape[0]
    wd, ws = probe.depth[:C], probe.saliency[:C]
    bd = probe.depth[-1:] if bias else torch.zeros(1, dtype=torch.float64)
    bs = probe.saliency[-1:] if bias else torch.zeros(1, dtype=torch.float64)
    t = {"depth.weight": wd[:, None], "depth.bias": bd.reshape(1),
         "saliency.weight": torch.stack([-ws / 2, ws / 2], 1), "saliency.bias": torch.cat([-bs / 2, bs / 2]),
         "feature_scale": probe.scale[:C], "lambda": torch.tensor(probe.lam, dtype=torch.float64),
         "saliency.threshold": torch.tensor([probe.threshold], dtype=torch.float64),
         "depth_norm": torch.tensor([labels.depth_mean, labels.depth_std], dtype=torch.float64)}
    if k:
        vd, vs = probe.depth[C:C + k], probe.saliency[C:C + k]
        od, os_ = lay.offset(probe.layout, vd), lay.offset(probe.layout, vs)
        t.update({"layout": probe.layout, "depth.layout_weight": vd, "saliency.layout_weight": vs,
                  "depth.offset": od[None], "saliency.offset": torch.stack([-os_ / 2, os_ / 2])})
    return {k_: v.float().contiguous() for k_, v in t.items()}


# ---------------------------------------------------------------- the sweep ----------------------------------------
def find_stores(run: Path) -> list[tuple[Path, list[Path]]]:
    """[(protocol folder with labels.safetensors, [store folders])], sorted; stores are folders with a manifest."""
    root = Path(run) / "captures"
    if not root.is_dir():
        raise fail(f"no captures in {root}; run `sceneprobe capture --run {run}` first")
    out = []
    for proto in sorted(p for p in root.iterdir() if p.is_dir()):
        if not (proto / "labels.safetensors").is_file():
            continue
        stores = sorted(s for s in proto.iterdir() if s.is_dir() and ((s / "manifest.json").exists()
                                                                      or any(s.glob("*/step_*.safetensors"))))
        if stores:
            out.append((proto, stores))
    if not out:
        raise fail(f"no capture store with labels under {root} (expected <protocol>/labels.safetensors beside "
                   f"<protocol>/<model>/manifest.json); run `sceneprobe capture` first")
    return out


def write_probe_file(path: Path, tensors: dict, *, fingerprint: str, rows: dict, protocol: str, model: str,
                     site: str, step: int, solver: str, cfg, device: str) -> None:
    """One probe file (both tasks' weights) with the metadata a rerun checks (fingerprint of the store, finished
    rows, fit identity of ``cfg``), written atomically with byte-stable safetensors."""
    from safetensors.torch import save as st_save
    meta = {"fingerprint": fingerprint, "rows": json.dumps(rows, sort_keys=True), "protocol": protocol,
            "model": model, "site": site, "step": str(step), "solver": solver,
            "config": json.dumps(fit_identity(cfg), sort_keys=True), "device": device}
    atomic_write_bytes(path, stable_safetensors(st_save(tensors, metadata=meta)))


def probe_path(run: Path, protocol: str, model: str, site: str, step: int) -> Path:
    return Path(run) / "probes" / protocol / model / site / f"step_{step:02d}.safetensors"


RUN_ONLY = ("device", "workers")       # ProbeConfig keys that say where probes run, not what they are


def fit_identity(cfg: ProbeConfig) -> dict:
    """The probe config without the keys that only say where it runs (device, workers): what fingerprints hold."""
    return {k: v for k, v in to_dict(cfg).items() if k not in RUN_ONLY}


def probe_fingerprint(cfg: ProbeConfig, store: CaptureStore, labels: ProtocolLabels) -> str:
    manifest = hashlib.sha256((store.root / "manifest.json").read_bytes()).hexdigest()[:16]
    return fingerprint(fit_identity(cfg), {"version": PROBE_VERSION, "manifest": manifest, "labels": labels.digest})


def _finished_rows(path: Path, fp: str) -> tuple[list[dict], dict[tuple[str, str, str], np.ndarray]] | None:
    """(result rows, per-test-image metrics {(variant, task, metric)}: variant "" or "noprior") of a finished probe
    file with this fingerprint, else None."""
    from safetensors import safe_open
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != fp or "rows" not in meta:
                return None
            per_image = {}
            for k in f.keys():                       # "test.<task>.<metric>"; the plain probe's "noprior.test.…"
                variant, _, rest = k.rpartition("test.") if k.startswith(("test.", f"{lay.PLAIN}.test.")) else \
                    ("", "", "")
                if rest:
                    per_image[(variant.rstrip("."), *rest.split(".", 1))] = f.get_tensor(k).numpy()
    except Exception:                                                          # damaged or foreign file: refit
        return None
    return json.loads(meta["rows"]), per_image


def probe_one(store: CaptureStore, site: str, step: int, labels: ProtocolLabels, cfg: ProbeConfig,
              device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Fit, score and format one (site, step): (tensors for the probe file, result rows).

    With a plain probe beside the layout-fair one, its tensors are prefixed ``noprior.`` and its rows carry the
    model name ``<model>.noprior``."""
    feats = {code: SplitFeatures(store, site, step, labels.idx(code)) for code in SPLITS.values()}
    if cfg.solver == "exact":
        probe, plain = fit_exact(store, site, step, labels, cfg, device, feats[1])
    else:
        probe, plain = fit_paper_adam(store, site, step, labels, cfg), None   # the paper's trainer: CPU only
    model = store.manifest.get("model", store.root.name)
    C = store.shape(site)[0]
    tensors, rows = {}, []
    for p, name, prefix in ((probe, model, ""), (plain, lay.plain_model(model), f"{lay.PLAIN}.")):
        if p is None:
            continue
        scores, per_image = score(store, site, step, labels, p, cfg, device, feats)
        timestep = store.timesteps[store.steps.index(step)]
        edge = {"depth": lambda_edge(p.lam[0], cfg.lambdas), "saliency": lambda_edge(p.lam[1], cfg.lambdas)} \
            if cfg.solver == "exact" else {}
        rows += [_row(store.manifest.get("protocol", labels.protocol), name, site, step, timestep, task, split,
                      metric, v, lambda_edge=edge.get(task, "")) for (task, split, metric), v in scores.items()]
        tensors.update({prefix + k: v for k, v in probe_tensors(p, C, cfg.bias, labels).items()})
        tensors.update({f"{prefix}test.{task}.{metric}": torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64))
                        for (task, metric), v in per_image.items()})   # per test image, for the report's bootstrap
    if probe.nonfinite:
        print(f"warning: {store.root}/{site} step {step}: {probe.nonfinite} non-finite activations (fp16 overflow?) "
              f"were replaced by 0", file=sys.stderr)
    tensors["nonfinite"] = torch.tensor([float(probe.nonfinite)])
    return tensors, rows


def _row(protocol, model, site, step, timestep, task, split, metric, value, lo=float("nan"), hi=float("nan"),
         lambda_edge: str = "") -> dict:
    return {"protocol": protocol, "model": model, "site": site, "step": int(step), "timestep": int(timestep),
            "task": task, "split": split, "metric": metric, "value": _fmt_value(value), "lo": _fmt_value(lo),
            "hi": _fmt_value(hi), "lambda_edge": lambda_edge}


def _fmt_value(v: float) -> float:
    """Round to 6 significant digits (what results.csv shows): reruns and resumed runs print identical bytes."""
    v = float(v)
    return v if not math.isfinite(v) else float(f"{v:.6g}")


def run_probes(run: Path, cfg: ProbeConfig, progress: bool = True, threads: int | None = 1) -> Path:
    """Fit and score every (store, site, step) under ``run/captures``; returns ``run/report/results.csv``.

    Resumable: a probe file whose fingerprint (config, store manifest, labels, PROBE_VERSION) matches is not refit.
    Probes run on ``cfg.device`` and ``cfg.workers`` at once (:mod:`.parallel`); memory: per worker, one (site,
    step)'s streamed chunks, plus the train rows kept for the IRLS passes up to CACHE_BYTES.
    ``threads``: torch and BLAS threads of each probe (restored after; None leaves them) — keep 1 for results that
    are byte-identical on every machine: the sweep is many small solves, and parallel probes use the cores better.
    """
    with single_threaded(threads):
        return _run_probes(run, cfg, progress)


def _run_probes(run: Path, cfg: ProbeConfig, progress: bool) -> Path:
    from tqdm import tqdm

    if cfg.solver not in ("exact", "adam"):
        raise fail(f"probe.solver must be exact or adam, got {cfg.solver!r}")
    if cfg.upsample not in ("nearest", "area"):
        raise fail(f"probe.upsample must be nearest or area, got {cfg.upsample!r}")
    if cfg.solver == "exact" and (not cfg.lambdas or min(cfg.lambdas) <= 0):
        raise fail(f"probe.lambdas must be a non-empty list of positive numbers, got {list(cfg.lambdas)}")
    run = Path(run)
    groups = []
    for proto, store_dirs in find_stores(run):
        stores = [CaptureStore(s) for s in store_dirs]
        labels = load_protocol_labels(proto, stores[0].n, cfg.depth_target)
        for s in stores:
            s.verify()                                   # every shard's header, before any probe file is written
            if s.n != stores[0].n:
                raise fail(f"capture store {s.root} has {s.n} rows but {stores[0].root} has {stores[0].n}; rows must "
                           f"align with {proto / 'labels.safetensors'}")
        groups.append((proto, labels, stores))
    device = resolve_device(cfg.device)
    workers = resolve_workers(cfg.workers)
    jobs = [(labels, s, site, step) for _, labels, stores in groups for s in stores
            for site in s.sites for step in s.site_steps(site)]
    rows: list[dict] = []
    arrays: dict[str, np.ndarray] = {}
    fps = {s.root: probe_fingerprint(cfg, s, labels) for _, labels, stores in groups for s in stores}
    found = {}
    todo = []
    for job in jobs:
        labels, store, site, step = job
        path = probe_path(run, labels.protocol, store.manifest.get("model", store.root.name), site, step)
        found[job[1:]] = _finished_rows(path, fps[store.root])
        if found[job[1:]] is None:
            todo.append(job)
    for labels, store, site, _ in todo:                 # shared caches filled once, before the workers read them
        _, h, w = store.shape(site)
        for code in SPLITS.values():
            labels.scorer(code, h, w), labels.nonsky_scorer(code, h, w)
            prior_metrics(labels, code, h, w, cfg.upsample)
        labels.native(h, w, cfg.upsample)
    bar = tqdm(total=len(jobs), desc="probes", unit="probe", disable=not progress, file=sys.stderr)
    bar.update(len(jobs) - len(todo))

    def one(job) -> Path:
        labels, store, site, step = job
        model = store.manifest.get("model", store.root.name)
        tensors, done = probe_one(store, site, step, labels, cfg, device)
        path = probe_path(run, labels.protocol, model, site, step)
        write_probe_file(path, tensors, fingerprint=fps[store.root], rows=done, protocol=labels.protocol, model=model,
                         site=site, step=step, solver=cfg.solver, cfg=cfg, device=device.type)
        return path

    def done_one(job, path: Path) -> None:
        found[job[1:]] = _finished_rows(path, fps[job[1].root])
        bar.update(1)
        bar.set_postfix_str(f"{job[0].protocol}/{job[2]}/step {job[3]}", refresh=False)
    map_ordered(one, todo, workers, done_one)
    bar.close()
    for labels, store, site, step in jobs:
        model = store.manifest.get("model", store.root.name)
        done, per_image = found[store, site, step]
        rows.extend(done)
        for (variant, task, metric), v in per_image.items():
            name = lay.plain_model(model) if variant else model
            arrays[per_image_key(labels.protocol, name, site, step, task, metric)] = v
    positions = {}
    for proto, labels, stores in groups:
        sizes = {tuple(s.shape(site)[1:]) for s in stores for site in s.sites} | {labels.size}
        rows += baseline_rows(labels, sorted(sizes), cfg.upsample, arrays)
        rows += prompt_only_rows(proto, labels, sorted(sizes), cfg, arrays)       # [] without prompt embeddings
        arrays[per_image_key(labels.protocol, "test-rows")] = labels.idx(2).astype(np.int64)
        positions.update({f"{labels.protocol}/{site}": prior_site(labels, *s.shape(site)[1:])
                          for s in stores for site in s.sites})
    write_per_image(run / "report", arrays, positions)
    return write_results(run / "report", rows, cfg)


def baseline_rows(labels: ProtocolLabels, sizes: list[tuple[int, int]], upsample: str,
                  arrays: dict[str, np.ndarray]) -> list[dict]:
    """Rows (and per-test-image arrays) of the position-only baselines at every size, the mean map and all-salient."""
    rows = []
    for split, code in SPLITS.items():
        n = len(labels.idx(code))
        cases = [(prior_site(labels, h, w), prior_metrics(labels, code, h, w, upsample), labels.prior(h, w, upsample))
                 for h, w in sizes]
        cases.append((bl.ALL_SALIENT, native_metrics(labels, code, 1, 1, None, bl.all_salient_logits(n)), None))
        for site, m, prior in cases:
            for (task, metric), v in m.items():
                rows.append(_row(labels.protocol, BASELINE_MODEL, site, -1, -1, task, split, metric, nanmean(v)))
                if split == "test":
                    arrays[per_image_key(labels.protocol, BASELINE_MODEL, site, -1, task, metric)] = v
            if prior is not None and split == "val":
                rows.append(_row(labels.protocol, BASELINE_MODEL, site, -1, -1, "saliency", "val", "threshold",
                                 prior.threshold))
            if ("depth", "mse") in m:                                          # skill over itself, by definition
                rows.append(_row(labels.protocol, BASELINE_MODEL, site, -1, -1, "depth", split, "skill", 0.0))
    return rows


def per_image_key(protocol: str, model: str, site: str = "", step: int = -1, task: str = "", metric: str = "") -> str:
    """Key of a per-test-image array in ``report/per_image.safetensors``: ``protocol/model/site/step/task/metric``
    (``protocol/test-rows``: the label rows of the test images, in the arrays' order)."""
    return "/".join([protocol, model] + ([site, str(step), task, metric] if site else []))


def write_per_image(out: Path, arrays: dict[str, np.ndarray], positions: dict[str, str] | None = None) -> Path:
    """Per-test-image metrics of every probe and baseline (float64), for the report's paired bootstrap; metadata
    ``positions``: ``protocol/site`` → the site name of its position-only baseline (the same native size)."""
    from safetensors.numpy import save as np_save
    data = np_save({k: np.ascontiguousarray(v) for k, v in sorted(arrays.items())},
                   metadata={"key": "protocol/model/site/step/task/metric",
                             "positions": json.dumps(positions or {}, sort_keys=True)})
    atomic_write_bytes(out / "per_image.safetensors", stable_safetensors(data))
    return out / "per_image.safetensors"


def read_per_image(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    path = Path(path)
    if not path.is_file():
        raise fail(f"per-image results {path} are missing; rerun `sceneprobe probe --run {path.parent.parent}`")
    try:
        return load_file(str(path))
    except Exception as e:                                  # safetensors' own error type (truncated, garbage header)
        raise _damaged_per_image(path, e) from None


def read_positions(path: Path) -> dict[str, str]:
    """``protocol/site`` → position-only baseline site (metadata of ``per_image.safetensors``)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="np") as f:
            return json.loads((f.metadata() or {}).get("positions", "{}"))
    except Exception as e:
        raise _damaged_per_image(path, e) from None


def _damaged_per_image(path: Path, e: Exception) -> Exception:
    if not (type(e).__name__ == "SafetensorError" or isinstance(e, (OSError, ValueError))):
        return e
    return fail(f"per-image results {path} are damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                f"rerun `sceneprobe probe --run {path.parent.parent}` to rewrite them")


def check_rows_have_arrays(rows: list[dict], arrays: dict[str, np.ndarray], path: Path,
                           skip: Callable[[dict], bool] = lambda r: False) -> None:
    """Every (protocol, model, site, step) of ``results.csv`` has its per-test-image arrays (``per_image.safetensors``,
    written by the same probe run): a site, model or step edited in, or files from two runs, are one error.
    ``skip``: rows that are not the sweep's (the report's own comparison rows)."""
    have = {tuple(k.split("/")[:4]) for k in arrays}
    for line, r in enumerate(rows, start=2):
        if not skip(r) and (r["protocol"], r["model"], r["site"], str(r["step"])) not in have:
            raise fail(f"results file {path}, line {line}: site {r['site']!r} (model {r['model']}, step {r['step']}) "
                       f"has no per-image results in {path.parent / 'per_image.safetensors'}: the two files are not "
                       f"from the same probe run; rerun `sceneprobe probe --run {path.parent.parent}` to rewrite them")


def _sort_key(r: dict):
    return (r["protocol"], r["model"], r["site"], r["step"], r["task"], r["split"], r["metric"])


def format_value(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:.6g}"


def _cell(r: dict, c: str) -> str:
    if c == "value":
        return format_value(r[c])
    if c in ("lo", "hi"):
        v = r.get(c, math.nan)
        return "" if math.isnan(v) else format_value(v)
    return r.get(c, "")


def write_results_csv(out: Path, rows: list[dict]) -> list[dict]:
    """Write ``out/results.csv`` (rows sorted, values formatted) and return the rows as results.json keeps them
    (NaN → None)."""
    rows = sorted(rows, key=_sort_key)
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(COLUMNS)
    for r in rows:
        wr.writerow([_cell(r, c) for c in COLUMNS])
    atomic_write_text(out / "results.csv", buf.getvalue())
    return [{**{c: r.get(c, "") for c in COLUMNS},
             **{k: None if math.isnan(r.get(k, math.nan)) else r[k] for k in ("value", "lo", "hi")}} for r in rows]


def write_results(out: Path, rows: list[dict], cfg: ProbeConfig) -> Path:
    clean = write_results_csv(out, rows)
    atomic_write_json(out / "results.json", {"columns": list(COLUMNS), "probe_config": fit_identity(cfg),
                                             "metrics": {k: list(v) for k, v in METRICS.items()}, "rows": clean})
    return out / "results.csv"


def read_results(path: Path) -> list[dict]:
    """results.csv → rows with typed step, timestep and value."""
    path = Path(path)
    if not path.is_file():
        raise fail(f"results file {path} is missing; run `sceneprobe probe --run {path.parent.parent}` first")
    redo = f"rerun `sceneprobe probe --run {path.parent.parent}` to rewrite it"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise fail(f"results file {path} cannot be read ({type(e).__name__}); {redo}") from None
    need = ("protocol", "model", "site", "step", "timestep", "task", "split", "metric", "value")
    for line, r in enumerate(rows, start=2):
        missing = [k for k in need if not r.get(k)]
        if missing:
            raise fail(f"results file {path}, line {line}: field {missing[0]!r} is missing or empty; {redo}")
        try:
            r["step"], r["timestep"], r["value"] = int(r["step"]), int(r["timestep"]), float(r["value"])
            r["lo"], r["hi"] = (float(r[k]) if r.get(k) else math.nan for k in ("lo", "hi"))
        except (TypeError, ValueError):
            raise fail(f"results file {path}, line {line}: step, timestep, value, lo and hi must be numbers; {redo}") \
                from None
        r["lambda_edge"] = r.get("lambda_edge") or ""
    return rows
