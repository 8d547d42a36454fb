"""``run_interventions``: probe-guided edits during generation, scored by the labeller against counterfactuals.

For each edit k (k = 0 … n_edits − 1) of a task, on a test-split sample of the generate protocol (same sample id,
seed, DDIM steps as the capture), four outputs are generated from the same x_T:

* ``unedited`` — the plain sample (it reproduces the captured image; the max difference is recorded);
* ``probe`` — at the planned (site, step)s the site's output is replaced by the activation optimised through the
  ``ldm`` probe of that (site, step) toward the counterfactual label (:mod:`.editor`);
* ``random`` — the same (site, step)s get a random direction with the probe edit's ‖Δa‖ (per site, step, sample);
* ``permuted_probe`` — the probe edit through the probe fitted on the permuted-weights control
  (``probes/generate/permuted``), applied to the real U-Net.

* ``permuted_probe`` is *norm-matched*: its optimised change is rescaled to the probe edit's ‖Δa‖ per (site, step,
  sample), so it differs from the real edit in direction only (``raw_delta_norm`` keeps its own size).

The labeller labels every output. Saliency: Dice / IoU of the output's mask with the counterfactual (moved) mask and
with the original mask (the unedited output's); depth: Spearman ρ of the output's depth with the counterfactual and the
original depth maps. ``gain`` scores the edit (:mod:`.verdicts`): Dice(moved) − Dice(original) for saliency,
ρ(counterfactual) − ρ(original) for depth; the verdict compares the probe edit's gain with the strongest control's
(paired bootstrap over edits, ``report.min_edit``). ``psnr_bg``: PSNR (dB, uint8) of the output vs the unedited
output outside the union of the original and counterfactual masks (saliency), over the whole image (depth: the whole
layout is meant to change).

Site kinds (``intervene.site_kinds``): ``attn`` edits the attention output before the residual (``to_out[0]``, the
paper's), ``block`` the residual stream (the ``Attention`` module's output, residual included). Each kind is edited
through probes fitted on *that* reading: the capture's own kind uses the run's probes; another kind gets a small
capture of the edited U-Net sites at the edited steps and its own probes (same sweep, same labels) under
``run/interventions/probes_<kind>/`` (:func:`prepare_kind`).

Plan (the paper's defaults): saliency edits at the decoder-side sites (``unet.up*``) at the first
``round(steps · saliency_step_fraction)`` steps; depth edits at every U-Net site at the first ``depth_steps`` steps.
Eligible samples for saliency are test samples whose labelled object covers 1–60 % of the image (all test samples if
none does; noted in the summary). Outputs: ``run/interventions/results.csv`` (one row per output, ``site_kind``
first), ``summary.json`` (every statistic), ``results.json`` (the verdicts, for the report's paper-comparison table;
keys below), ``images_<kind>.safetensors``, ``run/report/extra/interventions.md`` and
``run/report/figures/interventions.png``.

``results.json``::

    {"protocol": "generate", "rule": str, "min_effect": float, "n_boot": int, "ci_level": float,
     "headline_kind": "attn" (the paper's site when edited, else the first kind),
     "claims": {task: {"answer": "yes"|"no"|"inconclusive", "sentence": str, "site_kind": str}},   # headline kind
     "kinds": {kind: {task: {"answer", "sentence", "beats_controls", "moved", "strongest_control", "metric",
                             "definition", "n_edits", "sites", "steps",
                             "gain": {condition: {"mean", "lo", "hi", "n"}},
                             "probe_minus": {control: {"mean", "lo", "hi", "n"}},
                             "norms": {condition: mean ‖Δa‖}}}}}
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..config import Config, to_dict
from ..errors import fail
from ..labeller.readout import depth_target
from .editor import TASKS, Editor, ProbeEdit, RandomEdit, depth_norm, load_probe_head
from .targets import TASK_CODE, Transform, counterfactual_depth, counterfactual_mask, draw_transform
from .verdicts import RULE, edit_verdict, gain

PROTOCOL = "generate"
CONDITIONS = ("unedited", "probe", "random", "permuted_probe")
COLUMNS = ("site_kind", "task", "edit", "sample_id", "condition", "transform", "n_edits_applied", "delta_norm",
           "raw_delta_norm", "probe_loss_before", "probe_loss_after", "dice_cf", "dice_orig", "iou_cf", "iou_orig",
           "spearman_cf", "spearman_orig", "gain", "psnr_bg")
MASK_RANGE = (0.01, 0.60)        # saliency edits need an object to move: labelled mask area as a fraction of the image
PSNR_CAP = 100.0                 # identical pixels: report 100 dB rather than ∞
N_EXAMPLES = 4                   # edits per task shown in the figure


# ---------------------------------------------------------------------------------------------------------- context
@dataclass
class Context:
    """What every edit needs from the run folder (checked once, one-line errors)."""
    run: Path
    ldm: object
    labeller: object
    manifest: dict
    labels: dict                                   # labels.safetensors of the generate protocol (depth, saliency, ...)
    images: np.ndarray | None                      # captured samples (N, H, W, 3) uint8, for the regeneration check
    permuted: bool                                 # probes of the permuted control exist
    notes: list[str] = field(default_factory=list)
    source: Path | None = None                     # folder with captures/ and probes/ (default: run)

    @property
    def probes(self) -> Path:
        return self.source or self.run

    @property
    def kind(self) -> str:
        return self.manifest.get("site_kind", "attn")

    @property
    def steps(self) -> int:
        return len(self.manifest["steps"])

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.labels["saliency"].shape[1:3])

    @property
    def unet_sites(self) -> list[str]:
        return [s for s in self.manifest.get("site_order", list(self.manifest["sites"])) if s.startswith("unet.")]


def probe_file(run: Path, model: str, site: str, step: int) -> Path:
    from ..probe.sweep import probe_path
    return probe_path(run, PROTOCOL, model, site, step)


def load_context(run: Path, source: Path | None = None) -> Context:
    """The run's model, labeller and generate-protocol capture; ``source`` (default ``run``) is the folder whose
    ``captures/generate`` and ``probes/generate`` are used (another site kind's, :func:`prepare_kind`)."""
    from safetensors.numpy import load_file

    from ..capture.store import CaptureStore, load_labels
    from ..labeller import load_labeller
    from ..models.io import load_ldm, model_hash
    run = Path(run)
    src = Path(source) if source is not None else run
    proot = src / "probes" / PROTOCOL / "ldm"
    if not proot.is_dir() or not any(proot.glob("*/step_*.safetensors")):
        raise fail(f"no probes in {proot}; run `sceneprobe capture --run {run} --protocol generate`, label the images "
                   f"and `sceneprobe probe --run {run}` first")
    store = CaptureStore(src / "captures" / PROTOCOL / "ldm")
    labels = load_labels(src / "captures" / PROTOCOL)
    if len(labels["saliency"]) != store.n:
        raise fail(f"labels in {run / 'captures' / PROTOCOL} have {len(labels['saliency'])} rows but the capture has "
                   f"{store.n}; relabel the generated images")
    lab_dir = run / "labeller"
    if not (lab_dir / "config.json").is_file():
        raise fail(f"labeller folder {lab_dir} is missing; interventions label their outputs with the run's labeller "
                   f"(`sceneprobe run` puts it there)")
    m = store.manifest
    model_root = run if (run / "unet").is_dir() else (Path(m["model_root"]) if m.get("model_root") else None)
    if model_root is None:
        raise fail(f"no model in {run} (vae/, unet/, scheduler/) and the capture manifest names none")
    ldm = load_ldm(model_root)
    if m.get("model_hash") and model_hash(ldm.unet) != m["model_hash"]:
        raise fail(f"the U-Net in {model_root} is not the one captured in {store.root} (hash differs); recapture and "
                   f"refit the probes, or point the run at the captured model")
    if m.get("sampler", "ddim") != "ddim" or float(m.get("eta", 0.0)) != 0.0:
        raise fail(f"capture {store.root} used sampler {m.get('sampler')} η={m.get('eta')}; interventions replay DDIM η=0")
    samples = src / "captures" / PROTOCOL / "samples.safetensors"
    images = load_file(str(samples))["images"] if samples.is_file() else None
    permuted = (src / "probes" / PROTOCOL / "permuted").is_dir()
    ctx = Context(run, ldm, load_labeller(lab_dir), m, labels, images, permuted, source=source)
    if not permuted:
        ctx.notes.append("no probes of the permuted control (probes/generate/permuted): that control was skipped; "
                         "capture with --control permuted and rerun `sceneprobe probe`")
    return ctx


def plan(ctx: Context, task: str, cfg) -> tuple[list[str], list[int]]:
    """(sites, steps) edited for ``task`` (the paper's defaults)."""
    if task == "saliency":
        sites = [s for s in ctx.unet_sites if s.startswith("unet.up")]
        n = max(1, min(ctx.steps, round(ctx.steps * cfg.saliency_step_fraction)))
    else:
        sites, n = ctx.unet_sites, min(ctx.steps, cfg.depth_steps)
    if not sites:
        raise fail(f"the capture has no {'decoder-side (unet.up*) ' if task == 'saliency' else ''}U-Net sites to edit")
    return sites, list(range(n))


def check_config(cfg) -> None:
    if cfg.n_edits < 1 or cfg.iters < 0 or cfg.lr <= 0 or cfg.depth_steps < 1 \
            or not 0 < cfg.saliency_step_fraction <= 1:
        raise fail(f"config intervene: need n_edits ≥ 1, iters ≥ 0, lr > 0, depth_steps ≥ 1 and "
                   f"0 < saliency_step_fraction ≤ 1, got {to_dict(cfg)}")


# ------------------------------------------------------------------------------------------------------ generation
@torch.no_grad()
def generate_edited(ctx: Context, rows: list[int], editor: Editor | None) -> np.ndarray:
    """Replay the capture's sampling of store rows ``rows`` (same ids, seed, DDIM steps), with ``editor``'s hooks."""
    from ..models.build import sampling_scheduler
    from ..sample import decode, denoise, initial_noise, to_uint8
    m, unet, vae = ctx.manifest, ctx.ldm.unet, ctx.ldm.vae
    ids = [int(m["sample_ids"][r]) for r in rows]
    c, s = unet.config.in_channels, unet.config.sample_size
    dev = next(unet.parameters()).device
    sched = sampling_scheduler(ctx.ldm.scheduler_config, "ddim")
    z = initial_noise(ids, int(m["seed"]), (c, s, s)).to(dev)                     # (B, c, s, s)

    def fn(x, t):
        return unet(x, t).sample
    if editor is None:
        x = denoise(fn, sched, z, ids, int(m["seed"]), ctx.steps, 0.0)
    else:
        with editor:
            x = denoise(fn, sched, z, ids, int(m["seed"]), ctx.steps, 0.0)
    return to_uint8(decode(vae, x))


def psnr(a: np.ndarray, b: np.ndarray, keep: np.ndarray) -> float:
    """PSNR (dB) of uint8 images (H, W, 3) over the pixels where ``keep`` (H, W); NaN if none, capped at PSNR_CAP."""
    if not keep.any():
        return float("nan")
    d = a[keep].astype(np.float64) - b[keep].astype(np.float64)
    mse = float((d * d).mean())
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(255.0 ** 2 / mse))


def _mean_over(d: dict, keys, b: int) -> float:
    vals = [float(d[k][b]) for k in keys if k in d]
    return float(np.mean(vals)) if vals else float("nan")


# ------------------------------------------------------------------------------------------------------------- task
@dataclass
class TaskResult:
    task: str
    sites: list[str]
    steps: list[int]
    rows: list[dict]
    examples: dict                                   # arrays for the figure (first N_EXAMPLES edits)
    arrays: dict                                     # every output, for images.safetensors
    eligible: int
    regen_max_diff: float | None
    notes: list[str]
    kind: str = "attn"


def run_task(ctx: Context, task: str, cfg, batch_size: int, progress: bool = True) -> TaskResult:
    from ..labeller import label_images
    from ..probe.metrics import dice, iou, spearman
    sites, steps = plan(ctx, task, cfg)
    keys = [(s, t) for t in steps for s in sites]
    pool, size = int(ctx.manifest.get("pool", 1)), ctx.size
    heads = {k: load_probe_head(probe_file(ctx.probes, "ldm", *k), task, pool, size) for k in keys}
    perm = None
    if ctx.permuted:
        missing = [k for k in keys if not probe_file(ctx.probes, "permuted", *k).is_file()]
        if missing:
            raise fail(f"probe file {probe_file(ctx.probes, 'permuted', *missing[0])} is missing; rerun "
                       f"`sceneprobe probe --run {ctx.probes}`")
        perm = {k: load_probe_head(probe_file(ctx.probes, "permuted", *k), task, pool, size) for k in keys}
    mean, std = depth_norm(probe_file(ctx.probes, "ldm", *keys[0]))
    target_kind = probe_depth_target(probe_file(ctx.probes, "ldm", *keys[0]))
    notes: list[str] = []
    split = np.asarray(ctx.manifest["split"])
    test = np.flatnonzero(split == 2)
    if len(test) == 0:
        raise fail(f"the capture {ctx.probes / 'captures' / PROTOCOL} has no test-split samples to edit")
    eligible = test
    if task == "saliency":
        frac = ctx.labels["saliency"][test].reshape(len(test), -1).mean(1)
        eligible = test[(frac >= MASK_RANGE[0]) & (frac <= MASK_RANGE[1])]
        if len(eligible) == 0:
            eligible = test
            notes.append(f"no test sample has a labelled object covering {MASK_RANGE[0]:.0%}–{MASK_RANGE[1]:.0%} of "
                         f"the image; saliency edits use every test sample")
    edits = [(k, int(eligible[k % len(eligible)]), draw_transform(cfg.seed, task, k, size, cfg.shift_min,
                                                                  cfg.shift_max)) for k in range(cfg.n_edits)]
    site_index = {s: i for i, s in enumerate(ctx.unet_sites)}
    kind = ctx.kind
    rows_out, examples, regen = [], {}, []
    arrays: dict[str, list[np.ndarray]] = {c: [] for c in ("target", *CONDITIONS)}
    for start in tqdm(range(0, len(edits), batch_size), desc=f"interventions {task}", unit="batch",
                      disable=not progress, dynamic_ncols=True):
        batch = edits[start:start + batch_size]
        rows = [r for _, r, _ in batch]
        orig = generate_edited(ctx, rows, None)
        if ctx.images is not None:
            regen.append(int(np.abs(orig.astype(np.int16) - ctx.images[rows].astype(np.int16)).max()))
        lab0 = label_images(ctx.labeller, orig)
        if task == "saliency":
            cf = np.stack([counterfactual_mask(lab0["saliency"][i], t) for i, (_, _, t) in enumerate(batch)])
            target = torch.from_numpy(cf.astype(np.float32))                    # (B, H, W) {0, 1}
        else:
            cf = np.stack([counterfactual_depth(lab0["depth"][i], t) for i, (_, _, t) in enumerate(batch)])
            target = torch.from_numpy((depth_target(cf, target_kind) - mean) / std).float()   # as the probe predicts
        outs = {"unedited": (orig, {}, {}, {})}
        raw: dict[str, dict] = {}
        pe = ProbeEdit(heads, target, cfg.lr, cfg.iters)
        outs["probe"] = (_run(ctx, rows, sites, pe, kind, keys), pe.norms, pe.before, pe.after)
        re = RandomEdit(pe.norms, [(cfg.seed, TASK_CODE[task], k) for k, _, _ in batch], site_index, heads, target)
        outs["random"] = (_run(ctx, rows, sites, re, kind, keys), re.applied_norms, re.before, re.after)
        if perm is not None:
            pp = ProbeEdit(perm, target, cfg.lr, cfg.iters, match_norms=pe.norms)   # norm-matched: direction only
            outs["permuted_probe"] = (_run(ctx, rows, sites, pp, kind, keys), pp.norms, pp.before, pp.after)
            raw["permuted_probe"] = pp.raw_norms
        raw["probe"], raw["random"] = pe.raw_norms, re.applied_norms
        conds = list(outs)
        lab = label_images(ctx.labeller, np.concatenate([outs[c][0] for c in conds]))
        B = len(batch)
        for j, c in enumerate(conds):
            img, norms, before, after = outs[c]
            sal, dep = lab["saliency"][j * B:(j + 1) * B], lab["depth"][j * B:(j + 1) * B]
            for i, (k, r, t) in enumerate(batch):
                row = {"site_kind": kind, "task": task, "edit": k, "sample_id": int(ctx.manifest["sample_ids"][r]),
                       "condition": c, "transform": str(t), "n_edits_applied": len(norms) if c != "unedited" else 0,
                       "delta_norm": _mean_over(norms, keys, i) if c != "unedited" else 0.0,
                       "raw_delta_norm": _mean_over(raw[c], keys, i) if c != "unedited" else 0.0,
                       "probe_loss_before": _mean_over(before, keys, i), "probe_loss_after": _mean_over(after, keys, i)}
                if task == "saliency":
                    m0, m1 = lab0["saliency"][i:i + 1], cf[i:i + 1]
                    row.update(dice_cf=dice(sal[i:i + 1], m1)[0], dice_orig=dice(sal[i:i + 1], m0)[0],
                               iou_cf=iou(sal[i:i + 1], m1)[0], iou_orig=iou(sal[i:i + 1], m0)[0])
                    keep = ~((m0[0] > 0) | (m1[0] > 0))
                else:
                    row.update(spearman_cf=spearman(dep[i:i + 1], cf[i:i + 1])[0],
                               spearman_orig=spearman(dep[i:i + 1], lab0["depth"][i:i + 1])[0])
                    keep = np.ones(orig.shape[1:3], bool)
                row["gain"] = gain(row, task)
                row["psnr_bg"] = psnr(img[i], orig[i], keep) if c != "unedited" else float("nan")
                rows_out.append(row)
            arrays[c].append(img)
            if c == "probe":
                examples.setdefault("edited", []).append(img)
                examples.setdefault("edited_label", []).append(sal if task == "saliency" else dep)
        arrays["target"].append(cf.astype(np.float32))
        examples.setdefault("original", []).append(orig)
        examples.setdefault("target", []).append(cf)
    rows_out.sort(key=lambda r: (r["edit"], CONDITIONS.index(r["condition"])))   # one block of conditions per edit
    examples = {k: np.concatenate(v)[:N_EXAMPLES] for k, v in examples.items()}
    examples["transforms"] = [str(t) for _, _, t in edits[:N_EXAMPLES]]
    arrays = {c: np.concatenate(v) for c, v in arrays.items() if v}
    return TaskResult(task, sites, steps, rows_out, examples, arrays, int(len(eligible)),
                      max(regen) if regen else None, notes, kind)


def _run(ctx: Context, rows: list[int], sites: list[str], edit, kind: str, keys) -> np.ndarray:
    ed = Editor(ctx.ldm.unet, sites, edit, kind)
    images = generate_edited(ctx, rows, ed)
    missed = sorted(set(keys) - set(ed.applied))
    if missed:                                                                  # a bug, not a user mistake
        raise RuntimeError(f"planned edits {missed[:3]} were never applied")
    return images


# ---------------------------------------------------------------------------------------------------------- summary
def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def results_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(COLUMNS)
    for r in rows:
        vals = [r.get(c, float("nan")) for c in COLUMNS]
        wr.writerow([_fmt(float(v)) if isinstance(v, (float, np.floating)) else str(v) for v in vals])
    return buf.getvalue()


METRICS = {"saliency": ("dice_cf", "dice_orig", "iou_cf", "iou_orig", "gain", "psnr_bg", "delta_norm", "raw_delta_norm",
                        "probe_loss_before", "probe_loss_after"),
           "depth": ("spearman_cf", "spearman_orig", "gain", "psnr_bg", "delta_norm", "raw_delta_norm",
                     "probe_loss_before", "probe_loss_after")}
HEADLINE = {"saliency": ("dice_cf", "dice_orig"), "depth": ("spearman_cf", "spearman_orig")}


def _stats(x: np.ndarray) -> dict:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return {"mean": None, "sem": None, "n": 0}
    sem = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None
    return {"mean": round(float(x.mean()), 6), "sem": None if sem is None else round(sem, 6), "n": int(len(x))}


def summarise(res: TaskResult, rc=None) -> dict:
    """Per condition: mean, standard error and count of each metric; paired differences probe − each control; the
    verdict (:func:`.verdicts.edit_verdict` with the report config ``rc``: min_edit, n_boot, boot_seed, ci_level)."""
    from ..config import ReportConfig
    rc = rc or ReportConfig()
    by = {c: [r for r in res.rows if r["condition"] == c] for c in CONDITIONS}
    by = {c: v for c, v in by.items() if v}
    conds = {c: {m: _stats([r[m] for r in v]) for m in METRICS[res.task]} for c, v in by.items()}
    paired, probe = {}, {r["edit"]: r for r in by["probe"]}
    for other in ("unedited", "random", "permuted_probe"):
        if other not in by:
            continue
        metrics = HEADLINE[res.task] + (("psnr_bg",) if other != "unedited" else ())   # unedited has no PSNR
        paired[f"probe - {other}"] = {m: _stats([probe[r["edit"]][m] - r[m] for r in by[other]]) for m in metrics}
    v = edit_verdict(res.rows, res.task, rc.min_edit, rc.n_boot, rc.boot_seed, rc.ci_level)
    return {"site_kind": res.kind, "sites": res.sites, "steps": res.steps, "n_edits": len(by.get("probe", [])),
            "eligible_samples": res.eligible, "regeneration_max_abs_diff": res.regen_max_diff, "conditions": conds,
            "paired": paired, "verdict": v, "notes": res.notes}


def probe_depth_target(path: Path) -> str:
    """What a probe file's depth head predicts: ``depth`` or ``inverse`` (1/depth), from its recorded probe config."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    try:
        return json.loads(meta.get("config", "{}")).get("depth_target", "depth")
    except json.JSONDecodeError:
        return "depth"


def verdicts_json(summary: dict, rc) -> dict:
    """The compact verdict file ``interventions/results.json`` (keys: module docstring)."""
    kinds = {}
    for kind, k in summary["kinds"].items():
        kinds[kind] = {}
        for task, t in k["tasks"].items():
            v = t["verdict"]
            kinds[kind][task] = {**{key: v[key] for key in ("answer", "sentence", "beats_controls", "moved",
                                                            "strongest_control", "metric", "definition", "n_edits",
                                                            "gain", "probe_minus")},
                                 "sites": t["sites"], "steps": t["steps"],
                                 "norms": {c: s["delta_norm"]["mean"] for c, s in t["conditions"].items()}}
    head = "attn" if "attn" in kinds else next(iter(kinds))
    return {"protocol": PROTOCOL, "rule": RULE, "min_effect": rc.min_edit, "n_boot": rc.n_boot,
            "ci_level": rc.ci_level, "headline_kind": head,
            "claims": {task: {"answer": v["answer"], "sentence": v["sentence"], "site_kind": head}
                       for task, v in kinds[head].items()},
            "kinds": kinds}


def run_interventions(cfg: Config, run: Path, task: str = "both", progress: bool = True,
                      log: Callable[[str], None] | None = None) -> Path:
    """Edit, score, and write the results and the report section; returns ``run/report/extra/interventions.md``."""
    from safetensors.numpy import save as np_save

    from .report import write_figure, write_markdown
    if task not in (*TASKS, "both"):
        raise fail(f"option --task must be saliency, depth or both, got {task!r}")
    from .kinds import prepare_kind
    ic, rc = cfg.intervene, cfg.report
    check_config(ic)
    run = Path(run)
    main = load_context(run)
    tasks = TASKS if task == "both" else (task,)
    results, kinds = [], {}
    for kind in dict.fromkeys(getattr(ic, "site_kinds", (main.kind,))):
        if kind == main.kind:
            ctx = main
        else:                       # another reading of the same sites: its own capture of the edited sites and probes
            plans = [plan(main, t, ic) for t in tasks]
            sites = [s for s in main.unet_sites if any(s in p[0] for p in plans)]
            steps = sorted({i for p in plans for i in p[1]})
            ctx = load_context(run, prepare_kind(cfg, run, main, kind, sites, steps, progress))
        done = [run_task(ctx, t, ic, cfg.capture.batch_size, progress) for t in tasks]
        results += done
        kinds[kind] = {"notes": ctx.notes, "tasks": {res.task: summarise(res, rc) for res in done}}
    out = run / "interventions"
    atomic_write_text(out / "results.csv", results_csv([r for res in results for r in res.rows]))
    summary = {"protocol": PROTOCOL, "config": to_dict(ic), "report": to_dict(rc), "rule": RULE,
               "capture_site_kind": main.kind, "steps_total": main.steps, "notes": main.notes, "kinds": kinds}
    atomic_write_json(out / "summary.json", summary)
    atomic_write_json(out / "results.json", verdicts_json(summary, rc))
    for kind in kinds:
        arrays = {f"{res.task}.{k}": np.ascontiguousarray(v) for res in results if res.kind == kind
                  for k, v in res.arrays.items()}
        atomic_write_bytes(out / f"images_{kind}.safetensors", np_save(arrays))
    fig = write_figure(results, run / "report" / "figures" / "interventions.png")
    md = write_markdown(summary, fig, run / "report" / "extra" / "interventions.md")
    if log:
        log(f"[interventions] {out / 'results.csv'}")
    return md


__all__ = ["run_interventions", "load_context", "plan", "run_task", "summarise", "psnr", "CONDITIONS", "COLUMNS",
           "Transform"]
