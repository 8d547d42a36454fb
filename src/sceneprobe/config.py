"""Configuration: frozen dataclasses per stage; YAML in, resolved config out.

A preset (``tiny``, ``cpu``, ``gpu``) is a small YAML file in ``sceneprobe/presets`` that overrides the defaults
below. Unknown keys and wrong types are errors (:class:`~sceneprobe.errors.SceneprobeError`), never silently ignored.
The resolved config is what a run folder records in ``config.yaml``; a stage's fingerprint is the hash of its section
(and of the sections it depends on), so a changed config redoes exactly the stages it touches.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import fail


@dataclass(frozen=True)
class WorldConfig:
    """The synthetic world: how many scenes, how big, which seed, how they split."""
    n_scenes: int = 2000
    size: int = 64
    supersample: int = 3          # RGB anti-aliasing: s×s rays per pixel; depth/mask/ids use the pixel centre
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    workers: int = 1


@dataclass(frozen=True)
class VAEConfig:
    """diffusers ``AutoencoderKL`` architecture (64×64×3 → latent_channels × 16×16 with three blocks)."""
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16
    mid_block_add_attention: bool = True


@dataclass(frozen=True)
class UNetConfig:
    """diffusers ``UNet2DModel`` architecture on the VAE's latents (self-attention at two resolutions + mid)."""
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 32
    norm_num_groups: int = 32
    down_block_types: tuple[str, ...] = ("AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D")


@dataclass(frozen=True)
class TrainVAEConfig:
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    lr_min_ratio: float = 0.05    # cosine decay to lr * lr_min_ratio
    crop: int = 32                # train on random crops (the VAE is convolutional but for its mid attention); 0 = full
    recon: str = "l1"             # "l1" or "mse"
    kl_weight: float = 1e-6
    logvar_init: float = -6.0     # bias of quant_conv's log-variance half: posterior std ≈ 0.05 at start
    checkpoint_every: int = 250
    log_every: int = 25
    seed: int = 0


@dataclass(frozen=True)
class TrainLDMConfig:
    steps: int = 6000
    batch_size: int = 64
    lr: float = 1e-3
    lr_min_ratio: float = 0.05
    ema_decay: float = 0.999
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "v_prediction"  # "v_prediction" (x̂₀ error bounded at high noise) or "epsilon"
    snr_gamma: float = 5.0        # min-SNR-γ loss weighting (Hang et al. 2023); 0 = unweighted MSE
    zero_terminal_snr: bool = True  # rescale_betas_zero_snr + trailing spacing: the last timestep is pure noise
    flip: bool = True             # horizontal-flip augmentation of the cached latents
    checkpoint_every: int = 250
    log_every: int = 25
    seed: int = 0


@dataclass(frozen=True)
class SampleConfig:
    sampler: str = "ddim"         # "ddim" or "ddpm"
    steps: int = 15               # the paper's step count
    eta: float = 0.0
    n: int = 64
    batch_size: int = 32
    seed: int = 0


@dataclass(frozen=True)
class CaptureConfig:
    protocols: tuple[str, ...] = ("generate", "noised")
    n_generate: int = 256
    n_noised: int = 256
    steps: int = 15
    site_kind: str = "attn"       # "attn": to_out[0] before the residual (the paper's); "block": module output
    vae_input: str = "latent"     # "latent": z after step t's update; "x0": predicted clean latent
    dtype: str = "float16"
    pool: int = 1                 # spatial average pooling factor applied before storing
    batch_size: int = 32
    controls: tuple[str, ...] = ("permuted", "fresh")
    control_seed: int = 100
    seed: int = 1000


@dataclass(frozen=True)
class ProbeConfig:
    solver: str = "exact"         # "exact" (ridge / IRLS) or "adam" (the paper's trainer)
    upsample: str = "nearest"     # "nearest": predictions upsampled to the label grid; "area": labels area-downsampled
    bias: bool = False
    lambdas: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 4
    seed: int = 0


@dataclass(frozen=True)
class LabellerConfig:
    channels: tuple[int, ...] = (32, 64, 128)
    n_scenes: int = 4000
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0


@dataclass(frozen=True)
class InterveneConfig:
    n_edits: int = 32
    lr: float = 5e-3
    iters: int = 128
    shift_min: float = 0.15
    shift_max: float = 0.25
    saliency_step_fraction: float = 1 / 3
    depth_steps: int = 3
    seed: int = 123


@dataclass(frozen=True)
class ReportConfig:
    """How the report turns numbers into answers (fixed before the run; see ``sceneprobe.probe.stats.verdict``).

    A difference d with 95 % CI [lo, hi] reads "yes" when lo > 0 and d ≥ the minimum effect, "no" when hi < the
    minimum effect, else "inconclusive". Minimum effects are in the metric's own units.
    """
    n_boot: int = 2000            # paired bootstrap resamples over test images
    ci_level: float = 0.95
    boot_seed: int = 0
    min_dice: float = 0.05        # saliency: Dice gain over the strongest baseline / a control / the VAE decoder
    min_skill: float = 0.10       # depth: skill 1 − MSE/MSE(position-only) on standardised depth (and its gaps)
    min_edit: float = 0.05        # interventions: ρ(edit, counterfactual) − ρ(edit, original) / moved-mask gain
    step_fraction: float = 0.9    # "from step k": first step whose gain over position-only ≥ this × the best gain


@dataclass(frozen=True)
class Config:
    """The whole study's configuration; one section per stage."""
    preset: str = "cpu"
    world: WorldConfig = field(default_factory=WorldConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    train_vae: TrainVAEConfig = field(default_factory=TrainVAEConfig)
    train_ldm: TrainLDMConfig = field(default_factory=TrainLDMConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    labeller: LabellerConfig = field(default_factory=LabellerConfig)
    intervene: InterveneConfig = field(default_factory=InterveneConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


PRESETS = ("tiny", "cpu", "gpu")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; lists become tuples; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail(f"config key {where} must be a mapping, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise fail(f"config key {where} must be a list, got {value!r}")
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            if a is type(None) and value is None:
                return None
        return _coerce(value, [a for a in typing.get_args(tp) if a is not type(None)][0], where)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and type(value) is tp:
        return value
    raise fail(f"config key {where} must be {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls: type, data: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise fail(f"unknown config key {prefix}{unknown[0]}; known keys here: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples become lists) — what ``config.yaml`` holds."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise fail(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise fail(f"config file {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise fail(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def preset_dict(name: str) -> dict:
    if name not in PRESETS:
        raise fail(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)} or pass a YAML file with --config")
    text = resources.files("sceneprobe.presets").joinpath(f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def load_config(preset: str = "cpu", path: Path | None = None, overrides: dict | None = None) -> Config:
    """Defaults ← preset YAML ← user YAML (``path``) ← ``overrides``; validated, frozen."""
    data = _merge({"preset": preset}, preset_dict(preset))
    if path is not None:
        user = read_yaml(path)
        data = _merge(data, user)
        if "preset" in user and user["preset"] != preset:
            data = _merge(_merge({"preset": user["preset"]}, preset_dict(user["preset"])), user)
    if overrides:
        data = _merge(data, overrides)
    return _build(Config, data)


def config_from_dict(data: dict) -> Config:
    return _build(Config, data)


def fingerprint(*sections: Any) -> str:
    """Short stable hash of config sections (dataclasses or dicts): decides whether a stage must be redone."""
    blob = json.dumps([to_dict(s) if dataclasses.is_dataclass(s) else s for s in sections], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
