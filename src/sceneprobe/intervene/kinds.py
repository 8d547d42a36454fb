"""Probes for editing another reading of the same sites: the residual stream (``block``) beside the attention output.

An edit through a probe is only meaningful on the activation the probe was fitted on. The run's capture has one site
kind (``capture.site_kind``, ``attn`` by default: ``to_out[0]``, before the residual). To edit the other kind, this
module replays the capture's sampling (same model, ids, seeds, steps) recording only the edited U-Net sites in that
kind and keeping only the edited steps (``run_capture(..., store_steps=..., stop_early=True)``: sampling stops after
the last edited step, no VAE decode, no final images), for the trained U-Net
and its permuted control, copies the generate protocol's labels, and fits probes with the run's own sweep
(:func:`sceneprobe.probe.sweep.run_probes`, same config, same λ choice on val). Everything lives in
``run/interventions/probes_<kind>/`` laid out as a run folder (``captures/generate/{ldm,permuted}``,
``probes/generate/...``), so :func:`~sceneprobe.intervene.context.load_context` reads it with ``source=``.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Sequence

from ..config import Config


def kind_root(run: Path, kind: str) -> Path:
    return Path(run) / "interventions" / f"probes_{kind}"


def prepare_kind(cfg: Config, run: Path, ctx, kind: str, sites: Sequence[str], steps: Sequence[int],
                 progress: bool = True) -> Path:
    """Capture ``sites`` × ``steps`` in reading ``kind`` and fit their probes; returns the folder (a run layout)."""
    from ..capture.run import run_capture
    from ..probe.sweep import run_probes
    run, root = Path(run), kind_root(run, kind)
    m = ctx.manifest
    perm_manifest = run / "captures" / "generate" / "permuted" / "manifest.json"
    control_seed = cfg.capture.control_seed
    if perm_manifest.is_file():
        control_seed = json.loads(perm_manifest.read_text()).get("control_seed") or control_seed
    cc = dataclasses.replace(cfg.capture, site_kind=kind, n_generate=int(m["n"]), steps=len(m["steps"]),
                             seed=int(m["seed"]), pool=int(m.get("pool", 1)), dtype=m["dtype"],
                             control_seed=int(control_seed))
    ccfg = dataclasses.replace(cfg, capture=cc)
    kw = dict(sites=list(sites), readout=False, store_steps=list(steps), stop_early=True, progress=progress)
    run_capture(ccfg, root, "generate", ctx.ldm, **kw)
    if ctx.permuted:
        run_capture(ccfg, root, "generate", ctx.ldm, control="permuted", **kw)
    src = run / "captures" / "generate" / "labels.safetensors"
    dst = root / "captures" / "generate" / "labels.safetensors"
    if not dst.is_file() or dst.read_bytes() != src.read_bytes():
        tmp = dst.with_name(".labels.copy")
        shutil.copyfile(src, tmp)
        tmp.replace(dst)
    run_probes(root, dataclasses.replace(cfg.probe, plain=False), progress=progress)   # edits use the layout-fair probes
    return root


__all__ = ["kind_root", "prepare_kind"]
