"""The probe sweep's long-form result rows, indexed (:class:`Results`): groups of sites (model × family), the
val-chosen best site per step (:meth:`Results.curve`) and overall (:meth:`Results.best`), the strongest baseline, and
the labels the report gives groups and baselines.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..probe.baselines import ALL_SALIENT, BASELINE_MODEL, MEAN_MAP
from ..probe.layout import base_model, is_plain
from ..probe.metrics import HEADLINE

TASKS = ("depth", "saliency")
CONTROLS = ("permuted", "fresh")
MAIN_MODEL = "ldm"
FAMILIES = ("unet", "vae.dec", "vae.enc", "input")
EST_TAG = "-vs-"             # metric names of comparison rows the report adds to results.csv


DENOISER_PREFIXES = ("dit.", "mmdit.", "flux.", "transformer:")   # a DiT's sites (models/sites.py)


def family(site: str) -> str:
    """'unet' / 'vae.enc' / 'vae.dec' from a canonical name (``vae.dec.mid.attn0``) or a raw path. A transformer
    denoiser's sites (PixArt ``dit.*``, SD3 ``mmdit.*``, FLUX ``flux.*``) form the ``unet`` group too: the group is the
    denoiser, whose verdicts the report gives (the study's labels section says which denoiser it was)."""
    if site.startswith("vae.enc") or site.startswith("vae:encoder"):
        return "vae.enc"
    if site.startswith("vae"):
        return "vae.dec"
    if site.startswith(DENOISER_PREFIXES):
        return "unet"
    for sep in (".", ":"):
        if sep in site:
            return site.split(sep, 1)[0]
    return site


def group_label(model: str, fam: str) -> str:
    names = {("ldm", "unet"): "U-Net", ("ldm", "vae.dec"): "VAE decoder (mid self-attention)",
             ("ldm", "vae.enc"): "VAE encoder (clean image, step-independent)",
             ("permuted", "unet"): "U-Net, permuted weights", ("fresh", "unet"): "U-Net, fresh init",
             ("permuted", "vae.dec"): "VAE decoder on the permuted U-Net's latents",
             ("fresh", "vae.dec"): "VAE decoder on the fresh U-Net's latents",
             ("ldm", "input"): "input x_t (5×5 neighbourhood; the input control)",
             ("uncond", "unet"): "U-Net on its unconditional CFG half (same pass; the text as a control)"}
    return names.get((model, fam), f"{model} / {fam}")


def is_prompt_baseline(site: str) -> bool:
    """A prompt-only baseline (``prompt@{h}x{w}``, :mod:`sceneprobe.probe.prompt_only`): it reads the text."""
    return site.startswith("prompt@")


def baseline_label(site: str) -> str:
    if site == MEAN_MAP:
        return "mean map (val threshold)"
    if site == ALL_SALIENT:
        return "all-salient"
    if site.startswith("prompt@"):                  # probe/prompt_only.py
        return f"prompt-only probe {site.split('@', 1)[1]} (text embedding + layout)"
    return f"position-only probe {site.split('@', 1)[1]}"


@dataclass(frozen=True)
class Point:
    model: str
    site: str
    step: int
    timestep: int
    val: float
    test: float


class Results:
    """Index of long-form result rows: (protocol, model, site, step, task, split, metric) → value."""

    def __init__(self, rows: list[dict], plain: bool = False):
        """``plain``: index the probes fitted without the layout prior (``<model>.noprior``) under their base model
        names (the baselines as they are); default: the layout-fair probes, the plain ones left out."""
        rows = [r for r in rows if EST_TAG not in r["metric"]]
        if plain:
            rows = [{**r, "model": base_model(r["model"])} for r in rows
                    if is_plain(r["model"]) or r["model"] == BASELINE_MODEL]
        else:
            rows = [r for r in rows if not is_plain(r["model"])]
        self.rows = rows
        self.plain = plain
        self.v = {(r["protocol"], r["model"], r["site"], r["step"], r["task"], r["split"], r["metric"]): r["value"]
                  for r in self.rows}
        self.timestep = {(r["protocol"], r["model"], r["step"]): r["timestep"] for r in self.rows}
        self.protocols = sorted({r["protocol"] for r in self.rows})
        self.edge = {(r["protocol"], r["model"], r["site"], r["step"], r["task"]): r.get("lambda_edge", "")
                     for r in self.rows if r["model"] != BASELINE_MODEL}
        # (protocol, model) → its (site, step) pairs, and each site's family: the queries below run thousands of times
        # while the report is built, so they read this index instead of scanning every row each time
        self._pairs: dict[tuple[str, str], set[tuple[str, int]]] = {}
        for r in self.rows:
            self._pairs.setdefault((r["protocol"], r["model"]), set()).add((r["site"], r["step"]))
        self._family = {site: family(site) for pairs in self._pairs.values() for site, _ in pairs}

    def models(self, protocol: str) -> list[str]:
        ms = {m for p, m in self._pairs if p == protocol and m != BASELINE_MODEL}
        order = [MAIN_MODEL, *CONTROLS]
        return sorted(ms, key=lambda m: (order.index(m) if m in order else len(order), m))

    def groups(self, protocol: str) -> list[tuple[str, str]]:
        """(model, family) pairs; the encoder only for the main model (a control's encoder is the same network)."""
        out = []
        for m in self.models(protocol):
            fams = {self._family[site] for site, _ in self._pairs[(protocol, m)]}
            out += [(m, f) for f in FAMILIES if f in fams and (f != "vae.enc" or m == MAIN_MODEL)]
            out += [(m, f) for f in sorted(fams - set(FAMILIES))]
        return out

    def sites(self, protocol: str, model: str, fam: str | None = None) -> list[str]:
        return sorted({site for site, _ in self._pairs.get((protocol, model), ())
                       if fam is None or self._family[site] == fam})

    def steps(self, protocol: str, model: str | None = None, fam: str | None = None) -> list[int]:
        models = [model] if model is not None else [m for p, m in self._pairs if p == protocol]
        return sorted({step for m in models if m != BASELINE_MODEL for site, step in self._pairs.get((protocol, m), ())
                       if fam is None or self._family[site] == fam})

    def get(self, protocol, model, site, step, task, split, metric=None) -> float | None:
        return self.v.get((protocol, model, site, step, task, split, metric or HEADLINE[task]))

    def baseline(self, protocol: str, site: str, task: str, split: str = "test", metric: str | None = None):
        return self.get(protocol, BASELINE_MODEL, site, -1, task, split, metric)

    def baselines(self, protocol: str, task: str) -> list[str]:
        return sorted({r["site"] for r in self.rows if r["protocol"] == protocol and r["model"] == BASELINE_MODEL
                       and r["task"] == task})

    def point(self, protocol, model, site, step, task) -> Point | None:
        val = self.get(protocol, model, site, step, task, "val")
        test = self.get(protocol, model, site, step, task, "test")
        if val is None or test is None:
            return None
        return Point(model, site, step, self.timestep.get((protocol, model, step), -1), val, test)

    def curve(self, protocol: str, model: str, fam: str, task: str) -> list[Point]:
        """Per step, the site with the best *validation* headline metric (its test metric is what is reported)."""
        out = []
        for step in self.steps(protocol, model, fam):
            pts = [p for s in self.sites(protocol, model, fam) if (p := self.point(protocol, model, s, step, task))]
            pts = [p for p in pts if p.val == p.val]                          # NaN never wins
            if pts:
                out.append(max(pts, key=lambda p: (p.val, -p.step, p.site)))
        return out

    def best(self, protocol: str, model: str, fam: str, task: str, steps=None) -> Point | None:
        c = [p for p in self.curve(protocol, model, fam, task) if steps is None or p.step in steps]
        return max(c, key=lambda p: (p.val, -p.step)) if c else None

    def strongest_baseline(self, protocol: str, task: str, keep=None) -> str | None:
        """The baseline with the best validation score (saliency: Dice; depth: lowest MSE); ``keep(site)``: only
        among the baselines it accepts (e.g. the text-free ones)."""
        metric, sign = ("dice", 1) if task == "saliency" else ("mse", -1)
        c = [(sign * v, s) for s in self.baselines(protocol, task) if keep is None or keep(s)
             if (v := self.baseline(protocol, s, task, "val", metric)) is not None and v == v]
        return max(c)[1] if c else None

    def edges(self, protocol: str, model: str) -> tuple[int, int, int]:
        """(probes whose val-chosen λ is the grid's smallest, ... largest, probes) over (site, step, task)."""
        keys = [k for k in self.edge if k[0] == protocol and k[1] == model]
        return (sum(1 for k in keys if self.edge[k] == "low"), sum(1 for k in keys if self.edge[k] == "high"),
                len(keys))
