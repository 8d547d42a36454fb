"""Answers with numbers: does the U-Net (and the VAE) linearly encode depth and saliency, from which step, how far
above the strongest baseline and the controls, ahead of the image read-out or not — compared with the paper.

Every sentence follows from a statistic that could have come out the other way: the numbers and their CIs come from
:mod:`.analysis` (also written into ``results.csv``), the verdicts from the rule stated at the top of the report
(:func:`sceneprobe.probe.stats.verdict`). Numbers are printed with three decimals, as rounded from results.csv.

The pieces: :mod:`.how_to_read` (the rules section), :mod:`.paper_table` (the comparison with the paper),
:mod:`.formatting` (how numbers and CIs are printed); this module writes the findings of each protocol.
"""
from __future__ import annotations

from ..config import ReportConfig
from .analysis import analyse
from .formatting import _ci, _f, _kdist, _steps, _v, _where
from .how_to_read import rules_text
from .paper_table import paper_comparison
from .results_index import DENOISER_PREFIXES, MAIN_MODEL, TASKS, Results, baseline_label, group_label

HEAD = {"saliency": "Dice", "depth": "skill"}

PROVENANCE = {
    "noised": "**Labels: exact** — the renderer's (or your image folder's) depth and object mask of each image "
              "(`captures/noised/labels.safetensors`); activations come from the scene's latent forward-diffused to "
              "each step.",
    "generate": "**Labels: the labeller's, not exact** — depth and mask predicted by the run's labeller from each "
                "*final* generated image (see \"Labeller quality\" for its accuracy on held-out renders and on their "
                "VAE reconstructions).",
    "sd": "**Labels: from labelling networks, not exact** (see the Labels section), as the paper's came from "
          "TRACER/MiDaS.",
}


TAG = {"noised": "exact labels", "generate": "the labeller's labels", "sd": "labelling networks' labels"}


def _baselines_table(res: Results, protocol: str, f: dict) -> list[str]:
    L = ["| baseline (fit on train, threshold on val) | saliency Dice | AUROC | AP | depth MSE | Spearman ρ |",
         "|---|---|---|---|---|---|"]
    sites = sorted(set(f["baselines"].get("saliency", {})) | set(f["baselines"].get("depth", {})))
    for s in sites:
        mark = " **(strongest, saliency)**" if f["strongest"].get("saliency") == s else ""
        mark += " **(strongest, depth)**" if f["strongest"].get("depth") == s else ""
        g = lambda task, m: res.baseline(protocol, s, task, "test", m)          # noqa: E731
        L.append(f"| {baseline_label(s)}{mark} | {_f(g('saliency', 'dice'))} | {_f(g('saliency', 'auroc'))} | "
                 f"{_f(g('saliency', 'ap'))} | {_f(g('depth', 'mse'))} | {_f(g('depth', 'spearman'))} |")
    return L + [""]


def _encodes(res: Results, protocol: str, f: dict, rc: ReportConfig) -> list[str]:
    L = ["### Does the U-Net linearly encode depth and saliency?", ""]
    for task in ("saliency", "depth"):
        g = f["groups"].get((MAIN_MODEL, "unet"), {}).get(task)
        if not g:
            L.append(f"- **{task}**: no U-Net probes in this run.")
            continue
        b, h, e = g["best"], g["headline"], f["encodes"].get(task)
        s = f["strongest"].get(task)
        gt = lambda m: res.get(protocol, b.model, b.site, b.step, task, "test", m)  # noqa: E731
        if task == "saliency":
            L.append(f"- **saliency: {_v(e)}.** Best U-Net probe {_where(b)}: test Dice **{_ci(h)}** (IoU "
                     f"{_f(gt('iou'))}, AUROC {_f(gt('auroc'))}, AP {_f(gt('ap'))}). Strongest baseline: "
                     f"{baseline_label(s)} (Dice {_f(res.baseline(protocol, s, task))}); probe − baseline "
                     f"**{_ci(e)}** Dice (minimum {rc.min_dice:g}).")
        else:
            pos = res.baseline(protocol, s, task, "test", "spearman")
            own = f.get("positions", {}).get(b.site)
            pos_own = res.baseline(protocol, own, task, "test", "spearman") if own else None
            L.append(f"- **depth: {_v(e)}.** Best U-Net probe {_where(b)}: test skill over the layout prior "
                     f"**{_ci(h)}**; skill over the strongest baseline ({baseline_label(s)}) **{_ci(e)}** (minimum "
                     f"{rc.min_skill:g}). Beside it (not verdicts): centred skill (per-image mean removed) "
                     f"{_ci(g.get('centred'))}; scale-and-shift-invariant skill {_ci(g.get('ssi'))}; Spearman ρ "
                     f"{_f(gt('spearman'))} (non-sky {_f(gt('spearman_nonsky'))}) — the position-only baseline at "
                     f"the probe's own resolution scores ρ {_f(pos_own)} and the strongest baseline ρ {_f(pos)}, so ρ "
                     f"mostly measures layout; RMSE {_f(gt('rmse'))} (non-sky {_f(gt('rmse_nonsky'))}); AbsRel "
                     f"{_f(gt('absrel'))}; δ<1.25 {_f(gt('delta1'))}; skill on non-sky pixels "
                     f"{_f(gt('skill_nonsky'))}.")
    edges = f["edges"]
    if edges:
        L.append("- **λ on the grid's edge** (column `lambda_edge` of results.csv; the val optimum may lie beyond the "
                 "grid): " + "; ".join(f"{m}: {lo + hi} of {n} probes (low {lo}, high {hi})"
                                      for m, (lo, hi, n) in edges.items())
                 + ". Low: the least penalty on the grid was best, i.e. the probe is essentially unpenalised; high: "
                 "the most penalty was best (typically a probe with nothing to find).")
    return L + [""]


def _emergence(f: dict) -> list[str]:
    n = len(f["steps"])
    L = [f"### From which step? ({n} steps, 0 = noisiest)", ""]
    for task in ("saliency", "depth"):
        em = f["emergence"].get(task)
        if not em:
            L.append(f"- **{task}**: no step gains over the position-only baseline on val; no emergence step.")
            continue
        k, best = em["k"], em["best"]
        enc = f["encodes"].get(task)
        caveat = "" if enc is not None and enc.verdict == "yes" else \
            (f" Caveat: the U-Net's best probe does not beat the strongest baseline on {task} (verdict "
             f"{_v(enc)}), so this step marks a gain over the position-only probe only.")
        diff = "" if em["k_vs_best"] is None else f"; step {k.step} − best step: {_ci(em['k_vs_best'])}"
        L.append(f"- **{task}: from step {k.step}** of {n} (t={k.timestep}): test gain over the position-only "
                 f"baseline {_ci(em['gain_k'])}; best step {best.step}: {_ci(em['gain_best'])}{diff}.{caveat}")
        for fr, d in sorted(em.get("dists", {}).items()):
            if d is None:
                continue
            pt = em.get("points", {}).get(fr)
            L.append(f"  - fraction {fr:g}: k = {pt.step if pt else 'none'} on val; bootstrap over test images: "
                     f"{_kdist(d)}.")
        L.append(f"  - per step, best site on val, test {HEAD[task]} [pointwise 95 % CI]: "
                 + "; ".join(f"{p.step}: {_ci(e)}" for p, e in em["curve"]) + ".")
    return L + [""]


def _where_scene(res: Results, protocol: str, f: dict, rc: ReportConfig) -> list[str]:
    """Where the scene appears: the input x_t, the U-Net, the VAE decoder, the image read-out — layout-fair."""
    rows = [("input x_t (5×5 neighbourhood)", (MAIN_MODEL, "input")), ("U-Net", (MAIN_MODEL, "unet")),
            ("VAE decoder", (MAIN_MODEL, "vae.dec"))]
    if not any(f["groups"].get(k) for _, k in rows):
        return []
    L = ["### Where does the scene appear: input, U-Net, VAE decoder, image?", "",
         "Best probe of each group (site and step chosen on val), layout-fair; the difference to the input control "
         "is on the same test images.", "",
         "| where | saliency Dice [CI] | − input (Dice) | depth skill [CI] | − input (skill) |", "|---|---|---|---|---|"]
    for label, key in rows:
        g = f["groups"].get(key)
        if not g:
            continue
        cells = []
        for task in ("saliency", "depth"):
            t = g.get(task)
            d = f["vs_input"].get(task, {}).get(key[1]) if key[1] != "input" else None
            cells += [f"{_ci(t['headline'])} at {t['best'].site}@{t['best'].step}" if t else "n/a",
                      f"{_ci(d)} ({_v(d)})" if d else "—"]
        L.append(f"| {label} | " + " | ".join(cells) + " |")
    ro = {task: rows_[-1] for task, rows_ in f["readout"].items() if rows_}
    if ro:
        cells = []
        for task in ("saliency", "depth"):
            st, r, _ = ro.get(task, (None, None, None))
            cells += [f"{_ci(r)} at step {st} (depth: skill over the mean map)" if r else "n/a", "—"]
        L.append("| image read-out, last step (a labeller on the decoded x̂₀; not a probe) | " + " | ".join(cells)
                 + " |")
    L.append("")
    for task in ("saliency", "depth"):
        steps = f["vs_input"].get(task, {}).get("steps") or []
        if steps:
            above = [st for st, e in steps if e.verdict == "yes"]
            L.append(f"- **{task}, U-Net − input per step** [pointwise 95 % CI]: "
                     + "; ".join(f"{st}: {_ci(e)}" for st, e in steps)
                     + f". The U-Net adds to its input (verdict yes) at steps {_steps(above)}.")
    return L + [""]


def _vae(f: dict, rc: ReportConfig) -> list[str]:
    L = ["### The VAE: encoder and decoder, separately", "",
         "The paper's VAE claims concern the decoder fed the denoising latents; they are tested on `vae.dec.*` only. "
         "The encoder sees the clean image (step-independent) and is one number."]
    L.append("")
    for task in ("saliency", "depth"):
        enc = f["groups"].get((MAIN_MODEL, "vae.enc"), {}).get(task)
        if enc:
            e = f["vae_enc"].get(task)
            L.append(f"- **encoder, {task}: {_v(e)}** vs the strongest baseline: test {HEAD[task]} "
                     f"{_ci(enc['headline'])}; difference {_ci(e)}.")
        steps = f["vae_dec_steps"].get(task)
        if steps:
            by = {v: [e.step for e in steps if e.verdict == v] for v in ("yes", "no", "inconclusive")}
            dec = f["groups"][(MAIN_MODEL, "vae.dec")][task]
            L.append(f"- **decoder, {task}**: beats the strongest baseline (verdict yes) at steps "
                     f"{_steps(by['yes'])}; no at {_steps(by['no'])}; inconclusive at {_steps(by['inconclusive'])}. "
                     f"Best decoder probe {_where(dec['best'])}: {HEAD[task]} {_ci(dec['headline'])}.")
        for w in ("early", "late"):
            e = f["unet_vs_vae"].get(task, {}).get(w)
            if e:
                L.append(f"  - U-Net − VAE decoder, {w} steps ({_steps(f[w])}): {_ci(e)} → **{_v(e)}**.")
    if len(L) == 3:
        L.append("- No VAE sites were captured in this run.")
    return L + [""]


def _controls_table(res: Results, protocol: str, f: dict) -> list[str]:
    L = ["### How far above the controls and the strongest baseline?", "",
         "| group | saliency Dice [CI] | vs strongest baseline | depth skill [CI] | vs strongest baseline | "
         "main model − this group (Dice; skill) |", "|---|---|---|---|---|---|"]
    passing = []
    for (m, fam), g in f["groups"].items():
        cells = []
        for task in ("saliency", "depth"):
            t = g.get(task)
            cells += [_ci(t["headline"]) if t else "n/a",
                      (f"{_ci(t.get('vs_strongest'))} ({_v(t.get('vs_strongest'))})") if t else "n/a"]
            if t and m not in (MAIN_MODEL, "uncond") and _v(t.get("vs_strongest")) == "yes":   # uncond: trained
                passing.append(f"{group_label(m, fam)} ({task})")
        diffs = [f["controls"].get(task, {}).get((m, fam)) for task in ("saliency", "depth")]
        d = "; ".join(f"{_ci(e)} ({_v(e)})" for e in diffs if e) or "—"
        L.append(f"| {group_label(m, fam)} | " + " | ".join(cells) + f" | {d} |")
    if passing:
        L += ["", "- **A control beats the strongest baseline**: " + "; ".join(passing) + ". Random-weight features "
              "are random functions of the input latent x_t, which itself carries part of the scene (see the input "
              "control): passing this test says the *input* holds the information, not that the control network "
              "knows it. The question for the trained U-Net is how far it is above the controls and the input."]
    return L + [""]


def _text_control(f: dict) -> list[str]:
    """How much of "the U-Net encodes the scene beyond the layout" survives the text: the prompt alone (a probe on
    the pooled text embedding with the layout prior) and the model's own unconditional half of the CFG batch."""
    if not f["text"]:
        return []
    L = ["### How much survives the text as a control?", "",
         "A text-conditioned model may encode partly what the prompt already says. Rivals: the best **prompt-only** "
         "probe (the pooled text embedding with the layout prior, fitted and tuned like the probes) and the "
         "U-Net's own **unconditional** half (same pass, same images, no text). The U-Net's best probe against each "
         "(saliency: Dice difference; depth: skill over it; 95 % CI, verdict):", "",
         "| task | − strongest text-free baseline | − best prompt-only probe | − its unconditional half |",
         "|---|---|---|---|"]
    for task in ("saliency", "depth"):
        t = f["text"].get(task)
        if t:
            cell = lambda e: f"{_ci(e)} ({_v(e)})" if e is not None else "n/a"      # noqa: E731
            L.append(f"| {task} | {cell(t.get('layout'))} | {cell(t.get('prompt'))} | {cell(t.get('uncond'))} |")
    L.append("")
    for task in ("saliency", "depth"):
        t = f["text"].get(task)
        if not t:
            continue
        lay_v, pr_v = _v(t.get("layout")), _v(t.get("prompt"))
        if "prompt" in t:
            if lay_v == "yes":
                what = {"yes": "survives the prompt: the U-Net is above what the prompt alone predicts",
                        "no": "does **not** survive the prompt: the prompt alone predicts as much",
                        }.get(pr_v, "is inconclusive against the prompt alone")
                L.append(f"- **{task}**: the verdict \"beyond the layout\" {what}.")
            else:
                L.append(f"- **{task}**: no \"beyond the layout\" verdict to test against the prompt "
                         f"(vs the text-free baseline: {lay_v}).")
        if "uncond" in t:
            uv = _v(t["uncond"])
            L.append(f"  - against its unconditional half: {uv} — "
                     + ("the text adds to what the U-Net holds." if uv == "yes" else
                        "the U-Net holds about as much without the text." if uv == "no" else
                        "no clear difference either way."))
    return L + [""]


def _readout(f: dict, protocol: str) -> list[str]:
    if not any(f["readout"].values()):
        return []
    site = next((r.site for rows in f["readout"].values() for _, r, _ in rows if r is not None), "labeller(x0)")
    reader = site[:-4] if site.endswith("(x0)") else site
    last = ("" if protocol != "generate" else " The labels are the labeller's on the final image and the read-out "
            "is that same labeller: its last steps score ≈ 1 by construction." if reader == "labeller" else
            " The labels are the first labeller's on the final image and the read-out is a second, independent "
            "labeller: its last-step value is the two labellers' agreement (the read-out's ceiling), not 1 by "
            "construction.")
    L = [f"### Probe vs image read-out (`{reader}/` on each step's decoded x̂₀)", "",
         "Where the probe is above the read-out, the activations hold scene information the step's best image guess "
         "does not show. Depth: skill over the mean map for both curves (so they share a reference)." + last, "",
         "| step | probe Dice | read-out Dice | probe − read-out | probe − read-out, depth skill |",
         "|---|---|---|---|---|"]
    sal = {st: (r, d) for st, r, d in f["readout"].get("saliency", [])}
    dep = {st: (r, d) for st, r, d in f["readout"].get("depth", [])}
    curve = {p.step: e for p, e in f["emergence"].get("saliency", {}).get("curve", [])}
    for st in sorted(set(sal) | set(dep)):
        rs, ds = sal.get(st, (None, None))
        rd, dd = dep.get(st, (None, None))
        L.append(f"| {st} | {_ci(curve.get(st))} | {_ci(rs)} | {_ci(ds)} ({_v(ds)}) | {_ci(dd)} ({_v(dd)}) |")
    L.append("")
    for task in ("saliency", "depth"):
        rows = f["readout"].get(task, [])
        ahead = [st for st, _, d in rows if d is not None and d.verdict == "yes"]
        behind = [st for st, _, d in rows if d is not None and d.hi < 0]
        L.append(f"- **{task}**: the probe is ahead of the image read-out (verdict yes) at steps {_steps(ahead)}"
                 + (f"; not ahead from step {_first_after(rows, ahead)}" if ahead else "")
                 + f"; the read-out is ahead of the probe (CI of probe − read-out below 0) at steps {_steps(behind)}.")
        # the rival explanation of "ahead": layout alone — the probe is given the layout prior, the read-out is not
        s = f["strongest"].get(task)
        base = 0.0 if task == "depth" else f["baselines"].get(task, {}).get(s)
        below = [st for st, r, _ in rows if r is not None and base is not None and r.hi < base]
        if below and ahead:
            what = "skill 0 (the mean map)" if task == "depth" else f"Dice {_f(base)} ({baseline_label(s)})"
            L.append(f"  - at steps {_steps(below)} the read-out is below the layout baseline itself ({what}, CI "
                     "included): there the probe's lead over the read-out is at least partly what layout alone "
                     "gives (the probe is given the layout, the labeller reading x̂₀ is not); what the activations "
                     "hold beyond layout at those steps is the probe's gain over the position-only baseline "
                     "(\"From which step?\").")
    return L + [""]


def _first_after(rows, ahead: list[int]) -> str:
    later = [st for st, _, d in rows if st > max(ahead) and (d is None or d.verdict != "yes")]
    return str(later[0]) if later else "— (ahead up to the last step)"


def protocol_summary(res: Results, protocol: str, f: dict, rc: ReportConfig,
                     interventions: list[dict] | None = None) -> list[str]:
    L = [f"## Protocol `{protocol}`", "",
         PROVENANCE.get(protocol, f"Labels: `captures/{protocol}/labels.safetensors`."), ""]
    if not f["groups"]:
        return L + ["No probe results for this protocol.", ""]
    L += ["### Baselines", ""] + _baselines_table(res, protocol, f)
    L += _encodes(res, protocol, f, rc)
    L += _where_scene(res, protocol, f, rc)
    L += _emergence(f)
    L += _vae(f, rc)
    L += _controls_table(res, protocol, f)
    L += _text_control(f)
    L += _readout(f, protocol)
    L += paper_comparison(f, protocol, [c for c in interventions or [] if c.get("protocol") == protocol], rc)
    tag = TAG.get(protocol, "labels: see above")
    L = [f"{ln} ({protocol}, {tag})" if ln.startswith("### ") else ln for ln in L]   # provenance in every section
    if _transformer_denoiser(res, protocol):      # PixArt, SD3, FLUX: the denoiser group is a transformer's sites
        L = [ln.replace("U-Net", "transformer") for ln in L]
    return L


def _transformer_denoiser(res: Results, protocol: str) -> bool:
    """The protocol's denoiser is a diffusion transformer (its sites ``dit.*``, ``mmdit.*``, ``flux.*``)."""
    sites = res.sites(protocol, MAIN_MODEL, "unet")
    return bool(sites) and all(s.startswith(DENOISER_PREFIXES) for s in sites)


def summary_markdown(rows: list[dict], figures: dict[str, str] | None = None, analysed=None,
                     rc: ReportConfig | None = None, probe_cfg: dict | None = None,
                     interventions: list[dict] | None = None) -> str:
    """The whole summary as markdown; ``analysed`` = :func:`.analysis.analyse`'s result (computed here from
    ``rows`` alone, without per-image CIs, when absent); ``figures`` maps a caption to a path."""
    rc = rc or ReportConfig()
    if analysed is None:
        analysed = analyse(rows, {}, {}, rc)
    res, _, findings = analysed
    L = ["# sceneprobe report", ""] + rules_text(rc, probe_cfg)
    for p in res.protocols:
        L += protocol_summary(res, p, findings[p], rc, interventions)
    if figures:
        L += ["## Figures", ""]
        for caption, path in figures.items():
            L += [f"![{caption}]({path})", ""]
    return "\n".join(L) + "\n"


def best_table(rows: list[dict]) -> dict:
    """{protocol: {group label: {task: Point}}} — the val-chosen best probes, for tables and tests."""
    res = Results(rows)
    out: dict = {}
    for p in res.protocols:
        for m, fam in res.groups(p):
            out.setdefault(p, {})[group_label(m, fam)] = {t: res.best(p, m, fam, t) for t in TASKS}
    return out
