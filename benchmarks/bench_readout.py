"""Image read-out curve and label provenance (issue #10) for a model folder (default: the shipped ``cpu`` model).

* provenance: the labeller against the exact labels of held-out rendered scenes (world ``--world-seed``, never seen by
  the shipped VAE or labeller), on the renders and on their VAE reconstructions (``labeller_provenance``);
* read-out: a ``generate`` capture of ``--n`` samples (U-Net mid site + VAE decoder, so the x̂₀ of the test rows is
  decoded at every step), the labeller's labels of the final images, and a labeller on every step's x̂₀ scored
  against them (``run_readout``): mean over the test rows per step — read by the labels' own labeller (which scores
  itself at the last steps) and by the independent read-out labeller (``labeller_readout/``, issue 20), whose
  last-step value is the two labellers' agreement.

    python benchmarks/bench_readout.py [--model FOLDER] [--n 32] [--scenes 240] [--world-seed 7]

The last lines print the numbers.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="folder with vae/, unet/, scheduler/, labeller/")
    ap.add_argument("--n", type=int, default=32, help="generated samples (25 %% are test rows)")
    ap.add_argument("--scenes", type=int, default=240, help="rendered scenes (80 %% held out) for provenance")
    ap.add_argument("--world-seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from sceneprobe.capture.run import run_capture
    from sceneprobe.config import load_config
    from sceneprobe.labeller import label_samples, labeller_provenance, load_labeller
    from sceneprobe.labeller.readout import load_readout, run_readout
    from sceneprobe.models.io import load_ldm, shipped_root
    from sceneprobe.world.dataset import load_dataset, make_dataset
    root = args.model or shipped_root("cpu")
    ldm, lab = load_ldm(root), load_labeller(root / "labeller")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        data = make_dataset(tmp / "scenes", n=args.scenes, size=ldm.vae.config.sample_size, seed=args.world_seed,
                            val_fraction=0.1, test_fraction=0.8, progress=False)
        prov = labeller_provenance(lab, load_dataset(data), ldm.vae)
        t1 = time.time()
        cfg = load_config("cpu", overrides={"capture": {"n_generate": args.n, "batch_size": min(args.n, 16)}})
        run_capture(cfg, tmp / "run", "generate", ldm, progress=False, sites=["unet.mid.attn0", "vae.dec.mid.attn0"])
        label_samples(lab, tmp / "run" / "captures" / "generate" / "samples.safetensors", force=True)
        curves = {}
        readers = [("same", lab)] + ([("second", load_labeller(root / "labeller_readout"))]
                                     if (root / "labeller_readout").is_dir() else [])
        for name, reader in readers:
            run_readout(tmp / "run", "generate", reader)
            r = curves[name] = load_readout(tmp / "run", "generate")
        t2 = time.time()
    keys = ("saliency_dice", "saliency_iou", "depth_spearman", "depth_pearson", "depth_rmse")
    print(f"provenance: {prov['clean']['n_images']} held-out scenes, {t1 - t0:.0f} s")
    print(json.dumps({k: {"clean": round(prov["clean"][k], 3), "vae_reconstruction":
                          round(prov["vae_reconstruction"][k], 3)} for k in keys}))
    print(f"read-out: {len(r.rows)} test rows of {args.n} generated, steps {r.steps[0]}…{r.steps[-1]}, {t2 - t1:.0f} s")
    for r in curves.values():
        for task, metric in (("saliency", "dice"), ("saliency", "auroc"), ("depth", "spearman"),
                             ("depth", "spearman_nonsky"), ("depth", "mse")):
            print(f"readout ({r.readout_by}) {task} {metric}: " + " ".join(f"{v:.2f}" for v in r.curve(task, metric)))


if __name__ == "__main__":
    main()
