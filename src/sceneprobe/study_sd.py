"""The study of a text-to-image pipeline folder (``sceneprobe run --model PATH --prompts CSV --out RUN``; ``--sd`` is
the old name): capture → labels → probes → report, for SD 1.x/2.x, SDXL, PixArt-α/Σ, SD3/3.5 and FLUX.1.

Like ``study.py`` this knows every stage; each stage is one library call and the whole command resumes when rerun.

1. **capture** (:mod:`sceneprobe.capture.sd`): the model and each control (``permuted`` by default: every U-Net weight
   tensor permuted element-wise, same prompts and seeds) into ``RUN/captures/sd/<model>/``. Under
   ``accelerate launch`` the prompts are dealt out to the processes; the later stages run on the main process.
   Beside them, ``prompt_embeddings.safetensors``: each prompt's pooled text embedding by the model's own text
   encoders, the input of the prompt-only baseline (:mod:`sceneprobe.probe.prompt_only`).
2. **labels**: the model's images (``RUN/captures/sd/samples.safetensors``) are labelled by the project's labeller
   (``--labeller``, default the shipped one) and, with ``--depth-model``, depth from a local transformers DPT folder
   (relative inverse depth, the paper's MiDaS role) → ``RUN/captures/sd/labels.safetensors`` and ``labels.json``.
   Every model's probes are scored against these labels (the control's own images are never labelled).
3. **probes** and 4. **report** as in the default study; the report states where the labels come from
   (``report/extra/labels.md``).

``capture.store: streamed`` replaces steps 1 and 3 by the low-storage mode of :mod:`sceneprobe.probe.streamed`
(no activation store; labels are made batch by batch during sampling).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

from .atomic import atomic_write_text
from .config import Config, dump_yaml
from .errors import fail

SD_CONTROLS = ("permuted", "fresh", "uncond")   # uncond: the unconditional CFG half (capture/pipelines.py)


def make_labeller(labeller: Path | None = None, depth_model: Path | None = None):
    """The labeller of the study: a trained Labeller (default: the shipped one), with depth from ``depth_model``."""
    from .labeller import DepthModelLabeller, load_labeller, shipped_labeller_path
    path = Path(labeller) if labeller else shipped_labeller_path("cpu")
    if not path.is_dir():
        raise fail(f"labeller {path} does not exist; pass --labeller (a folder from `sceneprobe train-labeller`)")
    lab = load_labeller(path)
    return DepthModelLabeller(Path(depth_model), saliency_labeller=lab) if depth_model else lab


DENOISER_WORDS = {"sd": "", "sdxl": "", "pixart": "PixArt transformer (sites `dit.block{L}.attn`)",
                  "sd3": "SD3 MMDiT (sites `mmdit.block{L}.attn.img`, `mmdit.block{L}.attn2`)",
                  "flux": "FLUX transformer (sites `flux.double{L}.attn.img`, `flux.single{L}.attn`)"}


PROMPT_ONLY = ("\n**The prompt as a control**: the baselines include `prompt@{h}x{w}`, a probe of each prompt's pooled "
               "text embedding (by the model's own text encoders) over the layout prior, fitted, tuned and scored on "
               "the same splits (`probe/prompt_only.py`). When it is the strongest baseline, a verdict \"beats the "
               "strongest baseline\" is a verdict over what the prompt alone says.\n")


def labels_markdown(labels_json: Path, family: str = "sd") -> str:
    """The report section that says where the labels come from (and, for a transformer, what "U-Net" names)."""
    info = json.loads(Path(labels_json).read_text())
    from .models.families import FAMILIES
    fam = FAMILIES[family]
    den = DENOISER_WORDS.get(family, "")
    model = (f"\n**Model**: a {fam.title} pipeline ({fam.denoiser} `{fam.denoiser_class}`)."
             + (f" Its denoiser is the {den}: where this report says **U-Net** it means that transformer."
                if den else "") + "\n")
    depth = ("relative inverse depth from the DPT depth model " f"`{info.get('depth_labeller')}`"
             if info.get("depth_kind") == "inverse_depth" else
             f"camera-space depth from the project's labeller `{info.get('depth_labeller')}`")
    return ("# Labels\n\nLabels of the model's images are **not exact**: they are another network's output, as in the "
            "paper (which used MiDaS and TRACER).\n\n"
            f"* depth: {depth};\n"
            f"* saliency: the project's labeller `{info.get('saliency_labeller')}` (trained on rendered scenes with "
            "exact labels; on real images it is an approximation);\n"
            f"* {info.get('n')} images, labelled once from the model's own images; the controls are scored against "
            "the same labels.\n" + model + PROMPT_ONLY)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def run_sd_study(cfg: Config, model: Path, prompts: Path, out: Path, *, labeller: Path | None = None,
                 depth_model: Path | None = None, controls: Sequence[str] = ("permuted",), force: bool = False,
                 progress: bool = True, log: Callable[[str], None] = print, option: str = "--sd") -> Path:
    """Capture, label, probe and report one pipeline folder of any supported family (SD 1.x/2.x, SDXL, PixArt,
    SD3, FLUX: ``capture.pipelines.capture_functions``); returns ``RUN/report/report.html``."""
    from .capture.pipelines import capture_functions
    from .capture.store_fill import _state
    from .capture.sd import read_prompts, sd_options
    from .study import Stages
    bad = [c for c in controls if c not in SD_CONTROLS]
    if bad:
        raise fail(f"unknown control {bad[0]!r}; choose from {', '.join(SD_CONTROLS)} (or none)")
    read_prompts(prompts)                                             # the cheap inputs first: before any model loads
    fns = capture_functions(model, option)                            # (and before the run folder is written):
    fns.check(model, option)                                          # an unsupported family is one line
    out = Path(out)
    cc = cfg.capture
    state = _state()
    lab = make_labeller(labeller, depth_model)                        # fail early, before hours of sampling
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", dump_yaml(cfg))
    proot = out / "captures" / "sd"
    opts = sd_options(cc)
    pipe = fns.load(model, state.device, opts["variant"])
    if state.is_main_process:                                         # the prompt-only baseline's inputs
        from .probe.prompt_only import pooled_text_embeddings, save_embeddings
        proot.mkdir(parents=True, exist_ok=True)
        save_embeddings(proot, *pooled_text_embeddings(pipe, fns.family, read_prompts(prompts)[0], state.device))
    if cc.store == "streamed":
        from .probe.streamed_sd import run_streamed_sd
        results = run_streamed_sd(cfg, model, prompts, out, lab, controls=controls, force=force, progress=progress,
                                  log=log, pipe=pipe)
    else:
        for control in (None, *controls):
            log(f"[capture sd/{control or 'ldm'}] ({fns.family}) ...")
            fns.run_capture(model, prompts, proot / (control or "ldm"), **opts, batch_size=cc.batch_size,
                            control=control, control_seed=cc.control_seed, force=force, progress=progress, pipe=pipe)
        del pipe
        if not state.is_main_process:
            return out / "report" / "report.html"
        st = Stages(out, log)
        samples = proot / "samples.safetensors"
        lab_id = {"labeller": str(getattr(getattr(lab, "saliency_labeller", lab), "path", "")),
                  "depth": str(getattr(lab, "path", "")), "samples": _digest(samples)}

        def label() -> None:
            from .labeller import label_samples
            label_samples(lab, samples, force=True)
        st.run("labels", json.dumps(lab_id, sort_keys=True), [proot / "labels.safetensors", proot / "labels.json"],
               label)
        from .probe.sweep import run_probes
        log("[probes] ...")
        results = run_probes(out, cfg.probe, progress=progress)          # probe.workers: every core by default
    if not state.is_main_process:
        return out / "report" / "report.html"
    from .report import write_report
    atomic_write_text(out / "report" / "extra" / "labels.md", labels_markdown(proot / "labels.json", fns.family))
    log(f"[report] {results}")
    return write_report(out)
