"""The run folder an intervention reads: the model, the labeller, the generate protocol's capture and probes
(:class:`Context`, :func:`load_context`, checked once with one-line errors), and which (site, step)s a task edits
(:func:`plan`, the paper's defaults).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import to_dict
from ..errors import fail

PROTOCOL = "generate"


@dataclass
class Context:
    """What every edit needs from the run folder (checked once, one-line errors)."""
    run: Path
    ldm: object
    labeller: object
    manifest: dict
    labels: dict                                   # labels.safetensors of the generate protocol (depth, saliency, ...)
    images: np.ndarray | None                      # captured samples (N, H, W, 3) uint8, for the regeneration check
    permuted: bool                                 # probes of the permuted control exist
    notes: list[str] = field(default_factory=list)
    source: Path | None = None                     # folder with captures/ and probes/ (default: run)

    @property
    def probes(self) -> Path:
        return self.source or self.run

    @property
    def kind(self) -> str:
        return self.manifest.get("site_kind", "attn")

    @property
    def steps(self) -> int:
        return len(self.manifest["steps"])

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.labels["saliency"].shape[1:3])

    @property
    def unet_sites(self) -> list[str]:
        return [s for s in self.manifest.get("site_order", list(self.manifest["sites"])) if s.startswith("unet.")]


def probe_file(run: Path, model: str, site: str, step: int) -> Path:
    from ..probe.sweep import probe_path
    return probe_path(run, PROTOCOL, model, site, step)


def load_context(run: Path, source: Path | None = None) -> Context:
    """The run's model, labeller and generate-protocol capture; ``source`` (default ``run``) is the folder whose
    ``captures/generate`` and ``probes/generate`` are used (another site kind's, :func:`prepare_kind`)."""
    from safetensors.numpy import load_file

    from ..capture.store import CaptureStore, load_labels
    from ..labeller import load_labeller
    from ..models.io import load_ldm, model_hash
    run = Path(run)
    src = Path(source) if source is not None else run
    proot = src / "probes" / PROTOCOL / "ldm"
    if not proot.is_dir() or not any(proot.glob("*/step_*.safetensors")):
        raise fail(f"no probes in {proot}; run `sceneprobe capture --run {run} --protocol generate`, label the images "
                   f"and `sceneprobe probe --run {run}` first")
    store = CaptureStore(src / "captures" / PROTOCOL / "ldm")
    labels = load_labels(src / "captures" / PROTOCOL)
    if len(labels["saliency"]) != store.n:
        raise fail(f"labels in {run / 'captures' / PROTOCOL} have {len(labels['saliency'])} rows but the capture has "
                   f"{store.n}; relabel the generated images")
    lab_dir = run / "labeller"
    if not (lab_dir / "config.json").is_file():
        raise fail(f"labeller folder {lab_dir} is missing; interventions label their outputs with the run's labeller "
                   f"(`sceneprobe run` puts it there)")
    m = store.manifest
    model_root = run if (run / "unet").is_dir() else (Path(m["model_root"]) if m.get("model_root") else None)
    if model_root is None:
        raise fail(f"no model in {run} (vae/, unet/, scheduler/) and the capture manifest names none")
    ldm = load_ldm(model_root)
    if m.get("model_hash") and model_hash(ldm.unet) != m["model_hash"]:
        raise fail(f"the U-Net in {model_root} is not the one captured in {store.root} (hash differs); recapture and "
                   f"refit the probes, or point the run at the captured model")
    if m.get("sampler", "ddim") != "ddim" or float(m.get("eta", 0.0)) != 0.0:
        raise fail(f"capture {store.root} used sampler {m.get('sampler')} η={m.get('eta')}; interventions replay DDIM η=0")
    samples = src / "captures" / PROTOCOL / "samples.safetensors"
    images = load_file(str(samples))["images"] if samples.is_file() else None
    permuted = (src / "probes" / PROTOCOL / "permuted").is_dir()
    ctx = Context(run, ldm, load_labeller(lab_dir), m, labels, images, permuted, source=source)
    if not permuted:
        ctx.notes.append("no probes of the permuted control (probes/generate/permuted): that control was skipped; "
                         "capture with --control permuted and rerun `sceneprobe probe`")
    return ctx


def plan(ctx: Context, task: str, cfg) -> tuple[list[str], list[int]]:
    """(sites, steps) edited for ``task`` (the paper's defaults)."""
    if task == "saliency":
        sites = [s for s in ctx.unet_sites if s.startswith("unet.up")]
        n = max(1, min(ctx.steps, round(ctx.steps * cfg.saliency_step_fraction)))
    else:
        sites, n = ctx.unet_sites, min(ctx.steps, cfg.depth_steps)
    if not sites:
        raise fail(f"the capture has no {'decoder-side (unet.up*) ' if task == 'saliency' else ''}U-Net sites to edit")
    return sites, list(range(n))

def check_config(cfg) -> None:
    doses = tuple(getattr(cfg, "doses", (0.1,)))
    if cfg.n_edits < 1 or cfg.iters < 0 or cfg.lr <= 0 or cfg.depth_steps < 1 \
            or not 0 < cfg.saliency_step_fraction <= 1 or not doses or any(not 0 <= d < math.inf for d in doses):
        raise fail(f"config intervene: need n_edits ≥ 1, iters ≥ 0, lr > 0, depth_steps ≥ 1, "
                   f"0 < saliency_step_fraction ≤ 1 and doses ≥ 0, got {to_dict(cfg)}")


def probe_depth_target(path: Path) -> str:
    """What a probe file's depth head predicts: ``depth`` or ``inverse`` (1/depth), from its recorded probe config."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    try:
        return json.loads(meta.get("config", "{}")).get("depth_target", "depth")
    except json.JSONDecodeError:
        return "depth"
