"""The ``noised`` protocol on a pipeline folder (issue 21, parts 3–4): a user's own labelled images, each encoded by
the model's VAE and forward-diffused by the model's own process to every step of its schedule; the denoiser's sites
(and the VAE decoder's) read at each step, scored against the folder's exact labels.

For image x (the folder's RGB in [−1, 1]) and one fixed noise ε per image (a CPU generator seeded by
``sample.sample_seed(capture.seed, id, stream 2)``):

* z₀ = the VAE's posterior mode in the pipeline's latent variable — (mode − mean)·s/std where the VAE config has
  latents_mean/std, else (mode − shift)·s (``shift_factor``, 0 where it has none): the inverse of how the pipeline
  decodes (:meth:`~.pipeline_sampler.PipelineSampler.vae_input`);
* x_{t_i} from σ_i, the step's sigma as the pipeline sets its scheduler (:mod:`.pipeline_sampler`):
  flow matching (SD3, FLUX) x = (1 − σ)·z₀ + σ·ε; schedulers whose latent is z₀ + σ·ε (Euler, LMS, Heun: an
  ``init_noise_sigma`` above 1, e.g. SDXL's) x = z₀ + σ·ε; the others (DDIM, PNDM, DPM-Solver: SD 1.x/2.x, PixArt)
  x = (z₀ + σ·ε)/√(σ² + 1) = √ᾱ·z₀ + √(1 − ᾱ)·ε. Each is the scheduler's own ``add_noise`` / ``scale_noise``
  (a test checks it).

The denoiser runs once per step on x_{t_i}, inside the family's own pipeline call — on the image's caption where the
folder has ``captions.csv`` (with the capture's guidance and negative prompt, so the prompt-only baseline and the
``uncond`` reading apply), else on the empty prompt with no CFG batch (both halves would read the same text; FLUX
keeps its guidance embedding): step 0's latent is the call's ``latents``, each later one is put into the pipeline's latents at the end
of the step before. The VAE site reads each step's update of the noised latent (the pipeline's ``scheduler.step``
from x_{t_i}), as in the default study's noised protocol. FLUX's latents are packed 2×2 as its pipeline packs them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import fail
from ..sample import sample_seed
from .pipeline_hooks import OnSite
from .pipeline_sampler import PipelineSampler, schedule_sigmas

NOISE_STREAM = 2                 # sample.sample_seed stream of the fixed ε (as capture/run.py's noised protocol)


def forward_kind(schedule: dict, scheduler) -> str:
    """``"flow"``, ``"ve"`` (latent z₀ + σε) or ``"vp"`` (√ᾱ z₀ + √(1 − ᾱ) ε): the scheduler's forward process."""
    if type(scheduler).__name__.startswith("FlowMatch"):
        return "flow"
    return "ve" if schedule["init_noise_sigma"] > 1.0 + 1e-6 else "vp"


def forward(z0: torch.Tensor, eps: torch.Tensor, sigma: float, kind: str) -> torch.Tensor:
    """x_t of z₀ (B, c, h, w) at noise level σ (module doc)."""
    if kind == "flow":
        return (1.0 - sigma) * z0 + sigma * eps
    if kind == "ve":
        return z0 + sigma * eps
    return (z0 + sigma * eps) / (sigma * sigma + 1.0) ** 0.5


@torch.no_grad()
def encode(sampler: PipelineSampler, rgb: np.ndarray) -> torch.Tensor:
    """Images (B, H, W, 3) uint8 → z₀ (B, c, H/f, W/f) in the pipeline's latent variable (module doc)."""
    vae = sampler.pipe.vae
    dev = next(vae.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(0, 3, 1, 2).to(dev, torch.float32) / 127.5 - 1.0
    mode = vae.encode(x.to(vae.dtype)).latent_dist.mode().float()                   # (B, c, h, w)
    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, len(mean), 1, 1)
        m_, s_ = (torch.tensor(v, dtype=mode.dtype, device=dev).view(shape) for v in (mean, std))
        return (mode - m_) * cfg.scaling_factor / s_
    return (mode - float(getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor


def noises(shape: tuple[int, ...], ids: Sequence[int], seed: int) -> torch.Tensor:
    """One ε per image (B, c, h, w), independent of batching."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(sample_seed(seed, i, NOISE_STREAM)))
                        for i in ids])


def size_multiple(model: Path, family) -> int:
    """Image sides a pipeline folder takes are multiples of this (VAE factor × latent cells per token), from its
    configs alone (no weights): checked before the model loads."""
    from ..models.families import read_denoiser_config
    try:
        blocks = json.loads((Path(model) / "vae" / "config.json").read_text()).get("block_out_channels") or [0] * 4
    except (OSError, ValueError, AttributeError):
        blocks = [0] * 4
    cfg = read_denoiser_config(model, family)
    if family.key == "flux":
        cell = 2                                          # its 2×2 packing
    elif family.denoiser == "transformer":
        cell = int(cfg.get("patch_size") or 1)
    else:                                                 # a U-Net halves the latent at each block but the last
        cell = 2 ** (len(cfg.get("block_out_channels") or [0]) - 1)
    return 2 ** (len(blocks) - 1) * cell


def check_size(step: int, hw: tuple[int, int], folder: Path, title: str) -> None:
    if hw[0] % step or hw[1] % step:
        raise fail(f"images in {folder} are {hw[0]}x{hw[1]} px; this {title} pipeline needs sides that are "
                   f"multiples of {step}: resize or crop them (and their labels)")


@torch.no_grad()
def record_noised(sampler: PipelineSampler, rgb: np.ndarray, ids: Sequence[int], seed: int, sites: Sequence[str],
                  kind: str, on_site: OnSite, prompts: Sequence[str] | None = None, half: str = "cond") -> None:
    """One pipeline call per batch of images: the sites at every step on x_{t_i} of these images (module doc);
    ``prompts`` their captions (default: empty)."""
    dev = next(sampler.denoiser.parameters()).device
    dtype = next(sampler.denoiser.parameters()).dtype
    z0 = encode(sampler, rgb)                                                       # (B, c, h, w)
    eps = noises(tuple(z0.shape[1:]), ids, seed).to(z0.device)
    how = forward_kind(sampler.schedule, sampler.scheduler)
    sig = schedule_sigmas(sampler.scheduler, sampler.schedule)     # DDIM/PNDM: σ from ᾱ_t

    def latents_at(i: int) -> torch.Tensor:
        x = forward(z0, eps, float(sig[i]), how)                                    # (B, c, h, w)
        if sampler.family.key == "flux":
            x = sampler.pipe._pack_latents(x, *x.shape)                             # (B, h/2·w/2, 4c)
        return x.to(dev, dtype)
    sampler.run(list(prompts) if prompts is not None else [""] * len(ids), list(ids), sites, kind, on_site,
                half=half, latents_at=latents_at)


# ------------------------------------------------------------------------------------------------ the store
def noised_options(cc, family_key: str, captions: bool = False) -> dict:
    """``prepare_pipeline`` keywords of the noised protocol from a ``CaptureConfig``: its options; without captions
    an empty prompt and no CFG batch (guidance 1) but for FLUX, whose guidance is an embedding."""
    from .sd import sd_options
    opts = sd_options(cc)
    if not captions:
        opts.update(negative_prompt="", guidance=opts["guidance"] if family_key == "flux" else 1.0)
    opts.update(height=None, width=None)
    return opts


def read_captions(folder: Path, names: Sequence[str]) -> list[str] | None:
    """The captions of ``names`` from ``folder/captions.csv`` (header ``name,caption``; name = the image's file stem),
    or None without the file; a missing column or image is one line."""
    import csv
    import io
    path = Path(folder) / "captions.csv"
    if not path.is_file():
        return None
    from .prompts import _prompts_text                 # the prompts CSV's encodings (BOM, UTF-16, Latin-1)
    rows = csv.DictReader(io.StringIO(_prompts_text(path), newline=""))
    cols = [c.strip() for c in rows.fieldnames or []]
    if "name" not in cols or "caption" not in cols:
        raise fail(f"{path} needs the columns name,caption (it has {', '.join(cols) or 'none'}); name is the image's "
                   f"file stem")
    have = {(r.get("name") or "").strip(): r.get("caption") or "" for r in
            ({(k or "").strip(): v for k, v in row.items()} for row in rows)}
    lost = [n for n in names if n not in have]
    if lost:
        raise fail(f"{path} has no caption for {lost[0]} ({len(lost)} images without one); add a line "
                   f"{lost[0]},<caption> for each")
    return [have[n] for n in names]


def run_capture_noised(pipe, model_path: Path, data, out: Path, opts: dict, *, seed: int, batch_size: int,
                       control: str | None = None, control_seed: int = 100, force: bool = False,
                       progress: bool = True, captions: Sequence[str] | None = None) -> Path:
    """The noised store ``RUN/captures/noised/<model>`` of the images ``data`` (a ``SceneData``), resumable like
    every store; ``opts`` from :func:`noised_options`; ``captions`` the images' prompts (default: empty)."""
    from .pipelines import PipelineModel, prepare_pipeline
    from .run import (CAPTURE_VERSION, StoreSpec, _state, check_capture_options, fill_store, finish_store,
                      probe_split)
    check_capture_options(opts["site_kind"], opts["vae_input"], opts["dtype"], opts["pool"], batch_size,
                          opts["steps"])
    n = len(data)
    h, w = data.rgb.shape[1:3]
    ids = list(range(n))
    import hashlib
    extra = {"protocol": "noised", "data": str(Path(data.root).resolve()), "names": list(data.names),
             "rgb_digest": hashlib.sha256(np.ascontiguousarray(data.rgb).tobytes()).hexdigest()[:16],  # new pixels:
             "noise_seed": int(seed), "noised_version": CAPTURE_VERSION}                               # a new store
    m: PipelineModel = prepare_pipeline(model_path, None, **{**opts, "height": h, "width": w}, control=control,
                                        control_seed=control_seed, pipe=pipe, extra_identity=extra,
                                        prompt_rows=(list(captions) if captions else [""] * n, ids))
    prompts = m.prompts
    spec = StoreSpec(Path(out), m.shapes, n, m.n_steps, batch_size, opts["dtype"], opts["pool"], m.fingerprint)

    def run_batch(start: int, stop: int, emit) -> None:
        record_noised(m.sampler, data.rgb[start:stop], ids[start:stop], seed, m.sites, opts["site_kind"], emit,
                      prompts[start:stop], m.half)

    model = control or "ldm"
    if fill_store(spec, run_batch, force, progress, desc=f"capture noised/{model}"):
        from .pipelines import pipeline_manifest
        man = pipeline_manifest(m, model_path, control, n, ids, probe_split(ids), spec.fingerprint, **extra,
                                forward=FORWARD[forward_kind(m.sampler.schedule, m.sampler.scheduler)])
        cfg = m.sampler.guidance_scale > 1 and m.sampler.family.key != "flux"
        man.update(prompts=prompts, seeds=None, cfg_half=m.half if cfg else None)
        finish_store(Path(out), man)
    _state().wait_for_everyone()
    return Path(out)


FORWARD = {"flow": "x_t = (1 - sigma) z0 + sigma eps", "ve": "x_t = z0 + sigma eps",
           "vp": "x_t = (z0 + sigma eps) / sqrt(sigma^2 + 1) = sqrt(alpha_bar) z0 + sqrt(1 - alpha_bar) eps"}
