"""Capture protocols: every self-attention site of the U-Net and the VAE at every denoising step, in one streamed pass.

Stores are written to ``run/captures/<protocol>/<model>/`` (``model`` = ``ldm``, ``permuted`` or ``fresh``) in the
format of :mod:`sceneprobe.capture.store`: every shard is created once with its full (N, C, h, w) shape, then each
batch's rows are written in place as the hooks produce them, so peak memory does not grow with N.

Protocols
---------
In both protocols the VAE decoder site ``vae.dec.mid.attn0`` at step i is fed the same thing: the output of the
sampler's own ``scheduler.step`` at step i, computed from *that store's* U-Net prediction (the trained model's, or the
permuted / fresh control's) — ``prev_sample``, the latent after step i's update (``vae_input="latent"``, the paper's:
"after t+1 updates"), or ``pred_original_sample`` x̂₀ (``"x0"``) — decoded with :func:`sceneprobe.sample.decode`,
run only as far as the decoder's mid block (:func:`decode_to_mid`) where no image of it is needed. So
a control's VAE rows are a real control: the decoder sees what the control U-Net made of the latent. No ε or v
formula is written here; the scheduler's ``prediction_type`` decides. The manifest records it (``vae_dec_input``).

``generate`` (the paper's): sample ids 0…N−1, DDIM (η = 0) with ``capture.steps`` steps. At step i the U-Net runs once
    on x_t (all U-Net sites are recorded), then the decoder runs on the step's update as above. The encoder is never
    run while sampling, so ``vae.enc.mid.attn0`` is not a site of this protocol. Final images:
    ``captures/generate/samples.safetensors`` (``images`` (N, H, W, 3) uint8, ``sample_ids``, ``split`` int8) and
    ``captures/generate/images/*.png`` (a control's own images go to its store folder instead; the probes of every
    model use the ``ldm`` images' labels).
``noised``: the first ``capture.n_noised`` scenes of the dataset's *test* split are encoded, z0 = to_latent(mode
    q(z|x)), then forward-diffused with ONE fixed noise per sample to each sampler timestep t_i:
    x_{t_i} = ``scheduler.add_noise(z0, ε, t_i)``. The U-Net runs once per timestep on x_{t_i}; the decoder then reads
    ``scheduler.step(unet(x_{t_i}), t_i, x_{t_i})`` (one DDIM update from the *noised* latent, not a sampling chain).
    Exact labels go to ``captures/noised/labels.safetensors``.
    The encoder site ``vae.enc.mid.attn0`` (the encoder on the clean image) does not depend on the step or on the
    U-Net: it is stored ONCE, as ``step_00``, and the manifest marks it ``"step_independent": true`` with
    ``"steps": [0]`` in its ``sites`` entry and lists it in ``step_independent_sites``; read its steps with
    :meth:`~sceneprobe.capture.store.CaptureStore.site_steps`. The report shows it as its own group, not as a step curve.

Image read-out (the ``ldm`` store only, test-split rows only): at every step the decoded x̂₀ (``pred_original_sample``)
of the test rows is written to ``<store>/x0/step_XX/<sample id>.png``, for the labeller's read-out per step
(:mod:`sceneprobe.labeller.readout`). With ``vae_input="x0"`` this reuses the site's decode; otherwise it is one extra
decode of the test rows per step.

The probe split of the N rows is 60 % / 15 % / 25 % train / val / test, a fixed function of the sample ids
(:func:`probe_split`), stored in the manifest and beside the images or labels.

The pieces: :mod:`.store_fill` (the store engine: plan, fill, resume, manifest), :mod:`.site_shapes` (stored shapes),
:mod:`.generate_pass` and :mod:`.noised_pass` (each protocol's recording pass), :mod:`.input_site` (the input
control), :mod:`.vae_decodes` (the site's decode to the mid block, the read-out's decode), :mod:`.images` (final and
read-out images), :mod:`.split_codes` (:func:`probe_split`), :mod:`.options` (option checks, the control U-Net); this
module runs a protocol into its store (:func:`run_capture`). Resume and ``accelerate launch``: :mod:`.store_fill`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..config import Config, fingerprint, to_dict
from ..errors import fail
from ..models.build import sampling_scheduler
from ..models.io import HASH_CACHE, LDM, model_hash
from ..models.sites import list_sites
from ..sample import initial_noise, sample_seed
from .generate_pass import sample_and_record
from .images import X0Sink, _x0_saver, collect_samples, save_images, x0_image_path
from .input_site import INPUT_SITE, input_rows
from .noised_pass import NOISE_STREAM, _noised_batch, _test_scenes
from .options import CONTROLS, DTYPES, VAE_INPUTS, check_capture_options, control_unet
from .site_shapes import derived_shapes, site_shapes, traced_shapes
from .split_codes import SPLIT_FRACTIONS, probe_split
from .store import save_labels
from .store_fill import Emit, StoreSpec, _state, fill_store, finish_store
from .vae_decodes import decode_readout, decode_to_mid

CAPTURE_VERSION = 3  # 2: decoder fed this U-Net's update in noised; encoder stored once; x̂₀ read-out; 3: input site
PROTOCOLS = ("generate", "noised")

VAE_DEC_INPUT = {  # what the decoder site reads at step i (recorded in the manifest as ``vae_dec_input``)
    "generate": {"latent": "prev_sample of scheduler.step at step i (the latent after step i's update), from this "
                           "store's U-Net prediction on the sampling chain",
                 "x0": "pred_original_sample of scheduler.step at step i (predicted x0), from this store's U-Net "
                       "prediction on the sampling chain"},
    "noised": {"latent": "prev_sample of scheduler.step(unet(x_t_i), t_i, x_t_i): one update of the noised latent "
                         "x_t_i = add_noise(z0, eps, t_i), from this store's U-Net prediction",
               "x0": "pred_original_sample of scheduler.step(unet(x_t_i), t_i, x_t_i) (predicted x0 from the noised "
                     "latent), from this store's U-Net prediction"},
}
STEP_INDEPENDENT = ("vae.enc.mid.attn0",)  # sites that do not depend on the step: stored once, as step 0


def run_capture(cfg: Config, run: Path, protocol: str, ldm: LDM, data=None, control: str | None = None,
                force: bool = False, progress: bool = True, sites: Sequence[str] | None = None,
                readout: bool | None = None, store_steps: Sequence[int] | None = None,
                stop_early: bool = False) -> Path:
    """Capture ``protocol`` for the LDM (or a control of its U-Net) into ``run/captures/<protocol>/<model>/``.

    ``sites`` (default: every site of the protocol) restricts the capture to some canonical site names. ``readout``
    (default: for the ``ldm`` store, not for controls) also writes the decoded x̂₀ of the test rows at every step
    (``<store>/x0/step_XX/*.png``) for the labeller's image read-out. ``store_steps`` (default: all) keeps only
    those steps' shards, e.g. the steps an intervention edits; with ``stop_early`` (``generate`` only) sampling stops
    after the last of them, so no final images (``samples.safetensors``) are written.
    """
    cc = cfg.capture
    if protocol not in PROTOCOLS:
        raise fail(f"unknown capture protocol {protocol!r}; choose generate or noised")
    check_capture_options(cc.site_kind, cc.vae_input, cc.dtype, cc.pool, cc.batch_size, cc.steps)
    if control not in (None, *CONTROLS):
        raise fail(f"unknown control {control!r}; choose permuted or fresh")
    if protocol == "generate":
        n = cc.n_generate
        ids = list(range(n))
        names = None
        seeds = [sample_seed(cc.seed, i, 0) for i in ids]
    else:
        test = _test_scenes(data, cc.n_noised, ldm.vae.config.sample_size)
        n = test.rgb.shape[0]
        ids = list(range(n))
        names = list(test.names)
        seeds = [sample_seed(cc.seed, i, NOISE_STREAM) for i in ids]
    if n < 1:
        raise fail(f"capture.n_{protocol} must be at least 1")
    split = probe_split(ids)
    model = control or "ldm"
    unet = control_unet(ldm.unet, control, cc.control_seed)
    vae, sf = ldm.vae, ldm.scaling_factor
    cache = Path(run) / "captures" / HASH_CACHE  # hashes of folder-loaded weights, paid once per run folder
    unet_hash, vae_hash = model_hash(unet, cache), model_hash(vae, cache)  # on the CPU, before any move
    base_hash = model_hash(ldm.unet, cache) if control else unet_hash
    device = _state().device
    unet, vae = unet.to(device).eval(), vae.to(device).eval()
    proot = Path(run) / "captures" / protocol
    root = proot / model
    sched = sampling_scheduler(ldm.scheduler_config, "ddim")
    sched.set_timesteps(cc.steps)
    timesteps = [int(t) for t in sched.timesteps]
    c, s = unet.config.in_channels, unet.config.sample_size
    unet_sites = list_sites(unet, "unet")
    vae_sites = ["vae.dec.mid.attn0"] if protocol == "generate" else ["vae.enc.mid.attn0", "vae.dec.mid.attn0"]
    vae_sites = [v for v in vae_sites if v in list_sites(vae, "vae")]
    if sites is not None:
        unknown = [x for x in sites if x not in unet_sites + vae_sites + [INPUT_SITE]]
        if unknown:
            raise fail(f"site {unknown[0]!r} is not a site of the {protocol} protocol for this model; sites: "
                       f"{', '.join(unet_sites + vae_sites)}")
        unet_sites, vae_sites = [x for x in unet_sites if x in sites], [x for x in vae_sites if x in sites]
    window = cc.input_window if control is None else 0
    if sites is not None and INPUT_SITE not in sites:
        window = 0
    sites = unet_sites + vae_sites
    site_steps = {v: [0] for v in sites if v in STEP_INDEPENDENT}
    if store_steps is not None:
        keep = sorted({int(t) for t in store_steps})
        if not keep or keep[0] < 0 or keep[-1] >= cc.steps:
            raise fail(f"store_steps {list(store_steps)} must be steps of 0…{cc.steps - 1}")
        site_steps.update({v: keep for v in sites if v not in site_steps})
    stop_after = max(max(v) for v in site_steps.values()) if stop_early and site_steps and protocol == "generate" \
        else None
    readout = control is None if readout is None else bool(readout)
    test_rows = [k for k in range(n) if split[k] == 2] if readout else []

    def x0_for(start: int, stop: int) -> tuple[list[int], X0Sink | None]:
        """Batch-relative read-out rows of [start, stop) and the sink that saves their x̂₀ images."""
        rows = [k - start for k in test_rows if start <= k < stop]
        return rows, (_x0_saver(root, [ids[start + r] for r in rows]) if rows else None)

    def shape_pass() -> None:
        z = torch.zeros(1, c, s, s, device=device)
        unet(z, sched.timesteps[0]).sample
        vae.decode(z)
        if "vae.enc.mid.attn0" in sites:
            vae.encode(torch.zeros(1, 3, vae.config.sample_size, vae.config.sample_size, device=device))
    shapes = site_shapes({"unet": unet, "vae": vae}, sites, cc.site_kind, shape_pass, cc.pool, latent_hw=(s, s),
                         image_hw=(vae.config.sample_size,) * 2)
    if window:                                  # not a module: its shape is the latent's, c·k² channels
        sites.append(INPUT_SITE)
        shapes[INPUT_SITE] = (c * window * window, s // cc.pool, s // cc.pool)
        if store_steps is not None:
            site_steps[INPUT_SITE] = keep

    identity = {"version": CAPTURE_VERSION, "protocol": protocol, "model": model, "n": n, "steps": cc.steps,
                "site_kind": cc.site_kind, "vae_input": cc.vae_input, "dtype": cc.dtype, "pool": cc.pool,
                "seed": cc.seed, "control_seed": cc.control_seed if control else None, "sites": sites,
                "model_hash": unet_hash, "vae_hash": vae_hash, "scheduler": _jsonable(ldm.scheduler_config),
                "names": names, "vae_dec_input": VAE_DEC_INPUT[protocol][cc.vae_input], "readout": readout,
                "site_steps": site_steps, "stop_after": stop_after, "input_window": window}
    spec = StoreSpec(root, shapes, n, cc.steps, cc.batch_size, cc.dtype, cc.pool, fingerprint(identity), site_steps)
    image_dir = (proot if control is None else root) / "images"
    made: dict[int, np.ndarray] = {}           # final images written by this process, for samples.safetensors

    def run_generate(start: int, stop: int, emit: Emit) -> None:
        b_ids = ids[start:stop]
        z = initial_noise(b_ids, cc.seed, (c, s, s)).to(device)  # (b, c, s, s)
        rows, sink = x0_for(start, stop)
        images = sample_and_record(lambda x, t: unet(x, t).sample, unet, vae, sched, z, b_ids, cc.seed, cc.steps,
                                   unet_sites, vae_sites, cc.site_kind, cc.vae_input, emit, x0_rows=rows, x0_sink=sink,
                                   stop_after=stop_after, input_window=window)
        if images is not None:
            save_images(image_dir, b_ids, images)
            made.update(zip(b_ids, images))

    def run_noised(start: int, stop: int, emit: Emit) -> None:
        rows, sink = x0_for(start, stop)
        _noised_batch(unet, vae, sched, test.rgb[start:stop], ids[start:stop], cc.seed, unet_sites, vae_sites,
                      cc.site_kind, cc.vae_input, emit, device, x0_rows=rows, x0_sink=sink, input_window=window)

    ran = fill_store(spec, run_generate if protocol == "generate" else run_noised, force, progress,
                     desc=f"capture {protocol}/{model}")
    if not ran:
        return root
    if _state().is_main_process:
        if protocol == "generate":
            if stop_after is None:  # a pass stopped early made no final images
                collect_samples(image_dir, image_dir.parent / "samples.safetensors", ids, split, made)
        else:
            sal = test.saliency.astype(np.uint8)
            save_labels(proot, test.depth.astype(np.float32), sal, split)
    manifest = {
        "protocol": protocol, "model": model, "control": control,
        "sites": {name: {"shape": list(shapes[name]), "steps": spec.steps_of(name),
                         "step_independent": name in STEP_INDEPENDENT} for name in sites},
        "site_order": sites, "steps": list(range(cc.steps)), "timesteps": timesteps, "n": n, "sample_ids": ids,
        "seeds": seeds, "seed": cc.seed, "noise_stream": 0 if protocol == "generate" else NOISE_STREAM,
        "control_seed": cc.control_seed if control else None, "dtype": cc.dtype, "pool": cc.pool,
        "site_kind": cc.site_kind, "vae_input": cc.vae_input, "sampler": "ddim", "eta": 0.0,
        "model_hash": unet_hash, "vae_hash": vae_hash, "base_model_hash": base_hash,
        "scaling_factor": sf, "split": split.tolist(), "names": names, "fingerprint": spec.fingerprint,
        "config": to_dict(cc), "step_independent_sites": [v for v in sites if v in STEP_INDEPENDENT],
        "vae_dec_input": VAE_DEC_INPUT[protocol][cc.vae_input] if any(v.startswith("vae.dec") for v in sites) else None,
        "readout": {"rows": test_rows, "sample_ids": [ids[k] for k in test_rows],
                    "images": "x0/step_XX/<sample id:06d>.png", "what": "decoded pred_original_sample of "
                    "scheduler.step at each step (uint8 RGB)"} if readout else None,
        "model_root": str(ldm.root) if ldm.root else None, "stop_after": stop_after,
        "input_window": window, "input_site": {"what": "the U-Net's input x_t at each step (after "
                                               "scale_model_input), each position with its k×k neighbourhood as "
                                               "channels c·k² + dy·k + dx, zero-padded", "k": window} if window else None,
    }
    finish_store(root, manifest)
    return root


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


# Names other modules import from here (the capture's pieces live in the modules above).
__all__ = ["CAPTURE_VERSION", "CONTROLS", "DTYPES", "INPUT_SITE", "NOISE_STREAM", "PROTOCOLS", "SPLIT_FRACTIONS",
           "STEP_INDEPENDENT", "VAE_DEC_INPUT", "VAE_INPUTS", "Emit", "StoreSpec", "X0Sink", "check_capture_options",
           "collect_samples", "control_unet", "decode_readout", "decode_to_mid", "derived_shapes", "fill_store",
           "finish_store", "input_rows", "probe_split", "run_capture", "sample_and_record", "save_images",
           "site_shapes", "traced_shapes", "x0_image_path"]
