"""Probe files ``probes/<protocol>/<model>/<site>/step_XX.safetensors``: where each is written, its fingerprint (fit
config, store manifest, labels, PROBE_VERSION), the atomic byte-stable write, and a finished file's rows and
per-image metrics read back, so a rerun skips it."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_bytes, stable_safetensors
from ..capture.store import CaptureStore
from ..config import ProbeConfig, fingerprint, to_dict
from . import layout as lay
from .protocol_labels import ProtocolLabels

PROBE_VERSION = 4                      # bump when the fit or the file format changes (3: layout-fair; 4: λ chosen
                                       # between float64 minimisers, the float32 floor handed over): old probes redone


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
