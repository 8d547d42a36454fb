"""Low-storage probing for Stable Diffusion at the paper's scale (``capture: {store: streamed}``): no activation store.

The paper's sweep would need a 250 GB store (16 U-Net sites + the VAE site × 15 steps × 617 images at 512 px). What
the probes need is much less, and the sampling order can make each image be sampled exactly once:

1. **train images** (sampled first): each batch's activations stay on the device until its images are made and
   labelled; then, per (site, step), the sufficient statistics of the weighted least-squares fit are accumulated in
   float64 on the device — ``G = XᵀDX`` and ``XᵀS`` with S = [target block sum, positive count, pixel count] per native
   position, with an intercept column (:class:`~sceneprobe.probe.fit.RidgeStats`, the sweep's own statistics). The
   target is standardised afterwards by algebra: ``Xᵀ((y − m)/s) = (Xᵀy − m·Xᵀn)/s`` (m, s: train mean and std).
   Besides, a fixed random subsample of ``capture.subsample`` native positions per image (all of them when the grid
   is that small) is kept for the saliency fit, with weights ``n_j·hw/m`` (an unbiased estimate of the full
   objective). Activations are rounded to ``capture.dtype`` first: exactly what a full store would hold.
   With ``probe.layout: input`` (the default; :mod:`.layout`) each (site, step) also sums its activations over
   the train images per native position, ``Σ_i x_i(j)`` (C, h·w) float64: the layout channels L_j are a function of
   the train labels, known only once every train image is labelled, and with this sum the statistics of the
   design [features | L | 1] follow by algebra — ``XᵀDL = Σ_j n_j (Σ_i x_i(j)) L_jᵀ``,
   ``LᵀDL = N Σ_j n_j L_j L_jᵀ``, ``LᵀS = Σ_j L_j Σ_i S_i(j)`` — so the probes are the full store's layout-fair
   ones (to float rounding), the prior's channels unpenalised as in the sweep. The subsample's positions are
   drawn again from their seeds at fit time and get their L rows then.
2. **fit**: depth = ridge for every λ from G and XᵀS (exact: the full store's probe, to float rounding); saliency =
   the sweep's IRLS logistic path on the subsample, started from the exact full-data first Newton step, then every
   λ refined to its float64 minimiser (:meth:`~.fit.LogisticSolver.converged_path`); λ below the first one whose
   refinement does not converge (the data's floor) is never chosen. The subsample and the solver's float32 copy
   of it are freed after each probe's fit.
3. **validation images**: predictions of every λ's probe (native resolution, float64 as the sweep computes them:
   float32 would tie the logits of a strongly penalised probe, which spread ~1e-5 around its intercept, and Dice at
   a tuned threshold depends on their order) are kept; λ is chosen with the
   sweep's rule (depth: lowest mean MSE; saliency: highest mean Dice among converged λ; ties → larger λ). The
   chosen probe's decision threshold τ (with an intercept) and its validation metrics come from its own validation
   logits; the test split is scored with the same probe.
4. **test images**: predictions of the chosen probes are kept; then every metric of the sweep (val and test, skill
   over the position-only baseline, per-image arrays for the bootstrap, the baselines) is computed with the sweep's
   own functions from these predictions and the labels. Probe files and ``results.csv`` have the sweep's format.

What it keeps (SD v1.x, 512 px, 617 images, PNDM's 16 U-Net calls): G on the device ≈ 1.5 GB per model (with the
layout: the per-position sums ≈ 1.7 GB more); subsample
(64 positions, float16) ≈ 6.5 GB RAM; validation predictions ≈ 4 GB, test predictions ≈ 1.5 GB RAM. On disk: images,
labels, probes — about 2 GB. The permuted control is scored against the model's labels (same seeds, same rows).
The SD study's driver — processes, checkpoints and resume, ``accelerate launch`` — is :mod:`.streamed_sd`.
The probe without the prior (the sweep's ``<model>.noprior`` rows) is not fitted in streamed mode.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import Config
from ..errors import fail
from ..processes import resolve_workers
from . import baselines as bl
from . import fit
from . import layout as lay
from . import sweep as sw
from .metrics import NearestScorer, nanmean, ranks
from .parallel import map_ordered, resolve_device, single_threaded

STREAMED_VERSION = 5                   # 2: val/test predictions kept in float64 (see 3. above); 3: every λ
                                       # refined, λ below the convergence floor never chosen; 4: layout-fair;
                                       # 5: the refinement reads a float64 Hessian where a float32 one is too coarse


@dataclass
class Acc:
    """One (site, step): statistics on the device, subsample and predictions on the CPU."""
    stats: fit.RidgeStats | None          # G (C+1, C+1), last column = intercept; B (C+1, 3): Xᵀ[raw target sum,
                                          # positives, pixels]; P = Σ pixels (float64, on the capture device)
    nonfinite: int = 0
    xsum: torch.Tensor | None = None             # (C, h·w) float64: Σ over train images of x per native position
    sub: list = field(default_factory=list)     # [(image id, X (m, C+1) float16, n (m,), pos (m,))] per train image
    val: list = field(default_factory=list)     # [(b, 2L, h, w) float64]
    test: list = field(default_factory=list)    # [(b, 2, h, w) float64]
    theta_d: torch.Tensor | None = None          # (L, d) raw coordinates
    theta_s: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    converged: list = field(default_factory=list)  # per λ: the saliency fit converged (False below the floor)
    pick: tuple[int, int] = (0, 0)
    tau: float = 0.0                            # val-chosen saliency threshold, folded into the intercept


def _clean(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    bad = ~torch.isfinite(x)
    nbad = int(bad.sum())
    return (torch.where(bad, torch.zeros((), dtype=x.dtype, device=x.device), x) if nbad else x), nbad


def _design(x: torch.Tensor) -> torch.Tensor:
    """(b, C, h, w) → rows (b·h·w, C+1) float64 with the intercept column last, row order (image, y, x)."""
    X = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).double()
    return torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype, device=X.device)], 1)


def statistics_bytes(shapes: dict[str, tuple[int, int, int]], steps: int, layout: bool) -> int:
    """Bytes of the statistics a streamed fit holds on the capture device for the whole train pass: per (site, step)
    the float64 G (C+1)² and B (C+1)×3, and with the layout the per-position sums C × h·w."""
    per_step = sum((c + 1) * (c + 4) * 8 + (c * h * w * 8 if layout else 0) for c, h, w in shapes.values())
    return per_step * steps


def check_device_room(need: int, free: int, sites: int, steps: int) -> None:
    """One error line when the streamed statistics cannot fit in the device's free memory (leaving 10 % for the
    model's activations is the caller's margin of error, not a promise)."""
    if need > 0.9 * free:
        raise fail(f"the streamed statistics of {sites} sites x {steps} steps need {need / 1e9:.1f} GB on the GPU "
                   f"(Gram matrices and the layout-fair per-position sums), more than its {free / 1e9:.1f} GB free "
                   f"allow; record fewer sites with capture.sites (names or patterns, e.g. every 4th block; "
                   f"benchmarks/bench_scale.py gives the arithmetic per family) or fewer steps with capture.steps")


def target_of(depth: np.ndarray, target: str) -> np.ndarray:
    """The probe target in the sweep's units (float32): depth, or inverse depth (as ``load_protocol_labels``)."""
    if target == "inverse":
        if (depth <= 0).any():
            raise fail("labels have depth <= 0; probe.depth_target inverse needs positive depth")
        return (1.0 / depth.astype(np.float64)).astype(np.float32)
    return depth.astype(np.float32)


class StreamedProbes:
    """The streamed fit of one model: ``train_batch`` … → ``fit`` → ``val_batch`` … → ``choose`` → ``test_batch``."""

    def __init__(self, shapes: dict[str, tuple[int, int, int]], steps: int, size: tuple[int, int], cfg: Config,
                 device):
        pc, cc = cfg.probe, cfg.capture
        if pc.solver != "exact" or pc.upsample != "nearest":
            raise fail("capture.store streamed fits the exact probes with nearest upsampling (probe.solver: exact, "
                       f"probe.upsample: nearest); got {pc.solver}/{pc.upsample} — use capture.store: full")
        self.shapes, self.steps, self.size, self.pc, self.device = dict(shapes), steps, size, pc, device
        self.m, self.dtype, self.pool = cc.subsample, getattr(torch, cc.dtype), cc.pool
        self.lams = list(pc.lambdas)
        self.fit_device, self.workers = resolve_device(pc.device), resolve_workers(pc.workers)
        self.layout = pc.layout == "input"          # the prior as two unpenalised input channels (:mod:`.layout`)
        if torch.device(device).type == "cuda":      # before allocating: one line, not an out-of-memory traceback
            check_device_room(statistics_bytes(self.shapes, steps, self.layout),
                              torch.cuda.mem_get_info(torch.device(device))[0], len(self.shapes), steps)
        self.acc = {(s, t): Acc(fit.RidgeStats(c + 1, 3, device),
                                xsum=torch.zeros(c, h * w, dtype=torch.float64, device=device) if self.layout else None)
                    for s, (c, h, w) in self.shapes.items() for t in range(steps)}
        H, W = size
        self.count = {(h, w): fit.block_count(H, W, h, w) for c, h, w in self.shapes.values()}
        self.mean = self.std = None
        self.layouts: dict[tuple[int, int], torch.Tensor] = {}   # (h, w) → layout channels (2, h, w), set by fit
        self.sums: dict[tuple[int, int], torch.Tensor] = {}      # (h, w) → (h·w, 3) train Σ_i [target, pos, n]
        self.seconds: dict[str, float] = {}          # probe work by phase (statistics, fit, predict, choose, metrics)

    @contextlib.contextmanager
    def timed(self, phase: str):
        """Wall time of the probe work in ``phase`` (devices synchronised, so it is not billed to sampling)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            for dev in {self.device, self.fit_device}:
                if torch.device(dev).type == "cuda":
                    torch.cuda.synchronize(dev)
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t

    # -------------------------------------------------------------------------------------------- activations
    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """What a full store would hold: pooled like the store, rounded to ``capture.dtype``."""
        if self.pool > 1:
            x = F.avg_pool2d(x.float(), self.pool)
        return x.to(self.dtype).float()

    def train_batch(self, acts: dict, ids: Sequence[int], target: np.ndarray, saliency: np.ndarray) -> None:
        """Accumulate the statistics of one batch: ``target`` (b, H, W) raw target, ``saliency`` (b, H, W) {0, 1}."""
        # BLAS pinned to one thread: a multi-threaded GEMM may split a sum over rows between threads (OpenBLAS does
        # for XᵀS), so the thread count — 1 under torchrun, every core otherwise — would reach the saved statistics
        with self.timed("statistics"), single_threaded(1):
            self._train_batch(acts, ids, target, saliency)

    def _train_batch(self, acts: dict, ids: Sequence[int], target: np.ndarray, saliency: np.ndarray) -> None:
        sums = {}
        for (site, step), x in acts.items():
            a = self.acc[site, step]
            c, h, w = self.shapes[site]
            x, nbad = _clean(x)
            a.nonfinite += nbad
            if (h, w) not in sums:
                sums[h, w] = (fit.block_sum(target, h, w).to(self.device), fit.block_sum(saliency, h, w).to(self.device))
            dsum, pos = sums[h, w]                                                  # (b, h, w) float64
            n = self.count[h, w].to(self.device).reshape(1, -1).expand(len(ids), -1).reshape(-1)   # (b·h·w,)
            X = _design(x)                                                          # (b·h·w, C+1)
            a.stats.add(X, n, torch.stack([dsum.reshape(-1), pos.reshape(-1), n], 1))
            if a.xsum is not None:
                a.xsum += x.double().sum(0).reshape(c, -1)
            hw = h * w
            k = min(self.m, hw)
            for j, i in enumerate(ids):                                             # the saliency subsample
                sel = self._positions(int(i), site, step)
                f = hw / k
                rows = X[j * hw: (j + 1) * hw][sel.to(X.device)]
                a.sub.append((int(i), rows.to(torch.float16).cpu(), (n[:hw][sel.to(n.device)] * f).cpu(),
                              (pos[j].reshape(-1)[sel.to(pos.device)] * f).cpu()))

    def _positions(self, image: int, site: str, step: int) -> torch.Tensor:
        """The native positions (sorted, (k,) int64) of one train image's saliency subsample at (site, step): a fixed
        function of the image id, step and site, so the fit can draw them again (for their layout rows)."""
        _, h, w = self.shapes[site]
        hw = h * w
        k = min(self.m, hw)
        if k == hw:
            return torch.arange(hw)
        g = torch.Generator().manual_seed(image * 1_000_003 + step * 7_919 + sorted(self.shapes).index(site))
        return torch.randperm(hw, generator=g)[:k].sort().values

    def merge(self, other: "StreamedProbes") -> None:
        """Add the train statistics and subsample of another accumulator that saw other train images (another rank's
        share of the prompts): G, XᵀS and P add up, the subsample rows join in image order. Exact up to the order of
        float64 additions (G of two halves summed ≠ G summed image by image in the last bits)."""
        if set(other.acc) != set(self.acc):
            raise ValueError("accumulators of different sites or steps cannot be merged")
        for key, a in self.acc.items():
            b = other.acc[key]
            a.stats.merge(b.stats)
            if a.xsum is not None:
                a.xsum += b.xsum.to(a.xsum.device)
            a.nonfinite += b.nonfinite
            a.sub.extend(b.sub)

    def _predict(self, x: torch.Tensor, thetas: torch.Tensor) -> np.ndarray:
        """Native predictions x·w + L·v + b for every θ (K, d) = [w | v | b]: (b, K, h, w) float64 (the sweep's
        :func:`_predict`; L the layout channels at this size, when the probes read them)."""
        x, _ = _clean(x)
        th = thetas.to(device=x.device, dtype=torch.float64)
        C, (h, w) = x.shape[1], x.shape[2:]
        z = torch.einsum("nchw,kc->nkhw", x.double(), th[:, :C])
        k = 0
        if self.layout:
            L = self.layouts[h, w].to(x.device)                                   # (2, h, w)
            k = L.shape[0]
            z = z + torch.einsum("khw,nk->nhw", L, th[:, C:C + k])[None]
        if th.shape[1] > C + k:
            z = z + th[:, C + k][None, :, None, None]
        return z.cpu().numpy()

    def val_batch(self, acts: dict) -> None:
        with self.timed("predict"):
            for key, x in acts.items():
                a = self.acc[key]
                a.val.append(self._predict(x, torch.cat([a.theta_d, a.theta_s])))

    def test_batch(self, acts: dict) -> None:
        with self.timed("predict"):
            for key, x in acts.items():
                a = self.acc[key]
                a.test.append(self._predict(x, torch.stack([a.theta_d[a.pick[0]], a.theta_s[a.pick[1]]])))

    # -------------------------------------------------------------------------------------------- fits
    def fit(self, train_target: np.ndarray, train_saliency: np.ndarray | None = None, progress: bool = False) -> None:
        """All probes from the train statistics; ``train_target`` (n, H, W) float32 sets the standardisation and,
        with ``train_saliency`` (n, H, W) {0, 1}, the layout channels at every native size (the position-only
        baseline's maps, as the sweep's ``labels.prior``).

        Runs on ``probe.device`` with ``probe.workers`` probes at once (:mod:`.parallel`)."""
        t = train_target.astype(np.float64)
        self.mean, std = float(t.mean()), float(t.std())
        self.std = std if std > 0 else 1.0
        self.n_train = len(train_target)
        if self.layout:
            if train_saliency is None:
                raise ValueError("layout-fair streamed probes need the train saliency labels")
            std_t, every = self.standardise(train_target), np.ones(len(train_target), bool)
            for h, w in self.count:
                n = self.count[h, w].numpy()
                dstd, pos = fit.block_sum(std_t, h, w).numpy(), fit.block_sum(train_saliency, h, w).numpy()
                dmap, rate = bl.fit_prior(n, dstd, pos, every)
                self.layouts[h, w] = lay.maps(bl.Prior(dmap, rate, 0.0))
                raw = fit.block_sum(train_target, h, w).sum(0).reshape(-1)           # Σ_i raw target sum per j
                self.sums[h, w] = torch.stack([raw, torch.from_numpy(pos.sum(0).reshape(-1)),
                                               self.n_train * self.count[h, w].reshape(-1)], 1)
        bar = tqdm(total=len(self.acc), desc="fit", disable=not progress)
        with single_threaded(1), self.timed("fit"):
            map_ordered(self._fit_one, list(self.acc), self.workers, lambda *_: bar.update(1))
        bar.close()

    def _with_layout(self, a: Acc, site: str, G: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The statistics of the design [features (C) | layout (k) | 1] from those of [features | 1] and the
        per-position sums (module docstring): G (C+k+1)², B (C+k+1, 3), still in the raw target."""
        C, h, w = self.shapes[site]
        dev = G.device
        n = self.count[h, w].reshape(-1).to(dev)                                   # (hw,) pixels per position
        Lr = lay.rows(self.layouts[h, w]).to(dev)                                  # (hw, k)
        N = self.n_train
        xs = a.xsum.to(dev)                                                        # (C, hw)
        nL = Lr * n[:, None]
        k = Lr.shape[1]
        Gn = torch.zeros(C + k + 1, C + k + 1, dtype=torch.float64, device=dev)
        Gn[:C, :C], Gn[:C, -1], Gn[-1, :C], Gn[-1, -1] = G[:C, :C], G[:C, C], G[C, :C], G[C, C]
        Gn[:C, C:C + k] = xs @ nL                                                  # Σ_j n_j (Σ_i x_i(j)) L_jᵀ
        Gn[C:C + k, :C] = Gn[:C, C:C + k].T
        Gn[C:C + k, C:C + k] = N * (Lr.T @ nL)
        Gn[C:C + k, -1] = Gn[-1, C:C + k] = N * nL.sum(0)
        Bn = torch.cat([B[:C], Lr.T @ self.sums[h, w].to(dev), B[C:C + 1]])
        return Gn, Bn

    def _fit_one(self, key: tuple[str, int]) -> None:
        site, step = key
        a, bias, lams, dev = self.acc[key], self.pc.bias, self.lams, self.fit_device
        C = self.shapes[site][0]
        G, B = a.stats.G.to(dev), a.stats.B.to(dev).clone()
        k = 0
        if self.layout:
            G, B = self._with_layout(a, site, G, B)
            k = self.layouts[self.shapes[site][1:]].shape[0]
        d = C + k + int(bias)
        B[:, 0] = (B[:, 0] - self.mean * B[:, 2]) / self.std                       # standardised target sums
        stats = fit.RidgeStats(d, 3, dev)
        stats.G, stats.B, stats.P = G[:d, :d].clone(), B[:d].clone(), a.stats.P
        scale = fit.feature_scale(stats.G, stats.P, C)
        mask = fit.penalty_mask(d, bias, dev)
        mask[C:C + k] = 0.0                                                        # the layout's weights are free
        penalty = mask * scale ** 2
        a.theta_d = fit.ridge_path(stats, lams, bias, scale, mask)[:, :, 0]        # (L, d)
        init = fit.logistic_first_step(stats.G, stats.B[:, 1], stats.B[:, 2], stats.P, max(lams), penalty)
        chunks = self._chunks(a, key, dev)                                        # the subsample in float32
        per_image = min(self.m, self.shapes[site][1] * self.shapes[site][2])     # subsample rows per image
        solver = fit.LogisticSolver(lambda: chunks, stats.P, penalty, sum(len(c[0]) for c in chunks),
                                    period=per_image)
        # every λ to its float64 minimiser, and where the fit stops converging (the floor; see converged_path)
        a.theta_s, a.converged = solver.converged_path(lams, init)
        a.scale = scale
        # nothing after the fit needs the subsample or the solver's float32 copy of it (the chosen probe is already
        # refined): both are freed here, with the statistics' device memory, not kept until λ is chosen
        a.stats = a.sub = a.xsum = None
        del solver, chunks

    def _chunks(self, a: Acc, key: tuple[str, int], device=torch.device("cpu"), per: int = 64) -> list:
        """The subsample as the solver's chunks (64 images each, as the sweep's), on the solver's device: rows
        [features | layout | 1] (the layout rows of each image's positions, drawn again from their seeds)."""
        site, step = key
        C, h, w = self.shapes[site]
        Lr = lay.rows(self.layouts[h, w]).to(torch.float32) if self.layout else None

        def rows(p) -> torch.Tensor:
            X = p[1].to(torch.float32)
            parts = [X[:, :C]] + ([Lr[self._positions(p[0], site, step)]] if Lr is not None else []) + \
                ([X[:, C:C + 1]] if self.pc.bias else [])
            return torch.cat(parts, 1)
        out = []
        sub = sorted(a.sub, key=lambda p: p[0])                                   # image order, however they came
        for i in range(0, len(sub), per):
            part = sub[i:i + per]
            out.append((torch.cat([rows(p) for p in part]).to(device, torch.float32),
                        torch.cat([p[2] for p in part]).to(device, torch.float64),
                        torch.cat([p[3] for p in part]).to(device, torch.float64)))
        return out

    def standardise(self, target: np.ndarray) -> np.ndarray:
        return ((target - self.mean) / self.std).astype(np.float32)

    def choose(self, val_std: np.ndarray, val_sal: np.ndarray) -> None:
        """λ per (site, step) and task on the validation images, with the sweep's rule."""
        r = ranks(val_std)
        scorers = {(h, w): NearestScorer(val_std, val_sal, h, w, r) for _, h, w in set(self.shapes.values())}
        with single_threaded(1), self.timed("choose"):
            map_ordered(lambda key: self._choose_one(key, scorers[self.shapes[key[0]][1:]]), list(self.acc),
                        self.workers)

    def _choose_one(self, key: tuple[str, int], sc: NearestScorer) -> None:
        L, lams, a = len(self.lams), self.lams, self.acc[key]
        z = np.concatenate(a.val)                                                  # (n, 2L, h, w) float64
        rm = sc.depth(z[:, :L], spearman=False)["rmse"]
        ok = a.converged
        if self.pc.bias:                                                          # each λ at its best threshold
            best = sw.tune_thresholds(sc, z[:, L:])[0]
            dice_s = [float(best[i]) if ok[i] else float("nan") for i in range(L)]
        else:                                                                     # the paper's argmax rule
            dice_s = [nanmean(d) if ok[i] else float("nan")
                      for i, d in enumerate(sc.saliency(z[:, L:])["dice"].T)]
        a.pick = (sw._pick([-nanmean(rm[:, i] ** 2) for i in range(L)], lams), sw._pick(dice_s, lams))
        i_s = a.pick[1]                                   # already the float64 minimiser (converged_path)
        if self.pc.bias:                                  # τ on val from the chosen probe's own logits
            a.tau = sw.tune_threshold(sc, z[:, L + i_s])[1]
            a.theta_s[i_s, -1] -= a.tau

    # -------------------------------------------------------------------------------------------- results
    def results(self, labels, protocol: str, model: str, timesteps: Sequence[int]) -> dict:
        """{(site, step): (probe tensors, rows)} with the sweep's metrics, from the kept predictions."""
        with self.timed("metrics"):
            return self._results(labels, protocol, model, timesteps)

    def _results(self, labels, protocol: str, model: str, timesteps: Sequence[int]) -> dict:
        for _, h, w in set(self.shapes.values()):           # the labels' shared caches, filled before the workers
            for code in (1, 2):
                labels.scorer(code, h, w), labels.nonsky_scorer(code, h, w)
                sw.prior_metrics(labels, code, h, w, self.pc.upsample)
        with single_threaded(1):
            done = map_ordered(lambda key: self._result_one(key, labels, protocol, model, timesteps), list(self.acc),
                               self.workers)
        return dict(zip(self.acc, done))

    def _result_one(self, key, labels, protocol: str, model: str, timesteps: Sequence[int]):
        pc, L, lams = self.pc, len(self.lams), self.lams
        site, step = key
        a = self.acc[key]
        C, h, w = self.shapes[site]
        i_d, i_s = a.pick
        zv = np.concatenate(a.val)[:, [i_d, L + i_s]]
        zv[:, 1] -= a.tau
        zt = np.concatenate(a.test)
        scores, per_image = {}, {}
        for split, code, z in (("val", 1, zv), ("test", 2, zt)):
            m = sw.native_metrics(labels, code, h, w, z[:, :1], z[:, 1:])
            ref = sw.prior_metrics(labels, code, h, w, pc.upsample)
            for task, metric in list(m):
                scores[(task, split, metric)] = nanmean(m[(task, metric)])
            scores[("depth", split, "skill")] = sw.skill(m[("depth", "mse")], ref[("depth", "mse")])
            scores[("depth", split, "skill_nonsky")] = sw.skill(m[("depth", "mse_nonsky")],
                                                                ref[("depth", "mse_nonsky")])
            if split == "test":
                per_image = m
        scores[("depth", "val", "lambda")] = lams[i_d]
        scores[("saliency", "val", "lambda")] = lams[i_s]
        scores[("saliency", "val", "threshold")] = a.tau
        conv = [lam for lam, ok in zip(lams, a.converged) if ok]
        if not a.converged[i_s]:        # no λ of the grid converged: the saliency probe is not reported
            scores = {k: (float("nan") if k[0] == "saliency" and k[2] != "lambda" else v) for k, v in scores.items()}
        # the smallest λ whose fit converged (NaN: none) — the floor the data set; "low" edge = at that floor
        scores[("saliency", "val", "lambda_floor")] = min(conv) if conv else float("nan")
        edge = {"depth": sw.lambda_edge(lams[i_d], lams), "saliency": sw.lambda_edge(lams[i_s], conv or lams)}
        rows = [sw._row(protocol, model, site, step, timesteps[step], task, split, metric, v,
                        lambda_edge=edge.get(task, "")) for (task, split, metric), v in scores.items()]
        probe = sw.Probe(a.theta_d[i_d].cpu(), a.theta_s[i_s].cpu(), a.scale.cpu(), (lams[i_d], lams[i_s]),
                         {"depth": ("lambda", lams[i_d]), "saliency": ("lambda", lams[i_s])}, a.nonfinite,
                         threshold=a.tau, layout=self.layouts.get((h, w)) if self.layout else None)
        tensors = sw.probe_tensors(probe, C, pc.bias, labels)
        tensors.update({f"test.{task}.{metric}": torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64))
                        for (task, metric), v in per_image.items()})
        tensors["nonfinite"] = torch.tensor([float(a.nonfinite)])
        return tensors, rows
