"""One task's edits (:func:`run_task`): the eligible samples and their counterfactual targets, the edit directions
of each arm, the dose runs, and one scored row per output (columns: :data:`sceneprobe.intervene.results.COLUMNS`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import fail
from ..labeller.readout import depth_target
from .context import PROTOCOL, Context, plan, probe_depth_target, probe_file
from .editor import DirectionRecorder, DoseEdit, Editor, depth_norm, load_probe_head, random_direction
from .replay import generate_edited
from .scores import headroom, pixel_change, psnr
from .targets import TASK_CODE, counterfactual_depth, counterfactual_mask, draw_transform
from .verdicts import ARMS, gain

CONDITIONS = ("unedited", *ARMS)                  # unedited, probe, random, permuted_probe
MASK_RANGE = (0.01, 0.60)        # saliency edits need an object to move: labelled mask area as a fraction of the image
N_EXAMPLES = 4                   # edits per task shown in the figure


def _mean_over(d: dict, keys, b: int) -> float:
    vals = [float(d[k][b]) for k in keys if k in d]
    return float(np.mean(vals)) if vals else float("nan")


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
    doses: list[float] = field(default_factory=list)
    natural: dict = field(default_factory=dict)      # arm → {"ratio", "loss_before", "loss_after"}: per-edit lists


def _dose_key(d: float) -> str:
    return f"{d:g}"


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
    doses = sorted(dict.fromkeys(float(d) for d in cfg.doses))
    arms = [a for a in ARMS if a != "permuted_probe" or perm is not None]
    site_index = {s: i for i, s in enumerate(ctx.unet_sites)}
    kind = ctx.kind
    rows_out, examples, regen = [], {}, []
    natural = {a: {"ratio": [], "loss_before": [], "loss_after": []} for a in arms if a != "random"}
    arrays: dict[str, list[np.ndarray]] = {"target": [], "unedited": []}
    for start in tqdm(range(0, len(edits), batch_size), desc=f"interventions {task} ({kind})", unit="batch",
                      disable=not progress, dynamic_ncols=True):
        batch = edits[start:start + batch_size]
        rows = [r for _, r, _ in batch]
        B = len(batch)
        orig = generate_edited(ctx, rows, None)
        if ctx.images is not None:
            regen.append(int(np.abs(orig.astype(np.int16) - ctx.images[rows].astype(np.int16)).max()))
        lab0 = label_images(ctx.labeller, orig)
        if task == "saliency":
            cf = np.stack([counterfactual_mask(lab0["saliency"][i], t) for i, (_, _, t) in enumerate(batch)])
            target = torch.from_numpy(cf.astype(np.float32))                    # (B, H, W) {0, 1}
            orig_label = lab0["saliency"]
        else:
            cf = np.stack([counterfactual_depth(lab0["depth"][i], t) for i, (_, _, t) in enumerate(batch)])
            target = torch.from_numpy((depth_target(cf, target_kind) - mean) / std).float()   # as the probe predicts
            orig_label = lab0["depth"]
        # the directions: optimised once per edit at the unedited activations, the replay stopped after the last step
        rec = DirectionRecorder({"probe": heads, **({"permuted_probe": perm} if perm is not None else {})}, target,
                                cfg.lr, cfg.iters)
        generate_edited(ctx, rows, Editor(ctx.ldm.unet, sites, rec, kind), stop_after=max(steps))
        if set(rec.seen) != set(keys):                                          # a bug, not a user mistake
            raise RuntimeError(f"planned edits {sorted(set(keys) - set(rec.seen))[:3]} were never reached")
        for a in natural:
            natural[a]["ratio"] += [_mean_over(rec.natural[a], keys, i) for i in range(B)]
            natural[a]["loss_before"] += [_mean_over(rec.before[a], keys, i) for i in range(B)]
            natural[a]["loss_after"] += [_mean_over(rec.after[a], keys, i) for i in range(B)]

        def direction(arm: str, i: int):
            if arm == "random":
                k = batch[i][0]
                return lambda key, shape: random_direction(shape, (cfg.seed, TASK_CODE[task], k, site_index[key[0]],
                                                                   key[1]))
            return lambda key, shape: rec.dirs[arm][key][i]

        # the dose runs: every (dose, arm, edit) of the batch, in chunks of batch_size rows
        jobs = [(d, a, i) for d in doses for a in arms for i in range(B)]
        outs: dict[tuple[float, str], dict] = {(d, a): {"img": [None] * B, "info": [None] * B} for d in doses for a in arms}
        for c0 in range(0, len(jobs), batch_size):
            chunk = jobs[c0:c0 + batch_size]
            de = DoseEdit(keys, [d for d, _, _ in chunk], [direction(a, i) for _, a, i in chunk], heads,
                          target[[i for _, _, i in chunk]])
            imgs = _run(ctx, [rows[i] for _, _, i in chunk], sites, de, kind, keys)
            for j, (d, a, i) in enumerate(chunk):
                outs[(d, a)]["img"][i] = imgs[j]
                outs[(d, a)]["info"][i] = {
                    "delta_ratio": _mean_over(de.ratios, keys, j),
                    "delta_norm": float(np.mean([float(de.ratios[k][j] * de.act_norms[k][j]) for k in keys])),
                    "act_norm": _mean_over(de.act_norms, keys, j),
                    "probe_loss_before": _mean_over(de.before, keys, j),
                    "probe_loss_after": _mean_over(de.after, keys, j),
                    "natural_ratio": _mean_over(rec.natural[a], keys, i) if a in natural else float("nan")}
        order = [(d, a) for d in doses for a in arms]
        edited = np.concatenate([np.stack(outs[o]["img"]) for o in order])
        lab = label_images(ctx.labeller, np.concatenate([orig, edited]))
        labels = lab["saliency"] if task == "saliency" else lab["depth"]
        for i, (k, r, t) in enumerate(batch):
            H = headroom(task, orig_label[i], cf[i])
            if task == "saliency":
                keep = ~((orig_label[i] > 0) | (cf[i] > 0))
            else:
                keep = np.ones(orig.shape[1:3], bool)
            g0 = None
            for j, cond in enumerate(["unedited", *order]):
                img = orig[i] if cond == "unedited" else outs[cond]["img"][i]
                y = labels[j * B + i]
                row = {"site_kind": kind, "task": task, "edit": k, "sample_id": int(ctx.manifest["sample_ids"][r]),
                       "condition": "unedited" if cond == "unedited" else cond[1],
                       "dose": 0.0 if cond == "unedited" else cond[0], "transform": str(t),
                       "n_edits_applied": 0 if cond == "unedited" else len(keys)}
                if cond == "unedited":
                    row.update(delta_ratio=0.0, natural_ratio=float("nan"), delta_norm=0.0,
                               act_norm=float("nan"), probe_loss_before=_mean_over(rec.before["probe"], keys, i),
                               probe_loss_after=float("nan"))
                else:
                    row.update(outs[cond]["info"][i])
                if task == "saliency":
                    m0, m1 = orig_label[i:i + 1], cf[i:i + 1]
                    row.update(dice_cf=dice(y[None], m1)[0], dice_orig=dice(y[None], m0)[0],
                               iou_cf=iou(y[None], m1)[0], iou_orig=iou(y[None], m0)[0])
                else:
                    row.update(spearman_cf=spearman(y[None], cf[i:i + 1])[0],
                               spearman_orig=spearman(y[None], orig_label[i:i + 1])[0])
                row["gain"] = gain(row, task)
                g0 = row["gain"] if g0 is None else g0
                row["gain_vs_unedited"] = row["gain"] - g0
                row["headroom"] = H
                row["pixel_change"] = pixel_change(img, orig[i])
                row["psnr_bg"] = psnr(img, orig[i], keep) if cond != "unedited" else float("nan")
                rows_out.append(row)
        arrays["target"].append(cf.astype(np.float32))
        arrays["unedited"].append(orig)
        for (d, a) in order:
            arrays.setdefault(f"{a}.dose{_dose_key(d)}", []).append(np.stack(outs[(d, a)]["img"]))
        if len(examples.get("original", [])) < N_EXAMPLES:
            examples.setdefault("original", []).extend(orig)
            examples.setdefault("target", []).extend(cf)
            examples.setdefault("probe", []).extend(np.stack([outs[(d, "probe")]["img"][i] for d in doses])
                                                    for i in range(B))
            examples.setdefault("random", []).extend(outs[(doses[-1], "random")]["img"])
            j = 1 + order.index((doses[-1], "probe"))                          # the probe edit at the largest dose
            examples.setdefault("probe_label", []).extend(labels[j * B:(j + 1) * B])
    cidx = {c: n for n, c in enumerate(CONDITIONS)}
    rows_out.sort(key=lambda r: (r["edit"], r["dose"], cidx[r["condition"]]))   # one block of outputs per edit
    examples = {k: np.stack(v[:N_EXAMPLES]) for k, v in examples.items() if len(v)}
    examples["transforms"] = [str(t) for _, _, t in edits[:N_EXAMPLES]]
    examples["doses"] = doses
    arrays = {c: np.concatenate(v) for c, v in arrays.items() if v}
    return TaskResult(task, sites, steps, rows_out, examples, arrays, int(len(eligible)),
                      max(regen) if regen else None, notes, kind, doses, natural)


def _run(ctx: Context, rows: list[int], sites: list[str], edit, kind: str, keys) -> np.ndarray:
    ed = Editor(ctx.ldm.unet, sites, edit, kind)
    images = generate_edited(ctx, rows, ed)
    missed = sorted(set(keys) - set(ed.applied))
    if missed:                                                                  # a bug, not a user mistake
        raise RuntimeError(f"planned edits {missed[:3]} were never applied")
    return images
