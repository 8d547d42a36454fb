"""The end-to-end study (``sceneprobe run``): world → models → labeller → capture → labels → probes → report.

Like ``cli.py`` this is a place that knows every stage; each stage is one library call. A stage is skipped when its
output exists and its record ``run/.stages/<stage>.json`` holds the same fingerprint (a hash of the config sections
it depends on and of its inputs); otherwise it is redone, and so is every stage after it whose inputs changed. Each
stage is itself atomic or resumable, so a run killed at any point (even SIGKILL) resumes where it stopped and ends
with the same ``results.csv`` as an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import time
from pathlib import Path
from typing import Callable

from .atomic import atomic_write_json, atomic_write_text
from .config import Config, dump_yaml, fingerprint
from .errors import SceneprobeError, fail

CONTROL_MODELS = ("permuted", "fresh")
# World seeds of the labellers' training scenes, as offsets from the study's world seed: each labeller learns on a
# world of its own, disjoint from the scenes it is used on and from the other labeller's
LABELLER_WORLD_OFFSET, READOUT_LABELLER_WORLD_OFFSET = 1, 2


class Stages:
    """Fingerprinted stage records under ``run/.stages``; prints one progress line per stage."""

    def __init__(self, run: Path, log: Callable[[str], None] = print):
        self.dir = Path(run) / ".stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.chain = ""  # fingerprints of earlier stages: a changed stage redoes every later one

    def run(self, name: str, fp: str, outputs: list[Path], fn: Callable[[], object], clear: list[Path] = (),
            check: Callable[[], object] | None = None) -> None:
        """Run stage ``name`` unless its record matches ``fp`` and its outputs exist (and pass ``check``: a
        damaged output, e.g. a capture store that lost a shard, makes the stage run again)."""
        fp = fingerprint({"own": fp, "before": self.chain})
        self.chain = fp
        rec = self.dir / f"{name}.json"
        done = _record_fingerprint(rec) == fp and all(p.exists() for p in outputs) and _passes(check)
        if done:
            self.log(f"[{name}] up to date, skipped")
            return
        if rec.exists():  # the config changed since this stage ran (or the record is damaged): its outputs are stale
            rec.unlink()
            for p in clear:
                shutil.rmtree(p, ignore_errors=True) if Path(p).is_dir() else Path(p).unlink(missing_ok=True)
        t0 = time.time()
        self.log(f"[{name}] running ...")
        fn()
        dt = time.time() - t0
        atomic_write_json(rec, {"fingerprint": fp, "seconds": round(dt, 1)})
        self.log(f"[{name}] done in {dt:.0f} s")


def _passes(check: Callable[[], object] | None) -> bool:
    try:
        check and check()
    except SceneprobeError:
        return False
    return True


def _record_fingerprint(rec: Path) -> str | None:
    """The fingerprint of a stage record, checked before it is trusted: a truncated or hand-edited record (not a
    JSON object with a 16-hex-digit fingerprint) counts as absent, so the stage is redone rather than skipped."""
    try:
        fp = json.loads(rec.read_text()).get("fingerprint")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return fp if isinstance(fp, str) and len(fp) == 16 and all(c in "0123456789abcdef" for c in fp) else None


def _copy_model_folders(src: Path, run: Path) -> None:
    for part in ("vae", "unet", "scheduler"):
        if not (src / part).is_dir():
            raise fail(f"model folder {src} has no {part}/; pass a run folder with vae/, unet/ and scheduler/")
        tmp = run / f".{part}.copy"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src / part, tmp)
        shutil.rmtree(run / part, ignore_errors=True)
        tmp.rename(run / part)
    if (src / "training.json").is_file():  # how the model was trained and how good it is, for the report
        shutil.copyfile(src / "training.json", run / "model_training.json")


def label_generated(run: Path, labeller_dir: Path) -> Path:
    """Label the generated images with the labeller: ``captures/generate/labels.safetensors``."""
    from .labeller import label_samples, load_labeller
    samples = run / "captures" / "generate" / "samples.safetensors"
    return label_samples(load_labeller(labeller_dir), samples, force=True)


def run_study(cfg: Config, out: Path, from_scratch: bool = False, model: Path | None = None,
              with_interventions: bool = False, progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """Run (or resume) the whole study into ``out``; returns the path of ``report/report.html``."""
    from .models.io import load_ldm, model_hash, shipped_root
    out = Path(out)
    shipped = shipped_root(cfg.preset)
    if not from_scratch:  # fail before writing anything into the run folder
        src = Path(model) if model else shipped
        for part in ("unet", "vae", "scheduler"):
            if not (src / part).is_dir():
                raise fail(f"no {part}/ in the model folder {src}" + (" (the shipped model of preset "
                           f"{cfg.preset!r})" if not model else "") + "; pass --from-scratch to train one or "
                           "--model RUN_FOLDER with vae/, unet/ and scheduler/")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump_yaml(cfg))
    st = Stages(out, log)
    data_dir = out / "data"

    def world():
        from .world.dataset import make_dataset
        w = cfg.world
        make_dataset(data_dir, n=w.n_scenes, size=w.size, seed=w.seed, supersample=w.supersample, workers=w.workers,
                     val_fraction=w.val_fraction, test_fraction=w.test_fraction, force=True, progress=progress)
    st.run("world", fingerprint(world_id(cfg)), [data_dir / "split.json"], world, clear=[data_dir])

    def data():
        from .world.dataset import load_dataset
        return load_dataset(data_dir)

    if from_scratch:
        def models():
            from .train.ldm import train_ldm
            from .train.vae import train_vae
            d = data()
            resume = (out / "train_vae" / "checkpoint.pt").exists()
            if not (out / "vae").exists():
                train_vae(cfg, d, out, resume=resume, progress=progress)
            resume = (out / "train_ldm" / "checkpoint.pt").exists()
            train_ldm(cfg, d, out, resume=resume, force=True, progress=progress)
        fp = fingerprint("scratch", cfg.vae, cfg.unet, cfg.train_vae, cfg.train_ldm)
    else:
        def models():
            _copy_model_folders(src, out)
        fp = fingerprint("copy", str(src), model_hash_of_folder(src))
    st.run("models", fp, [out / "unet", out / "vae", out / "scheduler"], models,
           clear=[out / "unet", out / "train_ldm"] if from_scratch else [])

    lab_dir = out / "labeller"
    lfn, lfp = _labeller_stage(cfg, out, shipped, "labeller", cfg.labeller, LABELLER_WORLD_OFFSET, from_scratch,
                               progress)
    st.run("labeller", lfp, [lab_dir / "config.json"], lfn, clear=[lab_dir])
    # the image read-out's labeller: the second, independent one (readout.labeller: second), or the labels' own
    ro_dir = out / "labeller_readout" if cfg.readout.labeller == "second" else lab_dir
    if cfg.readout.labeller == "second":
        rfn, rfp = _labeller_stage(cfg, out, shipped, "labeller_readout", cfg.labeller_readout,
                                   READOUT_LABELLER_WORLD_OFFSET, from_scratch, progress)
        st.run("labeller-readout", rfp, [ro_dir / "config.json"], rfn, clear=[ro_dir])

    ldm = load_ldm(out)
    mh = model_hash(ldm.unet) + model_hash(ldm.vae)

    @functools.cache
    def views():
        """The held-out renders' VAE reconstructions and the labels' labeller's labels of both: both provenance
        checks below score them, so a run that does both makes them once."""
        from .labeller import heldout_views, load_labeller
        return heldout_views(load_labeller(lab_dir), data(), ldm.vae)

    def labeller_eval():
        from .labeller import labeller_provenance, load_labeller
        atomic_write_json(out / "labeller_eval.json", labeller_provenance(load_labeller(lab_dir), data(), ldm.vae,
                                                                          views=views()))
    st.run("labeller-eval", fingerprint(model_hash(ldm.vae), model_hash_of_folder(lab_dir), world_id(cfg),
                                        "provenance-1"),
           [out / "labeller_eval.json"], labeller_eval)
    if ro_dir != lab_dir:
        def readout_labeller_eval():
            from .labeller import load_labeller, readout_labeller_provenance
            atomic_write_json(out / "labeller_readout_eval.json", readout_labeller_provenance(
                load_labeller(lab_dir), load_labeller(ro_dir), data(), ldm.vae, views=views()))
        st.run("labeller-readout-eval", fingerprint(model_hash(ldm.vae), model_hash_of_folder(lab_dir),
                                                    model_hash_of_folder(ro_dir), world_id(cfg), "provenance-1"),
               [out / "labeller_readout_eval.json"], readout_labeller_eval)
    from .capture.run import CAPTURE_VERSION, run_capture
    from .capture.store import CaptureStore
    for protocol in cfg.capture.protocols:
        for control in (None, *cfg.capture.controls):
            name = control or "ldm"
            root = out / "captures" / protocol / name

            def cap(protocol=protocol, control=control):
                run_capture(cfg, out, protocol, ldm, data=data() if protocol == "noised" else None, control=control,
                            progress=progress)
            st.run(f"capture-{protocol}-{name}", fingerprint(cfg.capture, mh, world_id(cfg), CAPTURE_VERSION),
                   [root / "manifest.json"], cap, clear=[root], check=lambda root=root: CaptureStore(root).verify())
        if protocol == "generate":
            st.run("label-generated", fingerprint(mh, model_hash_of_folder(lab_dir)),
                   [out / "captures" / "generate" / "labels.safetensors"], lambda: label_generated(out, lab_dir))

        def readout(protocol=protocol):
            from .labeller import load_labeller
            from .labeller.readout import run_readout
            run_readout(out, protocol, load_labeller(ro_dir), target=cfg.probe.depth_target)
        st.run(f"readout-{protocol}", fingerprint(mh, model_hash_of_folder(lab_dir), model_hash_of_folder(ro_dir),
                                                  "readout-2", cfg.probe.depth_target),
               [out / "readout" / f"{protocol}.csv"], readout)

    def probes():
        from .probe.sweep import run_probes
        run_probes(out, cfg.probe, progress=progress)
    st.run("probes", fingerprint(cfg.probe), [out / "report" / "results.csv"], probes, clear=[out / "probes"])

    extra = extra_sections(out)
    if with_interventions:
        def interventions():
            from .intervene import run_interventions
            run_interventions(cfg, out, progress=progress)
        st.run("interventions", fingerprint(cfg.intervene, cfg.report, "doses-1"),
               [out / "report" / "extra" / "interventions.md"], interventions, clear=[out / "interventions"])

    from .report.html import write_report
    path = write_report(out, extra_sections=extra)
    log(f"[report] {path}")
    return path


def world_id(cfg: Config):
    """``cfg.world`` as the stages' fingerprints see it. ``workers`` changes no byte of the world (rendering is
    identical across workers, tested), so it is pinned to 1, its old default: runs made before it became 0 (every
    core) keep their fingerprints, and changing it redoes nothing."""
    return dataclasses.replace(cfg.world, workers=1)


def _labeller_stage(cfg: Config, out: Path, shipped: Path, name: str, lc, world_offset: int, from_scratch: bool,
                    progress: bool) -> tuple[Callable[[], None], str]:
    """The stage that puts a labeller into ``out/<name>``: a copy of the shipped ``<name>/``, or (from scratch, or
    none shipped) one trained with ``lc`` (a LabellerConfig) on scenes of world seed ``world.seed + world_offset``
    (``out/<name>_data``). Returns (stage function, fingerprint)."""
    dst = out / name
    if from_scratch or not (shipped / name).is_dir():
        def fn():
            import dataclasses

            from .labeller import train_labeller
            from .world.dataset import load_dataset, make_dataset
            ldata = out / f"{name}_data"
            if not (ldata / "split.json").exists():
                make_dataset(ldata, n=lc.n_scenes, size=cfg.world.size, seed=cfg.world.seed + world_offset,
                             supersample=cfg.world.supersample, workers=cfg.world.workers, force=True, progress=progress)
            train_labeller(dataclasses.replace(cfg, labeller=lc), load_dataset(ldata), dst,
                           resume=(out / f"train_{name}").exists(), force=True, progress=progress)
        return fn, fingerprint("scratch", lc, world_id(cfg), world_offset)

    def fn():
        tmp = out / f".{name}.copy"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(shipped / name, tmp)
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)
    return fn, fingerprint("copy", str(shipped / name), model_hash_of_folder(shipped / name))


def model_hash_of_folder(folder: Path) -> str:
    """Cheap identity of a model folder: hash of its config and weights files' bytes."""
    import hashlib
    h = hashlib.sha256()
    for p in sorted(Path(folder).glob("*")):
        if p.is_file() and p.suffix in (".json", ".safetensors"):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _metric_table(d: dict) -> str:
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in _flat(d).items())
    return "| metric | value |\n|---|---|\n" + rows


def extra_sections(run: Path) -> list[tuple[str, str]]:
    """Report sections on what the generate-protocol numbers stand on: the labeller and the generated images.

    Model figures come from the run's own training (``train_vae/``, ``train_ldm/``) or, for a copied model, from the
    ``training.json`` recorded beside it (copied to ``run/model_training.json``)."""
    out = []
    shipped = _read_json(run / "model_training.json") or {}
    lab = _read_json(run / "labeller" / "training.json") or _read_json(run / "train_labeller" / "eval.json")
    prov = _read_json(run / "labeller_eval.json")
    if prov and "vae_reconstruction" in prov:   # the run's own check: clean renders and their VAE reconstructions
        c, r = prov["clean"], prov["vae_reconstruction"]
        rows = "\n".join(f"| {k} | {c[k]:.4g} | {r[k]:.4g} |" for k in c
                         if isinstance(c.get(k), float) and isinstance(r.get(k), float))
        out.append(("Labeller quality (held-out rendered scenes and their VAE reconstructions)",
                    "The labeller plays MiDaS and TRACER's role: the generate-protocol labels are its reading of the "
                    "generated images — decoded latents — not exact labels. Its accuracy against the exact labels of "
                    f"{c.get('n_images')} held-out scenes of the run's world, on the renders and on the run's VAE "
                    "reconstructions of the same scenes (what generated images are made of; `labeller_eval.json`), "
                    "bounds what the generate-protocol probes can show.\n\n"
                    "| metric | clean renders | VAE reconstructions |\n|---|---|---|\n" + rows))
    elif lab:
        out.append(("Labeller quality (held-out rendered scenes)",
                    "The labeller plays MiDaS and TRACER's role: it labels the generated images. Its accuracy on "
                    "held-out rendered scenes with exact ground truth bounds what the generate-protocol probes can "
                    "show.\n\n" + _metric_table(lab.get("eval", lab))))
    sec = _labels_and_readout_section(run)
    if sec:
        out.append(sec)
    q = _read_json(run / "train_ldm" / "eval.json") or shipped.get("train_ldm", {}).get("eval")
    if q:
        out.append(("Generated image quality",
                    "Fréchet Scene Distance (FSD, see `sceneprobe.quality`) of 64 DDIM samples to held-out scenes, "
                    "with its floors (training vs held-out scenes; the VAE's reconstructions of held-out scenes) and "
                    "the noise ceiling; per-channel colour of samples and data (grey levels; cast = (R+B)/2 − G); "
                    "edge stripes = the largest per-channel colour excess (grey levels) of a 2-pixel border band of "
                    "the samples over the data's, beyond the global difference (edge_stripe_real_floor: the largest "
                    "such excess of sets of as many real scenes, its noise floor); ground detail = mean |grey − its 3×3 "
                    "mean| over the bottom third (grey levels: the checker texture of the near ground) of samples, "
                    "data and VAE reconstructions (ground_detail_ratio_vs_vae_recon, where present: the samples' "
                    "over the reconstructions', with a 95 % bootstrap CI over images).\n\n" + _metric_table(q)))
    # the shipped VAE as shipped (after its decoder-only fine-tune), not the record of its first training stage
    v = _read_json(run / "train_vae" / "eval.json") or shipped.get("shipped_vae_check") or \
        shipped.get("train_vae", {}).get("eval")
    if v:
        out.append(("VAE reconstruction (held-out scenes)", _metric_table(v)))
    return out


def _labeller_line(run: Path, name: str) -> str:
    """The labeller ``run/name/`` in words: architecture, seeds, training world and its held-out Dice / depth ρ."""
    t = _read_json(run / name / "training.json") or {}
    c = _read_json(run / name / "config.json") or {}
    lc, ev, data = t.get("labeller_config", {}), t.get("eval", {}), t.get("data", {})
    arch = (f"channels {list(c.get('channels', lc.get('channels', [])))}, {c.get('layers_per_block', '?')} "
            f"ResBlock(s) per level, {c.get('norm_num_groups', '?')} norm groups")
    held = (f"; on {ev.get('n_images', '?')} held-out ({ev.get('split', 'test')}) renders of that world: saliency Dice "
            f"{ev['saliency_dice']:.3f}, depth Spearman {ev['depth_spearman']:.3f}"
            if isinstance(ev.get("saliency_dice"), float) and isinstance(ev.get("depth_spearman"), float) else "")
    return (f"{arch}; init/batch seed {t.get('seed', lc.get('seed', '?'))}, trained on world seed "
            f"{data.get('seed', '?')} ({data.get('n_train', '?')} training scenes){held}")


def _labels_and_readout_section(run: Path) -> tuple[str, str] | None:
    """Which labeller made the generate labels and which read each step's x̂₀, and how far the two agree."""
    info = {p: _read_json(run / "readout" / f"{p}.json") for p in ("generate", "noised")}
    info = {p: i for p, i in info.items() if i}
    if not info:
        return None
    g = info.get("generate") or {}
    reader = next((i.get("readout_by") for i in info.values() if i.get("readout_by")), None)
    labels = g.get("labels_by") or "labeller"
    L = [f"- **Labels**: `generate` — `{labels}/` on each *final* generated image ({_labeller_line(run, labels)}); "
         "`noised` — exact (the renderer's)."]
    if reader:
        L.append(f"- **Image read-out** (each step's decoded x̂₀, both protocols): `{reader}/` "
                 f"({_labeller_line(run, reader)}).")
    if g.get("readout_is_labels_labeller"):
        L.append("- In `generate` the read-out labeller **is** the labels' labeller: at the last steps x̂₀ is "
                 "(almost) the final image, so the read-out scores itself (≈ 1 by construction) and says nothing "
                 "about the activations there (`readout.labeller: same`).")
    elif g:
        fin = g.get("final_image") or {}
        ceil = (f" On the final images of the test rows the read-out labeller scores Dice "
                f"{fin['saliency_dice']:.3f}, depth Spearman {fin['depth_spearman']:.3f} against the labels"
                if isinstance(fin.get("saliency_dice"), float) and isinstance(fin.get("depth_spearman"), float)
                else "")
        L.append("- In `generate` the two are **different labellers** (another seed, architecture and training "
                 "world), so the read-out curve's last-step value is the two labellers' *agreement* on (almost) the "
                 "final image, not 1 by construction: it is the ceiling of the read-out." + ceil + ". The probe is "
                 "fitted to the first labeller's labels and the read-out is not, so a late-step probe − read-out gap "
                 "of up to 1 − agreement can be the first labeller's own style rather than scene knowledge; the "
                 "early steps, where the read-out is far below its ceiling, answer \"does the network know before "
                 "the image shows it\".")
    ag = (_read_json(run / "labeller_readout_eval.json") or {}).get("agreement")
    if ag:
        keys = ("saliency_dice", "saliency_iou", "depth_spearman", "depth_pearson", "depth_rmse")
        rows = "\n".join(f"| {k} | {ag['clean'].get(k, float('nan')):.4g} | "
                          f"{ag['vae_reconstruction'].get(k, float('nan')):.4g} |" for k in keys)
        L += ["", f"Agreement of the read-out labeller with the labels' labeller (the latter as the truth) on "
                  f"{ag['clean'].get('n_images', '?')} held-out scenes of the run's world "
                  "(`labeller_readout_eval.json`, which also scores the read-out labeller against exact labels):", "",
              "| metric | clean renders | VAE reconstructions |", "|---|---|---|", rows]
    return "Labels and image read-out: which labeller made which", "\n".join(L)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


__all__ = ["run_study", "label_generated", "Stages"]
