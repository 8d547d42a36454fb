"""Capture a real Stable Diffusion model (a local diffusers ``StableDiffusionPipeline`` folder, offline).

The same explicit loop as our LDM (``sample.denoise``, DDIM η = 0 on the pipeline's noise schedule) with
classifier-free guidance, ε̂ = ε̂(∅) + g·(ε̂(c) − ε̂(∅)) with the empty prompt as ∅. Sites: every U-Net ``attn1``
(self-attention, canonical names ``unet.down{b}.attn{j}`` …, 16 in SD v1.4) and the VAE decoder's mid attention
(``vae.dec.mid.attn0``) fed the latent after each step's update. Only the conditional half of the CFG batch is kept.
Prompts and seeds come from a CSV with columns ``prompt`` and ``seed``; row k is sample id k, and its initial noise is
drawn from ``torch.Generator().manual_seed(seed)``.

Stable Diffusion v1.4 on a GPU (16 U-Net sites × 15 steps ≈ 347 MB per image in float16, plus the VAE site at
64×64×512 ≈ 63 MB; ``pool: 2`` stores a quarter). Batch 8 prompts (16 with CFG) is a starting point, not a measured
fit: lower ``capture.batch_size`` if the card runs out of memory (the per-step VAE decode at 512 px is the peak)::

    printf 'capture: {batch_size: 8, steps: 15}\n' > sd.yaml
    accelerate launch -m sceneprobe capture --model /path/to/stable-diffusion-v1-4 --prompts prompts.csv \
        --run runs/sd14 --config sd.yaml

writes ``runs/sd14/captures/sd/ldm/`` (add ``--control permuted`` for the permuted-weights control). With
``accelerate launch --num_processes K`` the prompts are dealt out to K GPUs, all writing the same store; a rerun
resumes. The folder must hold model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/ (no download
is ever attempted; the safety checker is not loaded).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import torch

from ..config import fingerprint
from ..errors import fail
from ..models.io import model_hash
from ..models.sites import list_sites
from .run import (CAPTURE_VERSION, StoreSpec, _jsonable, _state, check_capture_options, collect_samples,
                  control_unet, fill_store, finish_store, probe_split, sample_and_record, save_images, site_shapes)


def read_prompts(path: Path) -> tuple[list[str], list[int]]:
    """(prompts, seeds) from a CSV with a header holding ``prompt`` and ``seed`` columns."""
    path = Path(path)
    if not path.is_file():
        raise fail(f"prompts file {path} does not exist; pass a CSV with columns prompt,seed")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        for need in ("prompt", "seed"):
            if need not in cols:
                raise fail(f"prompts file {path} has no {need!r} column (columns: {', '.join(cols) or 'none'}); "
                           f"the header must name prompt and seed")
        prompts, seeds = [], []
        for line, row in enumerate(reader, start=2):
            row = {(k or "").strip(): v for k, v in row.items()}
            try:
                seeds.append(int(str(row["seed"]).strip()))
            except ValueError:
                raise fail(f"prompts file {path}, line {line}: seed {row['seed']!r} is not an integer") from None
            prompts.append(row["prompt"] or "")
    if not prompts:
        raise fail(f"prompts file {path} has no rows below its header")
    return prompts, seeds


def load_sd(model_path: Path, torch_dtype: torch.dtype = torch.float32):
    """Load a local ``StableDiffusionPipeline`` folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, …)."""
    from diffusers import StableDiffusionPipeline
    model_path = Path(model_path)
    if not (model_path / "model_index.json").is_file():
        raise fail(f"model folder {model_path} is not a diffusers Stable Diffusion folder (no model_index.json)")
    try:
        return StableDiffusionPipeline.from_pretrained(model_path, local_files_only=True, dtype=torch_dtype,
                                                       safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise fail(f"Stable Diffusion folder {model_path} could not be loaded ({type(e).__name__}: "
                   f"{str(e).splitlines()[0] if str(e) else ''})") from None


@torch.no_grad()
def _embed(pipe, prompts: Sequence[str], device) -> torch.Tensor:
    tok = pipe.tokenizer(list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    return pipe.text_encoder(tok.input_ids.to(device))[0]  # (B, L, D)


def run_capture_sd(model_path: Path, prompts_csv: Path, out: Path, steps: int = 15, guidance: float = 7.5, *,
                   site_kind: str = "attn", vae_input: str = "latent", dtype: str = "float16", pool: int = 1,
                   batch_size: int = 4, sites: Sequence[str] | None = None, control: str | None = None,
                   control_seed: int = 100, torch_dtype: torch.dtype | None = None, force: bool = False,
                   progress: bool = True) -> Path:
    """Capture SD's self-attention at every step for every prompt into the store ``out`` (see the module doc)."""
    from diffusers import DDIMScheduler
    check_capture_options(site_kind, vae_input, dtype, pool, batch_size, steps)
    prompts, seeds = read_prompts(prompts_csv)
    state = _state()
    device = state.device
    if torch_dtype is None:
        torch_dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = load_sd(model_path, torch_dtype)
    unet = control_unet(pipe.unet, control, control_seed)
    vae, sf = pipe.vae, float(pipe.vae.config.scaling_factor)
    unet_hash, vae_hash = model_hash(unet), model_hash(vae)
    unet, vae, pipe.text_encoder = unet.to(device).eval(), vae.to(device).eval(), pipe.text_encoder.to(device).eval()
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    timesteps = [int(t) for t in sched.timesteps]
    unet_sites = [s for s in list_sites(unet, "unet")]
    vae_sites = [s for s in list_sites(vae, "vae") if s.startswith("vae.dec")]
    if sites is not None:
        unknown = [s for s in sites if s not in unet_sites + vae_sites]
        if unknown:
            raise fail(f"site {unknown[0]!r} is not a site of this model; sites: {', '.join(unet_sites + vae_sites)}")
        unet_sites = [s for s in unet_sites if s in sites]
        vae_sites = [s for s in vae_sites if s in sites]
    all_sites = unet_sites + vae_sites
    n, ids = len(prompts), list(range(len(prompts)))
    c, s = unet.config.in_channels, unet.config.sample_size
    uncond = _embed(pipe, [""], device)  # (1, L, D)

    def shape_pass() -> None:
        z = torch.zeros(1, c, s, s, device=device, dtype=torch_dtype)
        unet(z, sched.timesteps[0], encoder_hidden_states=uncond).sample
        vae.decode(z)
    shapes = site_shapes({"unet": unet, "vae": vae}, all_sites, site_kind, shape_pass, pool)

    model = control or "ldm"
    identity = {"version": CAPTURE_VERSION, "protocol": "sd", "model": model, "prompts": prompts, "seeds": seeds,
                "steps": steps, "guidance": guidance, "site_kind": site_kind, "vae_input": vae_input, "dtype": dtype,
                "pool": pool, "sites": all_sites, "control_seed": control_seed if control else None,
                "model_hash": unet_hash, "vae_hash": vae_hash, "scheduler": _jsonable(dict(sched.config)),
                "torch_dtype": str(torch_dtype)}
    out = Path(out)
    spec = StoreSpec(out, shapes, n, steps, batch_size, dtype, pool, fingerprint(identity))

    def run_batch(start: int, stop: int, emit) -> None:
        b_ids = ids[start:stop]
        z = torch.stack([torch.randn((c, s, s), generator=torch.Generator().manual_seed(seeds[i])) for i in b_ids])
        z = z.to(device=device, dtype=torch_dtype)  # (b, c, s, s)
        cond = _embed(pipe, [prompts[i] for i in b_ids], device)  # (b, L, D)
        emb = torch.cat([uncond.expand(len(b_ids), -1, -1), cond])  # (2b, L, D): [uncond, cond]

        def unet_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            e_u, e_c = unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample.chunk(2)
            return e_u + guidance * (e_c - e_u)

        images = sample_and_record(unet_fn, unet, vae, sched, z, b_ids, 0, steps, unet_sites, vae_sites, site_kind,
                                   vae_input, emit, keep_half="cond")
        save_images(out / "images", b_ids, images)

    if not fill_store(spec, run_batch, force, progress, desc=f"capture sd/{model}"):
        return out
    split = probe_split(ids)
    if state.is_main_process:
        collect_samples(out / "images", out / "samples.safetensors", ids, split)
    manifest = {
        "protocol": "sd", "model": model, "control": control, "model_root": str(Path(model_path).resolve()),
        "sites": {name: {"shape": list(shapes[name])} for name in all_sites},
        "site_order": all_sites, "steps": list(range(steps)), "timesteps": timesteps, "n": n, "sample_ids": ids,
        "seeds": seeds,
        "prompts": prompts, "guidance": guidance, "cfg_half": "cond", "dtype": dtype, "pool": pool,
        "site_kind": site_kind, "vae_input": vae_input, "sampler": "ddim", "eta": 0.0, "model_hash": unet_hash,
        "vae_hash": vae_hash, "scaling_factor": sf, "split": split.tolist(), "fingerprint": spec.fingerprint,
        "control_seed": control_seed if control else None,
    }
    finish_store(out, manifest)
    return out
