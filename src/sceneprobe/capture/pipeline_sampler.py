"""One family's diffusers pipeline as a sampler that records: the options of its call, the per-step callback, the
schedule (timesteps and sigmas) and each step's VAE input (:class:`PipelineSampler`, used by ``capture/pipelines.py``).

Options passed to every pipeline: ``num_inference_steps`` = ``capture.steps``, ``guidance_scale`` =
``capture.guidance_scale`` (for FLUX the distilled guidance *embedding*: FLUX runs no CFG batch; its true CFG is
not used), ``negative_prompt`` = ``capture.negative_prompt`` when not empty (empty: the pipeline's own default, e.g.
SDXL's zeroed unconditional embedding; FLUX refuses one), ``height``/``width`` = ``capture.height``/``width`` or the
pipeline's default size, PixArt's ``use_resolution_binning=False`` (the size asked for is the size sampled; at the
native square size binning changes nothing) and ``clean_caption=False`` (prompts are used as written), one CPU
generator per seed and ``output_type="np"``. The scheduler is the folder's; ``capture.sd_scheduler`` may name another
for the DDPM-type families (SDXL, PixArt), not for the flow-matching ones.

Steps are indexed in sampling order. The schedule (timesteps *and* sigmas, as the pipeline sets them — FLUX's depend
on the image size through its shift ``mu``) is read in a first short pass that is stopped after step 0. σ: the
scheduler's own ``sigmas`` (flow matching: x_t = (1 − σ)·x₀ + σ·ε; Euler/DPM: x_t/√ᾱ = x₀ + σ·ε); a scheduler
without them gets σ = √((1 − ᾱ_t)/ᾱ_t) (the manifest says which).

VAE site (``vae.dec.mid.attn0``): each step's latent after its update, decoded as the pipeline decodes its final
latent (FLUX: unpacked first; then ``z·std/s + mean`` where the VAE config has latents_mean/std, else ``z/s``;
``+ shift_factor`` where it has one).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import fail
from ..models.families import Family
from .pipeline_hooks import OnSite, PipelineRecorder

FLOW_MATCHING = ("sd3", "flux")


class _Stop(Exception):
    """Ends the schedule pass after step 0."""


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
        """Decode a step's latent as far as the decoder's mid block (the VAE sites' hooks read it there; no image is
        needed: ``capture.run.decode_to_mid``); fp16 VAEs that ask for it are upcast, as SDXL's."""
        from .run import decode_to_mid
        vae = self.pipe.vae
        up = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
        if up:
            vae.to(torch.float32)
        try:
            decode_to_mid(vae, self.vae_input(latents).to(vae.dtype), lambda v, z: v.decode(z, return_dict=False))
        finally:
            if up:
                vae.to(torch.float16)

    @torch.no_grad()
    def run(self, prompts: Sequence[str], seeds: Sequence[int], sites: Sequence[str], kind: str, on_site: OnSite,
            schedule: dict | None = None, half: str = "cond",
            latents_at: Callable[[int], torch.Tensor] | None = None) -> np.ndarray | None:
        """One pipeline call recording ``sites`` at every step (cond half, first denoiser call of each step);
        returns the images (B, H, W, 3) uint8 as the pipeline's PIL output. With ``schedule`` (a dict) the call stops
        after step 0, having put the scheduler's timesteps and sigmas into it. ``half="uncond"``: the unconditional
        half of the CFG batch instead (:mod:`.pipeline_hooks`). ``latents_at(i)`` (the noised protocol): the latent
        the denoiser must see at step i, in the pipeline's own latent variable (FLUX: packed); step 0's is passed as
        the call's ``latents``, each later one is copied into the pipeline's latents at the end of the step before
        (after the VAE site read that step's update); the call then decodes nothing and returns None."""
        pipe, fam = self.pipe, self.family
        vae_sites = [s for s in sites if s.startswith("vae")]
        models = {fam.denoiser: self.denoiser, "vae": pipe.vae}
        rec = PipelineRecorder(models, sites, kind, len(prompts), self.latent_hw, dict(self.denoiser.config), on_site,
                               half)
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
                schedule["init_noise_sigma"] = float(getattr(sched, "init_noise_sigma", 1.0))  # flow: none (1)
                raise _Stop
            if latents_at is not None and i + 1 < self.n_steps:
                latents.copy_(latents_at(i + 1))             # in place: the loop's own tensor

        kw = self.call_options(prompts, seeds)
        if latents_at is not None:
            # the pipeline multiplies given latents by init_noise_sigma (SD, SDXL, PixArt; 1 for flow matching)
            kw.update(latents=latents_at(0) / self.schedule["init_noise_sigma"], output_type="latent")
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
            raise fail(f"{type(pipe).__name__} called back at {len(seen)} of {self.n_steps} steps (a scheduler of "
                       f"order > 1, such as Heun?); capture needs one callback per step: choose another scheduler "
                       f"with capture.sd_scheduler")
        if latents_at is not None:
            return None
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


def scheduler_sigmas(scheduler) -> list[float]:
    """σ of each step of a scheduler whose timesteps are set (SD's loop): its own sigmas, else from ᾱ_t."""
    n = len(scheduler.timesteps)
    sig = getattr(scheduler, "sigmas", None)
    return schedule_sigmas(scheduler, {"timesteps": [float(t) for t in scheduler.timesteps],
                                       "sigmas": None if sig is None else [float(s) for s in sig][:n]})


def schedule_sigmas(scheduler, schedule: dict) -> list[float]:
    """The schedule's σ per step: the scheduler's own, else σ = √((1 − ᾱ_t)/ᾱ_t) at each timestep."""
    if schedule.get("sigmas") is not None:
        return schedule["sigmas"]
    ab = scheduler.alphas_cumprod
    return [float(((1 - ab[int(round(t))]) / ab[int(round(t))]) ** 0.5) for t in schedule["timesteps"]]


def make_pipeline_scheduler(pipe, family: Family, name: str = "folder"):
    if name == "folder":
        return copy.deepcopy(pipe.scheduler)
    if family.key in FLOW_MATCHING:
        raise fail(f"capture.sd_scheduler {name!r}: {family.title} samples by flow matching with its folder's "
                   f"scheduler; use sd_scheduler: folder")
    from .sd import make_scheduler
    return make_scheduler(pipe, name)
