"""How the summary prints what it quotes: a number (three decimals, as rounded from results.csv), an estimate with
its CI, a verdict, a probe's site and step, a list of steps, the bootstrap distribution of the emergence step.
"""
from __future__ import annotations

import math

from . import emergence as emg
from .estimates import Est
from .results_index import Point


def _f(x: float | None, nd: int = 3) -> str:
    return "n/a" if x is None or x != x else f"{x:.{nd}f}"


def _ci(e: Est | None) -> str:
    if e is None or e.mean != e.mean:
        return "n/a"
    if not (math.isfinite(e.lo) and math.isfinite(e.hi)):
        return _f(e.mean)
    return f"{_f(e.mean)} [{_f(e.lo)}, {_f(e.hi)}]"


def _v(e: Est | None) -> str:
    return "n/a" if e is None or e.verdict is None else e.verdict


def _where(p: Point) -> str:
    return f"`{p.site}` at step {p.step} (t={p.timestep})"


def _kdist(d: emg.KDist) -> str:
    if d.mode is None:
        return "no step gains on any resample"
    top = ", ".join(f"{s}: {p:.0%}" for s, p in sorted(d.probs.items(), key=lambda x: -x[1])[:3])
    none = f"; no k on {d.p_none:.0%}" if d.p_none > 0 else ""
    return f"95 % interval of k [{d.lo:.0f}, {d.hi:.0f}], mode {d.mode} ({top}{none})"


def _steps(xs: list[int]) -> str:
    return ", ".join(map(str, xs)) if xs else "none"
