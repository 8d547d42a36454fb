"""Configuration: frozen dataclasses per stage; YAML in, resolved config out.

A preset (``tiny``, ``cpu``, ``gpu``) is a small YAML file in ``sceneprobe/presets`` that overrides the defaults
below. Unknown keys and wrong types are errors (:class:`~sceneprobe.errors.SceneprobeError`), never silently ignored.
The resolved config is what a run folder records in ``config.yaml``; a stage's fingerprint is the hash of its section
(and of the sections it depends on), so a changed config redoes exactly the stages it touches.

Each key's allowed values and the checked building of a section: :mod:`.config_rules`; the guarded YAML reader:
:mod:`.config_yaml`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .config_rules import ConfigValueError, _build, opt, seed_opt
from .config_yaml import read_yaml
from .errors import SceneprobeError, fail


@dataclass(frozen=True)
class WorldConfig:
    """The synthetic world: how many scenes, how big, which seed, how they split."""
    n_scenes: int = opt(2000, ge=1, le=10_000_000)
    size: int = opt(64, ge=32, le=512)
    supersample: int = opt(3, ge=1, le=8)  # RGB anti-aliasing: s×s rays per pixel; depth/mask/ids use the pixel centre
    seed: int = seed_opt(0)
    val_fraction: float = opt(0.1, ge=0.0, lt=1.0)
    test_fraction: float = opt(0.1, ge=0.0, lt=1.0)
    workers: int = opt(0, ge=0, le=256)  # render processes, 0 = every core; the bytes do not depend on it

    def problems(self):
        if self.val_fraction + self.test_fraction >= 1:
            yield "test_fraction", (f"plus val_fraction must be < 1 (leave scenes to train on), got "
                                    f"{self.val_fraction} + {self.test_fraction}")


@dataclass(frozen=True)
class VAEConfig:
    """diffusers ``AutoencoderKL`` architecture (64×64×3 → latent_channels × 16×16 with three blocks)."""
    block_out_channels: tuple[int, ...] = opt((16, 32, 64), ge=1, le=4096, min_items=1)
    layers_per_block: int = opt(1, ge=1, le=16)
    latent_channels: int = opt(4, ge=1, le=64)
    norm_num_groups: int = opt(16, ge=1, le=4096)
    mid_block_add_attention: bool = True

    def problems(self):
        yield from _groups_divide(self)


@dataclass(frozen=True)
class UNetConfig:
    """diffusers ``UNet2DModel`` architecture on the VAE's latents (self-attention at two resolutions + mid)."""
    block_out_channels: tuple[int, ...] = opt((32, 64, 64), ge=1, le=4096, min_items=1)
    layers_per_block: int = opt(1, ge=1, le=16)
    attention_head_dim: int = opt(32, ge=1, le=4096)
    norm_num_groups: int = opt(32, ge=1, le=4096)
    down_block_types: tuple[str, ...] = opt(("AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"), min_items=1,
                                            choices=("AttnDownBlock2D", "DownBlock2D"))
    up_block_types: tuple[str, ...] = opt(("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"), min_items=1,
                                          choices=("AttnUpBlock2D", "UpBlock2D"))

    def problems(self):
        yield from _groups_divide(self)
        n = len(self.block_out_channels)
        for key in ("down_block_types", "up_block_types"):
            if len(getattr(self, key)) != n:
                yield key, (f"needs one entry per block_out_channels entry ({n}), got "
                            f"{len(getattr(self, key))}")
        bad = [c for c in self.block_out_channels if c % self.attention_head_dim]
        if bad:
            yield "attention_head_dim", (f"({self.attention_head_dim}) must divide every block_out_channels entry, "
                                         f"not {bad[0]}")


@dataclass(frozen=True)
class TrainVAEConfig:
    steps: int = opt(3000, ge=1, le=10_000_000)
    batch_size: int = opt(32, ge=1, le=65536)
    lr: float = opt(1e-3, gt=0.0, le=10.0)
    lr_min_ratio: float = opt(0.05, ge=0.0, le=1.0)  # cosine decay to lr * lr_min_ratio
    crop: int = opt(32, ge=0, le=512)  # train on random crops (the VAE is convolutional but for its mid attention); 0 = full
    recon: str = opt("l1", choices=("l1", "mse"))
    kl_weight: float = opt(1e-6, ge=0.0, le=1e3)
    logvar_init: float = opt(-6.0, ge=-30.0, le=20.0)  # bias of quant_conv's log-variance half: posterior std ≈ 0.05
    # then the decoder alone on full images (encoder frozen: the latent space and its statistics do not move); crops
    # never show the decoder the image's true border, which left 15–28 grey-level stripes along the edges
    decoder_steps: int = opt(0, ge=0, le=10_000_000)
    decoder_lr: float = opt(2e-4, gt=0.0, le=10.0)
    decoder_batch_size: int = opt(16, ge=1, le=65536)
    checkpoint_every: int = opt(250, ge=1)
    log_every: int = opt(25, ge=1)
    seed: int = seed_opt(0)


@dataclass(frozen=True)
class TrainLDMConfig:
    steps: int = opt(6000, ge=1, le=10_000_000)
    batch_size: int = opt(64, ge=1, le=65536)
    lr: float = opt(1e-3, gt=0.0, le=10.0)
    lr_min_ratio: float = opt(0.05, ge=0.0, le=1.0)
    ema_decay: float = opt(0.999, ge=0.0, lt=1.0)
    num_train_timesteps: int = opt(1000, ge=2, le=100_000)
    beta_schedule: str = opt("squaredcos_cap_v2", choices=("linear", "scaled_linear", "squaredcos_cap_v2"))
    prediction_type: str = opt("v_prediction", choices=("v_prediction", "epsilon"))  # v: x̂₀ error bounded at high noise
    snr_gamma: float = opt(5.0, ge=0.0, le=1e6)  # min-SNR-γ loss weighting (Hang et al. 2023); 0 = unweighted MSE
    zero_terminal_snr: bool = True  # rescale_betas_zero_snr + trailing spacing: the last timestep is pure noise
    flip: bool = True             # horizontal-flip augmentation: the mirrored scenes' latents
    checkpoint_every: int = opt(250, ge=1)
    log_every: int = opt(25, ge=1)
    seed: int = seed_opt(0)

    def problems(self):
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            yield "zero_terminal_snr", "needs prediction_type v_prediction; set one of them differently"


@dataclass(frozen=True)
class SampleConfig:
    sampler: str = opt("ddim", choices=("ddim", "ddpm"))
    steps: int = opt(15, ge=1, le=100_000)  # the paper's step count (at most train_ldm.num_train_timesteps)
    eta: float = opt(0.0, ge=0.0, le=1.0)
    n: int = opt(64, ge=1, le=1_000_000)
    batch_size: int = opt(32, ge=1, le=65536)
    seed: int = seed_opt(0)

    def problems(self):
        # diffusers' DDIM step at η = 1 takes √(1 − ᾱ_prev − σ²) with σ² = 1 − ᾱ_prev up to rounding at a zero-SNR
        # first step (the shipped schedule): √ of −1e-8 is NaN and every sample is black. DDPM is the η = 1 sampler
        if self.sampler == "ddim" and self.eta >= 1:
            yield "eta", f"must be < 1 with sampler ddim, got {self.eta}; use sampler: ddpm for the fully stochastic sampler"


@dataclass(frozen=True)
class CaptureConfig:
    protocols: tuple[str, ...] = opt(("generate", "noised"), choices=("generate", "noised"))
    n_generate: int = opt(256, ge=1, le=10_000_000)
    n_noised: int = opt(256, ge=1, le=10_000_000)
    steps: int = opt(15, ge=1, le=100_000)  # at most train_ldm.num_train_timesteps
    site_kind: str = opt("attn", choices=("attn", "block"))  # "attn": to_out[0] before the residual (the paper's)
    vae_input: str = opt("latent", choices=("latent", "x0"))  # "latent": z after step t's update; "x0": predicted
    dtype: str = opt("float16", choices=("float16", "float32"))
    pool: int = opt(1, ge=1, le=64)  # spatial average pooling factor applied before storing
    # the input control (capture/run.py: INPUT_SITE): the U-Net's input x_t at every step with its k×k neighbourhood
    # as channels (c·k² per position), stored for the trained model; 0 = not captured. Odd.
    input_window: int = opt(5, ge=0, le=15)
    batch_size: int = opt(32, ge=1, le=65536)
    controls: tuple[str, ...] = opt(("permuted", "fresh"), choices=("permuted", "fresh"))
    control_seed: int = seed_opt(100)
    seed: int = seed_opt(1000)
    # Stable Diffusion only (capture/sd.py, study_sd.py):
    sd_scheduler: str = opt("folder", choices=("folder", "ddim", "lms", "pndm", "euler", "euler_a", "dpm"))
    guidance_scale: float = opt(7.5, ge=0.0, le=1000.0)  # 1 (or less): no classifier-free guidance, no doubled batch
    negative_prompt: str = ""     # the unconditional prompt of classifier-free guidance
    height: int = opt(0, ge=0, le=8192)  # pixels; 0: the U-Net's native size (as the pipeline)
    width: int = opt(0, ge=0, le=8192)
    variant: str = ""             # weight-file variant ("fp16" for *.fp16.safetensors); "": found by itself
    # the sites a pipeline study records: canonical names or shell patterns ("flux.double*", "unet.up*", "vae.*");
    # empty: every self-attention site (`sceneprobe sites --model PATH` lists them); a pattern matching none is an error
    sites: tuple[str, ...] = ()
    store: str = opt("full", choices=("full", "streamed"))  # streamed: sufficient statistics, no activation store
    subsample: int = opt(64, ge=1, le=1_000_000)  # streamed: stored train positions per image, site and step
    checkpoint_every: int = opt(8, ge=1, le=1_000_000)  # streamed: batches per chunk (the unit of resume and of dealing out)

    def problems(self):
        if self.input_window and self.input_window % 2 == 0:
            yield "input_window", f"must be odd (a window centred on each position) or 0, got {self.input_window}"


@dataclass(frozen=True)
class ProbeConfig:
    solver: str = opt("exact", choices=("exact", "adam"))  # ridge / IRLS, or the paper's Adam trainer
    upsample: str = opt("nearest", choices=("nearest", "area"))  # "nearest": predictions upsampled to the label grid
    bias: bool = True             # unpenalised intercept; False = the paper's no-bias probe (parity)
    # one λ per decade, wide enough that the val-chosen λ is interior (a choice on an edge is flagged in results.csv)
    lambdas: tuple[float, ...] = opt((1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0),
                                     gt=0.0, le=1e12, min_items=1)
    depth_target: str = opt("depth", choices=("depth", "inverse"))  # "inverse": 1/depth (MiDaS's convention)
    # layout-fair probes (probe/layout.py): "input" gives every probe — model, control, VAE, input — the position-only
    # prior (train means at the site's native size: standardised depth, salient log-odds) as two unpenalised input
    # channels, so its score is what the features add beyond layout; "none": features and intercept only
    layout: str = opt("input", choices=("input", "none"))
    # with layout "input", also fit the probe without the prior beside it (rows of model "<model>.noprior"; with
    # bias: false that is the paper's probe), so the report can show what the prior changed — in the protocols
    # named by plain_protocols (default: the paper's, generate, and Stable Diffusion's; each costs a second
    # saliency fit per probe)
    plain: bool = True
    plain_protocols: tuple[str, ...] = opt(("generate", "sd"), choices=("generate", "noised", "sd"))
    epochs: int = opt(30, ge=1, le=100_000)
    lr: float = opt(1e-3, gt=0.0, le=10.0)
    batch_size: int = opt(4, ge=1, le=65536)
    seed: int = seed_opt(0)
    # where the exact solvers run (probe/parallel.py): "auto" = the GPU when torch sees one, else the CPU; workers =
    # (site, step) probes fitted at once, each on one thread (0 = every core). Neither changes a CPU result's bytes,
    # so neither is part of a probe's fingerprint
    device: str = opt("auto", choices=("auto", "cpu", "cuda"))
    workers: int = opt(0, ge=0, le=4096)


@dataclass(frozen=True)
class LabellerConfig:
    channels: tuple[int, ...] = opt((32, 64, 128), ge=1, le=4096, min_items=1)
    layers_per_block: int = opt(1, ge=1, le=16)
    norm_num_groups: int = opt(8, ge=1, le=4096)  # reduced to gcd(groups, channels) per level
    n_scenes: int = opt(4000, ge=3, le=10_000_000)
    steps: int = opt(1500, ge=1, le=10_000_000)
    batch_size: int = opt(32, ge=1, le=65536)
    lr: float = opt(2e-3, gt=0.0, le=10.0)
    seed: int = seed_opt(0)


def _readout_labeller_default() -> "LabellerConfig":
    """The read-out labeller's recipe: another architecture and seed than ``labeller`` (trained on its own world)."""
    return LabellerConfig(channels=(8, 16, 32, 64), layers_per_block=2, norm_num_groups=4, seed=1)


@dataclass(frozen=True)
class ReadoutConfig:
    """The image read-out (labeller/readout.py): a labeller on each step's decoded x̂₀.

    ``labeller``: "second" = the independent read-out labeller (``labeller_readout``: another seed, architecture and
    training world), so in ``generate`` — whose labels are the first labeller on the final image — the read-out does
    not score itself; "same" = the labels' labeller (its last steps then score ≈ 1 by construction). Both protocols
    use the chosen one (``noised`` scores it against exact labels)."""
    labeller: str = opt("second", choices=("second", "same"))


@dataclass(frozen=True)
class InterveneConfig:
    n_edits: int = opt(32, ge=1, le=1_000_000)
    lr: float = opt(5e-3, gt=0.0, le=10.0)
    iters: int = opt(128, ge=1, le=1_000_000)
    shift_min: float = opt(0.15, ge=0.0, le=1.0)
    shift_max: float = opt(0.25, ge=0.0, le=1.0)
    saliency_step_fraction: float = opt(1 / 3, gt=0.0, le=1.0)
    depth_steps: int = opt(3, ge=1, le=100_000)
    seed: int = seed_opt(123)
    # where edits act: "attn" = to_out[0] (before the residual, the paper's), "block" = the residual stream (the
    # Attention module's output); each through probes fitted on that reading (interventions/probes_<kind>/)
    site_kinds: tuple[str, ...] = opt(("attn", "block"), choices=("attn", "block"), min_items=1)
    # dose–response: edit sizes ‖Δa‖/‖a‖ along the optimised direction (and the random / permuted-probe controls);
    # on the shipped cpu model 5–50 % changed the image by < 2 grey levels on average, 100–200 % by 3–8
    doses: tuple[float, ...] = opt((0.5, 1.0, 2.0), ge=0.0, le=10.0, min_items=1)
    # a dose "visibly changes the image" when the probe edit's mean |edited − unedited| (grey levels) is at least this
    visible_change: float = opt(2.0, ge=0.0, le=255.0)

    def problems(self):
        if self.shift_min > self.shift_max:
            yield "shift_min", f"({self.shift_min}) must be <= shift_max ({self.shift_max})"


@dataclass(frozen=True)
class ReportConfig:
    """How the report turns numbers into answers (fixed before the run; see ``sceneprobe.probe.stats.verdict``).

    A difference d with 95 % CI [lo, hi] reads "yes" when lo > 0 and d ≥ the minimum effect, "no" when hi < the
    minimum effect, else "inconclusive". Minimum effects are in the metric's own units.
    """
    n_boot: int = opt(2000, ge=1, le=10_000_000)  # paired bootstrap resamples over test images
    ci_level: float = opt(0.95, gt=0.0, lt=1.0)
    boot_seed: int = seed_opt(0)
    min_dice: float = opt(0.05, ge=0.0, le=1.0)  # saliency: Dice gain over the strongest baseline / a control / VAE
    min_skill: float = opt(0.10, ge=0.0, le=1.0)  # depth: skill 1 − MSE/MSE(position-only) on standardised depth
    min_edit: float = opt(0.05, ge=0.0, le=2.0)  # interventions: ρ(edit, counterfactual) − ρ(edit, original) / mask gain
    step_fraction: float = opt(0.9, gt=0.0, le=1.0)  # "from step k": first step whose gain ≥ this × the best gain


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
    labeller_readout: LabellerConfig = field(default_factory=_readout_labeller_default)  # the second, independent one
    readout: ReadoutConfig = field(default_factory=ReadoutConfig)
    intervene: InterveneConfig = field(default_factory=InterveneConfig)

    def problems(self):
        """Checks across sections (each section's own ranges are declared on its fields)."""
        t = self.train_ldm.num_train_timesteps
        for key in ("sample.steps", "capture.steps"):
            section, name = key.split(".")
            if getattr(getattr(self, section), name) > t:
                yield key, f"must be <= train_ldm.num_train_timesteps ({t}), got {getattr(getattr(self, section), name)}"
        crop, size, down = self.train_vae.crop, self.world.size, 2 ** (len(self.vae.block_out_channels) - 1)
        if crop and crop % down:
            yield "train_vae.crop", f"must be 0 or a multiple of {down} (the VAE's downsampling), got {crop}"
        if size % (down * 2 ** (len(self.unet.block_out_channels) - 1)):
            yield "world.size", (f"({size}) must be a multiple of {down * 2 ** (len(self.unet.block_out_channels) - 1)} "
                                 f"(VAE and U-Net downsampling)")
    report: ReportConfig = field(default_factory=ReportConfig)


PRESETS = ("tiny", "cpu", "gpu")


def _groups_divide(cfg: Any):
    """GroupNorm needs ``norm_num_groups`` to divide every channel count."""
    bad = [c for c in cfg.block_out_channels if c % cfg.norm_num_groups]
    if bad:
        yield "norm_num_groups", (f"({cfg.norm_num_groups}) must divide every block_out_channels entry, "
                                  f"not {bad[0]}")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples become lists) — what ``config.yaml`` holds."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def preset_dict(name: str) -> dict:
    if name not in PRESETS:
        raise fail(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)} or pass a YAML file with --config")
    text = resources.files("sceneprobe.presets").joinpath(f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def load_config(preset: str = "cpu", path: Path | None = None, overrides: dict | None = None,
                labels: dict[str, str] | None = None) -> Config:
    """Defaults ← preset YAML ← user YAML (``path``) ← ``overrides``; validated, frozen.

    ``labels`` maps dotted keys to the command-line options that set them (``{"sample.n": "--n"}``), so a bad value
    is reported as the option the user typed; a bad value from the YAML file names the file.
    """
    data = _merge({"preset": preset}, preset_dict(preset))
    layers: list[tuple[str, dict]] = [(f"preset {preset}", data)]
    if path is not None:
        user = read_yaml(path)
        data = _merge(data, user)
        if "preset" in user and user["preset"] != preset:
            data = _merge(_merge({"preset": user["preset"]}, preset_dict(user["preset"])), user)
        layers.append((f"config file {path}", user))
    if overrides:
        data = _merge(data, overrides)
        layers.append(("", overrides))
    try:
        return _build(Config, data)
    except ConfigValueError as e:
        raise _attribute(e, layers, labels or {}) from None


def _attribute(e: ConfigValueError, layers: list[tuple[str, dict]], labels: dict[str, str]) -> SceneprobeError:
    """Say where a bad value came from: the option the user typed, their config file, or the preset."""
    base = e.key.split("[")[0]
    for source, layer in reversed(layers):
        node: Any = layer
        for part in base.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is _ABSENT:
            continue
        if not source and base in labels:
            return fail(f"option {labels[base]} {e.problem}")
        return fail(f"{source}: key {e.key} {e.problem}") if source else e
    return e


_ABSENT = object()


def config_from_dict(data: dict) -> Config:
    return _build(Config, data)


def fingerprint(*sections: Any) -> str:
    """Short stable hash of config sections (dataclasses or dicts): decides whether a stage must be redone."""
    blob = json.dumps([to_dict(s) if dataclasses.is_dataclass(s) else s for s in sections], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
