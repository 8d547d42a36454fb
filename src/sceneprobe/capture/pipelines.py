"""Capture SDXL, PixArt-α/Σ, SD3/3.5 and FLUX.1 from a local diffusers pipeline folder, by the family's own pipeline.

Sampling *is* the family's diffusers pipeline (``StableDiffusionXLPipeline``, ``PixArtAlphaPipeline`` /
``PixArtSigmaPipeline``, ``StableDiffusion3Pipeline``, ``FluxPipeline``; :mod:`.pipeline_sampler` says with which
options); owned hooks (:mod:`.pipeline_hooks`) record the canonical sites and the pipeline's step-end callback marks
each step. So the images equal the pipeline's by construction (a test still checks it: the same call without hooks
gives the same bytes). SD 1.x/2.x keep their own loop (:mod:`.sd`); this module exposes the same interface
(:class:`PipelineModel` ≈ ``SDModel``: ``sites``, ``n_steps``, ``fingerprint``, ``sampler.size`` and a
sample-and-record call), so the store (:func:`run_capture_pipeline`) and the streamed probes work for every family;
:func:`capture_functions` picks the right functions for any folder.

A control (``permuted``, ``fresh``) is a copy of the denoiser swapped into the same pipeline for each call (the
pipeline's own denoiser is put back after it). The ``uncond`` reading (issue 21, part 5: the text as a control) is the
model itself read on the *unconditional* half of its CFG batch — same weights, same prompts, seeds and latents, so
the same images — at the denoiser's sites (the VAE sites would repeat the model's: they read the same latents); a
family or guidance without a CFG batch (FLUX, guidance ≤ 1) has no such half and is refused. The manifest records
each step's timestep and sigma, the family, the pipeline class and its call options. The ``noised`` protocol on a
user's labelled images is :mod:`.noised_pipelines`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import fail
from ..models.families import FAMILIES, Family, pipeline_family, read_model_index
from ..models.io import HASH_CACHE
from ..models.sites import list_sites, select_sites
from .identity import canonical, store_fingerprint
from .pipeline_hooks import OnSite
from .pipeline_sampler import PipelineSampler, make_pipeline_scheduler, schedule_sigmas, sigma_kind
from .run import CAPTURE_VERSION, _state, check_capture_options, control_unet

PIPELINE_FAMILIES = ("sdxl", "pixart", "sd3", "flux")     # SD 1.x/2.x: capture/sd.py
UNCOND = "uncond"             # the model's unconditional CFG half, a second reading beside the controls
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


# ------------------------------------------------------------------------------------------------ folders
def check_pipeline_folder(folder: Path, option: str = "--model") -> Family:
    """The family of a pipeline folder this module captures; any other, a missing part or a model part without
    weight files is one error line (before anything loads)."""
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
        cls = str((index.get(part) or ["", ""])[1] or "")
        weights = not any(w in cls for w in ("Tokenizer", "Scheduler", "Processor", "FeatureExtractor"))
        if weights and not any(p.suffix in (".safetensors", ".bin") for p in (folder / part).iterdir()):
            raise fail(f"{option} {folder} is a {family.title} pipeline folder, but its {part}/ holds no weights "
                       f"(*.safetensors or *.bin); pass the whole pipeline folder as saved by save_pretrained")
    return family


def find_variant(folder: Path, part: str) -> str | None:
    """``"fp16"`` (or another variant) when ``part/`` holds only variant weight files (``name.fp16.safetensors``,
    sharded ``name-00001-of-00003.fp16.safetensors`` too), else None."""
    d = Path(folder) / part
    files = [p for p in d.glob("diffusion_pytorch_model*") if p.suffix in (".safetensors", ".bin")]
    if any(len(p.name.split(".")) == 2 for p in files):                       # plain weights (sharded or not)
        return None
    variants = sorted({p.name.split(".")[1] for p in files if len(p.name.split(".")) == 3})
    return variants[0] if variants else None


def load_pipeline(folder: Path, torch_dtype: torch.dtype = torch.float32, variant: str | None = None):
    """The folder's pipeline (the class model_index.json names when it is one of the family's, else the family's
    text-to-image one), loaded offline; optional image encoders and feature extractors are not loaded."""
    import diffusers
    folder = Path(folder)
    family = check_pipeline_folder(folder)
    index = read_model_index(folder)
    name = index.get("_class_name")
    cls = getattr(diffusers, name if name in family.pipelines else family.pipelines[0])
    variant = variant or find_variant(folder, family.denoiser)
    # parts left out: optional encoders, and parts saved as [null, null] (e.g. SD3 without its T5)
    params = inspect.signature(cls).parameters
    skip = {k: None for k in params if k in ("image_encoder", "feature_extractor")
            or (isinstance(index.get(k), (list, tuple)) and index[k] and index[k][0] is None)}
    try:
        pipe = cls.from_pretrained(folder, local_files_only=True, dtype=torch_dtype, variant=variant, **skip)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError) as e:
        raise fail(f"{family.title} folder {folder} could not be loaded ({type(e).__name__}: "
                   f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    pipe.set_progress_bar_config(disable=True)
    from ..models.io import stamp_source
    for part in (family.denoiser, "vae", *TEXT_ENCODERS):   # their weight hashes may then be cached (model_hash)
        if isinstance(getattr(pipe, part, None), torch.nn.Module):
            stamp_source(getattr(pipe, part), folder / part)
    return pipe


def family_of(pipe) -> Family:
    return next(f for f in FAMILIES.values() if type(pipe).__name__ in f.pipelines)


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
    half: str = "cond"        # the CFG half read: "cond", or "uncond" for the uncond reading

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
        return self.sampler.run(prompts, seeds, self.sites, site_kind, on_site, half=self.half)


def default_dtype(family: Family, device: torch.device) -> torch.dtype:
    """float32 on the CPU; on a GPU bfloat16 for FLUX (its activations overflow float16), float16 otherwise."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if family.key == "flux" else torch.float16


def prepare_pipeline(model_path: Path, prompts_csv: Path | None, *, steps: int = 15, guidance: float = 7.5,
                     negative_prompt: str = "", height: int | None = None, width: int | None = None,
                     scheduler: str = "folder", variant: str | None = None, site_kind: str = "attn",
                     vae_input: str = "latent", dtype: str = "float16", pool: int = 1,
                     sites: Sequence[str] | None = None, control: str | None = None, control_seed: int = 100,
                     torch_dtype: torch.dtype | None = None, pipe=None, extra_identity: dict | None = None,
                     hash_cache: Path | None = None,
                     prompt_rows: tuple[list[str], list[int]] | None = None) -> PipelineModel:
    """Load (or reuse ``pipe``), resolve sites, read the schedule and the sites' shapes, compute the store identity
    (the keywords of ``capture.sd.prepare_sd``; ``hash_cache``: the run's file of weight hashes, see
    ``models.io.model_hash``; ``prompt_rows``: (prompts, seeds) given instead of ``prompts_csv``, as the noised
    protocol gives its empty prompts)."""
    from .sd import read_prompts, weights_hash
    if vae_input != "latent":
        raise fail("pipeline captures feed the VAE site the latent after each step (capture.vae_input: latent); "
                   f"got {vae_input!r}")
    prompts, seeds = (list(prompt_rows[0]), list(prompt_rows[1])) if prompt_rows else read_prompts(prompts_csv)
    device = _state().device
    if pipe is None:
        family = check_pipeline_folder(model_path)
        pipe = load_pipeline(model_path, torch_dtype or default_dtype(family, device), variant)
    family = family_of(pipe)
    if family.key == "flux" and negative_prompt:
        raise fail("FLUX.1 runs no CFG batch (its guidance is an embedding), so capture.negative_prompt is not used; "
                   "leave it empty")
    base = getattr(pipe, family.denoiser)
    half = "uncond" if control == UNCOND else "cond"
    if half == "uncond" and (family.key == "flux" or float(guidance) <= 1
                             or getattr(base.config, "time_cond_proj_dim", None) is not None):
        raise fail(f"the uncond reading needs a CFG batch: {family.title} with guidance {float(guidance):g} runs none "
                   f"(FLUX.1 never does; others need capture.guidance_scale > 1); drop uncond from --controls")
    den = base if half == "uncond" else control_unet(base, control, control_seed)
    hashes = {"model_hash": weights_hash(den, hash_cache), "vae_hash": weights_hash(pipe.vae, hash_cache),
              **{f"{k}_hash": weights_hash(getattr(pipe, k), hash_cache) for k in TEXT_ENCODERS
                 if isinstance(getattr(pipe, k, None), torch.nn.Module)}}
    pipe.to(device)
    den = den.to(device).eval()
    sampler = PipelineSampler(pipe, family, den, make_pipeline_scheduler(pipe, family, scheduler), steps,
                              float(guidance), negative_prompt or "", height, width)
    h, w = sampler.size
    den_sites = list_sites(den, family.denoiser)
    vae_sites = [s for s in list_sites(pipe.vae, "vae") if s.startswith("vae.dec")]
    if sites:
        chosen = select_sites(den_sites + vae_sites, sites, f"{family.title} model")
        den_sites = [s for s in den_sites if s in chosen]
        vae_sites = [s for s in vae_sites if s in chosen]
    if half == "uncond":
        vae_sites = []                                    # the same latents as the model's: nothing new to read
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
                "sites": den_sites + vae_sites, "half": half,
                "control_seed": control_seed if control not in (None, UNCOND) else None, **hashes,
                "scheduler": {"class": type(sched).__name__, "config": canonical(dict(sched.config))},
                "call": canonical({k: v for k, v in sampler.call_options([""], [0]).items()
                                   if k not in ("prompt", "generator", "negative_prompt")}),
                "torch_dtype": str(torch_dtype), **(extra_identity or {})}
    return PipelineModel(sampler, prompts, seeds, den_sites, vae_sites, shapes, identity, device, torch_dtype, hashes,
                         half)


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
                         control_seed=control_seed, torch_dtype=torch_dtype, pipe=pipe,
                         hash_cache=out.parent / HASH_CACHE)     # RUN/captures/sd/: the run's, beside its images
    from .sd import capture_prompts
    return capture_prompts(m, out, control, batch_size, dtype, pool, force, progress,
                           f"capture {m.sampler.family.key}/{control or 'ldm'}",
                           lambda prompts, seeds, emit: m.sample_and_record(prompts, seeds, site_kind, emit),
                           lambda n, ids, split, fp: pipeline_manifest(m, model_path, control, n, ids, split, fp))


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
        "cfg_half": m.half, "negative_prompt": s.negative_prompt, "size": list(s.size),
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
    sigmas: object                 # (prepared model) → the steps' sigmas, in sampling order


def _sd_timesteps(m) -> list[int]:
    m.sampler.scheduler.set_timesteps(m.sampler.steps)
    return [int(round(float(t))) for t in m.sampler.scheduler.timesteps]


def _sd_sigmas(m) -> list[float]:
    from .pipeline_sampler import scheduler_sigmas
    m.sampler.scheduler.set_timesteps(m.sampler.steps)
    return scheduler_sigmas(m.sampler.scheduler)


def capture_functions(folder: Path, option: str = "--model") -> CaptureFunctions:
    """The capture functions of a folder's family; an unsupported family is one line naming it and the known ones."""
    from . import sd
    family = pipeline_family(folder, option)
    if family.key == "sd":
        return CaptureFunctions(
            "sd", sd.check_sd_folder,
            lambda f, device, variant: sd.load_sd(f, torch.float16 if device.type == "cuda" else torch.float32,
                                                  variant),
            sd.prepare_sd, sd.run_capture_sd, _sd_timesteps, _sd_sigmas)
    return CaptureFunctions(
        family.key, lambda f, opt="--model": check_pipeline_folder(f, opt),
        lambda f, device, variant: load_pipeline(f, default_dtype(family, device), variant),
        prepare_pipeline, run_capture_pipeline, lambda m: m.timesteps, lambda m: m.sigmas)
