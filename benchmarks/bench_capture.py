"""Cost of capture (issue #4): time with capture on vs off, bytes per image, peak memory vs N, U-Net forwards.

Model: the shipped ``cpu`` model if the package has one, else a freshly built (untrained) ``cpu``-preset model — the
costs depend on the architecture, not on the weights. Times are the best of ``--repeats`` runs, in this process's CPU
time by default (``--clock cpu``, one torch thread): on a machine shared with a training job, wall time varies by ±50 %.

* off: ``sample.generate`` per batch (15 DDIM steps + the final decode), no hooks.
* U-Net capture: ``run_capture`` restricted to the U-Net sites (hooks, fp16 rows streamed into shards, PNGs, manifest).
* full capture: every site, so also one VAE decode per step (the VAE's self-attention is probed at every step).
* peak RSS: a fresh subprocess per N (``ru_maxrss``) running the full capture of N images; streaming means the
  ratio should stay near 1.
* U-Net forwards per image for all sites × steps: ours = steps (one pass); the paper's scheme regenerates each image
  up to step t for each of 7 block groups: 7 × Σ_{t=0}^{14} (t + 1) = 840.

    python benchmarks/bench_capture.py [--n 64] [--n-rss 64 512] [--repeats 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
clock = time.process_time


def get_model():
    """(LDM, config, description): the shipped cpu model, else a fresh cpu-preset one (seeded)."""
    from sceneprobe.config import load_config
    from sceneprobe.models.build import build_train_scheduler, build_unet, build_vae, latent_size
    from sceneprobe.models.io import LDM, load_ldm, shipped_root
    cfg = load_config("cpu")
    root = shipped_root("cpu")
    if (root / "unet").is_dir():
        return load_ldm(root), cfg, f"shipped cpu model ({root})"
    torch.manual_seed(0)
    vae = build_vae(cfg.vae, cfg.world.size).eval()
    unet = build_unet(cfg.unet, cfg.vae.latent_channels, latent_size(cfg.vae, cfg.world.size)).eval()
    ldm = LDM(vae, unet, dict(build_train_scheduler(cfg.train_ldm).config))
    return ldm, cfg, "freshly built cpu-preset model (untrained; no shipped model in this package)"


def with_capture(cfg, **over):
    from sceneprobe.config import config_from_dict, to_dict
    d = to_dict(cfg)
    d["capture"].update(over)
    return config_from_dict(d)


def rss_child(n: int) -> None:
    """Subprocess: full capture of ``n`` images, then print peak RSS (MiB) as JSON."""
    from sceneprobe.capture.run import run_capture
    ldm, cfg, _ = get_model()
    with tempfile.TemporaryDirectory() as tmp:
        run_capture(with_capture(cfg, n_generate=n), Path(tmp), "generate", ldm, progress=False)
    print(json.dumps({"n": n, "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def store_bytes(root: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in root.glob("*/step_*.safetensors"):
        key = "vae" if f.parent.name.startswith("vae") else "unet"
        out[key] = out.get(key, 0) + f.stat().st_size
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="images for the timing runs")
    ap.add_argument("--n-rss", type=int, nargs=2, default=[64, 512], help="the two N of the peak-memory runs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu: this process's CPU time (immune to other jobs on a shared machine); wall: elapsed")
    ap.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.rss_child is not None:
        return rss_child(args.rss_child)

    from sceneprobe.capture import run as caprun
    from sceneprobe.capture.run import run_capture
    from sceneprobe.models.sites import list_sites
    from sceneprobe.sample import generate
    io_time = {"write_rows": 0.0, "images": 0.0}

    def timed(fn, key):  # how much of the capture time is disk output (shard rows; PNGs and samples file)
        def wrapper(*a, **k):
            t0 = clock()
            try:
                return fn(*a, **k)
            finally:
                io_time[key] += clock() - t0
        return wrapper
    caprun.write_rows = timed(caprun.write_rows, "write_rows")
    caprun.save_images = timed(caprun.save_images, "images")
    caprun.collect_samples = timed(caprun.collect_samples, "images")
    ldm, cfg, what = get_model()
    cc = cfg.capture
    cfg_t = with_capture(cfg, n_generate=args.n)
    unet_sites = list_sites(ldm.unet, "unet")
    times: dict[str, list[float]] = {"off": [], "unet": [], "full": []}
    calls: list[int] = []
    with torch.no_grad():
        generate(ldm, list(range(cc.batch_size)), cc.seed, steps=2)  # warm-up (allocator, kernels)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for _ in range(args.repeats):
            t0 = clock()
            with torch.no_grad():
                for s in range(0, args.n, cc.batch_size):
                    generate(ldm, list(range(s, min(args.n, s + cc.batch_size))), cc.seed, steps=cc.steps)
            times["off"].append(clock() - t0)
            io_time.update(write_rows=0.0, images=0.0)
            t0 = clock()
            run_capture(cfg_t, tmp / "u", "generate", ldm, force=True, progress=False, sites=unet_sites)
            times["unet"].append(clock() - t0)
            if times["unet"][-1] == min(times["unet"]):
                io_unet = dict(io_time)
            calls.clear()
            h = ldm.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
            t0 = clock()
            try:
                root = run_capture(cfg_t, tmp / "f", "generate", ldm, force=True, progress=False)
            finally:
                h.remove()
            times["full"].append(clock() - t0)
        nbytes = store_bytes(root)
    fwd_per_image = (sum(calls) - 1) / args.n  # minus the batch-1 shape pass
    rss = {}
    for n in args.n_rss:
        p = subprocess.run([sys.executable, __file__, "--rss-child", str(n), "--threads", str(args.threads)],
                           capture_output=True, text=True, check=True)
        rss[n] = json.loads(p.stdout.strip().splitlines()[-1])["maxrss_mib"]

    off, unet, full = (min(times[k]) for k in ("off", "unet", "full"))
    paper = 7 * sum(t + 1 for t in range(15))
    total = sum(nbytes.values())
    n0, n1 = args.n_rss
    print(f"model: {what}; U-Net sites {len(unet_sites)}, steps {cc.steps}, batch {cc.batch_size}, "
          f"dtype {cc.dtype}, torch threads {args.threads}, {args.clock} time, best of {args.repeats}")
    print(f"sampling {args.n} images: capture off {off:.2f} s | U-Net-site capture {unet:.2f} s "
          f"(overhead {100 * (unet - off) / off:+.1f} %, goal <= 10 %) | full capture incl. per-step VAE decode "
          f"{full:.2f} s (per-step VAE decode + VAE site: {full - unet:+.2f} s, {100 * (full - off) / off:+.0f} % vs off)")
    print(f"of the U-Net-site capture time: shard row writes {io_unet['write_rows']:.2f} s, final PNGs + "
          f"samples.safetensors {io_unet['images']:.2f} s, hooks/hash/shape pass/manifest the rest")
    print(f"bytes written per image: {total / args.n / 2**20:.2f} MiB (U-Net sites {nbytes.get('unet', 0) / args.n / 2**20:.2f}"
          f" MiB, VAE site {nbytes.get('vae', 0) / args.n / 2**20:.2f} MiB; {cc.steps} steps, {cc.dtype})")
    print(f"peak RSS (full capture in a subprocess): {n0} images {rss[n0]:.0f} MiB, {n1} images {rss[n1]:.0f} MiB "
          f"-> ratio {rss[n1] / rss[n0]:.2f} (goal <= 1.2)")
    print(f"U-Net forward passes per image, all sites x all steps: ours {fwd_per_image:.0f} (one pass) vs paper's "
          f"scheme 7 groups x sum(t+1, t<15) = {paper} ({paper / fwd_per_image:.0f}x fewer)")


if __name__ == "__main__":
    main()
