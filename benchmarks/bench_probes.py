"""Exact probes vs the paper's Adam trainer, and the `probes` stage before/after a revision, on one capture.

    python benchmarks/bench_probes.py --run runs/default          # every store of a real run
    python benchmarks/bench_probes.py                             # a synthetic store with planted signal
    python benchmarks/bench_probes.py --run runs/default --baseline 5932953   # the stage against that revision

1. Per probe: the exact sweep (ridge + IRLS, λ chosen on val) on every (store, site, step), both tasks, against the
   Adam trainer (lr 1e-3, 30 epochs, batch 4, checkpoint on val loss) on a few (site, step) pairs of the first store.
   Both fit the same probes — the layout-fair one per task (``probe.plain: false`` for the exact sweep here; the
   `probes` stage also fits the plain twin for the paper's protocol, which Adam's rows never had) — and both times
   include scoring on val and test. Goal (issue 23): ≥ 20× at equal or better test metrics. "Equal or better" is a
   stated rule on a CI, not on point estimates: for each metric, the per-test-image difference exact − Adam (averaged
   over the Adam pairs) gets a paired 95 % bootstrap CI (``probe.stats.paired_bootstrap``, 2000 resamples of the test
   images); a metric is *worse* only when that CI lies wholly on its worse side of 0 (resolvably worse), and the
   clause holds when no metric is worse. The point estimates are printed too, with the strict reading (every
   difference ≥ 0) beside it. ``--adam-depth-loss squared`` trains the Adam depth probes on squared error, the exact
   ridge's objective, instead of the paper's Huber (an experiment: is a depth difference the objective's or the
   solver's?). ``--path`` prints, at each Adam pair, the exact depth probe's whole ridge path (val MSE, test MSE and
   ρ at every grid λ, the val-chosen one marked) beside Adam's test figures: where along the path the two solvers'
   probes sit, and whether some λ on it is as good as Adam on both test MSE and ρ (a description of the path, not a
   choice: λ is chosen on val MSE and nothing else).
2. The `probes` stage as `make run` runs it (``run_probes`` with the default probe config: every core as a worker,
   one thread each) on the same captures, once with this checkout's code and once with the code of ``--baseline``
   (extracted with ``git archive``), each in a fresh process, into temporary folders (the run's captures are only
   read). Goal: halved. Then how results.csv changed: the largest |Δ| per metric and the probes whose chosen λ or
   threshold moved.

Nothing is written to the run folder. The last lines are the figures.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

from sceneprobe.capture.store import CaptureStore
from sceneprobe.config import ProbeConfig
from sceneprobe.probe import exact_fit, fit, sweep
from sceneprobe.probe import layout as lay
from sceneprobe.probe.fitted_probe import layout_of
from sceneprobe.probe.layout import is_plain
from sceneprobe.probe.metrics import nanmean
from sceneprobe.probe.split_features import SplitFeatures, _features, _predict
from sceneprobe.probe.stats import paired_bootstrap
from sceneprobe.probe.synthetic import synthetic_run
from sceneprobe.processes import resolve_workers

REPO = Path(__file__).resolve().parents[1]
BASELINE = "5932953"            # the last revision before issue 23's probe work (one Cholesky per λ, …)
STAGE = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import sceneprobe
from sceneprobe.config import ProbeConfig
from sceneprobe.probe.sweep import run_probes
t = time.perf_counter()
run_probes(Path(sys.argv[2]), ProbeConfig(), progress=False)
print(json.dumps({"seconds": time.perf_counter() - t, "module": sceneprobe.__file__}))
"""


def _scores(rows):
    """Test metrics of the layout-fair probe (the plain probe fitted beside it has its own rows: left out)."""
    return {(r["task"], r["metric"]): r["value"] for r in rows if r["split"] == "test" and not is_plain(r["model"])}


def _per_image(tensors) -> dict:
    """{(task, metric): per-test-image values} of the layout-fair probe, from :func:`sweep.probe_one`'s tensors."""
    return {(t, m): tensors[f"test.{t}.{m}"].numpy() for t, m in
            (k.split(".")[1:] for k in tensors if k.startswith("test.") and k.count(".") == 2)}


def depth_path(store, site: str, step: int, labels, cfg: ProbeConfig) -> dict:
    """The layout-fair depth probe's ridge path as :func:`exact_fit.fit_exact` solves it (same design, scale and
    penalty): {"lambda": [L], "val_mse", "test_mse", "test_spearman", "test_pearson": [L] means over the images}."""
    C, h, w = store.shape(site)
    layout = layout_of(labels, h, w, cfg)
    k = 0 if layout is None else layout.shape[0]
    lrows = None if layout is None else lay.rows(layout)
    d = C + k + int(cfg.bias)
    n_pix, dsum, pos = labels.native(h, w, cfg.upsample)
    stats = fit.RidgeStats(d, 1)
    for r, x in store.iter_rows(site, step, labels.idx(0), 64):
        X = exact_fit._design(_features(x)[0], lrows, cfg.bias, "cpu").double()
        wt = n_pix.reshape(1, -1).expand(len(r), -1).reshape(-1)
        stats.add(X, wt, dsum[r].reshape(-1, 1).double())
    scale = fit.feature_scale(stats.G, stats.P, C)
    mask = fit.penalty_mask(d, cfg.bias)
    mask[C:C + k] = 0.0
    theta = fit.ridge_path(stats, list(cfg.lambdas), cfg.bias, scale, mask)[:, :, 0]        # (L, d)
    out = {"lambda": list(cfg.lambdas)}
    for code, split in ((1, "val"), (2, "test")):
        z = _predict(SplitFeatures(store, site, step, labels.idx(code)), theta, cfg.bias, layout).numpy()
        m = labels.scorer(code, h, w).depth(z)
        out[f"{split}_mse"] = [nanmean(m["rmse"][:, i] ** 2) for i in range(len(theta))]
        for name in ("spearman", "pearson"):
            out[f"{split}_{name}"] = [nanmean(m[name][:, i]) for i in range(len(theta))]
    return out


def path_lines(site: str, step: int, path: dict, adam: dict, chosen: float) -> list[str]:
    """The path table of one pair, Adam's test figures, and the λ on the path (if any) at least as good as Adam on
    both test MSE and ρ. ``chosen``: the sweep's val-chosen λ (the path's choice must be the same)."""
    i_val = exact_fit._pick([-v for v in path["val_mse"]], path["lambda"])
    assert path["lambda"][i_val] == chosen, (path["lambda"][i_val], chosen)    # the path is the sweep's
    lines = [f"{site} step {step}: exact ridge path (val MSE chooses λ = {path['lambda'][i_val]:g}, marked *); "
             f"adam test: mse {adam[('depth', 'mse')]:.4f}, spearman {adam[('depth', 'spearman')]:.4f}, "
             f"pearson {adam[('depth', 'pearson')]:.4f}"]
    for i, lam in enumerate(path["lambda"]):
        lines.append(f"  {'*' if i == i_val else ' '} lambda {lam:<8g} val mse {path['val_mse'][i]:.4f}   test mse "
                     f"{path['test_mse'][i]:.4f}  spearman {path['test_spearman'][i]:.4f}  pearson "
                     f"{path['test_pearson'][i]:.4f}")
    both = [lam for i, lam in enumerate(path["lambda"]) if path["test_mse"][i] <= adam[("depth", "mse")]
            and path["test_spearman"][i] >= adam[("depth", "spearman")]]
    lines.append("  on the path, as good as adam on both test mse and spearman: " + (
        f"{len(both)} of {len(path['lambda'])} lambdas ({', '.join(f'{lam:g}' for lam in both)})" if both else "none"))
    return lines


def _source(rev: str | None, into: Path) -> Path:
    """The ``src`` folder of ``rev`` (``git archive``), or this checkout's when rev is None."""
    if rev is None:
        return REPO / "src"
    into.mkdir(parents=True, exist_ok=True)
    tar = into / "src.tar"
    with open(tar, "wb") as f:
        subprocess.run(["git", "-C", str(REPO), "archive", rev, "src"], stdout=f, check=True)
    with tarfile.open(tar) as t:
        t.extractall(into, filter="data")
    return into / "src"


def _stage(src: Path, run: Path, into: Path) -> tuple[float, Path]:
    """Seconds of ``run_probes`` with the code under ``src`` on the captures of ``run`` (linked), in a new process."""
    into.mkdir(parents=True)
    (into / "captures").symlink_to(run.resolve() / "captures")
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", STAGE, str(src), str(into)], env=env, check=True,
                         capture_output=True, text=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(res["module"]).resolve().is_relative_to(src.resolve()), res["module"]   # the code we meant to time
    return res["seconds"], into / "report" / "results.csv"


def _read(path: Path) -> dict:
    with open(path, newline="") as f:
        return {(r["protocol"], r["model"], r["site"], r["step"], r["task"], r["split"], r["metric"]): r["value"]
                for r in csv.DictReader(f)}


def compare_results(before: Path, after: Path) -> list[str]:
    """Lines: byte-identical or not; max |Δ| per (task, metric); probes whose val-chosen λ or τ changed."""
    if before.read_bytes() == after.read_bytes():
        return ["results.csv: byte-identical"]
    a, b = _read(before), _read(after)
    lines = [f"results.csv: {len(a)} rows before, {len(b)} after, {len(set(a) ^ set(b))} rows only in one"]
    diff = defaultdict(float)
    where = {}
    for k in sorted(set(a) & set(b)):
        x, y = float(a[k]), float(b[k])
        d = abs(x - y) if x == x and y == y else (0.0 if x != x and y != y else float("inf"))
        if d > diff[k[4], k[6]]:
            diff[k[4], k[6]], where[k[4], k[6]] = d, k
    changed = sorted(k for k in diff if diff[k] > 0)
    lines.append("max |after - before| per metric (val and test; 0 elsewhere): " + (", ".join(
        f"{t}.{m} {diff[t, m]:.3g}" for t, m in changed) or "none"))
    for choice in ("lambda", "threshold"):
        moved = [k for k in set(a) & set(b) if k[6] == choice and k[5] == "val" and a[k] != b[k]]
        total = sum(1 for k in a if k[6] == choice and k[5] == "val")
        lines.append(f"val-chosen {choice} changed in {len(moved)} of {total} probes" + "".join(
            f"\n  {k[0]}/{k[1]}/{k[2]}/step {k[3]} {k[4]}: {a[k]} -> {b[k]}" for k in sorted(moved)[:12]))
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help="run folder with captures/ (default: a synthetic store)")
    ap.add_argument("--pairs", type=int, default=3, help="(site, step) pairs for the Adam trainer")
    ap.add_argument("--epochs", type=int, default=30, help="Adam epochs (the paper: 30)")
    ap.add_argument("--threads", type=int, default=1, help="torch and BLAS threads for both solvers")
    ap.add_argument("--repeat", type=int, default=2, help="exact sweep repeats (best time is kept)")
    ap.add_argument("--baseline", default=BASELINE, help="git revision the probes stage is compared with")
    ap.add_argument("--no-stage", action="store_true", help="skip the probes-stage comparison")
    ap.add_argument("--path", action="store_true",
                    help="print the exact depth probe's ridge path (val/test MSE, test rho per lambda) at the Adam pairs")
    ap.add_argument("--adam-depth-loss", choices=("huber", "squared"), default="huber",
                    help="the Adam trainer's depth loss: huber (δ = 1, the paper's) or squared (the exact ridge's "
                         "objective, to ask whether a depth difference comes from the objective or the solver)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)                      # numpy's BLAS too (the exact solver's float64 products)
    tmp = tempfile.TemporaryDirectory(prefix="bench_probes_")
    if args.run is None:
        run = synthetic_run(Path(tmp.name) / "synthetic", n=256, channels=64, size=64, steps=3, noise=1.0,
                            models=("ldm",), sites={"unet.down0.attn0": 16, "unet.up1.attn0": 16})
        what = "synthetic store (planted signal): N=256, C=64, 16x16 sites, 64x64 labels, 2 sites x 3 steps"
    else:
        run = Path(args.run)
        what = f"run {run}"
    cfg = ProbeConfig()
    fair = dataclasses.replace(cfg, plain=False)           # the probes Adam fits: the layout-fair one per task
    groups = []
    for proto, stores in sweep.find_stores(run):
        ss = [CaptureStore(s) for s in stores]
        groups.append((sweep.load_protocol_labels(proto, ss[0].n), ss))
    print(f"data: {what}")

    times = []
    for _ in range(args.repeat):                         # best of a few: the machine is shared
        exact_rows, exact_img, n_pairs = {}, {}, 0
        t0 = time.perf_counter()
        for labels, stores in groups:
            for store in stores:
                for site in store.sites:
                    for step in store.site_steps(site):
                        tensors, rows = sweep.probe_one(store, site, step, labels, fair)
                        exact_rows[(store.root, site, step)] = rows
                        exact_img[(store.root, site, step)] = _per_image(tensors)
                        n_pairs += 1
        times.append(time.perf_counter() - t0)
    t_exact = min(times) / (2 * n_pairs)

    labels, stores = groups[0]
    store = next((s for s in stores if s.root.name == "ldm"), stores[0])   # the trained model, not a control
    all_pairs = [(s, st) for s in store.sites for st in store.site_steps(s)]
    k = min(args.pairs, len(all_pairs))
    picks = [all_pairs[round(i * (len(all_pairs) - 1) / max(k - 1, 1))] for i in range(k)]
    adam_cfg = dataclasses.replace(cfg, solver="adam", epochs=args.epochs)
    if args.adam_depth_loss == "squared":                # an experiment on the objective, not the paper's trainer
        from sceneprobe.probe import adam_trainer
        paper_loss = adam_trainer._adam_loss

        def squared(pred, y, task, upsample):
            if task != "depth":
                return paper_loss(pred, y, task, upsample)
            if upsample == "nearest":
                pred = adam_trainer.upsample_nearest(pred, y.shape[-2], y.shape[-1])
            return torch.nn.functional.mse_loss(pred[:, 0], y)
        adam_trainer._adam_loss = squared
    sweep.fit_paper_adam(store, *picks[0], labels, dataclasses.replace(adam_cfg, epochs=1))   # warm-up
    adam_rows, adam_img = {}, {}
    t0 = time.perf_counter()
    for site, step in picks:
        tensors, adam_rows[(site, step)] = sweep.probe_one(store, site, step, labels, adam_cfg)
        adam_img[(site, step)] = _per_image(tensors)
    t_adam = (time.perf_counter() - t0) / (2 * len(picks))

    keys = [("saliency", "dice"), ("saliency", "iou"), ("depth", "spearman"), ("depth", "pearson"), ("depth", "rmse")]
    print(f"\nstore {store.root}: test metrics, exact vs adam ({args.epochs} epochs, depth loss {args.adam_depth_loss})")
    print(f"{'site':<24}{'step':>5}  " + "  ".join(f"{t[:3]}.{m:<8}" for t, m in keys))
    sums = {"exact": {k: 0.0 for k in keys}, "adam": {k: 0.0 for k in keys}}
    for site, step in picks:
        for name, rows in (("exact", exact_rows[(store.root, site, step)]), ("adam", adam_rows[(site, step)])):
            sc = _scores(rows)
            for kk in keys:
                sums[name][kk] += sc[kk] / len(picks)
            print(f"{site:<24}{step:>5}  " + "  ".join(f"{sc[kk]:>12.4f}" for kk in keys) + f"  {name}")
    delta = {(t, m): sums["exact"][(t, m)] - sums["adam"][(t, m)] for t, m in keys}
    diff = ", ".join(f"{m} {delta[(t, m)]:+.4f}" for t, m in keys)
    strict = all((d <= 0) if m == "rmse" else (d >= 0) for (t, m), d in delta.items())
    ci = {kk: paired_bootstrap(sum(exact_img[(store.root, *p)][kk] for p in picks) / len(picks),
                               sum(adam_img[p][kk] for p in picks) / len(picks)) for kk in keys}
    worse = [m for (t, m), e in ci.items() if (e["lo"] > 0 if m == "rmse" else e["hi"] < 0)]
    as_good = not worse

    if args.path:
        print("\nthe exact depth probe's ridge path at the adam pairs (test metrics as in the table above)")
        for site, step in picks:
            chosen = float(next(r["value"] for r in exact_rows[(store.root, site, step)] if r["task"] == "depth"
                                and r["split"] == "val" and r["metric"] == "lambda" and not is_plain(r["model"])))
            for line in path_lines(site, step, depth_path(store, site, step, labels, fair),
                                   _scores(adam_rows[(site, step)]), chosen):
                print(line)

    stage = []
    if not args.no_stage:
        base = Path(tmp.name)
        try:
            src_before = _source(args.baseline, base / "baseline")
        except (OSError, subprocess.CalledProcessError) as e:
            stage = [f"probes stage: skipped (no git revision {args.baseline}: {type(e).__name__})"]
        else:
            t_before, csv_before = _stage(src_before, run, base / "before")
            t_after, csv_after = _stage(_source(None, base), run, base / "after")
            w = resolve_workers(cfg.workers)
            stage = compare_results(csv_before, csv_after) + [
                f"probes stage (run_probes, {w} workers x 1 thread, same captures): before {t_before:.1f} s "
                f"(revision {args.baseline}), after {t_after:.1f} s (this checkout): {t_before / t_after:.2f}x faster "
                f"(goal: halved, >= 2x: {'met' if t_before >= 2 * t_after else 'not met'})"]

    print(f"\nexact sweep: {n_pairs} (site, step) pairs x 2 tasks in {t_exact * 2 * n_pairs:.2f} s "
          f"(best of {args.repeat})")
    for name in ("exact", "adam"):
        print(f"{name} mean test over the adam pairs: dice {sums[name][('saliency', 'dice')]:.4f}, "
              f"spearman {sums[name][('depth', 'spearman')]:.4f}, rmse {sums[name][('depth', 'rmse')]:.4f}")
    print(f"exact - adam (higher is better but rmse): {diff} (every point estimate on the better side or 0: "
          f"{'yes' if strict else 'no'})")
    print(f"exact - adam per test image, mean over the adam pairs, paired 95 % CI over {ci[keys[0]]['n']} test images: "
          + ", ".join(f"{m} {e['mean']:+.4f} [{e['lo']:+.4f}, {e['hi']:+.4f}]" for (t, m), e in ci.items())
          + f" -> resolvably worse: {', '.join(worse) or 'none'}")
    for line in stage[:-1]:                              # how results.csv changed
        print(line)
    print(f"exact: {t_exact:.3f} s per probe ({2 * n_pairs} layout-fair probes, no plain twin, "
          f"threads={args.threads})")
    print(f"adam:  {t_adam:.3f} s per probe ({2 * len(picks)} probes, {args.epochs} epochs, threads={args.threads})")
    ok = t_adam / t_exact >= 20 and as_good
    verdict = "equal or better (no metric resolvably worse)" if as_good else "WORSE"
    print(f"speed-up: {t_adam / t_exact:.1f}x at {verdict} test metrics (goal >= 20x at equal or better test metrics: "
          f"{'met' if ok else 'not met'})")
    if stage:
        print(stage[-1])                                 # the stage's times, last
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
