"""Command line: one subcommand per stage; each calls one library function and prints what it wrote (last line).

A user mistake (:class:`SceneprobeError`) is printed as one line ``error: …`` with exit status 2, no traceback.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from .errors import SceneprobeError, fail
from .owned import ADOPT

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub, ever: everything is local


# Options that set a config key of another name (the rest are named like their key: --steps → sample.steps).
OPTION_OF = {"world.n_scenes": "--n", "capture.guidance_scale": "--guidance"}


def _labels(over: dict) -> dict[str, str]:
    """Dotted config keys set from options → the option's name, so a bad value is reported as the option typed."""
    return {f"{sec}.{k}": OPTION_OF.get(f"{sec}.{k}", f"--{k.replace('_', '-')}")
            for sec, keys in over.items() if isinstance(keys, dict) for k in keys}


def _config(args, overrides: dict | None = None):
    """The resolved config: preset ← --config ← options; every value checked against its declared range here,
    before any folder is written."""
    from .config import load_config
    over = dict(overrides or {})
    return load_config(args.preset, Path(args.config) if args.config else None, over, labels=_labels(over))


def _options(section: str, args, **keys: str) -> dict:
    """{section: {config key: option value}} for the options the user gave (None = keep the config's)."""
    vals = {key: getattr(args, attr) for key, attr in keys.items() if getattr(args, attr, None) is not None}
    return {section: vals} if vals else {}


def _merged(*overs: dict) -> dict:
    out: dict = {}
    for o in overs:
        for sec, keys in o.items():
            out.setdefault(sec, {}).update(keys)
    return out


def _seeded(args, section: str, key: str = "seed") -> dict:
    return {section: {key: args.seed}} if getattr(args, "seed", None) is not None else {}


def _common(p: argparse.ArgumentParser, out: bool = True, out_help: str = "output folder") -> None:
    p.add_argument("--preset", default="cpu", help="preset: tiny, cpu or gpu")
    p.add_argument("--config", default=None, help="YAML file overriding the preset (unknown keys are errors)")
    p.add_argument("--seed", type=int, default=None, help="seed; None keeps the config's")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    if out:
        p.add_argument("--out", required=True, help=out_help)


def cmd_scenes(args) -> Path:
    from .world.dataset import make_dataset
    cfg = _config(args, _merged(_seeded(args, "world"), _options("world", args, n_scenes="n", size="size",
                                                                  supersample="supersample", workers="workers")))
    w = cfg.world
    return make_dataset(Path(args.out), n=w.n_scenes, size=w.size, seed=w.seed, supersample=w.supersample,
                        workers=w.workers, val_fraction=w.val_fraction, test_fraction=w.test_fraction,
                        force=args.force, progress=not args.no_progress)


def cmd_check_data(args) -> Path:
    from .world.dataset import load_dataset
    data = load_dataset(Path(args.folder), skip_bad=args.skip_bad)
    counts = {s: int((data.split == s).sum()) for s in ("train", "val", "test")}
    print(f"{len(data)} images {data.rgb.shape[1]}x{data.rgb.shape[2]}; depth: {'yes' if data.depth is not None else 'no'}; "
          f"saliency: {'yes' if data.saliency is not None else 'no'}; split {counts}")
    for s in getattr(data, "skipped", []):
        print(f"skipped {s}")
    if getattr(data, "skipped", []):
        print(f"skipped {len(data.skipped)} bad file(s)")
    return Path(args.folder)


def _load_data(path: str, skip_bad: bool = False):
    from .world.dataset import load_dataset
    return load_dataset(Path(path), skip_bad=skip_bad)


def _data(args):
    """The --data folder of a training or capture command (its --skip-bad applies)."""
    return _load_data(args.data, skip_bad=getattr(args, "skip_bad", False))


def cmd_train_vae(args) -> Path:
    from .train.vae import train_vae
    cfg = _config(args, _seeded(args, "train_vae"))
    return train_vae(cfg, _data(args), Path(args.out), resume=args.resume, force=args.force,
                     progress=not args.no_progress)


def cmd_latent_stats(args) -> Path:
    from .models.io import load_vae, save_model
    from .models.latents import set_latent_stats
    data = _data(args)
    vae = load_vae(Path(args.vae))
    stats = set_latent_stats(vae, data.subset("train").rgb[:1024])
    print("latents_mean " + " ".join(f"{v:.4f}" for v in stats["latents_mean"]))
    print("latents_std  " + " ".join(f"{v:.4f}" for v in stats["latents_std"]))
    return save_model(vae, Path(args.vae))


def cmd_tune_decoder(args) -> Path:
    from .models.io import load_vae, save_model
    from .train.vae import tune_decoder
    cfg = _config(args, _seeded(args, "train_vae"))
    if not cfg.train_vae.decoder_steps:
        raise fail("config key train_vae.decoder_steps is 0; set it (e.g. --config with train_vae: {decoder_steps: 300})")
    data = _data(args)
    vae_dir = Path(args.vae)
    vae = load_vae(vae_dir)
    vae = tune_decoder(cfg, data, vae, vae_dir.parent / "tune_decoder", resume=args.resume, progress=not args.no_progress)
    return save_model(vae, vae_dir)


def cmd_train_ldm(args) -> Path:
    from .train.ldm import train_ldm
    cfg = _config(args, _seeded(args, "train_ldm"))
    return train_ldm(cfg, _data(args), Path(args.out), resume=args.resume, force=args.force,
                     progress=not args.no_progress)


def cmd_train_labeller(args) -> Path:
    """Train the depth + saliency labeller on rendered scenes (labeller/train.py); --depth-model is scored beside it."""
    from .labeller import DepthModelLabeller, train_labeller
    from .owned import owned_folder
    cfg = _config(args, _seeded(args, "labeller"))
    dpt = DepthModelLabeller(Path(args.depth_model)) if args.depth_model else None
    with owned_folder(_train_dir(args), "sceneprobe train-labeller", "--train-dir"):   # never the user's folder
        return train_labeller(cfg, _data(args), Path(args.out), resume=args.resume, force=args.force,
                              progress=not args.no_progress, fp16=args.fp16, train_dir=_train_dir(args),
                              command=_command_line("train-labeller", args), depth_model=dpt)


def _train_dir(args) -> Path:
    """train-labeller's checkpoint folder: --train-dir, or OUT/../train_<OUT name> (as labeller/train.py)."""
    out = Path(args.out)
    return Path(args.train_dir) if args.train_dir else out.parent / f"train_{out.name}"


def _command_line(name: str, args) -> str:
    """The command as a person would retype it (recorded in training.json), rebuilt from the parsed options."""
    parts = [f"sceneprobe {name}"]
    for key, value in sorted(vars(args).items()):
        if key in ("fn", "command") or value in (None, False):
            continue
        parts.append(f"--{key.replace('_', '-')}" + ("" if value is True else f" {value}"))
    return " ".join(parts)


def cmd_label(args) -> Path:
    """Label a capture's samples.safetensors or a folder of images (labeller/apply.py)."""
    from .labeller import DepthModelLabeller, label_path, load_labeller, shipped_labeller_path
    path = Path(args.labeller) if args.labeller else shipped_labeller_path("cpu")
    lab = load_labeller(path) if args.labeller or path.is_dir() else None
    if args.depth_model:
        lab = DepthModelLabeller(Path(args.depth_model), saliency_labeller=lab)
    elif lab is None:
        raise fail(f"no labeller: the shipped one ({path}) is missing; train one with `sceneprobe train-labeller` "
                   f"and pass --labeller")
    return label_path(lab, Path(args.images), Path(args.out) if args.out else None, force=args.force)


def _model_root(arg: str | None) -> Path:
    from .models.io import shipped_root
    return Path(arg) if arg else shipped_root("cpu")


def cmd_sample(args) -> Path:
    from .models.io import load_ldm
    from .sample import sample_to_folder
    cfg = _config(args, _merged(_seeded(args, "sample"), _options("sample", args, n="n", steps="steps",
                                                                   sampler="sampler")))
    s = cfg.sample
    from .owned import check_out_folder
    check_out_folder(Path(args.out), args.force)                   # before loading the model
    ldm = load_ldm(_model_root(args.model))
    data = _data(args) if args.data else None           # before sampling: a bad folder fails fast
    out = sample_to_folder(ldm, Path(args.out), n=s.n, seed=s.seed, steps=s.steps, sampler=s.sampler, eta=s.eta,
                           batch_size=s.batch_size, force=args.force, progress=not args.no_progress)
    if data is not None:
        _write_quality(ldm, data, out, s)
    return out


def _write_quality(ldm, data, out: Path, s) -> None:
    """``out/quality.json`` and ``out/samples_vs_real.png`` for the samples just written (same seeds, same images)."""
    import json

    from PIL import Image

    from .atomic import atomic_write_json
    from .quality import comparison_grid
    from .train.ldm import sample_quality
    import numpy as np
    imgs = np.stack([np.asarray(Image.open(out / f"{i:06d}.png").convert("RGB")) for i in range(s.n)])
    q = sample_quality(ldm, data, seed=s.seed, steps=s.steps, sampler=s.sampler, samples=imgs)
    Image.fromarray(comparison_grid(q.pop("_samples"), q.pop("_heldout"))).save(out / "samples_vs_real.png")
    atomic_write_json(out / "quality.json", q)
    print(f"FSD {q['fsd_samples_vs_heldout']:.2f} (real vs real {q['fsd_train_vs_heldout']:.2f}, VAE reconstructions "
          f"{q['fsd_vae_recon_vs_heldout']:.2f}, noise {q['fsd_noise_vs_heldout']:.2f}); mean RGB samples "
          f"{q['colour_samples']['mean_rgb']} vs data {q['colour_heldout']['mean_rgb']}; cast "
          f"{q['colour_samples']['cast']} vs {q['colour_heldout']['cast']}; edge stripes {json.dumps(q['edge_stripe_samples'])}; "
          f"ground detail {json.dumps(q['ground_detail'])}, samples/VAE {q['ground_detail_ratio_vs_vae_recon']['value']} "
          f"(95 % CI {q['ground_detail_ratio_vs_vae_recon']['ci95']})")


def cmd_capture(args) -> Path:
    """Capture every self-attention site at every step (capture/run.py; capture/sd.py for Stable Diffusion)."""
    from .capture.run import CONTROLS, PROTOCOLS, run_capture
    run = Path(args.run)
    model = Path(args.model) if args.model else None
    pipeline = model is not None and (model / "model_index.json").is_file()
    if args.control not in (None, *CONTROLS, *(("uncond",) if pipeline else ())):
        raise fail(f"option --control must be permuted or fresh{' (or uncond for a pipeline folder)' * pipeline}, "
                   f"got {args.control!r}")
    cfg = _config(args, _merged(_seeded(args, "capture"), _options("capture", args, guidance_scale="guidance")))
    cc = cfg.capture
    is_sd = model is not None and (model / "model_index.json").is_file()
    if args.prompts or is_sd:
        if not args.prompts:
            raise fail(f"--model {model} is a diffusers pipeline folder; pass --prompts CSV (columns prompt,seed)")
        if not is_sd:
            raise fail(f"--prompts needs --model pointing to a local diffusers pipeline folder (model_index.json), "
                       f"got {model}")
        if args.protocol not in (None, "generate"):
            raise fail(f"capture of a pipeline folder supports only --protocol generate, got {args.protocol!r}; the "
                       f"noised protocol on your labelled images is `sceneprobe run --model PATH --data FOLDER`")
        from .capture.pipelines import capture_functions
        from .capture.sd import read_prompts, sd_options
        read_prompts(Path(args.prompts))                   # the cheap input first
        fns = capture_functions(model)                     # SD 1.x/2.x, SDXL, PixArt, SD3, FLUX; else one line
        fns.check(model, "--model")
        return fns.run_capture(model, Path(args.prompts), run / "captures" / "sd" / (args.control or "ldm"),
                               **sd_options(cc, args.guidance), batch_size=cc.batch_size, control=args.control,
                               control_seed=cc.control_seed, force=args.force, progress=not args.no_progress)
    if args.protocol not in PROTOCOLS:
        raise fail(f"option --protocol must be generate or noised, got {args.protocol!r}")
    from .models.io import load_ldm, shipped_root
    root = model or (run if (run / "unet").is_dir() else shipped_root("cpu"))
    data = None
    if args.protocol == "noised":
        dpath = Path(args.data) if args.data else run / "data"
        if not dpath.exists():
            raise fail(f"protocol noised needs a dataset: {dpath} does not exist; pass --data (from `sceneprobe scenes`)")
        data = _load_data(str(dpath), skip_bad=args.skip_bad)
    return run_capture(cfg, run, args.protocol, load_ldm(root), data, args.control, args.force, not args.no_progress)


def cmd_probe(args) -> Path:
    """Fit and score probes for every capture store of the run (probe/sweep.py); prints results.csv."""
    from .config import load_config
    from .probe.sweep import run_probes
    run = Path(args.run)
    over = _merged(_seeded(args, "probe"), _options("probe", args, solver="solver"))
    path = Path(args.config) if args.config else (run / "config.yaml" if (run / "config.yaml").is_file() else None)
    cfg = load_config(args.preset, path, over, labels=_labels(over))
    return run_probes(run, cfg.probe, progress=not args.no_progress)


def cmd_report(args) -> Path:
    """Figures, summary.md and a self-contained report.html from RUN/report/results.csv (report/html.py)."""
    from .report import write_report
    return write_report(Path(args.run))


def cmd_intervene(args) -> Path:
    """Probe-guided edits during generation, scored by the labeller vs controls (intervene/); prints the md section."""
    from .config import load_config
    from .intervene import run_interventions
    run = Path(args.run)
    if args.task not in ("saliency", "depth", "both"):
        raise fail(f"option --task must be saliency, depth or both, got {args.task!r}")
    path = Path(args.config) if args.config else (run / "config.yaml" if (run / "config.yaml").is_file() else None)
    cfg = load_config(args.preset, path, _seeded(args, "intervene"), labels=_labels(_seeded(args, "intervene")))
    return run_interventions(cfg, run, task=args.task, progress=not args.no_progress)


def cmd_export(args) -> Path:
    from .models.io import export_pretrained
    dest = Path(args.out)
    # training.json is written last: without it, an earlier export was interrupted and is simply redone.
    if (dest / "unet").exists() and (dest / "training.json").exists() and not args.force:
        raise fail(f"{dest} already holds a model; pass --force to replace it")
    (dest / "training.json").unlink(missing_ok=True)                # (dest is ours: checked by main's ownership)
    return export_pretrained(Path(args.run), dest, extra={"command": " ".join(sys.argv)})


def cmd_sites(args) -> None:
    """List the canonical sites of a local diffusers pipeline folder (models/families.py); writes nothing."""
    from .models.families import pipeline_sites
    _, header, rows = pipeline_sites(Path(args.model), "--model")
    print(header)
    width = max((len(r.site) for r in rows), default=0)
    pwidth = max((len(r.path) for r in rows), default=0)
    for r in rows:
        print(f"{r.site:<{width}}  {r.path:<{pwidth}}  channels {r.channels:<5}  grid {r.grid}")
    return None


def _is_pipeline(path: str | None) -> bool:
    return bool(path) and (Path(path) / "model_index.json").is_file()


def _run_sd(args) -> Path:
    """``sceneprobe run --model PATH --prompts CSV --out RUN`` (``--sd`` is an alias): the study of a local diffusers
    pipeline folder of any supported family — SD 1.x/2.x, SDXL, PixArt-α/Σ, SD3/3.5, FLUX.1 (study_sd.py)."""
    from .study_sd import run_sd_study
    if args.sd and args.model:
        raise fail("pass the pipeline folder once: --model PATH (--sd is its old name)")
    option, folder = ("--sd", args.sd) if args.sd else ("--model", args.model)
    if args.data and args.prompts:
        raise fail("pass --prompts (the model's own images, labelled by the labeller) or --data (your labelled "
                   "images, the noised protocol), not both")
    if args.data:
        return _run_noised(args, option, folder)
    if not folder or not args.prompts:
        raise fail("the pipeline study needs both --model (a local diffusers pipeline folder) and --prompts (a CSV "
                   "with columns prompt,seed)")
    if not _is_pipeline(folder):
        raise fail(f"{option} {folder} is not a local diffusers pipeline folder (no model_index.json)")
    over = _seeded(args, "capture")
    if args.store:
        over.setdefault("capture", {})["store"] = args.store
    cfg = _config(args, over)
    from .models.families import check_site_selection
    check_site_selection(Path(folder), cfg.capture.sites, option)      # from the configs, before any weight is read
    controls = [] if args.controls in ("", "none") else [c.strip() for c in args.controls.split(",") if c.strip()]
    return run_sd_study(cfg, Path(folder), Path(args.prompts), Path(args.out),
                        labeller=Path(args.labeller) if args.labeller else None,
                        depth_model=Path(args.depth_model) if args.depth_model else None, controls=controls,
                        progress=not args.no_progress, option=option)


def _run_noised(args, option: str, folder: str) -> Path:
    """``sceneprobe run --model PATH --data FOLDER --out RUN``: the noised study on labelled images
    (study_noised.py)."""
    from .study_noised import run_noised_study
    if not folder:
        raise fail("--data needs --model PATH: a local diffusers pipeline folder (with model_index.json)")
    if not _is_pipeline(folder):
        raise fail(f"{option} {folder} is not a local diffusers pipeline folder (no model_index.json); --data needs "
                   f"one")
    over = _seeded(args, "capture")
    if args.store:
        over.setdefault("capture", {})["store"] = args.store
    cfg = _config(args, over)
    from .models.families import check_site_selection
    check_site_selection(Path(folder), cfg.capture.sites, option)
    controls = [] if args.controls in ("", "none") else [c.strip() for c in args.controls.split(",") if c.strip()]
    return run_noised_study(cfg, Path(folder), Path(args.data), Path(args.out), controls=controls,
                            progress=not args.no_progress, option=option, skip_bad=args.skip_bad)


def cmd_run(args) -> Path:
    if args.sd or args.prompts or args.data or _is_pipeline(args.model):
        return _run_sd(args)
    from .study import run_study
    cfg = _config(args, _seeded(args, "world"))
    return run_study(cfg, Path(args.out), from_scratch=args.from_scratch, model=Path(args.model) if args.model else None,
                     with_interventions=args.with_interventions, progress=not args.no_progress)


class UsageError(SceneprobeError):
    """A command-line mistake found by the argument parser (unknown option, ``--n abc``, …)."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: sceneprobe sample: argument --n: invalid int value: 'abc'; …``."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}; see `{self.prog} --help`")


def _owned(args):
    """Claim and lock the folder the command writes (``owns`` = (option, mode), declared beside its parser).

    ``fill``: a run folder written in place (created with a marker, or checked to be ours; locked inside);
    ``read``: the same, but it must exist already (probe, report, intervene read it first);
    ``replace``: a folder replaced whole (locked beside it; never a folder of the user's own files);
    ``parent``: a model folder updated in place (``--vae``): its run folder is claimed and locked (so a VAE is
    rewritten, and tune-decoder's logs written, only inside a folder sceneprobe made; never through a link).
    """
    import contextlib

    from .owned import check_not_link, owned_folder, replaced_folder
    spec = getattr(args, "owns", None)
    value = getattr(args, spec[0], None) if spec else None
    if value is None:
        return contextlib.nullcontext()
    option, mode = f"--{spec[0]}", spec[1]
    if mode == "replace":
        return replaced_folder(Path(value), option, made_by=f"sceneprobe {args.command}")
    if mode == "parent":
        check_not_link(Path(value), option)
        if not Path(value).is_dir():
            raise fail(f"{option} {value} does not exist; pass a model folder")
        return owned_folder(Path(value).resolve().parent, f"sceneprobe {args.command}", f"the folder of {option}",
                            must_exist=True)
    return owned_folder(Path(value), f"sceneprobe {args.command}", option, must_exist=mode == "read")


def _adopt_targets(args) -> list[Path]:
    """The folders ``--adopt`` claims: the one the command writes (the run folder of ``--vae``; train-labeller's
    training folder too)."""
    if not getattr(args, "adopt", False):
        return []
    option, mode = getattr(args, "owns", None) or ("out", "replace")
    value = getattr(args, option, None)
    if value is None:
        return []
    targets = [Path(value).resolve().parent if mode == "parent" else Path(value)]
    if args.command == "train-labeller":
        targets.append(_train_dir(args))
    return targets


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = Parser(prog="sceneprobe", formatter_class=fmt,
                                description="Probe what a latent diffusion model knows about the 3D scene it draws.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("scenes", formatter_class=fmt, help="render a dataset of synthetic scenes with exact labels")
    _common(s, out_help="dataset folder to create")
    s.add_argument("--n", type=int, default=None, help="number of scenes (default: world.n_scenes of the preset)")
    s.add_argument("--size", type=int, default=None, help="image size in pixels, 32..512 (default: world.size)")
    s.add_argument("--supersample", type=int, default=None, help="s×s rays per pixel for RGB anti-aliasing")
    s.add_argument("--workers", type=int, default=None, help="worker processes")
    s.add_argument("--force", action="store_true", help="replace --out if it exists")
    s.set_defaults(fn=cmd_scenes)

    s = sub.add_parser("check-data", formatter_class=fmt, help="validate and cache a dataset folder (yours or rendered)")
    s.add_argument("folder", help="folder with rgb/ (or images), optional depth/ and saliency/")
    s.add_argument("--skip-bad", action="store_true", help="skip and count bad files instead of stopping")
    s.set_defaults(fn=cmd_check_data)

    for name, fn, what in (("train-vae", cmd_train_vae, "the KL-VAE"), ("train-ldm", cmd_train_ldm, "the latent U-Net")):
        s = sub.add_parser(name, formatter_class=fmt, help=f"train {what}")
        _common(s, out_help="run folder (vae/, unet/, scheduler/ are written here)")
        s.add_argument("--data", required=True, help="dataset folder (from `sceneprobe scenes`)")
        s.add_argument("--skip-bad", action="store_true", help="leave out unusable files of --data instead of stopping")
        s.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the run folder")
        s.add_argument("--force", action="store_true", help="retrain even if the model folder exists")
        s.set_defaults(fn=fn, owns=("out", "fill"))

    s = sub.add_parser("latent-stats", formatter_class=fmt,
                       help="store per-channel latent statistics (latents_mean/latents_std) in an existing VAE folder")
    s.add_argument("--vae", required=True, help="VAE folder (diffusers AutoencoderKL), updated in place")
    s.add_argument("--data", required=True, help="dataset folder: statistics over its first 1024 training images")
    s.set_defaults(fn=cmd_latent_stats, owns=("vae", "parent"))

    s = sub.add_parser("tune-decoder", formatter_class=fmt,
                       help="fine-tune a VAE's decoder on full images, encoder frozen (latents unchanged)")
    _common(s, out=False)
    s.add_argument("--vae", required=True, help="VAE folder, updated in place; logs in its parent's tune_decoder/")
    s.add_argument("--data", required=True, help="dataset folder (full training images)")
    s.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    s.set_defaults(fn=cmd_tune_decoder, owns=("vae", "parent"))

    s = sub.add_parser("train-labeller", formatter_class=fmt, help="train the depth + saliency labeller on rendered scenes")
    _common(s, out_help="labeller folder to write (diffusers folder with training.json)")
    s.add_argument("--data", required=True, help="dataset folder with depth/ and saliency/ (from `sceneprobe scenes`)")
    s.add_argument("--skip-bad", action="store_true", help="leave out unusable files of --data instead of stopping")
    s.add_argument("--train-dir", default=None, help="checkpoint and logs folder (default: OUT/../train_<OUT name>)")
    s.add_argument("--fp16", action="store_true", help="save half-precision weights (scored as saved)")
    s.add_argument("--depth-model", default=None, help="local transformers DPT folder: also score its depth on held-out")
    s.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the training folder")
    s.add_argument("--force", action="store_true", help="retrain even if --out exists")
    s.set_defaults(fn=cmd_train_labeller, owns=("out", "replace"))

    s = sub.add_parser("label", formatter_class=fmt, help="label images with depth and saliency (the trained labeller)")
    s.add_argument("--images", required=True,
                   help="a samples.safetensors (labels.safetensors is written beside it), a folder holding one, "
                        "or a folder of images (then --out is required)")
    s.add_argument("--out", default=None, help="labels file, or the labelled dataset folder for a folder of images")
    s.add_argument("--labeller", default=None, help="labeller folder (default: the shipped cpu labeller)")
    s.add_argument("--depth-model", default=None,
                   help="local transformers DPT folder for depth (relative inverse depth); saliency still from the labeller")
    s.add_argument("--force", action="store_true", help="replace existing labels")
    s.set_defaults(fn=cmd_label)

    s = sub.add_parser("sample", formatter_class=fmt, help="sample images from a trained LDM")
    _common(s, out_help="folder for the PNGs and grid.png")
    s.add_argument("--model", default=None, help="run folder with vae/, unet/, scheduler/ (default: the shipped model)")
    s.add_argument("--n", type=int, default=None, help="number of samples (default: sample.n)")
    s.add_argument("--steps", type=int, default=None, help="denoising steps (default: sample.steps)")
    s.add_argument("--sampler", default=None, help="ddim or ddpm (default: sample.sampler)")
    s.add_argument("--data", default=None, help="dataset folder: also write quality.json (FSD with its floors, colour "
                                                "statistics, edge stripes) and samples_vs_real.png against its held-out scenes")
    s.add_argument("--force", action="store_true", help="replace --out if it exists")
    s.set_defaults(fn=cmd_sample)

    s = sub.add_parser("capture", formatter_class=fmt,
                       help="record every self-attention output at every denoising step (U-Net and VAE)")
    _common(s, out=False)
    s.add_argument("--run", required=True, help="run folder; the store goes to RUN/captures/<protocol>/<model>/")
    s.add_argument("--protocol", default=None, help="generate (sample and record) or noised (test scenes, noised)")
    s.add_argument("--control", default=None, help="permuted or fresh: capture a control U-Net instead (a pipeline "
                                                    "folder: also uncond, the model on its unconditional CFG half)")
    s.add_argument("--data", default=None, help="dataset folder for --protocol noised (default: RUN/data)")
    s.add_argument("--model", default=None,
                   help="model: a run folder with vae/, unet/, scheduler/ or a local diffusers pipeline folder "
                        "(default: RUN if it holds unet/, else the shipped model)")
    s.add_argument("--prompts", default=None, help="CSV with columns prompt,seed (pipeline folders only)")
    s.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (pipeline folders only; FLUX: its guidance embedding; "
                        "default: capture.guidance_scale)")
    s.add_argument("--force", action="store_true", help="redo the store even if it is finished")
    s.set_defaults(fn=cmd_capture, owns=("run", "fill"))

    s = sub.add_parser("probe", formatter_class=fmt, help="fit and score linear probes on every capture store of a run")
    _common(s, out=False)
    s.add_argument("--run", required=True, help="run folder with captures/<protocol>/<model>/; writes probes/ and report/")
    s.add_argument("--solver", default=None, help="exact (ridge + IRLS, default of the config) or adam (the paper's trainer)")
    s.set_defaults(fn=cmd_probe, owns=("run", "read"))

    s = sub.add_parser("report", formatter_class=fmt, help="write figures, summary.md and report.html from the probe results")
    s.add_argument("--run", required=True, help="run folder with report/results.csv (from `sceneprobe probe`)")
    s.set_defaults(fn=cmd_report, owns=("run", "read"))

    s = sub.add_parser("intervene", formatter_class=fmt,
                       help="edit activations through the probes during generation; score the outputs vs controls")
    _common(s, out=False)
    s.add_argument("--run", required=True, help="run folder with probes/generate/, labeller/ and the model; writes "
                                                "interventions/ and report/extra/interventions.md")
    s.add_argument("--task", default="both", help="saliency (move the object), depth (move/mirror depth) or both")
    s.set_defaults(fn=cmd_intervene, owns=("run", "read"))

    s = sub.add_parser("run", formatter_class=fmt, help="the whole study: world, models, labeller, capture, probes, report")
    _common(s, out_help="run folder (resumable: rerun the same command to continue)")
    s.add_argument("--from-scratch", action="store_true", help="train VAE, U-Net and labeller instead of the shipped ones")
    s.add_argument("--model", default=None,
                   help="a local diffusers pipeline folder (model_index.json: SD 1.x/2.x, SDXL, PixArt-α/Σ, SD3/3.5, "
                        "FLUX.1; needs --prompts or --data), or a run folder whose vae/, unet/, scheduler/ replace the shipped "
                        "model")
    s.add_argument("--with-interventions", action="store_true", help="also run the probe-guided interventions")
    s.add_argument("--sd", default=None, help="old name of --model PATH for a pipeline folder (needs --prompts)")
    s.add_argument("--prompts", default=None, help="pipeline study: CSV with columns prompt,seed")
    s.add_argument("--data", default=None, help="pipeline study on your labelled images instead of --prompts: a "
                                                "folder with rgb/, depth/, saliency/ (the noised protocol)")
    s.add_argument("--labeller", default=None, help="pipeline study: labeller folder (default: the shipped one)")
    s.add_argument("--depth-model", default=None,
                   help="pipeline study: local transformers DPT folder for depth (relative inverse depth)")
    s.add_argument("--controls", default="permuted",
                   help="pipeline study: controls, comma-separated (permuted, fresh, uncond: the model on its "
                        "unconditional CFG half), or none")
    s.add_argument("--store", default=None, help="pipeline study: full (activation store) or streamed "
                                                  "(low-storage; default: capture.store)")
    s.set_defaults(fn=cmd_run, owns=("out", "fill"))

    s = sub.add_parser("sites", formatter_class=fmt,
                       help="list the canonical sites of a local diffusers pipeline folder (SD 1.x/2.x, SDXL, "
                            "PixArt-α/Σ, SD3/3.5, FLUX.1): site, module path, channels, grid; writes nothing",
                       description="Print the family of a local diffusers pipeline folder (from model_index.json) and "
                                   "one line per canonical site: name, model:module path, channels of its attn "
                                   "reading, and its token grid on the latent (cells per token: patch size, FLUX's "
                                   "2x2 packing, a U-Net block's downsampling). Reads configs only; writes nothing. "
                                   "capture.sites selects among them (names or patterns such as flux.double*).")
    s.add_argument("--model", required=True, help="local diffusers pipeline folder (with model_index.json); only "
                                                  "configs are read, no weights")
    s.set_defaults(fn=cmd_sites)

    s = sub.add_parser("export", formatter_class=fmt, help="export a trained run as fp16 folders (how the shipped default is made)")
    s.add_argument("--run", required=True, help="run folder with vae/, unet/, scheduler/")
    s.add_argument("--out", required=True, help="destination folder (e.g. src/sceneprobe/pretrained/cpu)")
    s.add_argument("--force", action="store_true", help="replace an existing model in --out")
    s.set_defaults(fn=cmd_export, owns=("out", "fill"))
    for sp in sub.choices.values():  # every command reading a dataset accepts the option its errors advise
        if "data" in {a.dest for a in sp._actions} and "skip_bad" not in {a.dest for a in sp._actions}:
            sp.add_argument("--skip-bad", action="store_true", help="leave out unusable files of --data instead of "
                                                                    "stopping")
        if sp.get_default("owns") or "out" in {a.dest for a in sp._actions}:  # every command that writes a folder
            sp.add_argument(ADOPT, action="store_true",
                            help="claim the folder it writes although it has no .sceneprobe.json marker: only for a "
                                 "folder an older sceneprobe made (before markers); never pass it for your own files")
    return p


# Errors of the machine, not of the code: one line too (the file and what to do), not a traceback.
_OS_ADVICE = {errno.ENOSPC: "free some space or pass another --out", errno.EDQUOT: "free some space or pass another --out",
              errno.EROFS: "pass a writable --out", errno.EACCES: "pass a folder you can write to",
              errno.EPERM: "pass a folder you can write to",
              errno.EINVAL: "the name or a setting is not valid here (e.g. a character such as : ? * \\ in a file "
                            "name on a FAT, exFAT or SMB drive); pass another name or folder",
              errno.ENAMETOOLONG: "pass a shorter name or folder"}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        from . import owned
        owned.command_name = f"sceneprobe {args.command}"
        owned.set_adopted(_adopt_targets(args))
        if getattr(args, "preset", None) is not None:
            _config(args, _seeded(args, "world"))  # preset, --config and --seed checked before any folder is touched
        if getattr(args, "no_progress", False):
            _quiet_libraries()
        with _owned(args):
            result = args.fn(args)
        if result is not None:
            # one write of the whole line: under `accelerate launch` (unbuffered) every process prints its result,
            # and print's separate writes of the text and the newline interleaved ("…/ldm…/ldm" on one line)
            sys.stdout.write(f"{result}\n")
        sys.stdout.flush()                        # a closed pipe is found here, not in the exit's flush
    except SceneprobeError as e:
        _end_bars()
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except BrokenPipeError:                       # `sceneprobe check-data … | head -c 1`: the reader left
        return _reader_gone()
    except OSError as e:
        if e.errno not in _OS_ADVICE:
            raise
        _end_bars()
        verb = "cannot use" if e.errno in (errno.EINVAL, errno.ENAMETOOLONG) else "cannot write"
        print(f"error: {verb} {e.filename or 'a file'}: {e.strerror}; {_OS_ADVICE[e.errno]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        from . import owned
        owned.set_adopted([])                                          # --adopt holds for this command only
    return 0


def _quiet_libraries() -> None:
    """--no-progress holds for diffusers' and transformers' own bars too (loading pipelines, writing shards)."""
    import diffusers.utils.logging as dl
    import transformers.utils.logging as tl
    dl.disable_progress_bar()
    tl.disable_progress_bar()


def _end_bars() -> None:
    """Close the progress bars an error cut short, so the ``error:`` line starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        try:
            bar.close()
        except Exception:      # a bar on a closed stream: nothing to tidy
            pass


def _reader_gone() -> int:
    """What Unix tools do when the reader of their output exits (``| head``): stop, say nothing, and end with the
    status of a SIGPIPE death (128 + 13); stdout goes to /dev/null so the exit's flush does not complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, AttributeError, ValueError):      # no real stdout (tests, embedding): nothing to redirect
        pass
    return 141


if __name__ == "__main__":
    sys.exit(main())
