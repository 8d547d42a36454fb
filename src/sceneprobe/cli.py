"""Command line: the parser (one subcommand per stage; each calls one function of :mod:`.commands`) and ``main``,
which prints what the command wrote (last line) and owns the folder it writes (:mod:`.owned`).

A user mistake (:class:`SceneprobeError`) is printed as one line ``error: …`` with exit status 2, no traceback.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from .commands import (_config, _seeded, _train_dir, cmd_capture, cmd_check_data, cmd_export, cmd_intervene,
                       cmd_label, cmd_latent_stats, cmd_probe, cmd_report, cmd_run, cmd_sample, cmd_scenes, cmd_sites,
                       cmd_train_labeller, cmd_train_ldm, cmd_train_vae, cmd_tune_decoder)
from .errors import SceneprobeError, fail
from .owned import ADOPT

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub, ever: everything is local


def _common(p: argparse.ArgumentParser, out: bool = True, out_help: str = "output folder") -> None:
    p.add_argument("--preset", default="cpu", help="preset: tiny, cpu or gpu")
    p.add_argument("--config", default=None, help="YAML file overriding the preset (unknown keys are errors)")
    p.add_argument("--seed", type=int, default=None, help="seed; None keeps the config's")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    if out:
        p.add_argument("--out", required=True, help=out_help)


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
    s.add_argument("--workers", type=int, default=None, help="render processes, 0 = every core (default: world.workers, 0)")
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
