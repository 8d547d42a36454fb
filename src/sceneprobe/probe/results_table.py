"""``report/results.csv`` and ``results.json``: the long-form rows (COLUMNS), values rounded to 6 significant digits,
sorted and formatted so that reruns write identical bytes; and the table read back (:func:`read_results`)."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from ..atomic import atomic_write_json, atomic_write_text
from ..config import ProbeConfig
from ..errors import fail
from .metrics import METRICS
from .probe_files import fit_identity

# lo / hi: a CI, filled by the report for the numbers it interprets; lambda_edge: "low" / "high" when the val-chosen
# λ of that probe's task is the grid's smallest / largest (widen probe.lambdas), else empty
COLUMNS = ("protocol", "model", "site", "step", "timestep", "task", "split", "metric", "value", "lo", "hi",
           "lambda_edge")


def _row(protocol, model, site, step, timestep, task, split, metric, value, lo=float("nan"), hi=float("nan"),
         lambda_edge: str = "") -> dict:
    return {"protocol": protocol, "model": model, "site": site, "step": int(step), "timestep": int(timestep),
            "task": task, "split": split, "metric": metric, "value": _fmt_value(value), "lo": _fmt_value(lo),
            "hi": _fmt_value(hi), "lambda_edge": lambda_edge}


def _fmt_value(v: float) -> float:
    """Round to 6 significant digits (what results.csv shows): reruns and resumed runs print identical bytes."""
    v = float(v)
    return v if not math.isfinite(v) else float(f"{v:.6g}")


def _sort_key(r: dict):
    return (r["protocol"], r["model"], r["site"], r["step"], r["task"], r["split"], r["metric"])


def format_value(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:.6g}"


def _cell(r: dict, c: str) -> str:
    if c == "value":
        return format_value(r[c])
    if c in ("lo", "hi"):
        v = r.get(c, math.nan)
        return "" if math.isnan(v) else format_value(v)
    return r.get(c, "")


def write_results_csv(out: Path, rows: list[dict]) -> list[dict]:
    """Write ``out/results.csv`` (rows sorted, values formatted) and return the rows as results.json keeps them
    (NaN → None)."""
    rows = sorted(rows, key=_sort_key)
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(COLUMNS)
    for r in rows:
        wr.writerow([_cell(r, c) for c in COLUMNS])
    atomic_write_text(out / "results.csv", buf.getvalue())
    return [{**{c: r.get(c, "") for c in COLUMNS},
             **{k: None if math.isnan(r.get(k, math.nan)) else r[k] for k in ("value", "lo", "hi")}} for r in rows]


def write_results(out: Path, rows: list[dict], cfg: ProbeConfig) -> Path:
    clean = write_results_csv(out, rows)
    atomic_write_json(out / "results.json", {"columns": list(COLUMNS), "probe_config": fit_identity(cfg),
                                             "metrics": {k: list(v) for k, v in METRICS.items()}, "rows": clean})
    return out / "results.csv"


def read_results(path: Path) -> list[dict]:
    """results.csv → rows with typed step, timestep and value."""
    path = Path(path)
    if not path.is_file():
        raise fail(f"results file {path} is missing; run `sceneprobe probe --run {path.parent.parent}` first")
    redo = f"rerun `sceneprobe probe --run {path.parent.parent}` to rewrite it"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise fail(f"results file {path} cannot be read ({type(e).__name__}); {redo}") from None
    need = ("protocol", "model", "site", "step", "timestep", "task", "split", "metric", "value")
    for line, r in enumerate(rows, start=2):
        missing = [k for k in need if not r.get(k)]
        if missing:
            raise fail(f"results file {path}, line {line}: field {missing[0]!r} is missing or empty; {redo}")
        try:
            r["step"], r["timestep"], r["value"] = int(r["step"]), int(r["timestep"]), float(r["value"])
            r["lo"], r["hi"] = (float(r[k]) if r.get(k) else math.nan for k in ("lo", "hi"))
        except (TypeError, ValueError):
            raise fail(f"results file {path}, line {line}: step, timestep, value, lo and hi must be numbers; {redo}") \
                from None
        r["lambda_edge"] = r.get("lambda_edge") or ""
    return rows
