"""fp16 copy of a finished run's U-Net (how the shipped default is stored) + its scheduler and training records."""
import sys, shutil
from pathlib import Path
from sceneprobe.models.io import load_ldm, save_model
run, out = Path(sys.argv[1]), Path(sys.argv[2])
ldm = load_ldm(run)
save_model(ldm.unet, out / "unet", fp16=True)
shutil.copytree(run / "scheduler", out / "scheduler")
(out / "train_ldm").mkdir()
for f in ("config.yaml", "eval.json", "metrics.jsonl", "samples_grid.png", "samples_vs_real.png", "train.log"):
    src = run / "train_ldm" / f if f != "train.log" else run / f
    if src.exists():
        shutil.copy(src, out / "train_ldm" / f)
