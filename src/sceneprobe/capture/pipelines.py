"""Capture SDXL, PixArt-α/Σ, SD3/3.5 and FLUX.1 from a local diffusers pipeline folder, by the family's own pipeline.

Sampling *is* the family's diffusers pipeline (``StableDiffusionXLPipeline``, ``PixArtAlphaPipeline`` /
``PixArtSigmaPipeline``, ``StableDiffusion3Pipeline``, ``FluxPipeline``), called with the prompts, one CPU generator
per seed and ``output_type="np"``; owned hooks (:mod:`.pipeline_hooks`) record the canonical sites and the pipeline's
step-end callback marks each step. So the images equal the pipeline's by construction (a test still checks it: the
same call without hooks gives the same bytes). SD 1.x/2.x keep their own loop (:mod:`.sd`); this module exposes the
same interface (:class:`PipelineModel` ≈ ``SDModel``: ``sites``, ``n_steps``, ``fingerprint``, ``sampler.size`` and a
sample-and-record call), so the store (:func:`run_capture_pipeline`) and the streamed probes work for every family.

Options passed to every pipeline: ``num_inference_steps`` = ``capture.steps``, ``guidance_scale`` =
``capture.guidance_scale`` (for FLUX the distilled guidance *embedding*: FLUX runs no CFG batch; its true CFG is
not used), ``negative_prompt`` = ``capture.negative_prompt`` when not empty (empty: the pipeline's own default, e.g.
SDXL's zeroed unconditional embedding; FLUX refuses one), ``height``/``width`` = ``capture.height``/``width`` or the
pipeline's default size, PixArt's ``use_resolution_binning=False`` (the size asked for is the size sampled; at the
native square size binning changes nothing) and ``clean_caption=False`` (prompts are used as written). The scheduler
is the folder's; ``capture.sd_scheduler`` may name another for the DDPM-type families (SDXL, PixArt), not for the
flow-matching ones.

Steps are indexed in sampling order. The schedule (timesteps *and* sigmas, as the pipeline sets them — FLUX's depend
on the image size through its shift ``mu``) is read in a first short pass that also measures the sites' shapes and is
stopped after step 0. σ: the scheduler's own ``sigmas`` (flow matching: x_t = (1 − σ)·x₀ + σ·ε; Euler/DPM:
x_t = x₀ + σ·ε up to scale); a scheduler without them gets σ = √((1 − ᾱ_t)/ᾱ_t) (the manifest says which).

VAE site (``vae.dec.mid.attn0``): each step's latent after its update, decoded as the pipeline decodes its final
latent (FLUX: unpacked first; then ``z·std/s + mean`` where the VAE config has latents_mean/std, else ``z/s``;
``+ shift_factor`` where it has one).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import fail
from ..models.families import FAMILIES, Family, pipeline_family, read_model_index
from ..models.sites import list_sites
from .identity import canonical, store_fingerprint
from .pipeline_hooks import OnSite, PipelineRecorder
from .run import (CAPTURE_VERSION, StoreSpec, _state, check_capture_options, collect_samples, control_unet,
                  fill_store, finish_store, probe_split, save_images)

PIPELINE_FAMILIES = ("sdxl", "pixart", "sd3", "flux")     # SD 1.x/2.x: capture/sd.py
FLOW_MATCHING = ("sd3", "flux")


class _Stop(Exception):
    """Ends the schedule pass after step 0."""


# ------------------------------------------------------------------------------------------------ folders
def check_pipeline_folder(folder: Path, option: str = "--model") -> Family:
    """The family of a pipeline folder this module captures; any other (or a missing part) is one error line."""
    folder = Path(folder)
    family = pipeline_family(folder, option)
    if family.key not in PIPELINE_FAMILIES:
        raise fail(f"{option} {folder} is a {family.title} folder; it is captured by capture/sd.py, not here")
    index = read_model_index(folder, option)
    parts = [p for p, v in index.items() if not p.startswith("_") and isinstance(v, (list, tuple)) and v
             and v[0] is not None and p not in ("feature_extractor", "image_encoder", "safety_checker")]
    for part in sorted(set(parts) | {family.denoiser, "vae", "scheduler"}):
        if not (folder / part).is_dir():
            raise fail(f"{family.title} folder {folder} has no {part}/ (model_index.json names it); pass the whole "
                       f"pipeline folder as saved by save_pretrained")
    return family


def find_variant(folder: Path, part: str) -> str | None:
    """``"fp16"`` (or another variant) when ``part/`` holds only variant weight files, else None."""
    d = Path(folder) / part
    files = [p for p in d.glob("diffusion_pytorch_model*") if p.suffix in (".safetensors", ".bin")]
    if any(len(p.name.split(".")) == 2 or "-of-" in p.name.split(".")[0] for p in files):
        return None
    variants = sorted({p.name.split(".")[1] for p in files if len(p.name.split(".")) == 3})
    return variants[0] if variants else None


def load_pipeline(folder: Path, torch_dtype: torch.dtype = torch.float32, variant: str | None = None):
    """The folder's pipeline (the class model_index.json names when it is one of the family's, else the family's
    text-to-image one), loaded offline; optional image encoders and feature extractors are not loaded."""
    import diffusers
    folder = Path(folder)
    family = check_pipeline_folder(folder)
    name = read_model_index(folder).get("_class_name")
    cls = getattr(diffusers, name if name in family.pipelines else family.pipelines[0])
    variant = variant or find_variant(folder, family.denoiser)
    skip = {k: None for k in ("image_encoder", "feature_extractor") if k in inspect.signature(cls).parameters}
    try:
        pipe = cls.from_pretrained(folder, local_files_only=True, dtype=torch_dtype, variant=variant, **skip)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError) as e:
        raise fail(f"{family.title} folder {folder} could not be loaded ({type(e).__name__}: "
                   f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def family_of(pipe) -> Family:
    return next(f for f in FAMILIES.values() if type(pipe).__name__ in f.pipelines)


# ------------------------------------------------------------------------------------------------ sampling
@contextlib.contextmanager
def _swapped(pipe, **parts):
    """The pipeline with some parts replaced (a control's denoiser, another scheduler) for one call; restored after."""
    old = {k: getattr(pipe, k) for k in parts}
    try:
        for k, v in parts.items():
            setattr(pipe, k, v)
        yield pipe
    finally:
        for k, v in old.items():
            setattr(pipe, k, v)


@dataclass
class PipelineSampler:
    """One family's pipeline with the options of a capture; ``denoiser`` may be a control copy of the pipeline's."""
    pipe: object
    family: Family
    denoiser: torch.nn.Module
    scheduler: object
    steps: int = 15
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    height: int | None = None
    width: int | None = None
    options: dict = field(default_factory=dict)   # further keywords of the pipeline call
    schedule: dict | None = None                   # {"timesteps", "sigmas"} of this size, read once (read_schedule)

    @property
    def vae_scale(self) -> int:
        return int(self.pipe.vae_scale_factor)

    @property
    def cell(self) -> int:
        """Latent cells per token side: FLUX's packing, a DiT's patch, 1 for a U-Net."""
        return 2 if self.family.key == "flux" else int(getattr(self.denoiser.config, "patch_size", 1) or 1)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) in pixels: the options, else the pipeline's default size."""
        native = int(getattr(self.pipe, "default_sample_size", 0) or self.denoiser.config.sample_size) * self.vae_scale
        h, w = self.height or native, self.width or native
        step = self.vae_scale * self.cell
        if h % step or w % step:
            raise fail(f"capture.height/width must be multiples of {step} for this {self.family.title} pipeline, got "
                       f"{h}x{w}")
        return h, w

    @property
    def latent_hw(self) -> tuple[int, int]:
        h, w = self.size
        return h // self.vae_scale, w // self.vae_scale

    def call_options(self, prompts: Sequence[str], seeds: Sequence[int]) -> dict:
        """The keyword arguments of the pipeline call (the equality test calls the pipeline with exactly these)."""
        h, w = self.size
        params = inspect.signature(type(self.pipe).__call__).parameters
        kw = dict(prompt=list(prompts), num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                  height=h, width=w, generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
                  output_type="np", **self.options)
        if self.negative_prompt:
            kw["negative_prompt"] = [self.negative_prompt] * len(prompts)
        for k, v in (("use_resolution_binning", False), ("clean_caption", False)):
            if k in params:
                kw[k] = v
        return kw

    @torch.no_grad()
    def vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        """A step's latent as the pipeline hands its final latent to ``vae.decode`` (module doc)."""
        vae, z = self.pipe.vae, latents
        if self.family.key == "flux":
            z = self.pipe._unpack_latents(z, *self.size, self.vae_scale)                  # (B, c, h, w)
        cfg = vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, len(mean), 1, 1)
            z = z * torch.tensor(std, dtype=z.dtype, device=z.device).view(shape) / cfg.scaling_factor \
                + torch.tensor(mean, dtype=z.dtype, device=z.device).view(shape)
        else:
            z = z / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None) is not None:
            z = z + cfg.shift_factor
        return z

    @torch.no_grad()
    def decode_step(self, latents: torch.Tensor) -> None:
        """Decode a step's latent (the VAE sites' hooks read it); fp16 VAEs that ask for it are upcast, as SDXL's."""
        vae = self.pipe.vae
        up = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
        if up:
            vae.to(torch.float32)
        try:
            vae.decode(self.vae_input(latents).to(vae.dtype), return_dict=False)
        finally:
            if up:
                vae.to(torch.float16)

    @torch.no_grad()
    def run(self, prompts: Sequence[str], seeds: Sequence[int], sites: Sequence[str], kind: str, on_site: OnSite,
            schedule: dict | None = None) -> np.ndarray:
        """One pipeline call recording ``sites`` at every step (cond half, first denoiser call of each step);
        returns the images (B, H, W, 3) uint8 as the pipeline's PIL output. With ``schedule`` (a dict) the call stops
        after step 0, having put the scheduler's timesteps and sigmas into it."""
        pipe, fam = self.pipe, self.family
        vae_sites = [s for s in sites if s.startswith("vae")]
        models = {fam.denoiser: self.denoiser, "vae": pipe.vae}
        rec = PipelineRecorder(models, sites, kind, len(prompts), self.latent_hw, dict(self.denoiser.config), on_site)
        seen: list[int] = []

        def step_end(i: int, t, latents: torch.Tensor) -> None:
            seen.append(i)
            if vae_sites:
                rec.vae_armed = True
                try:
                    self.decode_step(latents)
                finally:
                    rec.vae_armed = False
            rec.next_step()
            if schedule is not None:
                sched = pipe.scheduler
                schedule["timesteps"] = [float(x) for x in sched.timesteps]
                sig = getattr(sched, "sigmas", None)
                schedule["sigmas"] = None if sig is None else [float(x) for x in sig][:len(sched.timesteps)]
                raise _Stop

        kw = self.call_options(prompts, seeds)
        params = inspect.signature(type(pipe).__call__).parameters
        if "callback_on_step_end" in params:
            kw["callback_on_step_end"] = lambda p, i, t, cb: (step_end(i, t, cb["latents"]), {})[1]
        else:                                                    # PixArt: the older per-step callback
            kw.update(callback=lambda i, t, x: step_end(i, t, x), callback_steps=1)
        with _swapped(pipe, **{fam.denoiser: self.denoiser, "scheduler": self.scheduler}), rec:
            try:
                images = pipe(**kw).images                       # (B, H, W, 3) float in [0, 1]
            except _Stop:
                return np.zeros((0,), np.uint8)
        if schedule is None and len(seen) != self.n_steps:
            raise RuntimeError(f"{type(pipe).__name__} called back at {len(seen)} of {self.n_steps} steps (a "
                               f"scheduler of order > 1?); capture needs one callback per step")
        return (np.asarray(images) * 255).round().astype("uint8")   # as diffusers' numpy_to_pil

    def read_schedule(self) -> dict:
        """Timesteps and sigmas of a capture at this size (a short pass, stopped after step 0)."""
        out: dict = {}
        self.run([""], [0], [], "attn", lambda *a: None, schedule=out)
        if "timesteps" not in out:
            raise fail(f"{type(self.pipe).__name__} never called back; its scheduler cannot be captured")
        return out

    @property
    def n_steps(self) -> int:
        """Denoiser steps per image, as the pipeline sets its scheduler for this size."""
        if self.schedule is None:
            self.schedule = self.read_schedule()
        return len(self.schedule["timesteps"])


def sigma_kind(scheduler) -> str:
    name = type(scheduler).__name__
    if name.startswith("FlowMatch"):
        return "flow matching: x_t = (1 - sigma) x0 + sigma eps (the scheduler's sigmas)"
    if hasattr(scheduler, "sigmas"):
        return "the scheduler's sigmas: x_t / sqrt(alpha_bar) = x0 + sigma eps"
    return "derived: sigma = sqrt((1 - alpha_bar_t) / alpha_bar_t)"


def schedule_sigmas(scheduler, schedule: dict) -> list[float]:
    if schedule.get("sigmas") is not None:
        return schedule["sigmas"]
    ab = scheduler.alphas_cumprod
    return [float(((1 - ab[int(round(t))]) / ab[int(round(t))]) ** 0.5) for t in schedule["timesteps"]]


def make_pipeline_scheduler(pipe, family: Family, name: str = "folder"):
    if name == "folder":
        import copy
        return copy.deepcopy(pipe.scheduler)
    if family.key in FLOW_MATCHING:
        raise fail(f"capture.sd_scheduler {name!r}: {family.title} samples by flow matching with its folder's "
                   f"scheduler; use sd_scheduler: folder")
    from .sd import make_scheduler
    return make_scheduler(pipe, name)


# ------------------------------------------------------------------------------------------------ the model
@dataclass
class PipelineModel:
    """A loaded folder prepared for capture (the interface of ``SDModel``)."""
    sampler: PipelineSampler
    prompts: list[str]
    seeds: list[int]
    denoiser_sites: list[str]
    vae_sites: list[str]
    shapes: dict
    identity: dict
    device: torch.device
    dtype: torch.dtype
    hashes: dict

    @property
    def sites(self) -> list[str]:
        return self.denoiser_sites + self.vae_sites

    @property
    def n_steps(self) -> int:
        return self.sampler.n_steps

    @property
    def fingerprint(self) -> str:
        return store_fingerprint(self.identity)

    @property
    def timesteps(self) -> list[int]:
        return [int(round(t)) for t in self.sampler.schedule["timesteps"]]

    @property
    def sigmas(self) -> list[float]:
        return schedule_sigmas(self.sampler.scheduler, self.sampler.schedule)

    def sample_and_record(self, prompts: Sequence[str], seeds: Sequence[int], site_kind: str,
                          on_site: OnSite) -> np.ndarray:
        return self.sampler.run(prompts, seeds, self.sites, site_kind, on_site)


def default_dtype(family: Family, device: torch.device) -> torch.dtype:
    """float32 on the CPU; on a GPU bfloat16 for FLUX (its activations overflow float16), float16 otherwise."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if family.key == "flux" else torch.float16


def prepare_pipeline(model_path: Path, prompts_csv: Path, *, steps: int = 15, guidance: float = 7.5,
                     negative_prompt: str = "", height: int | None = None, width: int | None = None,
                     scheduler: str = "folder", variant: str | None = None, site_kind: str = "attn",
                     vae_input: str = "latent", dtype: str = "float16", pool: int = 1,
                     sites: Sequence[str] | None = None, control: str | None = None, control_seed: int = 100,
                     torch_dtype: torch.dtype | None = None, pipe=None,
                     extra_identity: dict | None = None) -> PipelineModel:
    """Load (or reuse ``pipe``), resolve sites, read the schedule and the sites' shapes, compute the store identity
    (the keywords of ``capture.sd.prepare_sd``)."""
    from .sd import read_prompts, weights_hash
    if vae_input != "latent":
        raise fail("pipeline captures feed the VAE site the latent after each step (capture.vae_input: latent); "
                   f"got {vae_input!r}")
    prompts, seeds = read_prompts(prompts_csv)
    device = _state().device
    if pipe is None:
        family = check_pipeline_folder(model_path)
        pipe = load_pipeline(model_path, torch_dtype or default_dtype(family, device), variant)
    family = family_of(pipe)
    if family.key == "flux" and negative_prompt:
        raise fail("FLUX.1 runs no CFG batch (its guidance is an embedding), so capture.negative_prompt is not used; "
                   "leave it empty")
    base = getattr(pipe, family.denoiser)
    den = control_unet(base, control, control_seed)
    hashes = {"model_hash": weights_hash(den), "vae_hash": weights_hash(pipe.vae),
              **{f"{k}_hash": weights_hash(getattr(pipe, k)) for k in ("text_encoder", "text_encoder_2",
                                                                      "text_encoder_3")
                 if isinstance(getattr(pipe, k, None), torch.nn.Module)}}
    pipe.to(device)
    den = den.to(device).eval()
    sampler = PipelineSampler(pipe, family, den, make_pipeline_scheduler(pipe, family, scheduler), steps,
                              float(guidance), negative_prompt or "", height, width)
    h, w = sampler.size
    den_sites = list_sites(den, family.denoiser)
    vae_sites = [s for s in list_sites(pipe.vae, "vae") if s.startswith("vae.dec")]
    if sites is not None:
        unknown = [s for s in sites if s not in den_sites + vae_sites]
        if unknown:
            raise fail(f"site {unknown[0]!r} is not a site of this {family.title} model; sites: "
                       f"{', '.join(den_sites + vae_sites)}")
        den_sites = [s for s in den_sites if s in sites]
        vae_sites = [s for s in vae_sites if s in sites]
    native: dict[str, tuple[int, ...]] = {}
    sampler.schedule = _shape_pass(sampler, den_sites + vae_sites, site_kind, native)
    shapes = {}
    for s in den_sites + vae_sites:
        c, sh, sw = native[s]
        if sh // pool < 1 or sw // pool < 1:
            raise fail(f"capture.pool {pool} is larger than site {s}'s {sh}x{sw} grid; lower capture.pool")
        shapes[s] = (c, sh // pool, sw // pool)
    sched = sampler.scheduler
    torch_dtype = next(den.parameters()).dtype
    identity = {"version": CAPTURE_VERSION, "protocol": "sd", "family": family.key, "pipeline": type(pipe).__name__,
                "model": control or "ldm", "prompts": prompts, "seeds": seeds, "steps": steps,
                "guidance_scale": float(guidance), "negative_prompt": sampler.negative_prompt, "size": [h, w],
                "site_kind": site_kind, "vae_input": vae_input, "dtype": dtype, "pool": pool,
                "sites": den_sites + vae_sites, "control_seed": control_seed if control else None, **hashes,
                "scheduler": {"class": type(sched).__name__, "config": canonical(dict(sched.config))},
                "call": canonical({k: v for k, v in sampler.call_options([""], [0]).items()
                                   if k not in ("prompt", "generator", "negative_prompt")}),
                "torch_dtype": str(torch_dtype), **(extra_identity or {})}
    return PipelineModel(sampler, prompts, seeds, den_sites, vae_sites, shapes, identity, device, torch_dtype, hashes)


def _shape_pass(sampler: PipelineSampler, sites: Sequence[str], kind: str, native: dict) -> dict:
    """Step 0 of one call on the empty prompt: the schedule, and each site's (C, h, w) into ``native``."""
    out: dict = {}

    def note(site: str, step: int, y: torch.Tensor) -> None:
        native.setdefault(site, tuple(y.shape[1:]))
    sampler.run([""], [0], sites, kind, note, schedule=out)
    lost = [s for s in sites if s not in native]
    if "timesteps" not in out or lost:
        raise RuntimeError(f"the schedule pass of {type(sampler.pipe).__name__} did not reach "
                           f"{lost or 'its step-end callback'}")
    return out


# ------------------------------------------------------------------------------------------------ the capture
def run_capture_pipeline(model_path: Path, prompts_csv: Path, out: Path, steps: int = 15, guidance: float = 7.5, *,
                         negative_prompt: str = "", height: int | None = None, width: int | None = None,
                         scheduler: str = "folder", variant: str | None = None, site_kind: str = "attn",
                         vae_input: str = "latent", dtype: str = "float16", pool: int = 1, batch_size: int = 4,
                         sites: Sequence[str] | None = None, control: str | None = None, control_seed: int = 100,
                         torch_dtype: torch.dtype | None = None, force: bool = False, progress: bool = True,
                         pipe=None) -> Path:
    """Capture every site at every step for every prompt into the store ``out`` (``RUN/captures/sd/<model>``, as
    ``capture.sd.run_capture_sd``: the model's images beside it, a control's inside it; resumes; skips a finished
    store of the same identity)."""
    check_capture_options(site_kind, vae_input, dtype, pool, batch_size, steps)
    out = Path(out)
    m = prepare_pipeline(model_path, prompts_csv, steps=steps, guidance=guidance, negative_prompt=negative_prompt,
                         height=height, width=width, scheduler=scheduler, variant=variant, site_kind=site_kind,
                         vae_input=vae_input, dtype=dtype, pool=pool, sites=sites, control=control,
                         control_seed=control_seed, torch_dtype=torch_dtype, pipe=pipe)
    n, ids = len(m.prompts), list(range(len(m.prompts)))
    spec = StoreSpec(out, m.shapes, n, m.n_steps, batch_size, dtype, pool, m.fingerprint)
    image_root = out.parent if control is None else out

    def run_batch(start: int, stop: int, emit) -> None:
        b_ids = ids[start:stop]
        images = m.sample_and_record([m.prompts[i] for i in b_ids], [m.seeds[i] for i in b_ids], site_kind, emit)
        save_images(image_root / "images", b_ids, images)

    model = control or "ldm"
    if not fill_store(spec, run_batch, force, progress, desc=f"capture {m.sampler.family.key}/{model}"):
        return out
    split = probe_split(ids)
    if _state().is_main_process:
        collect_samples(image_root / "images", image_root / "samples.safetensors", ids, split)
    finish_store(out, pipeline_manifest(m, model_path, control, n, ids, split, spec.fingerprint))
    return out


def pipeline_manifest(m: PipelineModel, model_path: Path, control: str | None, n: int, ids: list[int],
                      split: np.ndarray, fp: str, **extra) -> dict:
    s = m.sampler
    sched = s.scheduler
    return {
        "protocol": "sd", "family": s.family.key, "pipeline": type(s.pipe).__name__, "model": control or "ldm",
        "control": control, "model_root": str(Path(model_path).resolve()),
        "sites": {name: {"shape": list(m.shapes[name])} for name in m.sites}, "site_order": m.sites,
        "steps": list(range(m.n_steps)), "sampling_steps": s.steps, "timesteps": m.timesteps,
        "timesteps_exact": s.schedule["timesteps"], "sigmas": m.sigmas, "sigma_kind": sigma_kind(sched),
        "n": n, "sample_ids": ids, "seeds": m.seeds, "prompts": m.prompts, "guidance": s.guidance_scale,
        "cfg_half": "cond", "negative_prompt": s.negative_prompt, "size": list(s.size),
        "latent_grid": list(s.latent_hw), "dtype": m.identity["dtype"], "pool": m.identity["pool"],
        "site_kind": m.identity["site_kind"], "vae_input": "latent", "sampler": type(sched).__name__,
        "scheduler_config": canonical(dict(sched.config)), "call": m.identity["call"], **m.hashes,
        "scaling_factor": float(s.pipe.vae.config.scaling_factor),
        "shift_factor": getattr(s.pipe.vae.config, "shift_factor", None), "split": split.tolist(),
        "fingerprint": fp, "control_seed": m.identity["control_seed"], **extra,
    }



# ------------------------------------------------------------------------------------------------ any family
@dataclass(frozen=True)
class CaptureFunctions:
    """What the study needs of a family's capture: SD 1.x/2.x by ``capture/sd.py``, the others by this module."""
    family: str                    # the family key (models/families.py)
    check: object                  # (folder, option) → None; one error line for a bad folder
    load: object                   # (folder, device, variant) → the loaded pipeline
    prepare: object                # prepare_sd / prepare_pipeline (same keywords)
    run_capture: object            # run_capture_sd / run_capture_pipeline (same keywords)
    timesteps: object              # (prepared model) → the steps' timesteps (int), in sampling order


def _sd_timesteps(m) -> list[int]:
    m.sampler.scheduler.set_timesteps(m.sampler.steps)
    return [int(round(float(t))) for t in m.sampler.scheduler.timesteps]


def capture_functions(folder: Path, option: str = "--model") -> CaptureFunctions:
    """The capture functions of a folder's family; an unsupported family is one line naming it and the known ones."""
    from . import sd
    family = pipeline_family(folder, option)
    if family.key == "sd":
        return CaptureFunctions(
            "sd", sd.check_sd_folder,
            lambda f, device, variant: sd.load_sd(f, torch.float16 if device.type == "cuda" else torch.float32,
                                                  variant),
            sd.prepare_sd, sd.run_capture_sd, _sd_timesteps)
    return CaptureFunctions(
        family.key, lambda f, opt="--model": check_pipeline_folder(f, opt),
        lambda f, device, variant: load_pipeline(f, default_dtype(family, device), variant),
        prepare_pipeline, run_capture_pipeline, lambda m: m.timesteps)
