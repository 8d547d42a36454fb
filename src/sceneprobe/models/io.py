"""Models on disk: diffusers ``save_pretrained`` folders (config.json + safetensors), never pickles.

A run (or the shipped default) is a folder with ``vae/``, ``unet/`` and ``scheduler/``, each loadable by plain
diffusers with ``local_files_only=True``. The VAE's latent normalisation lives in ``vae/config.json``: per-channel
``latents_mean``/``latents_std`` for our VAEs, the scalar ``scaling_factor`` (Stable Diffusion's 0.18215) otherwise.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel
from safetensors import safe_open

from ..errors import fail


@dataclass
class LDM:
    """A latent diffusion model: VAE, U-Net and the training noise schedule (a DDPM scheduler config)."""
    vae: AutoencoderKL
    unet: UNet2DModel
    scheduler_config: dict
    root: Path | None = None

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)


def save_model(model: torch.nn.Module, folder: Path, fp16: bool = False) -> Path:
    """``save_pretrained`` into a temporary sibling, then rename: a folder is whole or absent."""
    folder = Path(folder)
    if folder.is_symlink():                                            # never replace a link (nor its target)
        raise fail(f"{folder} is a symbolic link (to {os.readlink(folder)}); sceneprobe never replaces a link: "
                   f"remove the link or write the model to another folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        to_save = model
        if fp16:
            import copy
            to_save = copy.deepcopy(model).half()
        to_save.save_pretrained(tmp, safe_serialization=True)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders; models are for people and other tools to read
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _check_folder(folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise fail(f"{what} folder {folder} does not exist; train it first or point to a diffusers model folder")
    if not (folder / "config.json").is_file():
        raise fail(f"{what} folder {folder} has no config.json; it is not a diffusers model folder")
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise fail(f"{what} folder {folder} has no diffusion_pytorch_model.safetensors")
    try:
        with safe_open(str(weights), framework="pt") as f:
            for k in f.keys():
                f.get_slice(k)
        size = weights.stat().st_size
        with open(weights, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if size < 8 + n + end:
            raise ValueError("file shorter than its header says")
    except Exception as e:  # safetensors raises several types for a damaged file
        raise fail(f"weights file {weights} is truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                   f"re-save or re-train the model") from None


def read_json_file(path: Path, what: str, advice: str) -> dict:
    """The guarded reader of a model folder's JSON files: one error naming the file, never a traceback."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise fail(f"{what} {path} is not valid JSON ({type(e).__name__}); {advice}") from None
    if not isinstance(data, dict):
        raise fail(f"{what} {path} must hold a JSON object; {advice}")
    return data


def _load(cls, folder: Path, what: str):
    folder = Path(folder)
    _check_folder(folder, what)
    config = read_json_file(folder / "config.json", f"{what} config", "re-save or re-train the model")
    made = config.get("_class_name")
    if made and made != cls.__name__:  # another model's folder: say so (from_pretrained lists every weight name)
        raise fail(f"{what} folder {folder} holds a {made} model, not a {cls.__name__}; point to the {what} folder")
    try:
        model = cls.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        first = first if len(first) <= 160 else first[:160] + " …"
        raise fail(f"{what} folder {folder} could not be loaded ({type(e).__name__}: {first}); it does not fit its "
                   f"config.json: re-save or re-train the model") from None
    model = model.float().eval()
    stamp_source(model, folder)
    return model


def load_vae(folder: Path) -> AutoencoderKL:
    return _load(AutoencoderKL, folder, "VAE")


def load_unet(folder: Path) -> UNet2DModel:
    return _load(UNet2DModel, folder, "U-Net")


def load_scheduler_config(folder: Path) -> dict:
    folder = Path(folder)
    if not (folder / "scheduler_config.json").is_file():
        raise fail(f"scheduler folder {folder} has no scheduler_config.json")
    read_json_file(folder / "scheduler_config.json", "scheduler config", "re-save the model folder (train-ldm or export)")
    try:
        return dict(DDPMScheduler.load_config(folder, local_files_only=True))
    except (OSError, ValueError, TypeError) as e:
        raise fail(f"scheduler config {folder / 'scheduler_config.json'} could not be read ({type(e).__name__}); "
                   f"re-save the model folder (train-ldm or export)") from None


def check_compatible(vae: AutoencoderKL, unet: UNet2DModel, where: Path | str) -> None:
    """The U-Net must read and write the VAE's latents: channels and spatial size must agree."""
    c = vae.config.latent_channels
    size = vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)
    if unet.config.in_channels != c or unet.config.out_channels != c:
        raise fail(f"model folder {where}: U-Net in/out channels ({unet.config.in_channels}/{unet.config.out_channels}) "
                   f"differ from the VAE's latent channels ({c}); train the U-Net on this VAE's latents")
    if unet.config.sample_size != size:
        raise fail(f"model folder {where}: U-Net sample_size {unet.config.sample_size} differs from the VAE's latent size "
                   f"{size}; train the U-Net on this VAE's latents")


def load_ldm(root: Path) -> LDM:
    """Load ``root/{vae,unet,scheduler}`` and check that they fit together."""
    root = Path(root)
    if not root.is_dir():
        raise fail(f"model folder {root} does not exist")
    vae, unet = load_vae(root / "vae"), load_unet(root / "unet")
    check_compatible(vae, unet, root)
    return LDM(vae=vae, unet=unet, scheduler_config=load_scheduler_config(root / "scheduler"), root=root)


def shipped_root(preset: str = "cpu") -> Path:
    """The pretrained default inside the package (``sceneprobe/pretrained/<preset>``)."""
    return Path(str(resources.files("sceneprobe").joinpath("pretrained", preset)))


HASH_VERSION = 1   # the definition of model_hash; a cached value made under another one is never reused
HASH_CACHE = ".model_hashes.json"   # the file name of a run's persistent cache (see model_hash)


def _state(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The parameters and buffers themselves (not detached copies: their identity and version counter are stable),
    in name order."""
    return sorted(model.state_dict(keep_vars=True).items())


def _snapshot(model: torch.nn.Module) -> tuple:
    """What the weights' values could have changed by, cheaply: each state tensor's name, object, version counter
    (bumped by every in-place write through the tensor: ``copy_``, optimiser steps, ``load_state_dict``), dtype and
    shape. A device move keeps it (the values are the same); a dtype change, a copy or a replaced tensor does not."""
    return tuple((n, id(t), t._version, str(t.dtype), tuple(t.shape)) for n, t in _state(model))


def _digest(model: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex) over (name, float32 values) of every parameter and buffer in name order, on any device."""
    h = hashlib.sha256()
    for name, t in _state(model):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy())  # buffer protocol: no bytes copy
    return h.hexdigest()[:16]


def stamp_source(model: torch.nn.Module, folder: Path) -> None:
    """Note, right after ``model`` was loaded from ``folder``, the stat identity of the folder's files (path, device,
    inode, size, mtime and ctime in ns of every file: a rewritten or replaced weight file changes it) together with
    the model's :func:`_snapshot`, so that :func:`model_hash` can reuse a cached hash while both still hold."""
    import diffusers
    entries = []
    for p in sorted(Path(folder).iterdir()):
        if p.is_file():
            st = p.stat()
            entries.append([str(p.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    key = json.dumps([HASH_VERSION, type(model).__name__, diffusers.__version__, torch.__version__, entries])
    model._sceneprobe_source = (hashlib.sha256(key.encode()).hexdigest(), _snapshot(model))


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}                                   # absent or damaged: a cache is only ever a shortcut
    return data if isinstance(data, dict) else {}


def model_hash(model: torch.nn.Module, cache: Path | None = None) -> str:
    """SHA-256 (first 16 hex) over the model's parameters and buffers (name, float32 values), in name order.

    Paid once: the value is kept on the module while its :func:`_snapshot` is unchanged, and, for a model loaded from
    a folder (:func:`stamp_source`) and not changed since, in ``cache`` (a JSON file the caller owns, e.g. a run's
    ``captures/.model_hashes.json``; never inside the model folder) under the key of the folder's stat identity, so a
    later process reads it instead of hashing the weights again. Not seen: values changed behind the version
    counter (``tensor.data`` writes); sceneprobe makes none.
    """
    snap = _snapshot(model)
    memo = model.__dict__.get("_sceneprobe_hash")
    if memo is not None and memo[0] == snap:
        return memo[1]
    source = model.__dict__.get("_sceneprobe_source")
    key = source[0] if cache is not None and source is not None and source[1] == snap else None
    value = _read_cache(cache).get(key) if key else None
    if not (isinstance(value, str) and len(value) == 16):
        value = _digest(model)
        if key:
            from ..atomic import atomic_write_json
            try:
                Path(cache).parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(Path(cache), {**_read_cache(cache), key: value})
            except OSError:
                pass                                # an unwritable cache costs time, never a result
    model._sceneprobe_hash = (snap, value)
    return value


def export_pretrained(run: Path, dest: Path, extra: dict | None = None) -> Path:
    """Copy a trained run's vae/, unet/, scheduler/ into ``dest`` as fp16 safetensors folders, with
    ``training.json`` (the run's resolved config, training metrics and evaluation) beside them.

    This is how the shipped default in ``sceneprobe/pretrained/<preset>`` is made from a run of the project's own
    training commands. Loading upcasts to float32 (``load_ldm`` / ``from_pretrained(torch_dtype=torch.float32)``).
    """
    import yaml
    run, dest = Path(run), Path(dest)
    ldm = load_ldm(run)
    dest.mkdir(parents=True, exist_ok=True)
    save_model(ldm.vae, dest / "vae", fp16=True)
    save_model(ldm.unet, dest / "unet", fp16=True)
    DDPMScheduler.from_config(ldm.scheduler_config).save_pretrained(dest / "scheduler")
    record: dict = {"run": run.name, **(extra or {})}
    for stage in ("train_vae", "tune_decoder", "train_ldm"):
        d = run / stage
        info: dict = {}
        if (d / "config.yaml").exists():
            info["config"] = yaml.safe_load((d / "config.yaml").read_text())
        if (d / "eval.json").exists():
            info["eval"] = json.loads((d / "eval.json").read_text())
        if (d / "metrics.jsonl").exists():
            lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()]
            info["final_metrics"] = lines[-1] if lines else {}
            info["wall_time_s"] = lines[-1].get("elapsed_s") if lines else None
        if info or stage not in record:  # a stage done elsewhere (``extra``) keeps its record
            record[stage] = info
    # What the shipped (fp16-rounded) VAE reaches on scenes rendered afresh from a seed its training never used;
    # tests/test_shipped.py renders them again and checks the figure still holds.
    from .latents import evaluate_vae
    from ..world.render import render_scenes
    check = {"render_seed": 424242, "n_images": 96}
    rgb = render_scenes(seed=check["render_seed"], indices=range(check["n_images"]), size=ldm.vae.config.sample_size)["rgb"]
    record["shipped_vae_check"] = {**check, **evaluate_vae(load_vae(dest / "vae"), rgb)}
    from ..atomic import atomic_write_json
    atomic_write_json(dest / "training.json", record)
    return dest
