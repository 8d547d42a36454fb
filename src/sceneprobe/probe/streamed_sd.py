"""The Stable Diffusion study in streamed mode (``capture.store: streamed``): processes, checkpoints and resume.

The maths is :class:`~.streamed.StreamedProbes`; this is the driver. Each split's images are cut into *chunks* of
``capture.checkpoint_every`` batches; chunk c is sampled by process c mod P (P = 1, or the processes of
``accelerate launch``). Per model the phases are:

1. **train** (every process): sample and label its chunks and accumulate its own statistics; after each chunk write
   the chunk's saliency subsample and labels (``train.c<c>.pt``), then the process's running statistics
   (``train.r<rank>.pt``: G, XᵀS, P in float64, overwritten);
2. **fit** (main process): the processes' statistics added in rank order, the subsample joined in image order,
   every λ's probes fitted; written to ``probes.pt`` for the other processes;
3. **val** (every process): its chunks' predictions for every λ (with several processes passed on as ``val.c<c>.pt``,
   with the labels; one process keeps them in memory and samples the val chunks again when resumed);
4. **choose** (main): λ, refinement and threshold from the joined val predictions → ``picks.pt``;
5. **test** (every process): its chunks' predictions of the chosen probes (``test.c<c>.pt``);
6. **results** (main): metrics, probe files and ``streamed.json``; the checkpoints are removed.

The checkpoints live in ``captures/sd/<model>/streamed/`` beside ``identity.json`` (the model's fingerprint, the
number of processes, ``checkpoint_every``). A rerun resumes from them: finished chunks are not sampled again, each
process's statistics continue from its last checkpoint bit for bit, and the fit, the choice and the results — all
deterministic — are recomputed. With one process an interrupted run therefore equals an uninterrupted one byte for
byte; with P processes only the order of the float64 additions of G differs (last bits). Another number of
processes or another ``checkpoint_every`` starts the model over (logged). Checkpoints on disk while a model runs,
at the paper's scale (``benchmarks/bench_sd.py`` prints them): the statistics (≈ 1.6 GB per process), the saliency
subsample (≈ 10 GB at 64 positions), the test predictions (≈ 1.2 GB), and with several processes the val
predictions (≈ 8 GB); removed when the model's probes are written (images, labels, probes: ≈ 2 GB).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..atomic import atomic_write_json
from ..config import Config
from ..errors import fail
from . import fit
from . import sweep as sw
from .streamed import STREAMED_VERSION, StreamedProbes, target_of


def _save(path: Path, obj) -> str:
    """torch.save through a temporary name and a rename (a killed process leaves no half-written checkpoint);
    returns the file's digest (what a rank's statistics record of the chunks they include)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    digest = _digest(tmp)
    os.replace(tmp, path)
    return digest


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _damaged(path: Path, why: str, then: str) -> Exception:
    return fail(f"streamed checkpoint {path} is damaged ({why}); delete that file and rerun the same command: {then}")


def _load(path: Path, digest: str | None = None, then: str = "its chunk is sampled again"):
    """A checkpoint, checked: against ``digest`` when one was recorded, and readable; else one line naming it."""
    if digest is not None and _digest(path) != digest:
        raise _damaged(path, "its digest differs from the one the statistics recorded", then)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:     # truncated, garbage, not a torch file: torch raises several types
        raise _damaged(path, f"{type(e).__name__}: {' '.join(str(e).split())[:120]}", then) from None


def chunks_of(ids: Sequence[int], batch: int, every: int) -> list[list[list[int]]]:
    """``ids`` → batches of ``batch`` → chunks of ``every`` batches (the unit of checkpoints and of dealing out)."""
    batches = [list(ids[k:k + batch]) for k in range(0, len(ids), batch)]
    return [batches[c:c + every] for c in range(0, len(batches), every)]


class Checkpoints:
    """``captures/sd/<model>/streamed/``: started afresh (by the main process) when its identity differs."""

    def __init__(self, folder: Path, identity: dict, state, force: bool, log: Callable[[str], None]):
        self.dir, self.state, self.log = Path(folder), state, log
        if state.is_main_process:
            path = self.dir / "identity.json"
            try:
                old = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                old = None
            if force or old != identity:
                if old is not None and not force:
                    log(f"[streamed] {self.dir}: checkpoints of other options or process count; starting the model over")
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir.mkdir(parents=True)
                atomic_write_json(path, identity)
        state.wait_for_everyone()

    def chunk(self, phase: str, c: int) -> Path:
        return self.dir / f"{phase}.c{c:05d}.pt"

    def rank(self, r: int) -> Path:
        return self.dir / f"train.r{r}.pt"

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _stats_state(sp: StreamedProbes, digests: dict[int, str]) -> dict:
    """A rank's running statistics and exactly which train chunks they include: ids and the chunk files' digests."""
    return {"chunks": sorted(digests), "digests": [digests[c] for c in sorted(digests)],
            "stats": {key: {"G": a.stats.G.cpu(), "B": a.stats.B.cpu(),
                            "P": torch.tensor(a.stats.P, dtype=torch.float64), "nonfinite": torch.tensor(a.nonfinite),
                            **({"xsum": a.xsum.cpu()} if a.xsum is not None else {})}
                      for key, a in sp.acc.items()}}


def _add_stats(sp: StreamedProbes, state: dict) -> None:
    """Add a checkpoint's statistics to ``sp``'s (into zeros: exact, so a resumed sum continues bit for bit)."""
    for key, a in sp.acc.items():
        s = state["stats"][key]
        other = fit.RidgeStats(a.stats.d, a.stats.k, "cpu")
        other.G, other.B, other.P = s["G"], s["B"], float(s["P"])
        a.stats.merge(other)
        if a.xsum is not None:
            a.xsum += s["xsum"].to(a.xsum.device)
        a.nonfinite += int(s["nonfinite"])


def _labels_part(b_ids: list[int], depth_all: np.ndarray, sal_all: np.ndarray) -> dict:
    return {"ids": torch.tensor(b_ids, dtype=torch.int64), "depth": torch.from_numpy(depth_all[b_ids]),
            "saliency": torch.from_numpy(sal_all[b_ids])}


def _read_labels(part: dict, depth_all: np.ndarray, sal_all: np.ndarray) -> None:
    i = part["ids"].numpy()
    depth_all[i], sal_all[i] = part["depth"].numpy(), part["saliency"].numpy()


def stream_model(m, cfg: Config, proot: Path, model: str, control: str | None, labeller, ck: Checkpoints, *,
                 progress: bool) -> tuple[StreamedProbes, np.ndarray, np.ndarray] | None:
    """Phases 1–5 of one model (module doc) on every process. Returns, on the main process, the accumulator with
    every chosen probe, the test predictions and the probe seconds by phase, and the labels (depth, saliency) of all
    images; None on the others."""
    from ..capture.run import probe_split, save_images
    from ..capture.sd import sample_and_record_sd
    from ..capture.store import load_labels
    from ..labeller import label_images
    cc, pc, state = cfg.capture, cfg.probe, ck.state
    rank, world, main = state.process_index, state.num_processes, state.is_main_process
    n = len(m.prompts)
    ids = list(range(n))
    split = probe_split(ids)
    size = m.sampler.size
    if control is None:                                   # the model's labels come from its own images
        depth_all, sal_all = np.zeros((n, *size), np.float32), np.zeros((n, *size), np.uint8)
    else:                                                 # a control is scored against the model's labels
        raw = load_labels(proot)
        depth_all, sal_all = raw["depth"].astype(np.float32), (raw["saliency"] > 0).astype(np.uint8)
    image_dir = (proot if control is None else proot / model) / "images"
    chunks = {code: chunks_of([i for i in ids if split[i] == code], cc.batch_size, cc.checkpoint_every)
              for code in (0, 1, 2)}

    def mine(code: int, phase: str) -> list[int]:
        return [c for c in range(len(chunks[code])) if c % world == rank and not ck.chunk(phase, c).is_file()]

    # the train chunks this rank's statistics include, checked against the chunk files (a consistent point)
    sp = StreamedProbes(m.shapes, m.n_steps, size, cfg, m.device)
    done: dict[int, str] = {}
    if ck.rank(rank).is_file():
        with sp.timed("checkpoints"):
            st = _load(ck.rank(rank), then="the chunks it counted are sampled again")
            listed = dict(zip((int(c) for c in st.get("chunks", [])), st.get("digests", [])))
            missing = [c for c in listed if not ck.chunk("train", c).is_file()]
            if missing or len(listed) != len(st.get("chunks", [])):
                # the statistics count a chunk whose subsample is gone: no sum can be taken apart, so this rank's
                # statistics start again from zero (the consistent point) and all of its chunks are sampled again
                ck.log(f"[streamed] {ck.chunk('train', missing[0]) if missing else ck.rank(rank)} is missing, but "
                    f"{ck.rank(rank)} counts it: rank {rank}'s train chunks are sampled again")
            else:
                for c, dg in listed.items():
                    if _digest(ck.chunk("train", c)) != dg:
                        raise _damaged(ck.chunk("train", c), "its digest differs from the one "
                                       f"{ck.rank(rank).name} recorded", "its rank's chunks are sampled again")
                _add_stats(sp, st)
                done = listed
    todo = {"train": [c for c in range(len(chunks[0])) if c % world == rank and c not in done],
            "val": mine(1, "val"), "test": mine(2, "test")}
    bar = tqdm(total=sum(len(b) for code, ph in ((0, "train"), (1, "val"), (2, "test")) for c in todo[ph]
                         for b in chunks[code][c]), desc=f"streamed sd/{model}", unit="img",
               disable=not (progress and main))

    def run(b_ids: list[int]) -> dict:
        acts: dict = {}

        def on_site(site: str, step: int, y: torch.Tensor) -> None:
            acts[site, step] = sp.prepare(y)
        b_prompts, b_seeds = [m.prompts[i] for i in b_ids], [m.seeds[i] for i in b_ids]
        if hasattr(m, "sample_and_record"):      # SDXL, PixArt, SD3, FLUX: their own pipeline (capture/pipelines.py)
            imgs = m.sample_and_record(b_prompts, b_seeds, cc.site_kind, on_site)
        else:
            imgs = sample_and_record_sd(m.sampler, b_prompts, b_seeds, m.unet_sites, m.vae_sites, cc.site_kind,
                                        on_site, m.device, m.dtype, m.half)
        save_images(image_dir, b_ids, imgs)
        if control is None:
            lab = label_images(labeller, imgs)
            if lab["saliency"] is None:
                raise fail("probe labels need saliency too: pass --labeller (a trained labeller) alongside "
                           "--depth-model")
            depth_all[b_ids], sal_all[b_ids] = lab["depth"], (lab["saliency"] > 0)
        bar.update(len(b_ids))
        return acts

    # 1. train: this process's chunks, its statistics checkpointed after each
    for c in todo["train"]:
        b_all = [i for b in chunks[0][c] for i in b]
        for b_ids in chunks[0][c]:
            sp.train_batch(run(b_ids), b_ids, target_of(depth_all[b_ids], pc.depth_target), sal_all[b_ids])
        with sp.timed("checkpoints"):
            done[c] = _save(ck.chunk("train", c), {**_labels_part(b_all, depth_all, sal_all),
                                                   "sub": {key: a.sub for key, a in sp.acc.items()}})
            for a in sp.acc.values():
                a.sub = []
            _save(ck.rank(rank), _stats_state(sp, done))
    state.wait_for_everyone()

    # 2. fit (main): its own statistics plus the other processes', every chunk's subsample
    if main:
        with sp.timed("checkpoints"):
            digests = dict(done)
            for r in range(1, world):
                st = _load(ck.rank(r), then="the chunks it counted are sampled again")
                got = dict(zip((int(c) for c in st["chunks"]), st["digests"]))
                if sorted(got) != [c for c in range(len(chunks[0])) if c % world == r]:
                    raise _damaged(ck.rank(r), f"it counts chunks {sorted(got)}, not rank {r}'s",
                                   "the chunks it counted are sampled again")
                _add_stats(sp, st)
                digests.update(got)
            for c in range(len(chunks[0])):              # every subsample row is one the statistics counted
                part = _load(ck.chunk("train", c), digests.get(c), then="its rank's chunks are sampled again")
                _read_labels(part, depth_all, sal_all)
                for key, rows in part["sub"].items():
                    sp.acc[key].sub.extend(rows)
        train = np.flatnonzero(split == 0)
        sp.fit(target_of(depth_all[train], pc.depth_target), sal_all[train])
        if world > 1:
            _save(ck.dir / "probes.pt", {key: {"theta_d": a.theta_d.cpu(), "theta_s": a.theta_s.cpu()}
                                         for key, a in sp.acc.items()})
    else:
        for a in sp.acc.values():
            a.stats = None                                # only the main process fits
    state.wait_for_everyone()
    if not main:
        for key, p in _load(ck.dir / "probes.pt").items():
            sp.acc[key].theta_d, sp.acc[key].theta_s = p["theta_d"], p["theta_s"]

    def predict(phase: str, code: int, batch_fn) -> None:
        # one process keeps its val predictions (≈ 8 GB at the paper's scale, float64) in memory, not on disk: a
        # resumed run samples the val chunks again (15 % of the images); several processes pass them on as files
        files = world > 1 or phase == "test"
        for c in todo[phase]:
            for b_ids in chunks[code][c]:
                batch_fn(run(b_ids))
            if files:
                b_all = [i for b in chunks[code][c] for i in b]
                with sp.timed("checkpoints"):                # Acc.val / Acc.test hold the predictions
                    _save(ck.chunk(phase, c), {**_labels_part(b_all, depth_all, sal_all),
                                               "pred": {key: torch.from_numpy(np.concatenate(getattr(a, phase)))
                                                        for key, a in sp.acc.items()}})
                    for a in sp.acc.values():
                        setattr(a, phase, [])
        state.wait_for_everyone()
        if main and files:                                # every chunk's predictions, in image order
            with sp.timed("checkpoints"):
                for c in range(len(chunks[code])):
                    part = _load(ck.chunk(phase, c))         # damaged: one line; deleted ones were sampled again
                    _read_labels(part, depth_all, sal_all)
                    for key, z in part["pred"].items():
                        getattr(sp.acc[key], phase).append(z.numpy())

    # 3.–4. val predictions of every λ, then the choice (main)
    predict("val", 1, sp.val_batch)
    if main:
        val = np.flatnonzero(split == 1)
        sp.choose(sp.standardise(target_of(depth_all[val], pc.depth_target)), sal_all[val])
        if world > 1:
            _save(ck.dir / "picks.pt", {key: {"theta_d": a.theta_d.cpu(), "theta_s": a.theta_s.cpu(),
                                              "pick": torch.tensor(a.pick), "tau": torch.tensor(a.tau)}
                                        for key, a in sp.acc.items()})
    state.wait_for_everyone()
    if not main:
        for key, p in _load(ck.dir / "picks.pt").items():
            a = sp.acc[key]
            a.theta_d, a.theta_s, a.pick, a.tau = p["theta_d"], p["theta_s"], tuple(p["pick"].tolist()), float(p["tau"])
    # 5. test predictions of the chosen probes
    predict("test", 2, sp.test_batch)
    bar.close()
    return (sp, depth_all, sal_all) if main else None


def run_streamed_sd(cfg: Config, model_path: Path, prompts: Path, out: Path, labeller, *,
                    controls: Sequence[str] = ("permuted",), force: bool = False, progress: bool = True,
                    log: Callable[[str], None] = print, pipe=None, seconds: dict | None = None) -> Path | None:
    """The SD study in streamed mode: images, labels, probes and ``report/results.csv`` (returned; None on the
    processes other than the main one of ``accelerate launch``).

    ``seconds`` (optional) receives, per model, the wall time of the probe work by phase and of the whole model
    (``{model: {"statistics": …, "checkpoints": …, "fit": …, "predict": …, "choose": …, "metrics": …, "total": …}}``):
    capture time = total − the probe phases."""

    from ..capture.pipelines import capture_functions
    from ..capture.run import _state, collect_samples, probe_split
    from ..capture.sd import sd_options
    from ..capture.store import save_labels
    from ..labeller.apply import _describe
    state = _state()
    cc, pc = cfg.capture, cfg.probe
    out = Path(out)
    proot = out / "captures" / "sd"
    opts = sd_options(cc)
    fns = capture_functions(model_path)                  # SD 1.x/2.x: capture/sd.py; the other families: pipelines.py
    if pipe is None:
        pipe = fns.load(model_path, state.device, opts["variant"])
    rows: list[dict] = []
    arrays: dict[str, np.ndarray] = {}
    labels_desc = _describe(labeller)
    shapes_all: dict = {}
    for control in (None, *controls):
        model = control or "ldm"
        extra = {"store": "streamed", "streamed_version": STREAMED_VERSION, "subsample": cc.subsample,
                 "probe": sw.fit_identity(pc), "labeller": labels_desc}
        if control is not None:
            extra["labels"] = sw.load_protocol_labels(proot, None, pc.depth_target).digest
        m = fns.prepare(model_path, prompts, **opts, control=control, control_seed=cc.control_seed, pipe=pipe,
                        extra_identity=extra)
        shapes_all.update(m.shapes)
        fp = m.fingerprint
        mdir = proot / model
        record = mdir / "streamed.json"
        n = len(m.prompts)
        ids = list(range(n))
        timesteps = fns.timesteps(m)
        paths = {(s, t): sw.probe_path(out, "sd", model, s, t) for s in m.sites for t in range(m.n_steps)}
        done = None
        if not force and record.is_file() and json.loads(record.read_text()).get("fingerprint") == fp:
            done = {k: sw._finished_rows(p, fp) for k, p in paths.items()}
            if any(v is None for v in done.values()):
                done = None
        if done is None:
            log(f"[streamed sd/{model}] sampling {n} images: train, then val, then test")
            t_model = time.perf_counter()
            if state.is_main_process:
                record.unlink(missing_ok=True)
            ck = Checkpoints(mdir / "streamed", {"fingerprint": fp, "processes": state.num_processes,
                                                 "checkpoint_every": cc.checkpoint_every}, state, force, log)
            res = stream_model(m, cfg, proot, model, control, labeller, ck, progress=progress)
            if res is not None:
                sp, depth_all, sal_all = res
                if control is None:
                    split = probe_split(ids)
                    collect_samples(proot / "images", proot / "samples.safetensors", ids, split)
                    save_labels(proot, depth_all, sal_all, split, sample_ids=np.asarray(ids, np.int64))
                    atomic_write_json(proot / "labels.json", {"source": str(proot / "samples.safetensors"), "n": n,
                                                              **labels_desc})
                labels = sw.load_protocol_labels(proot, n, pc.depth_target)
                done = {}
                for key, (tensors, prow) in sp.results(labels, "sd", model, timesteps).items():
                    sw.write_probe_file(paths[key], tensors, fingerprint=fp, rows=prow, protocol="sd", model=model,
                                        site=key[0], step=key[1], solver="exact-streamed", cfg=pc,
                                        device=sp.fit_device.type)
                    done[key] = sw._finished_rows(paths[key], fp)
                atomic_write_json(record, {"fingerprint": fp, "n": n, "sites": m.sites, "steps": m.n_steps,
                                           "timesteps": timesteps, "subsample": cc.subsample, "family": fns.family,
                                           "sigmas": fns.sigmas(m)})
                ck.remove()
                secs = sp.seconds
                probe_s = sum(secs.values())
                wall = time.perf_counter() - t_model
                log(f"[streamed sd/{model}] {wall:.1f} s: capture {wall - probe_s:.1f} s, probes {probe_s:.1f} s ("
                    + ", ".join(f"{k} {v:.1f}" for k, v in secs.items()) + f") on {sp.fit_device.type}, "
                    f"{sp.workers} worker(s), {state.num_processes} process(es)")
                if seconds is not None:
                    seconds[model] = {**secs, "total": wall}
                del sp
            state.wait_for_everyone()                       # the next model (a control) reads these labels
        else:
            log(f"[streamed sd/{model}] up to date, skipped")
        if state.is_main_process:
            for (site, step), (prow, per_image) in sorted(done.items()):
                rows.extend(prow)
                for (_, task, metric), v in per_image.items():      # (variant, task, metric): streamed probes are plain
                    arrays[sw.per_image_key("sd", model, site, step, task, metric)] = v
    if not state.is_main_process:
        return None
    labels = sw.load_protocol_labels(proot, None, pc.depth_target)
    sizes = {tuple(sh[1:]) for sh in shapes_all.values()} | {labels.size}
    rows += sw.baseline_rows(labels, sorted(sizes), pc.upsample, arrays)
    rows += sw.prompt_only_rows(proot, labels, sorted(sizes), pc, arrays)   # [] without prompt embeddings
    arrays[sw.per_image_key("sd", "test-rows")] = labels.idx(2).astype(np.int64)
    positions = {f"sd/{site}": sw.prior_site(labels, *sh[1:]) for site, sh in shapes_all.items()}
    sw.write_per_image(out / "report", arrays, positions)
    return sw.write_results(out / "report", rows, pc)
