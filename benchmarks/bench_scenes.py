"""Benchmark: how fast the synthetic world renders, and how long 10,000 scenes of 64×64 take to make.

    .venv/bin/python benchmarks/bench_scenes.py                 # ~15 s on 2 CPU cores
    .venv/bin/python benchmarks/bench_scenes.py --n64 1000 --n256 24 --supersample 3

Measures ``render_scenes`` (sample + render, no files) at 64×64 and 256×256 with 1 and 2 workers, then
``make_dataset`` (render + write 4 files per scene + cache) at 64×64 with 2 workers into a temporary folder under
``--tmp`` (default: the system's temporary folder; file creation speed differs a lot between disks and with other
jobs' I/O, so point it where datasets will really go). Prints a table, then the projected time for 10,000 scenes
of 64×64 as its last lines (goal: under 60 s with 2 workers).
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from sceneprobe.world.dataset import make_dataset
from sceneprobe.world.render import render_scenes


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the pool's workers, once they have exited)."""
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + child.ru_utime + child.ru_stime


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``fn()``; CPU time does not depend on what else the machine is running."""
    start, cpu = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - start, cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n64", type=int, default=400, help="scenes per 64x64 render measurement")
    parser.add_argument("--n256", type=int, default=12, help="scenes per 256x256 render measurement")
    parser.add_argument("--n-make", type=int, default=1000, help="scenes for the make_dataset measurement")
    parser.add_argument("--supersample", type=int, default=3, help="rays per pixel = supersample²")
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()),
                        help="folder in which the temporary dataset is written")
    args = parser.parse_args()

    rows = []
    for size, n in ((64, args.n64), (256, args.n256)):
        for workers in (1, 2):
            dt = timed(lambda: render_scenes(0, range(n), size=size, supersample=args.supersample, workers=workers))
            rows.append((f"render_scenes {size}x{size}", workers, n, *dt))
    args.tmp.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix=".bench_scenes-") as tmp:
        dt_make, cpu_make = timed(lambda: make_dataset(Path(tmp) / "ds", n=args.n_make, size=64,
                                                       supersample=args.supersample, workers=2, progress=False))
    rows.append(("make_dataset 64x64 (+files)", 2, args.n_make, dt_make, cpu_make))

    print(f"supersample {args.supersample} ({args.supersample ** 2} rays per pixel); times include pool start-up; "
          f"dataset written under {args.tmp}")
    print(f"{'what':<30} {'workers':>7} {'scenes':>7} {'seconds':>8} {'scenes/s':>9} {'CPU ms/scene':>13}")
    for what, workers, n, dt, cpu in rows:
        print(f"{what:<30} {workers:>7} {n:>7} {dt:>8.2f} {n / dt:>9.1f} {cpu / n * 1000:>13.2f}")
    render_2 = rows[1][3] / rows[1][2] * 10_000
    make_2 = dt_make / args.n_make * 10_000
    idle_2 = cpu_make / args.n_make * 10_000 / 2
    print(f"projected time for 10,000 scenes of 64x64 with 2 workers: render_scenes {render_2:.0f} s, "
          f"make_dataset (render + write files) {make_2:.0f} s as measured (goal < 60 s); "
          f"{idle_2:.0f} s on 2 otherwise idle cores (from CPU time)")


if __name__ == "__main__":                                             # the worker pool spawns: guard the entry
    main()
