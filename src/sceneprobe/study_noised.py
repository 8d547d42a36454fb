"""The noised study of a pipeline folder on a user's labelled images (issue 21, part 4):
``sceneprobe run --model PATH --data FOLDER --out RUN``.

1. **data**: the folder as ``check-data`` reads it (``rgb/``, ``depth/<stem>.npy``, ``saliency/<stem>.png``; e.g.
   NYUv2 depth or DUTS masks exported to that layout); both labels are needed; the first ``capture.n_noised`` images
   in name order; their sides must suit the model (a multiple of the VAE factor × patch). Prompts: the empty one,
   or each image's caption from ``captions.csv`` (header ``name,caption``) where the folder has it — then the
   prompt-only baseline is fitted too and ``--controls`` may name ``uncond``.
2. **capture** (:mod:`sceneprobe.capture.noised_pipelines`): the model and each control (``permuted``, ``fresh``)
   into ``RUN/captures/noised/<model>/`` — each image encoded by the model's VAE, forward-diffused by the model's own
   process to every step, the denoiser run once per step on the image's caption (empty without captions.csv);
   exact labels (the folder's) into ``RUN/captures/noised/labels.safetensors``.
3. **probes** and 4. **report** as in every study (the report's ``noised`` protocol: exact labels).

Every stage resumes when the command is rerun (finished stores are skipped, probes are not refit).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .atomic import atomic_write_text
from .config import Config, dump_yaml
from .errors import fail

NOISED_CONTROLS = ("permuted", "fresh", "uncond")      # uncond: with captions only


def load_labelled(folder: Path, n_max: int, skip_bad: bool = False):
    """The first ``n_max`` images (name order) of a labelled folder, with depth and saliency; else one line
    (``skip_bad``: unusable files are left out and counted, as ``--skip-bad`` everywhere)."""
    from .world.dataset import load_dataset
    from .world.scene_data import SceneData
    data = load_dataset(Path(folder), skip_bad=skip_bad)
    missing = [k for k in ("depth", "saliency") if getattr(data, k) is None]
    if missing:
        raise fail(f"--data {folder} has no {' and no '.join(f'{k}/' for k in missing)}; the noised study scores "
                   f"probes against exact labels: add {missing[0]}/<stem>.{'npy' if missing[0] == 'depth' else 'png'} "
                   f"for every image (`sceneprobe check-data {folder}` checks the layout)")
    if len(data) < 4:
        raise fail(f"--data {folder} holds {len(data)} images; probes need train, val and test rows: give at least 4")
    k = min(len(data), int(n_max))
    return SceneData(data.root, data.names[:k], data.rgb[:k], data.depth[:k], data.saliency[:k], data.split[:k])


def run_noised_study(cfg: Config, model: Path, data_folder: Path, out: Path, *, controls: Sequence[str] = ("permuted",),
                     force: bool = False, progress: bool = True, log: Callable[[str], None] = print,
                     option: str = "--model", skip_bad: bool = False) -> Path:
    """Capture (noised), probe and report one pipeline folder on a labelled image folder; returns the report."""
    from .capture.noised_pipelines import (check_size, noised_options, read_captions, run_capture_noised,
                                           size_multiple)
    from .capture.pipelines import capture_functions
    from .capture.run import _state, probe_split
    from .capture.store import save_labels
    bad = [c for c in controls if c not in NOISED_CONTROLS]
    if bad:
        raise fail(f"unknown control {bad[0]!r}; choose from {', '.join(NOISED_CONTROLS)} (or none)")
    cc = cfg.capture
    if cc.store != "full":
        raise fail("the noised study writes a full activation store; set capture.store: full (or drop --store)")
    fns = capture_functions(model, option)                  # an unsupported family is one line
    fns.check(model, option)
    data = load_labelled(data_folder, cc.n_noised, skip_bad)
    captions = read_captions(data_folder, data.names)
    if "uncond" in controls and captions is None:
        raise fail(f"the uncond reading needs prompts: --data {data_folder} has no captions.csv (columns name,caption)"
                   f", so every image is read on the empty prompt; drop uncond from --controls")
    from .models.families import FAMILIES
    family = FAMILIES[fns.family]
    check_size(size_multiple(model, family), data.rgb.shape[1:3], data.root, family.title)   # before any weights
    out = Path(out)
    state = _state()
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", dump_yaml(cfg))
    pipe = fns.load(model, state.device, cc.variant or None)
    opts = noised_options(cc, fns.family, captions is not None)
    proot = out / "captures" / "noised"
    if captions is not None and state.is_main_process:          # the prompt-only baseline's inputs
        from .probe.prompt_only import pooled_text_embeddings, save_embeddings
        proot.mkdir(parents=True, exist_ok=True)
        save_embeddings(proot, *pooled_text_embeddings(pipe, fns.family, captions, state.device))
    for control in (None, *controls):
        log(f"[capture noised/{control or 'ldm'}] ({fns.family}, {len(data)} images of {data.root}) ...")
        run_capture_noised(pipe, model, data, proot / (control or "ldm"), opts, seed=cc.seed,
                           batch_size=cc.batch_size, control=control, control_seed=cc.control_seed, force=force,
                           progress=progress, captions=captions)
    del pipe
    if not state.is_main_process:
        return out / "report" / "report.html"
    ids = np.arange(len(data), dtype=np.int64)
    save_labels(proot, data.depth, data.saliency.astype(np.uint8), probe_split(ids.tolist()), sample_ids=ids)
    from .probe.sweep import run_probes
    log("[probes] ...")
    results = run_probes(out, cfg.probe, progress=progress)
    from .report import write_report
    atomic_write_text(out / "report" / "extra" / "labels.md", labels_markdown(data, fns.family))
    log(f"[report] {results}")
    return write_report(out)


def labels_markdown(data, family: str) -> str:
    from .models.families import FAMILIES
    return ("# Labels\n\nThe labels are **exact**: the depth and saliency files of the image folder "
            f"`{data.root}` ({len(data)} images), as given; the probes read the activations of each image "
            f"forward-diffused to every step by the {FAMILIES[family].title} model's own process.\n\n"
            f"Images: {json.dumps(data.names[:5])}{' …' if len(data) > 5 else ''}\n")
