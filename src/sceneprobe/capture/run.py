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

Scale and resume
----------------
Under ``accelerate launch`` the batches are dealt out to the processes (``PartialState``): rank 0 creates the shards,
every rank writes its own rows, rank 0 writes the manifest last. Each rank lists its finished batches (row ranges) in
``progress/rank<r>.json``; a rerun with the same options skips them (after checking every shard with
``CaptureStore.check_shard``). A finished store whose fingerprint matches is skipped; a store made with other options
is an error unless ``force=True``, which redoes it.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..atomic import atomic_write_json
from ..config import Config, fingerprint, to_dict
from ..errors import fail
from ..models.build import sampling_scheduler
from ..models.io import HASH_CACHE, LDM, model_hash
from ..models.sites import list_sites
from ..sample import decode, denoise, generators, initial_noise, sample_seed, to_latent, to_uint8
from .recorder import KINDS, Recorder
from .store import CaptureStore, create_shard, finish_manifest, save_labels, shard_path, write_rows

CAPTURE_VERSION = 3  # 2: decoder fed this U-Net's update in noised; encoder stored once; x̂₀ read-out; 3: input site
PROTOCOLS = ("generate", "noised")
CONTROLS = ("permuted", "fresh")
DTYPES = ("float16", "float32")
VAE_INPUTS = ("latent", "x0")
SPLIT_FRACTIONS = (0.60, 0.15, 0.25)
NOISE_STREAM = 2  # sample.generators stream of the noised protocol's fixed ε (0: x_T, 1: DDPM/η steps)

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
# The input control: the U-Net's input x_t at each step, every position with its k×k neighbourhood as channels
# (channel c·k² + dy·k + dx, zero-padded at the border), so a linear probe on it sees what a small local filter of the
# input could read. Stored for the trained model only (the controls' inputs add nothing to compare against).
INPUT_SITE = "input.xt"

Emit = Callable[[str, int, torch.Tensor], None]  # (site, step, rows (b, C, h, w))
X0Sink = Callable[[int, torch.Tensor], None]     # (step, decoded x̂₀ of the read-out rows (k, 3, H, W) in [−1, 1])


# ---------------------------------------------------------------------------------------------------------- splits
def probe_split(sample_ids: Sequence[int]) -> np.ndarray:
    """Split codes (N,) int8 (0 train, 1 val, 2 test): 60 / 15 / 25 %, exact counts, fixed by the ids.

    The ids are ordered by a hash of each id (so the split is unrelated to id order) and cut at 60 % and 75 %.
    """
    keys = np.array([int.from_bytes(hashlib.sha256(f"split:{int(i)}".encode()).digest()[:8], "little")
                     for i in sample_ids], dtype=np.uint64)
    order = np.argsort(keys, kind="stable")
    n = len(keys)
    n_train, n_val = round(SPLIT_FRACTIONS[0] * n), round(SPLIT_FRACTIONS[1] * n)
    split = np.full(n, 2, np.int8)
    split[order[:n_train]] = 0
    split[order[n_train:n_train + n_val]] = 1
    return split


# ---------------------------------------------------------------------------------------------------- store engine
@dataclass
class StoreSpec:
    """What one store holds: stored (C, h, w) per site (after pooling), N rows, steps, dtype, identity."""
    root: Path
    shapes: dict[str, tuple[int, int, int]]
    n: int
    n_steps: int
    batch_size: int
    dtype: str
    pool: int
    fingerprint: str
    site_steps: dict[str, list[int]] | None = None   # steps stored per site (default: all); step-independent: [0]

    def steps_of(self, site: str) -> list[int]:
        return list((self.site_steps or {}).get(site, range(self.n_steps)))

    def pairs(self) -> list[tuple[str, int]]:
        """Every (site, step) shard of the store."""
        return [(s, t) for s in self.shapes for t in self.steps_of(s)]


class _PendingStore(CaptureStore):
    """A store being written: the same shard checks as a finished one, against the planned manifest."""

    def __init__(self, spec: StoreSpec):
        self.root = Path(spec.root)
        self.manifest = {"sites": {s: {"shape": list(sh), "steps": spec.steps_of(s)} for s, sh in spec.shapes.items()},
                         "steps": list(range(spec.n_steps)), "timesteps": [], "n": spec.n, "dtype": spec.dtype}
        self.sites, self.steps, self.timesteps, self.n = list(spec.shapes), list(range(spec.n_steps)), [], spec.n


def _state():
    from ..processes import process_state
    return process_state()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise fail(f"{path} is unreadable or not valid JSON; rerun the capture with --force") from None


def fill_store(spec: StoreSpec, run_batch: Callable[[int, int, Emit], None], force: bool = False,
               progress: bool = True, desc: str = "capture") -> bool:
    """Create the shards and fill them batch by batch; returns False if a finished, matching store was skipped.

    ``run_batch(start, stop, emit)`` computes rows [start, stop) and calls ``emit(site, step, rows)`` exactly once per
    stored (site, step) (``spec.pairs()``). Every process of an ``accelerate launch`` calls this; rank 0 creates and removes files.
    """
    state = _state()
    root, main = Path(spec.root), state.is_main_process
    mpath = root / "manifest.json"
    if mpath.is_file() and not force:
        have = _read_json(mpath).get("fingerprint")
        if have != spec.fingerprint:
            raise fail(f"capture store {root} was made with other options or another model (fingerprint {have} ≠ "
                       f"{spec.fingerprint}); pass --force to redo it, or capture into another run folder")
        CaptureStore(root).verify()
        return False
    state.wait_for_everyone()
    if force and main and root.exists():
        shutil.rmtree(root)
    state.wait_for_everyone()

    # Resume: union of every rank's finished row ranges (the world size may have changed since).
    done = np.zeros(spec.n, bool)
    own: list[list[int]] = []
    for f in sorted((root / "progress").glob("rank*.json")):
        p = _read_json(f)
        if p.get("fingerprint") != spec.fingerprint:
            raise fail(f"unfinished capture store {root} was started with other options or another model; "
                       f"pass --force to start it again")
        for a, b in p["done"]:
            done[a:b] = True
        if f.name == f"rank{state.process_index}.json":
            own = [list(r) for r in p["done"]]
    missing = [(s, t) for s, t in spec.pairs() if not shard_path(root, s, t).is_file()]
    if done.any():
        pending = _PendingStore(spec)
        for site, step in spec.pairs():
            if (site, step) not in missing:
                pending.check_shard(site, step)  # names a truncated or mismatched shard
        if missing:  # a lost shard lost its rows: every batch is redone
            done[:], own = False, []
    state.wait_for_everyone()
    if main:
        if not done.any():
            shutil.rmtree(root / "progress", ignore_errors=True)
            missing = spec.pairs()
        for site, step in missing:
            create_shard(shard_path(root, site, step), (spec.n, *spec.shapes[site]), spec.dtype)
    state.wait_for_everyone()

    starts = range(0, spec.n, spec.batch_size)
    todo = [s for s in starts if not done[s:s + spec.batch_size].all()]
    mine = todo[state.process_index::state.num_processes]
    ppath = root / "progress" / f"rank{state.process_index}.json"
    tdtype = getattr(torch, spec.dtype)
    stored = set(spec.pairs())
    for start in tqdm(mine, desc=desc, unit="batch", disable=not progress or not main, dynamic_ncols=True):
        stop = min(spec.n, start + spec.batch_size)
        seen: set[tuple[str, int]] = set()

        def emit(site: str, step: int, rows: torch.Tensor, start: int = start, seen: set = seen) -> None:
            if (site, step) not in stored:  # a step this store does not keep (``store_steps``)
                return
            if spec.pool > 1:
                rows = F.avg_pool2d(rows.float(), spec.pool)  # (b, C, h/p, w/p)
            write_rows(shard_path(root, site, step), start, rows.to(tdtype).cpu())
            seen.add((site, step))

        run_batch(start, stop, emit)
        if seen != set(spec.pairs()):
            raise RuntimeError(f"batch {start}: {len(seen)} of {len(spec.pairs())} shards written")
        own.append([start, stop])
        atomic_write_json(ppath, {"fingerprint": spec.fingerprint, "batch_size": spec.batch_size, "done": own})
    state.wait_for_everyone()
    return True


def finish_store(root: Path, manifest: dict) -> None:
    """Rank 0: write the manifest last and drop the progress files; then every process waits."""
    state = _state()
    if state.is_main_process:
        finish_manifest(root, manifest)
        shutil.rmtree(Path(root) / "progress", ignore_errors=True)
    state.wait_for_everyone()


# ------------------------------------------------------------------------------------------------- model plumbing
_DERIVABLE = {"unet": ("UNet2DModel", "UNet2DConditionModel"), "vae": ("AutoencoderKL",)}


def derived_shapes(models: dict, sites: Sequence[str], latent_hw: tuple[int, int],
                   image_hw: tuple[int, int] | None = None) -> dict[str, tuple[int, int, int]] | None:
    """Native (C, H, W) per site from the modules' structure, without running them; None where it cannot be sure.

    C is the width of the site's output projection (``to_out[0].out_features``: the reading of both kinds, since the
    residual add needs the same width). H×W is the latent's ``latent_hw`` halved once per resampler on the way:
    U-Net ``down{b}``: after the downsamplers of down blocks 0…b−1; ``mid``: after all of them; ``up{b}``: the mid
    grid doubled once per upsampler of up blocks 0…b−1. VAE decoder mid: the latent grid; encoder mid:
    ``image_hw`` halved once per encoder downsampler. Every convolution in between keeps the grid (3×3, padding 1).
    Only canonical sites of ``UNet2DModel`` / ``UNet2DConditionModel`` / ``AutoencoderKL`` with every halving exact
    are derived; anything else (raw paths, other classes, odd grids) returns None and the caller traces the shapes.
    """
    from ..models.sites import _UNET, _VAE, resolve, site_channels, site_path

    def n_res(blocks, attr: str, upto: int) -> int:
        return sum(1 for blk in list(blocks)[:upto] if getattr(blk, attr, None))

    def halve(hw: tuple[int, int], k: int) -> tuple[int, int] | None:
        if hw[0] % 2 ** k or hw[1] % 2 ** k:
            return None                         # Downsample2D rounds odd grids up, the up path then pads: trace it
        return hw[0] // 2 ** k, hw[1] // 2 ** k

    out: dict[str, tuple[int, int, int]] = {}
    for site in sites:
        key = site_path(site)[0]
        model = models.get(key)
        if model is None or type(model).__name__ not in _DERIVABLE.get(key, ()):
            return None
        mu, mv = _UNET.match(site), _VAE.match(site)
        if mu:
            downs = n_res(model.down_blocks, "downsamplers", len(model.down_blocks))
            if mu.group(1) == "down":
                hw = halve(latent_hw, n_res(model.down_blocks, "downsamplers", int(mu.group(2))))
            elif mu.group(1) == "up":
                ups = n_res(model.up_blocks, "upsamplers", int(mu.group(2)))
                hw = halve(latent_hw, downs)
                hw = hw and (hw[0] * 2 ** ups, hw[1] * 2 ** ups)
            else:
                hw = halve(latent_hw, downs)
        elif mv and mv.group(1) == "dec":
            hw = tuple(latent_hw)
        elif mv and image_hw is not None:
            hw = halve(image_hw, n_res(model.encoder.down_blocks, "downsamplers", len(model.encoder.down_blocks)))
        else:
            return None
        if hw is None:
            return None
        out[site] = (site_channels(resolve(model, key, site)), int(hw[0]), int(hw[1]))
    return out


def traced_shapes(models: dict, sites: Sequence[str], kind: str, run_once: Callable[[], None]) -> dict:
    """Native (C, H, W) per site from one tiny forward pass (``run_once``) with shape-only hooks."""
    native: dict[str, tuple[int, ...]] = {}

    def note(site: str, y: torch.Tensor) -> None:
        native.setdefault(site, tuple(y.shape[1:]))  # (C, H, W)

    with torch.no_grad(), Recorder(models, sites, kind, on_output=note):
        run_once()
    lost = [s for s in sites if s not in native]
    if lost:
        raise RuntimeError(f"sites {lost} were not called by the shape pass")
    return native


def site_shapes(models: dict, sites: Sequence[str], kind: str, run_once: Callable[[], None], pool: int,
                latent_hw: tuple[int, int] | None = None, image_hw: tuple[int, int] | None = None) -> dict:
    """Stored (C, h, w) per site (native grid // ``pool``): derived from the modules when ``latent_hw`` is given and
    :func:`derived_shapes` is sure (no forward pass), else traced by one tiny forward pass (``run_once``)."""
    native = derived_shapes(models, sites, latent_hw, image_hw) if latent_hw is not None else None
    if native is None:
        native = traced_shapes(models, sites, kind, run_once)
    out = {}
    for s in sites:
        c, h, w = native[s]
        if h // pool < 1 or w // pool < 1:
            raise fail(f"capture.pool {pool} is larger than site {s}'s {h}x{w} grid; lower capture.pool")
        out[s] = (c, h // pool, w // pool)
    return out


@torch.no_grad()
def input_rows(x: torch.Tensor, window: int) -> torch.Tensor:
    """The input control's rows: x (b, c, h, w) → (b, c·k², h, w), each position with its k×k neighbourhood."""
    b, c, h, w = x.shape
    return F.unfold(x.float(), window, padding=window // 2).reshape(b, c * window * window, h, w)


@torch.no_grad()  # without it autograd kept every activation of the pass for a backward that never comes (+30 %)
def sample_and_record(unet_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], unet, vae, scheduler,
                      z: torch.Tensor, sample_ids: Sequence[int], seed: int, steps: int, unet_sites: Sequence[str],
                      vae_sites: Sequence[str], kind: str, vae_input: str, emit: Emit,
                      keep_half: str | None = None, x0_rows: Sequence[int] = (),
                      x0_sink: X0Sink | None = None, stop_after: int | None = None,
                      input_window: int = 0) -> np.ndarray | None:
    """One sampling pass from x_T = ``z`` (B, c, h, w) recording every site at every step; returns uint8 images.

    ``unet_fn`` calls ``unet`` exactly once per step (twice the batch with CFG: ``keep_half="cond"``). The VAE sites
    at step i read ``scheduler.step``'s ``prev_sample`` (``vae_input="latent"``) or ``pred_original_sample``
    (``"x0"``). ``x0_sink(step, images)`` (optional) receives the decoded x̂₀ of the batch rows ``x0_rows``.
    ``stop_after``: stop sampling after that step (its sites recorded) and return None — no final images.
    ``input_window`` k > 0 also records :data:`INPUT_SITE`, the U-Net's input with its k×k neighbourhood.
    """
    cur = {"step": 0, "mute": False}
    final: dict[str, torch.Tensor] = {}
    rows = list(x0_rows)
    if input_window:
        inner = unet_fn

        def unet_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            emit(INPUT_SITE, cur["step"], input_rows(x, input_window))
            return inner(x, t)

    def on_out(site: str, y: torch.Tensor) -> None:
        if not cur["mute"]:
            emit(site, cur["step"], y)

    only_mid = all(v.startswith("vae.dec.mid.") for v in vae_sites)

    def callback(i: int, t: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        img = None
        if vae_sites:  # the per-step decode is the dominant extra cost of capture: only when a VAE site is asked for
            src = x if vae_input == "latent" else x0
            # A whole image is needed only as the final image (the last step's latent) or as the read-out rows' x̂₀
            # in the same batch decode (x0 input); otherwise the decoder stops after its mid block (the site).
            whole = (i == steps - 1 and vae_input == "latent") or (vae_input == "x0" and x0_sink is not None
                                                                    and bool(rows)) or not only_mid
            if whole:
                img = decode(vae, src)  # (B, 3, H, W): records the VAE sites at step i
            else:
                decode_to_mid(vae, src)  # records the VAE sites at step i, no image
            if i == steps - 1 and vae_input == "latent":
                final["img"] = img  # the last step's latent is the final latent: reuse its decode
        if x0_sink is not None and rows:
            if img is not None and vae_input == "x0":
                x0_sink(i, img[rows])
            else:
                cur["mute"] = True  # the read-out decode is not a capture of the VAE site
                try:
                    x0_sink(i, decode_readout(vae, x0[rows]))  # (k, 3, H, W)
                finally:
                    cur["mute"] = False
        cur["step"] = i + 1  # the next U-Net call is step i + 1
        if stop_after is not None and i >= stop_after:
            raise _Stop

    try:
        with Recorder({"unet": unet}, unet_sites, kind, on_out, keep_half=keep_half), \
                Recorder({"vae": vae}, vae_sites, kind, on_out):
            x = denoise(unet_fn, scheduler, z, sample_ids, seed, steps, 0.0, callback)
    except _Stop:
        return None
    img = final.get("img")
    if img is None:
        img = decode(vae, x)
    return to_uint8(img)


class _Stop(Exception):
    """Raised by the sampling callback to end a pass early (``stop_after``)."""


class _MidDone(Exception):
    """Raised by :func:`decode_to_mid`'s hook once the decoder's mid block has run."""


def decode_to_mid(vae, latents: torch.Tensor, decode_fn: Callable | None = None) -> None:
    """Run ``decode_fn(vae, latents)`` (B, c, h, w) (default :func:`sceneprobe.sample.decode`) only as far as the
    decoder's mid block; no image is made.

    The mid block's self-attention (``vae.dec.mid.attn*``) sees exactly what it sees in a full decode — the same
    operations on the same batch, so its hooks record the same bytes — and the up blocks, which hold most of the
    decoder's FLOPs (they run at up to the image's resolution), are skipped: the cost of the VAE site falls from one
    decode per step to post_quant_conv + conv_in + mid block at the latent's grid.
    """
    def stop(module, args, output):
        raise _MidDone
    handle = vae.decoder.mid_block.register_forward_hook(stop)  # after the sites' hooks, which fire inside it
    try:
        (decode_fn or decode)(vae, latents)
    except _MidDone:
        return
    finally:
        handle.remove()
    raise RuntimeError("the VAE decoder never ran its mid block")


def decode_readout(vae, latents: torch.Tensor) -> torch.Tensor:
    """The image read-out's decode of x̂₀ rows (k, c, h, w) → (k, 3, H, W): :func:`sceneprobe.sample.decode`, under
    its own name so that a profile (benchmarks/bench_capture.py) can tell it from the sites' and the final decodes."""
    return decode(vae, latents)


def save_images(folder: Path, sample_ids: Sequence[int], images: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in zip(sample_ids, images):
        Image.fromarray(im).save(folder / f"{int(i):06d}.png")


def x0_image_path(store_root: Path, step: int, sample_id: int) -> Path:
    """Where the capture writes the decoded x̂₀ of a read-out row at ``step`` (PNG, uint8 RGB)."""
    return Path(store_root) / "x0" / f"step_{step:02d}" / f"{int(sample_id):06d}.png"


def _x0_saver(store_root: Path, sample_ids: Sequence[int]) -> X0Sink:
    """An :data:`X0Sink` that saves each step's decoded x̂₀ of ``sample_ids`` as PNGs under ``store_root/x0``."""
    def sink(step: int, images: torch.Tensor) -> None:
        save_images(Path(store_root) / "x0" / f"step_{step:02d}", sample_ids, to_uint8(images))
    return sink


def collect_samples(image_dir: Path, out: Path, sample_ids: Sequence[int], split: np.ndarray,
                    made: dict[int, np.ndarray] | None = None) -> Path:
    """``samples.safetensors`` (images (N, H, W, 3) uint8, sample_ids int64, split int8) from the batch PNGs.

    ``made`` (optional): images this process has just written as PNGs, by sample id; they are taken from memory
    instead of being read back (PNG is lossless: the same pixels). Ids not in it (another rank's rows, a resumed
    run's earlier batches) are read from their PNGs."""
    from safetensors.numpy import save_file
    made = made or {}
    images = np.stack([made[int(i)] if int(i) in made else
                       np.asarray(Image.open(image_dir / f"{int(i):06d}.png").convert("RGB")) for i in sample_ids])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({"images": images, "sample_ids": np.asarray(sample_ids, np.int64), "split": np.asarray(split, np.int8)},
              str(tmp))
    tmp.replace(out)
    return out


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def check_capture_options(site_kind: str, vae_input: str, dtype: str, pool: int, batch_size: int, steps: int) -> None:
    if site_kind not in KINDS:
        raise fail(f"capture.site_kind {site_kind!r} is unknown; choose attn or block")
    if vae_input not in VAE_INPUTS:
        raise fail(f"capture.vae_input {vae_input!r} is unknown; choose latent or x0")
    if dtype not in DTYPES:
        raise fail(f"capture.dtype {dtype!r} is not supported; choose float16 or float32")
    if pool < 1 or batch_size < 1 or steps < 1:
        raise fail(f"capture.pool, capture.batch_size and capture.steps must be at least 1 "
                   f"(got {pool}, {batch_size}, {steps})")


def control_unet(unet, control: str | None, seed: int):
    """The U-Net a store is made with: the model itself, or a permuted / fresh control (models/controls.py)."""
    from ..models.controls import fresh_copy, permuted_copy
    if control is None:
        return unet
    if control not in CONTROLS:
        raise fail(f"unknown control {control!r}; choose permuted or fresh")
    return permuted_copy(unet, seed) if control == "permuted" else fresh_copy(unet, seed)


# ------------------------------------------------------------------------------------------------------ protocols
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


def _test_scenes(data, n_noised: int, image_size: int):
    """The first ``n_noised`` scenes of the dataset's test split, checked for labels and size."""
    if data is None:
        raise fail("protocol noised needs a dataset with depth and saliency: pass --data (from `sceneprobe scenes`)")
    test = data.subset("test")
    if test.rgb.shape[0] == 0:
        raise fail(f"dataset {getattr(data, 'root', '')} has no test split; the noised protocol captures test scenes")
    if test.depth is None or test.saliency is None:
        raise fail(f"dataset {getattr(data, 'root', '')} has no depth or saliency labels; "
                   f"the noised protocol needs both")
    if test.rgb.shape[1] != image_size or test.rgb.shape[2] != image_size:
        raise fail(f"dataset {getattr(data, 'root', '')} has {test.rgb.shape[1]}x{test.rgb.shape[2]} images but "
                   f"the VAE expects {image_size}x{image_size}; render scenes at that size")
    n = min(n_noised, test.rgb.shape[0])
    return _Rows(test.names[:n], test.rgb[:n], test.depth[:n], test.saliency[:n])


@dataclass
class _Rows:
    names: Sequence[str]
    rgb: np.ndarray        # (N, H, W, 3) uint8
    depth: np.ndarray      # (N, H, W) float32
    saliency: np.ndarray   # (N, H, W) bool


@torch.no_grad()
def _noised_batch(unet, vae, sched, rgb: np.ndarray, ids: Sequence[int], seed: int, unet_sites, vae_sites,
                  kind: str, vae_input: str, emit: Emit, device, x0_rows: Sequence[int] = (),
                  x0_sink: X0Sink | None = None, input_window: int = 0) -> None:
    """Encode, then x_t = add_noise(z0, ε, t) at every timestep with one fixed ε per sample; record every site.

    The decoder reads ``scheduler.step(unet(x_t), t, x_t)``'s ``prev_sample`` (``vae_input="latent"``) or
    ``pred_original_sample`` (``"x0"``): the update computed with *this* U-Net's prediction. The encoder site is
    emitted once, as step 0.
    """
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(device)
    enc = [v for v in vae_sites if v.startswith("vae.enc")]
    dec = [v for v in vae_sites if not v.startswith("vae.enc")]
    with Recorder({"vae": vae}, enc, kind, on_output=lambda site, y: emit(site, 0, y)):
        z0 = to_latent(vae, vae.encode(x).latent_dist.mode())  # (b, c, h, w) in the diffusion space
    eps = torch.stack([torch.randn(z0.shape[1:], generator=g) for g in generators(ids, seed, NOISE_STREAM)]).to(device)
    cur = {"step": 0, "mute": False}
    rows = list(x0_rows)

    def on_dec(site: str, y: torch.Tensor) -> None:
        if not cur["mute"]:
            emit(site, cur["step"], y)

    with Recorder({"unet": unet}, unet_sites, kind, lambda s, y: emit(s, cur["step"], y)), \
            Recorder({"vae": vae}, dec, kind, on_dec):
        for i, t in enumerate(sched.timesteps):
            cur["step"] = i
            xt = sched.add_noise(z0, eps, t.reshape(1).expand(len(ids)).to(device))  # (b, c, h, w)
            x_in = sched.scale_model_input(xt, t)
            if input_window:
                emit(INPUT_SITE, i, input_rows(x_in, input_window))
            pred = unet(x_in, t).sample                                            # ε̂ or v̂: the scheduler knows
            if not dec and not (x0_sink is not None and rows):
                continue
            out = sched.step(pred, t, xt)                                           # stateless for DDIM (η = 0)
            src = out.prev_sample if vae_input == "latent" else out.pred_original_sample
            img = None
            if dec and vae_input == "x0" and x0_sink is not None and rows:          # the read-out reuses this decode
                img = decode(vae, src)
            elif dec:
                decode_to_mid(vae, src)                                             # the site only: no image needed
            if x0_sink is not None and rows:
                if img is not None:
                    x0_sink(i, img[rows])
                else:
                    cur["mute"] = True
                    try:
                        x0_sink(i, decode_readout(vae, out.pred_original_sample[rows]))
                    finally:
                        cur["mute"] = False
