"""``write_report(run)``: figures, ``summary.md`` and one self-contained ``report.html`` (images embedded as base64).

Later stages add sections without editing this file: pass ``extra_sections=[(title, body), ...]`` (markdown, or HTML
when the body starts with ``<``), or drop markdown files into ``run/report/extra/*.md`` (included in name order; the
first ``# heading`` is the title). Both land under "Further analyses" in the HTML and in summary.md.
"""
from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Sequence

from ..atomic import atomic_write_text
from ..errors import fail
from ..probe.sweep import (COLUMNS, check_rows_have_arrays, read_per_image, read_positions, read_results,
                           write_results_csv)
from . import figures
from .analysis import analyse, merge_rows
from .intervention_claims import intervention_claims
from .results_index import EST_TAG, TASKS
from .summary import summary_markdown

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee;margin:.4em 0}code{background:#f5f5f5;padding:0 .2em}
h1,h2,h3{margin-top:1.4em}.hook{border-left:4px solid #9ab;padding-left:1em;color:#456}"""


def _inline(text: str, images: dict[str, str]) -> str:
    """Escape, then **bold**, `code`, and ![alt](path) (embedded when the path is a known figure)."""
    out, pos = [], 0
    for m in re.finditer(r"!\[([^\]]*)\]\(([^)]+)\)", text):
        out.append(_marks(html.escape(text[pos:m.start()], quote=False)))
        src = images.get(m.group(2), html.escape(m.group(2)))
        out.append(f'<img alt="{html.escape(m.group(1))}" src="{src}">')
        pos = m.end()
    out.append(_marks(html.escape(text[pos:], quote=False)))
    return "".join(out)


def _marks(s: str) -> str:
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", s)


def markdown_to_html(md: str, images: dict[str, str] | None = None) -> str:
    """The small markdown subset the report writes: headings, paragraphs, '-' lists, pipe tables, images."""
    images = images or {}
    out, para, lines, i = [], [], md.splitlines(), 0

    def flush():
        if para:
            out.append(f"<p>{_inline(' '.join(para), images)}</p>")
            para.clear()
    while i < len(lines):
        line = lines[i].rstrip()
        if not line.strip():
            flush()
        elif m := re.match(r"^(#{1,6})\s+(.*)", line):
            flush()
            n = len(m.group(1))
            out.append(f"<h{n}>{_inline(m.group(2), images)}</h{n}>")
        elif line.lstrip().startswith("- "):
            flush()
            items = []
            while i < len(lines) and lines[i].lstrip().startswith("- "):
                items.append(f"<li>{_inline(lines[i].lstrip()[2:], images)}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.startswith("|"):
            flush()
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            body = [r for r in block[1:] if not all(re.fullmatch(r":?-{3,}:?", c) for c in r)]
            head = "".join(f"<th>{_inline(c, images)}</th>" for c in block[0])
            rows = "".join("<tr>" + "".join(f"<td>{_inline(c, images)}</td>" for c in r) + "</tr>" for r in body)
            out.append(f"<table><tr>{head}</tr>{rows}</table>")
            continue
        else:
            para.append(line.strip())
        i += 1
    flush()
    return "\n".join(out)


def _extra_files(report_dir: Path) -> list[tuple[str, str]]:
    out = []
    for p in sorted((report_dir / "extra").glob("*.md")):
        text = p.read_text()
        m = re.match(r"^#\s+(.*)\n?", text)
        out.append((m.group(1).strip(), text[m.end():]) if m else (p.stem, text))
    return out


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def write_report(run: Path, extra_sections: Sequence[tuple[str, str]] = ()) -> Path:
    """Figures, summary.md and report.html from ``run/report/results.csv``; returns the report.html path.

    ``extra_sections``: (title, markdown-or-HTML body) pairs appended under "Further analyses" — the hook for
    later stages (labeller quality, interventions); ``run/report/extra/*.md`` files are appended too."""
    run = Path(run)
    out = run / "report"
    rows = read_results(out / "results.csv")
    if not rows:
        raise fail(f"results file {out / 'results.csv'} has no rows; rerun `sceneprobe probe --run {run}`")
    rc = _report_config(run)
    pi = out / "per_image.safetensors"
    arrays, positions = (read_per_image(pi), read_positions(pi)) if pi.is_file() else ({}, {})
    if arrays:                                                 # the sweep's rows (not the report's own) are its
        check_rows_have_arrays(rows, arrays, out / "results.csv",
                               skip=lambda r: EST_TAG in r["metric"] or r["model"] in ("readout", "intervention"))
    readouts = _readouts(run, {r["protocol"] for r in rows})
    claims, iv_ests = intervention_claims(_read_json(run / "interventions" / "results.json")
                                          or _read_json(run / "interventions" / "summary.json"))
    analysed = analyse(rows, arrays, positions, rc, readouts)
    res, an, findings = analysed
    write_results_table(out, merge_rows(rows, an.ests + iv_ests))
    fig_dir = out / "figures"
    figs: dict[str, Path] = {}
    for p in res.protocols:
        if not res.models(p):
            continue
        for task in TASKS:
            figs[f"{p}: {task}, best site per step"] = figures.curves(res, p, task, fig_dir, findings[p])
        for task in TASKS:
            figs[f"{p}: {task}, site × step"] = figures.heatmap(res, p, task, fig_dir)
        grid = figures.prediction_grid(run, res, p, fig_dir)
        if grid is not None:
            figs[f"{p}: probe predictions at early, middle and late steps"] = grid
    rel = {cap: path.relative_to(out).as_posix() for cap, path in figs.items()}
    extras = list(extra_sections) + _extra_files(out)
    rj = out / "results.json"
    cfg = json.loads(rj.read_text()).get("probe_config") if rj.is_file() else None
    md = summary_markdown(rows, rel, analysed, rc, cfg, claims)
    md += "\n## Further analyses\n\n"
    if extras:
        for title, body in extras:
            text = "(HTML section: see report.html)" if body.lstrip().startswith("<") else body.strip()
            md += f"### {title}\n\n{text}\n\n"
    else:
        md += ("_No further analyses yet (labeller quality, interventions): later stages add sections through "
               "`write_report(run, extra_sections=...)` or `report/extra/*.md`._\n")
    atomic_write_text(out / "summary.md", md)

    images = {r: _data_uri(figs[c]) for c, r in rel.items()}
    # figures written by later stages (e.g. interventions) and referenced from their sections: embed them too
    images.update({f"figures/{f.name}": _data_uri(f) for f in sorted(fig_dir.glob("*.png"))
                   if f"figures/{f.name}" not in images})
    summary_part, _, _ = md.partition("\n## Further analyses\n")
    body = [markdown_to_html(summary_part, images), '<h2 id="further-analyses">Further analyses</h2>',
            "<!-- HOOK: later stages add sections here (write_report(extra_sections=...) or report/extra/*.md) -->"]
    if not extras:
        body.append('<p class="hook">No further analyses yet (labeller quality, interventions).</p>')
    for title, text in extras:
        inner = text if text.lstrip().startswith("<") else markdown_to_html(text, images)
        body.append(f"<section><h3>{html.escape(title)}</h3>\n{inner}</section>")
    if cfg:
        body.append(f"<h2>Probe configuration</h2><pre>{html.escape(json.dumps(cfg, indent=2, sort_keys=True))}</pre>")
    page = (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>sceneprobe report</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    atomic_write_text(out / "report.html", page)
    return out / "report.html"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _report_config(run: Path):
    """The run's ``report`` section (``run/config.yaml``), else the defaults."""
    from ..config import ReportConfig, config_from_dict
    try:
        import yaml
        return config_from_dict(yaml.safe_load((run / "config.yaml").read_text()) or {}).report
    except Exception:                                                          # no or foreign config: defaults
        return ReportConfig()


def _readouts(run: Path, protocols) -> dict:
    """{protocol: image read-out per step} where the read-out stage wrote one (``run/readout/<protocol>.csv``)."""
    protocols = [p for p in sorted(protocols) if (run / "readout" / f"{p}.csv").is_file()]
    if not protocols:                                                          # skip the labeller's heavy imports
        return {}
    try:
        from ..labeller.readout import load_readout
    except ImportError:
        return {}
    out = {}
    for p in protocols:
        try:
            r = load_readout(run, p)
        except Exception:                                                      # damaged read-out: report without it
            r = None
        if r is not None:
            out[p] = r
    return out


def write_results_table(out: Path, rows: list[dict]) -> Path:
    """results.csv (and the rows of results.json) with the report's CIs and comparison rows merged in."""
    rj = out / "results.json"
    data = _read_json(rj) or {"columns": list(COLUMNS)}
    data["rows"] = write_results_csv(out, rows)
    from ..atomic import atomic_write_json
    atomic_write_json(rj, data)
    return out / "results.csv"
