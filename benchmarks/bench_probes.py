"""Exact probes vs the paper's Adam trainer: time per probe and test metrics, on one capture.

    python benchmarks/bench_probes.py --run runs/default          # every store of a real run
    python benchmarks/bench_probes.py                             # a synthetic store with planted signal

The exact sweep (ridge + IRLS, λ chosen on val) runs on every (store, site, step), both tasks; the Adam trainer
(lr 1e-3, 30 epochs, batch 4, checkpoint on val loss) on a few (site, step) pairs of the first store. Both times
include scoring on val and test. Nothing is written to the run folder. The last lines are the figures.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

from sceneprobe.capture.store import CaptureStore
from sceneprobe.config import ProbeConfig
from sceneprobe.probe import sweep
from sceneprobe.probe.synthetic import synthetic_run


def _scores(rows):
    return {(r["task"], r["metric"]): r["value"] for r in rows if r["split"] == "test"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help="run folder with captures/ (default: a synthetic store)")
    ap.add_argument("--pairs", type=int, default=3, help="(site, step) pairs for the Adam trainer")
    ap.add_argument("--epochs", type=int, default=30, help="Adam epochs (the paper: 30)")
    ap.add_argument("--threads", type=int, default=1, help="torch and BLAS threads for both solvers")
    ap.add_argument("--repeat", type=int, default=2, help="exact sweep repeats (best time is kept)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)                      # numpy's BLAS too (the exact solver's float64 products)
    tmp = None
    if args.run is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_probes_")
        run = synthetic_run(Path(tmp.name), n=256, channels=64, size=64, steps=3, noise=1.0, models=("ldm",),
                            sites={"unet.down0.attn0": 16, "unet.up1.attn0": 16})
        what = "synthetic store (planted signal): N=256, C=64, 16x16 sites, 64x64 labels, 2 sites x 3 steps"
    else:
        run = Path(args.run)
        what = f"run {run}"
    cfg = ProbeConfig()
    groups = []
    for proto, stores in sweep.find_stores(run):
        ss = [CaptureStore(s) for s in stores]
        groups.append((sweep.load_protocol_labels(proto, ss[0].n), ss))
    print(f"data: {what}")

    times = []
    for _ in range(args.repeat):                         # best of a few: the machine is shared
        exact_rows, n_pairs = {}, 0
        t0 = time.perf_counter()
        for labels, stores in groups:
            for store in stores:
                for site in store.sites:
                    for step in store.steps:
                        _, rows = sweep.probe_one(store, site, step, labels, cfg)
                        exact_rows[(store.root, site, step)] = rows
                        n_pairs += 1
        times.append(time.perf_counter() - t0)
    t_exact = min(times) / (2 * n_pairs)

    labels, stores = groups[0]
    store = stores[0]
    all_pairs = [(s, st) for s in store.sites for st in store.steps]
    k = min(args.pairs, len(all_pairs))
    picks = [all_pairs[round(i * (len(all_pairs) - 1) / max(k - 1, 1))] for i in range(k)]
    adam_cfg = dataclasses.replace(cfg, solver="adam", epochs=args.epochs)
    sweep.fit_paper_adam(store, *picks[0], labels, dataclasses.replace(adam_cfg, epochs=1))   # warm-up
    adam_rows = {}
    t0 = time.perf_counter()
    for site, step in picks:
        _, adam_rows[(site, step)] = sweep.probe_one(store, site, step, labels, adam_cfg)
    t_adam = (time.perf_counter() - t0) / (2 * len(picks))

    keys = [("saliency", "dice"), ("saliency", "iou"), ("depth", "spearman"), ("depth", "pearson"), ("depth", "rmse")]
    print(f"\nstore {store.root}: test metrics, exact vs adam ({args.epochs} epochs)")
    print(f"{'site':<24}{'step':>5}  " + "  ".join(f"{t[:3]}.{m:<8}" for t, m in keys))
    sums = {"exact": {k: 0.0 for k in keys}, "adam": {k: 0.0 for k in keys}}
    for site, step in picks:
        for name, rows in (("exact", exact_rows[(store.root, site, step)]), ("adam", adam_rows[(site, step)])):
            sc = _scores(rows)
            for kk in keys:
                sums[name][kk] += sc[kk] / len(picks)
            print(f"{site:<24}{step:>5}  " + "  ".join(f"{sc[kk]:>12.4f}" for kk in keys) + f"  {name}")
    diff = ", ".join(f"{m} {sums['exact'][(t, m)] - sums['adam'][(t, m)]:+.4f}" for t, m in keys)
    print(f"\nexact sweep: {n_pairs} (site, step) pairs x 2 tasks in {t_exact * 2 * n_pairs:.2f} s "
          f"(best of {args.repeat})")
    print(f"exact: {t_exact:.3f} s per probe ({2 * n_pairs} probes, threads={args.threads})")
    print(f"adam:  {t_adam:.3f} s per probe ({2 * len(picks)} probes, {args.epochs} epochs, threads={args.threads})")
    print(f"speed-up: {t_adam / t_exact:.1f}x (goal >= 20x)")
    for name in ("exact", "adam"):
        print(f"{name} mean test over the adam pairs: dice {sums[name][('saliency', 'dice')]:.4f}, "
              f"spearman {sums[name][('depth', 'spearman')]:.4f}, rmse {sums[name][('depth', 'rmse')]:.4f}")
    print(f"exact - adam (higher is better but rmse): {diff}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
