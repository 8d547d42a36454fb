"""Each subcommand's function: its arguments → one library call → the path it wrote (``cli.main`` prints it).

The config of a command comes from its preset, ``--config`` and its own options (``_config``: an option that sets a
config key is named like the key, ``OPTION_OF`` lists the exceptions); the pipeline-folder study (``run --model
PATH``) and the noised study on a user's labelled images are dispatched from ``cmd_run``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import fail

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
