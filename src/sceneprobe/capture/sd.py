"""Capture a real Stable Diffusion model (a local diffusers ``StableDiffusionPipeline`` folder, offline).

Sampling is diffusers' own pipeline loop, step for step (:func:`sd_sample`): for the same prompt, seed, steps,
guidance scale, negative prompt and size our latents and images equal
``StableDiffusionPipeline(...)(prompt, generator=torch.Generator().manual_seed(seed))`` (a test checks it). The
scheduler is the folder's own (``scheduler: folder``, e.g. PNDM for v1.4/v1.5) unless ``capture.sd_scheduler``
names another (``ddim``, ``lms`` — the paper's, ``pndm``, ``euler``, ``euler_a``, ``dpm``), built from the folder's
scheduler config, so ε- and v-prediction folders (SD 2.x) both work. Classifier-free guidance,
ε̂ = ε̂(∅) + g·(ε̂(c) − ε̂(∅)) with ∅ the negative prompt (default ""), runs the doubled batch only when g > 1 (as the
pipeline does); only the conditional half is recorded.

Sites: every U-Net ``attn1`` (self-attention, canonical names ``unet.down{b}.attn{j}`` …, 16 in SD v1.x) and the VAE
decoder's mid attention (``vae.dec.mid.attn0``) fed the latent after each step's update. Prompts and seeds come from
a CSV with columns ``prompt`` and ``seed`` (:mod:`.prompts`); row k is sample id k.

Folder layout: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/; ``feature_extractor/`` and
``safety_checker/`` are never loaded (they need not exist). Folders that hold only fp16 variant files
(``*.fp16.safetensors``) are found by themselves (``capture.variant`` forces one). No download is ever attempted.

Where things go (``RUN/captures/sd/``): ``ldm/`` (the store), ``images/`` and ``samples.safetensors`` (the model's
images: ``sceneprobe label --images RUN/captures/sd`` writes ``labels.safetensors`` beside them, where ``sceneprobe
probe`` reads them), ``permuted/`` (the control's store, with its own images inside). The whole study — capture,
labels, probes, report — is ``sceneprobe run --sd PATH --prompts CSV --out RUN`` (:mod:`sceneprobe.study_sd`).
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import fail
from ..models.families import CAPTURE_SUPPORTED, Family, detect_family, read_model_index
from ..models.sites import list_sites, select_sites
from .identity import canonical, store_fingerprint
from .prompts import read_prompts  # noqa: F401  (re-exported: the studies read prompts through here)
from .recorder import Recorder
from .run import (CAPTURE_VERSION, StoreSpec, _state, check_capture_options, collect_samples, control_unet,
                  decode_to_mid, fill_store, finish_store, probe_split, save_images, site_shapes)
from ..models.io import HASH_CACHE

SCHEDULERS = {"ddim": "DDIMScheduler", "lms": "LMSDiscreteScheduler", "pndm": "PNDMScheduler",
              "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
              "dpm": "DPMSolverMultistepScheduler"}
OnSite = Callable[[str, int, torch.Tensor], None]   # (site, step, rows (b, C, h, w))


# ------------------------------------------------------------------------------------------------ folders
def find_variant(model_path: Path) -> str | None:
    """``"fp16"`` (or another variant) when unet/ holds only variant weight files, else None."""
    unet = Path(model_path) / "unet"
    if not unet.is_dir():
        return None
    plain = [p for p in unet.glob("diffusion_pytorch_model*") if p.suffix in (".safetensors", ".bin")
             and len(p.name.split(".")) == 2 and "-of-" not in p.name]
    if plain or any(unet.glob("diffusion_pytorch_model-*-of-*.safetensors")):
        return None
    variants = sorted({p.name.split(".")[1] for p in unet.glob("diffusion_pytorch_model.*.*")
                       if p.suffix in (".safetensors", ".bin") and len(p.name.split(".")) == 3})
    return variants[0] if variants else None


def weights_hash(model: torch.nn.Module, cache: Path | None = None) -> str:
    """``models.io.model_hash`` (SHA-256 over parameters and buffers in name order, as float32) for a model on any
    device (each tensor is copied to the CPU on its own), paid once: see ``model_hash`` for ``cache``."""
    from ..models.io import model_hash
    return model_hash(model, cache)


SUPPORTED = CAPTURE_SUPPORTED


def check_sd_folder(model_path: Path, option: str = "model folder") -> None:
    """Refuse, before any weights are read, a folder that is not a loadable Stable Diffusion v1/v2 pipeline: no or
    unreadable ``model_index.json``, another family (SDXL, SD3, FLUX, PixArt, …: ``models/families.py`` tells which;
    those are captured by ``capture/pipelines.py``), or a missing part."""
    model_path = Path(model_path)
    index = read_model_index(model_path, option, what="a diffusers Stable Diffusion folder")
    family = detect_family(index)
    if not (isinstance(family, Family) and family.key == "sd"):
        name = family.name if isinstance(family, Family) else family
        other = (" (capture.pipelines.run_capture_pipeline and `sceneprobe run --model` capture it)"
                 if isinstance(family, Family) else f"; sceneprobe knows {SUPPORTED}")
        raise fail(f"{option} {model_path} holds a pipeline of the {name} family ({index.get('_class_name', '?')} "
                   f"in model_index.json), not Stable Diffusion v1/v2{other}")
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (model_path / sub).is_dir():
            raise fail(f"Stable Diffusion folder {model_path} has no {sub}/; it needs unet/, vae/, text_encoder/, "
                       f"tokenizer/ and scheduler/")


def load_sd(model_path: Path, torch_dtype: torch.dtype = torch.float32, variant: str | None = None):
    """Load a local ``StableDiffusionPipeline`` folder; safety checker and feature extractor are not loaded."""
    model_path = Path(model_path)
    check_sd_folder(model_path)
    from diffusers import StableDiffusionPipeline
    variant = variant or find_variant(model_path)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(model_path, local_files_only=True, dtype=torch_dtype,
                                                       variant=variant, safety_checker=None, feature_extractor=None,
                                                       image_encoder=None, requires_safety_checker=False)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise fail(f"Stable Diffusion folder {model_path} could not be loaded ({type(e).__name__}: "
                   f"{str(e).splitlines()[0] if str(e) else ''}); an fp16-only folder needs capture.variant: fp16"
                   if variant is None else
                   f"Stable Diffusion folder {model_path} could not be loaded with variant {variant!r} "
                   f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    from ..models.io import stamp_source
    for part in ("unet", "vae", "text_encoder"):       # their weight hashes may then be cached (models.io.model_hash)
        stamp_source(getattr(pipe, part), model_path / part)
    return pipe


def make_scheduler(pipe, name: str = "folder"):
    """The sampler: the folder's own scheduler (a copy), or ``name`` built from the folder's scheduler config."""
    if name == "folder":
        return copy.deepcopy(pipe.scheduler)
    if name not in SCHEDULERS:
        raise fail(f"capture.sd_scheduler {name!r} is unknown; choose folder, {', '.join(SCHEDULERS)}")
    import diffusers
    extra = {"skip_prk_steps": True} if name == "pndm" else {}  # PLMS only, as SD's own PNDM config
    return getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config, **extra)


# ------------------------------------------------------------------------------------------------ sampling
@dataclass
class SDSampler:
    """Everything one sampling pass needs; ``unet`` may be a control copy of ``pipe.unet``."""
    pipe: object
    unet: torch.nn.Module
    scheduler: object
    steps: int = 15
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    height: int | None = None
    width: int | None = None

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) in pixels: the options, else the U-Net's native size (as the pipeline defaults)."""
        native = int(self.unet.config.sample_size) * self.vae_scale
        h, w = self.height or native, self.width or native
        if h % self.vae_scale or w % self.vae_scale:
            raise fail(f"capture.height/width must be multiples of {self.vae_scale}, got {h}x{w}")
        return h, w

    @property
    def n_steps(self) -> int:
        """U-Net calls per image: ``steps``, or one more for PNDM's PLMS warm-up (v1.4/v1.5's own scheduler)."""
        self.scheduler.set_timesteps(self.steps)
        return len(self.scheduler.timesteps)

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None

    @torch.no_grad()
    def embed(self, prompts: Sequence[str], device) -> torch.Tensor:
        """Text embeddings (B, L, D), as ``encode_prompt`` (no clip skip)."""
        pipe = self.pipe
        tok = pipe.tokenizer(list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        mask = tok.attention_mask.to(device) if getattr(pipe.text_encoder.config, "use_attention_mask", False) else None
        return pipe.text_encoder(tok.input_ids.to(device), attention_mask=mask)[0]

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], device, dtype,
               callback: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Final latents (B, c, h, w) for ``prompts`` with one CPU generator per seed, as the pipeline draws them.

        ``callback(step, timestep, latents)`` runs after each step's update (the VAE site reads it)."""
        from diffusers.utils.torch_utils import randn_tensor
        sched = self.scheduler
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        cond = self.embed(prompts, device)                                          # (B, L, D)
        if self.cfg:
            neg = self.embed([self.negative_prompt] * len(prompts), device)
            emb = torch.cat([neg, cond])                                            # (2B, L, D): [uncond, cond]
        else:
            emb = cond
        sched.set_timesteps(self.steps, device=device)
        h, w = self.size
        shape = (len(prompts), self.unet.config.in_channels, h // self.vae_scale, w // self.vae_scale)
        x = randn_tensor(shape, generator=gens if len(gens) > 1 else gens[0], device=torch.device(device),
                         dtype=emb.dtype) * sched.init_noise_sigma                  # (B, c, h, w)
        params = set(inspect.signature(sched.step).parameters)
        extra = {"eta": 0.0} if "eta" in params else {}
        if "generator" in params:
            extra["generator"] = gens if len(gens) > 1 else gens[0]
        for i, t in enumerate(sched.timesteps):
            inp = torch.cat([x, x]) if self.cfg else x
            inp = sched.scale_model_input(inp, t)
            eps = self.unet(inp, t, encoder_hidden_states=emb, return_dict=False)[0]
            if self.cfg:
                e_u, e_c = eps.chunk(2)
                eps = e_u + self.guidance_scale * (e_c - e_u)
            x = sched.step(eps, t, x, **extra, return_dict=False)[0]
            if callback is not None:
                callback(i, int(t), x)
        return x

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images (B, 3, H, W) in [−1, 1] (not clamped), as the pipeline decodes."""
        vae = self.pipe.vae
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """The pipeline's post-processing: (B, 3, H, W) in [−1, 1] → (B, H, W, 3) uint8 via ((x/2 + ½) clamp) · 255."""
    x = (images.detach() / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return (x * 255).round().astype("uint8")


@torch.no_grad()
def sample_and_record_sd(sampler: SDSampler, prompts: Sequence[str], seeds: Sequence[int], unet_sites: Sequence[str],
                         vae_sites: Sequence[str], site_kind: str, on_site: OnSite, device, dtype,
                         half: str = "cond") -> np.ndarray:
    """One sampling pass recording every site at every step (cond half only; ``half="uncond"``: the unconditional
    half, the ``uncond`` reading); returns the uint8 images."""
    cur = {"step": 0}
    final: dict[str, torch.Tensor] = {}
    steps = sampler.n_steps

    def on_out(site: str, y: torch.Tensor) -> None:
        on_site(site, cur["step"], y)

    def callback(i: int, t: int, x: torch.Tensor) -> None:
        if vae_sites and i == steps - 1:   # the VAE site reads the latent after step i's update
            final["img"] = sampler.decode(x)   # the last step's latent is the final latent: reuse its decode
        elif vae_sites:                    # no image needed: the decoder stops after its mid block (the site)
            decode_to_mid(sampler.pipe.vae, x, lambda vae, z: sampler.decode(z))
        cur["step"] = i + 1

    with Recorder({"unet": sampler.unet}, unet_sites, site_kind, on_out, keep_half=half if sampler.cfg else None), \
            Recorder({"vae": sampler.pipe.vae}, vae_sites, site_kind, on_out):
        x = sampler.sample(prompts, seeds, device, dtype, callback)
    img = final.get("img")
    if img is None:
        img = sampler.decode(x)
    return to_uint8(img)


# ------------------------------------------------------------------------------------------------ the capture
def sd_options(cc, guidance: float | None = None) -> dict:
    """Keyword options of :func:`run_capture_sd` from a ``CaptureConfig`` (``guidance`` overrides the config's)."""
    return dict(steps=cc.steps, guidance=cc.guidance_scale if guidance is None else float(guidance),
                negative_prompt=cc.negative_prompt, height=cc.height or None, width=cc.width or None,
                scheduler=cc.sd_scheduler, variant=cc.variant or None, site_kind=cc.site_kind,
                vae_input=cc.vae_input, dtype=cc.dtype, pool=cc.pool, sites=list(cc.sites) or None)


@dataclass
class SDModel:
    """A loaded folder prepared for capture: sampler, sites, shapes and the store identity."""
    sampler: SDSampler
    prompts: list[str]
    seeds: list[int]
    unet_sites: list[str]
    vae_sites: list[str]
    shapes: dict
    identity: dict
    device: torch.device
    dtype: torch.dtype
    hashes: dict
    half: str = "cond"        # the CFG half read; "uncond" for the uncond reading (capture/pipelines.py: UNCOND)

    @property
    def sites(self) -> list[str]:
        return self.unet_sites + self.vae_sites

    @property
    def n_steps(self) -> int:
        return self.sampler.n_steps

    @property
    def fingerprint(self) -> str:
        return store_fingerprint(self.identity)


def prepare_sd(model_path: Path, prompts_csv: Path, *, steps: int = 15, guidance: float = 7.5,
               negative_prompt: str = "", height: int | None = None, width: int | None = None,
               scheduler: str = "folder", variant: str | None = None, site_kind: str = "attn",
               vae_input: str = "latent", dtype: str = "float16", pool: int = 1, sites: Sequence[str] | None = None,
               control: str | None = None, control_seed: int = 100, torch_dtype: torch.dtype | None = None,
               pipe=None, extra_identity: dict | None = None, hash_cache: Path | None = None) -> SDModel:
    """Load (or reuse ``pipe``), build the sampler, resolve sites and shapes, and compute the store identity.

    ``hash_cache``: a JSON file the run owns where weight hashes of folder-loaded parts are kept
    (``models.io.model_hash``)."""
    if vae_input != "latent":
        raise fail("Stable Diffusion captures feed the VAE site the latent after each step (capture.vae_input: latent); "
                   f"got {vae_input!r}")
    prompts, seeds = read_prompts(prompts_csv)
    device = _state().device
    if torch_dtype is None:
        torch_dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = pipe if pipe is not None else load_sd(model_path, torch_dtype, variant)
    half = "uncond" if control == "uncond" else "cond"   # the model read on its unconditional CFG half
    unet = pipe.unet if half == "uncond" else control_unet(pipe.unet, control, control_seed)
    hashes = {"model_hash": weights_hash(unet, hash_cache), "vae_hash": weights_hash(pipe.vae, hash_cache),
              "text_hash": weights_hash(pipe.text_encoder, hash_cache)}
    unet = unet.to(device).eval()
    pipe.vae.to(device).eval()
    pipe.text_encoder.to(device).eval()
    sampler = SDSampler(pipe, unet, make_scheduler(pipe, scheduler), steps, float(guidance), negative_prompt or "",
                        height, width)
    h, w = sampler.size
    unet_sites = list_sites(unet, "unet")
    vae_sites = [s for s in list_sites(pipe.vae, "vae") if s.startswith("vae.dec")]
    if sites:
        chosen = select_sites(unet_sites + vae_sites, sites, "model")
        unet_sites = [s for s in unet_sites if s in chosen]
        vae_sites = [s for s in vae_sites if s in chosen]
    if half == "uncond":
        if not sampler.cfg:
            raise fail(f"the uncond reading needs a CFG batch: guidance {float(guidance):g} runs none; set "
                       "capture.guidance_scale > 1 or drop uncond from --controls")
        vae_sites = []                           # the same latents as the model's: nothing new to read
    lh, lw = h // sampler.vae_scale, w // sampler.vae_scale

    def shape_pass() -> None:                    # only where the shapes cannot be derived from the modules
        emb = sampler.embed([""], device)
        z = torch.zeros(1, unet.config.in_channels, lh, lw, device=device, dtype=emb.dtype)
        unet(z, int(sampler.scheduler.config.num_train_timesteps) - 1, encoder_hidden_states=emb)
        sampler.decode(z)
    shapes = site_shapes({"unet": unet, "vae": pipe.vae}, unet_sites + vae_sites, site_kind, shape_pass, pool,
                         latent_hw=(lh, lw), image_hw=(h, w))
    sched = sampler.scheduler
    identity = {"version": CAPTURE_VERSION, "protocol": "sd", "model": control or "ldm", "prompts": prompts,
                "seeds": seeds, "steps": steps, "guidance_scale": float(guidance), "cfg": sampler.cfg,
                "negative_prompt": sampler.negative_prompt, "size": [h, w], "site_kind": site_kind,
                "vae_input": vae_input, "dtype": dtype, "pool": pool, "sites": unet_sites + vae_sites,
                "control_seed": control_seed if control else None, **hashes,
                "scheduler": {"class": type(sched).__name__, "config": canonical(dict(sched.config))},
                "torch_dtype": str(torch_dtype), **({"half": half} if half == "uncond" else {}),
                **(extra_identity or {})}
    return SDModel(sampler, prompts, seeds, unet_sites, vae_sites, shapes, identity, device, torch_dtype, hashes,
                   half)


def run_capture_sd(model_path: Path, prompts_csv: Path, out: Path, steps: int = 15, guidance: float = 7.5, *,
                   negative_prompt: str = "", height: int | None = None, width: int | None = None,
                   scheduler: str = "folder", variant: str | None = None, site_kind: str = "attn",
                   vae_input: str = "latent", dtype: str = "float16", pool: int = 1, batch_size: int = 4,
                   sites: Sequence[str] | None = None, control: str | None = None, control_seed: int = 100,
                   torch_dtype: torch.dtype | None = None, force: bool = False, progress: bool = True,
                   pipe=None) -> Path:
    """Capture SD's self-attention at every step for every prompt into the store ``out`` (see the module doc).

    ``out`` is ``RUN/captures/sd/<model>``; the model's images go to ``RUN/captures/sd/`` (``images/``,
    ``samples.safetensors``), a control's into its own store folder. A finished store with the same identity is
    skipped; an unfinished one resumes (also in another process or under ``accelerate launch``)."""
    check_capture_options(site_kind, vae_input, dtype, pool, batch_size, steps)
    out = Path(out)
    m = prepare_sd(model_path, prompts_csv, steps=steps, guidance=guidance, negative_prompt=negative_prompt,
                   height=height, width=width, scheduler=scheduler, variant=variant, site_kind=site_kind,
                   vae_input=vae_input, dtype=dtype, pool=pool, sites=sites, control=control,
                   control_seed=control_seed, torch_dtype=torch_dtype, pipe=pipe,
                   hash_cache=out.parent / HASH_CACHE)  # RUN/captures/sd/: the run's, beside its images
    def record(prompts, seeds, emit) -> np.ndarray:
        return sample_and_record_sd(m.sampler, prompts, seeds, m.unet_sites, m.vae_sites, site_kind, emit, m.device,
                                    m.dtype, m.half)
    return capture_prompts(m, out, control, batch_size, dtype, pool, force, progress, f"capture sd/{control or 'ldm'}",
                           record, lambda n, ids, split, fp: sd_manifest(m, model_path, control, n, ids, split, fp))


def capture_prompts(m, out: Path, control: str | None, batch_size: int, dtype: str, pool: int, force: bool,
                    progress: bool, desc: str, record, manifest) -> Path:
    """The store of a prepared model (:class:`SDModel` or a pipeline family's): every prompt's sites at every step
    into ``out``, the model's images beside it (``RUN/captures/sd/``), a control's inside it; resumes; a finished
    store of the same identity is skipped. ``record(prompts, seeds, emit)`` samples one batch, emitting its rows,
    and returns its images; ``manifest(n, ids, split, fingerprint)`` is the finished store's manifest."""
    n, ids = len(m.prompts), list(range(len(m.prompts)))
    spec = StoreSpec(out, m.shapes, n, m.n_steps, batch_size, dtype, pool, m.fingerprint)
    image_root = out.parent if control is None else out

    def run_batch(start: int, stop: int, emit) -> None:
        b_ids = ids[start:stop]
        images = record([m.prompts[i] for i in b_ids], [m.seeds[i] for i in b_ids], emit)
        save_images(image_root / "images", b_ids, images)

    if not fill_store(spec, run_batch, force, progress, desc=desc):
        return out
    split = probe_split(ids)
    if _state().is_main_process:
        collect_samples(image_root / "images", image_root / "samples.safetensors", ids, split)
    finish_store(out, manifest(n, ids, split, spec.fingerprint))
    return out


def sd_manifest(m: SDModel, model_path: Path, control: str | None, n: int, ids: list[int], split: np.ndarray,
                fp: str, **extra) -> dict:
    from .pipeline_sampler import scheduler_sigmas, sigma_kind
    sched = m.sampler.scheduler
    sched.set_timesteps(m.sampler.steps)
    return {
        "sigmas": scheduler_sigmas(sched), "sigma_kind": sigma_kind(sched),      # issue 21: each step's σ too
        "protocol": "sd", "model": control or "ldm", "control": control, "model_root": str(Path(model_path).resolve()),
        "sites": {name: {"shape": list(m.shapes[name])} for name in m.sites},
        "site_order": m.sites, "steps": list(range(m.n_steps)), "sampling_steps": m.sampler.steps,
        "timesteps": [int(round(float(t))) for t in sched.timesteps], "n": n, "sample_ids": ids, "seeds": m.seeds,
        "prompts": m.prompts, "guidance": m.sampler.guidance_scale, "cfg_half": m.half if m.sampler.cfg else None,
        "negative_prompt": m.sampler.negative_prompt, "size": list(m.sampler.size),
        "dtype": m.identity["dtype"], "pool": m.identity["pool"], "site_kind": m.identity["site_kind"],
        "vae_input": "latent", "sampler": type(sched).__name__, "scheduler_config": canonical(dict(sched.config)),
        **m.hashes, "scaling_factor": float(m.sampler.pipe.vae.config.scaling_factor), "split": split.tolist(),
        "fingerprint": fp, "control_seed": m.identity["control_seed"], **extra,
    }
