"""The probe sweep: every capture store × site × step × task → probe files and a long-form results table.

Usage::

    sceneprobe probe --run runs/default              # exact solvers (ridge + IRLS), λ chosen on val
    sceneprobe probe --run runs/default --solver adam  # the paper's trainer, for parity

Per (protocol, model, site, step) one pass over the probe-train rows accumulates, in float64, ``G = XᵀDX`` and
``XᵀS`` for the native positions (D = pixels per position, S = label sums, see :mod:`.fit`); depth is ridge for all λ
at once, saliency an IRLS path warm-started from the same statistics (the train rows stay in memory for its passes up
to CACHE_BYTES, else they are re-read). λ is chosen on the validation split (depth: lowest MSE; saliency: highest
Dice, each λ at its own val-chosen decision threshold; ties → the larger λ). The saliency path is solved to 1e-3
relative in float32, and every λ that could win — within ``exact_fit.CHOICE_MARGIN`` of the best — is solved to its
float64 minimiser and scored again before the choice, so the choice is made between float64 minimisers; the chosen
probe's decision threshold τ (salient ⇔ logit > τ, highest val Dice) is folded into its intercept. The intercept
(``probe.bias``, default on) is unpenalised; ``probe.bias: false`` is the paper's no-bias probe with its argmax rule
(τ = 0). A λ chosen on the grid's edge is flagged (``lambda_edge``). The test split is only ever scored. Features
are divided by their train RMS inside the penalty only (λ‖w·s‖² in raw units), so one λ grid means the same at every
site.

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

The pieces: :mod:`.protocol_labels` (labels, split codes, shared caches), :mod:`.split_features` (streamed
activations, predictions), :mod:`.exact_fit` (ridge + IRLS, λ on val), :mod:`.thresholds` (τ on val),
:mod:`.adam_fit` (the paper's trainer), :mod:`.fitted_probe` (a probe and its file tensors), :mod:`.scoring`
(metrics, skill over the position-only baseline), :mod:`.probe_files` (paths, fingerprints, finished files),
:mod:`.results_table` (results.csv / .json), :mod:`.per_image` (per_image.safetensors); this module finds the
stores, runs every probe (:func:`run_probes`, :func:`probe_one`) and adds the baselines' rows. Every name other
modules use is importable from here.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from ..capture.store import CaptureStore
from ..config import ProbeConfig
from ..errors import fail
from ..processes import resolve_workers
from . import baselines as bl
from . import layout as lay
from .adam_fit import fit_paper_adam
from .baselines import BASELINE_MODEL
from .exact_fit import _pick, fit_exact, lambda_edge
from .fitted_probe import Probe, layout_of, probe_tensors
from .metrics import nanmean
from .parallel import map_ordered, resolve_device, single_threaded
from .per_image import check_rows_have_arrays, per_image_key, read_per_image, read_positions, write_per_image
from .probe_files import (PROBE_VERSION, RUN_ONLY, _finished_rows, fit_identity, probe_fingerprint, probe_path,
                          write_probe_file)
from .process_pool import map_probe_jobs
from .prompt_only import prompt_only_rows
from .protocol_labels import SKY_DEPTH, SPLITS, ProtocolLabels, load_protocol_labels
from .results_table import COLUMNS, _fmt_value, _row, format_value, read_results, write_results, write_results_csv
from .scoring import native_metrics, prior_metrics, prior_site, relative_depth_errors, score, skill
from .split_features import SplitFeatures
from .thresholds import dice_at_thresholds, threshold_candidates, tune_threshold, tune_thresholds, with_val_threshold


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


def fit_and_write(run: Path, labels: ProtocolLabels, store: CaptureStore, site: str, step: int, cfg: ProbeConfig,
                  device: torch.device | str, fingerprint: str) -> Path:
    """:func:`probe_one` and its probe file (with the store's ``fingerprint``); returns the file's path."""
    model = store.manifest.get("model", store.root.name)
    tensors, done = probe_one(store, site, step, labels, cfg, device)
    path = probe_path(run, labels.protocol, model, site, step)
    write_probe_file(path, tensors, fingerprint=fingerprint, rows=done, protocol=labels.protocol, model=model,
                     site=site, step=step, solver=cfg.solver, cfg=cfg, device=torch.device(device).type)
    return path


# Fewer probes to fit than this run on threads even on the CPU: a worker process pays a second or two to start.
PROCESS_MIN_JOBS = 48


def run_probes(run: Path, cfg: ProbeConfig, progress: bool = True, threads: int | None = 1) -> Path:
    """Fit and score every (store, site, step) under ``run/captures``; returns ``run/report/results.csv``.

    Resumable: a probe file whose fingerprint (config, store manifest, labels, PROBE_VERSION) matches is not refit.
    Probes run on ``cfg.device`` and ``cfg.workers`` at once: on the CPU, from :data:`PROCESS_MIN_JOBS` probes on,
    in worker processes (:mod:`.process_pool`), else on threads (:mod:`.parallel`); memory: per worker, one (site,
    step)'s streamed chunks, plus the train rows kept for the IRLS passes up to CACHE_BYTES.
    ``threads``: torch and BLAS threads of each probe (restored after; None leaves them) — keep 1 for results that
    are byte-identical on every machine: the sweep is many small solves, and parallel probes use the cores better.
    """
    with single_threaded(threads):
        return _run_probes(run, cfg, progress, threads)


def _run_probes(run: Path, cfg: ProbeConfig, progress: bool, threads: int | None) -> Path:
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
    processes = device.type == "cpu" and workers > 1 and len(todo) >= PROCESS_MIN_JOBS
    for labels, store, site, _ in ([] if processes else todo):   # caches the threads share, filled once before they
        _, h, w = store.shape(site)                               # read them (a worker process fills its own)
        for code in SPLITS.values():
            labels.scorer(code, h, w), labels.nonsky_scorer(code, h, w)
            prior_metrics(labels, code, h, w, cfg.upsample)
        labels.native(h, w, cfg.upsample)
    bar = tqdm(total=len(jobs), desc="probes", unit="probe", disable=not progress, file=sys.stderr)
    bar.update(len(jobs) - len(todo))

    def one(job) -> Path:
        labels, store, site, step = job
        return fit_and_write(run, labels, store, site, step, cfg, device, fps[store.root])

    def done_one(job, path: Path) -> None:
        found[job[1:]] = _finished_rows(path, fps[job[1].root])
        bar.update(1)
        bar.set_postfix_str(f"{job[0].protocol}/{job[2]}/step {job[3]}", refresh=False)
    if processes:
        protos = {labels.protocol: proto for proto, labels, _ in groups}
        specs = [(str(run), str(protos[labels.protocol]), store.n, str(store.root), site, step, fps[store.root])
                 for labels, store, site, step in todo]
        map_probe_jobs(specs, workers, cfg, 1 if threads is None else threads,
                       lambda i, path: done_one(todo[i], path))
    else:
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


# Names other modules import from here (the sweep's pieces live in the modules above).
__all__ = ["COLUMNS", "PROBE_VERSION", "Probe", "ProtocolLabels", "RUN_ONLY", "SKY_DEPTH", "SPLITS", "SplitFeatures",
           "_finished_rows", "_fmt_value", "_pick", "_row", "baseline_rows", "check_rows_have_arrays",
           "dice_at_thresholds", "find_stores", "fit_exact", "fit_identity", "fit_paper_adam", "format_value",
           "lambda_edge", "layout_of", "load_protocol_labels", "native_metrics", "per_image_key", "prior_metrics",
           "prior_site", "probe_fingerprint", "probe_one", "probe_path", "probe_tensors", "read_per_image",
           "read_positions", "read_results", "relative_depth_errors", "run_probes", "score", "skill",
           "threshold_candidates", "tune_threshold", "tune_thresholds", "with_val_threshold", "write_per_image",
           "write_probe_file", "write_results", "write_results_csv"]
