"""After a time-bounded train-ldm: the checkpoint's step, written as a config that ends training there."""
import sys, torch, yaml
from pathlib import Path
run, base = Path(sys.argv[1]), Path(sys.argv[2])
step = int(torch.load(run / "train_ldm" / "checkpoint.pt", map_location="cpu", weights_only=False)["step"])
cfg = yaml.safe_load(base.read_text())
cfg["train_ldm"]["steps"] = step
(run.parent / (run.name + "_final.yaml")).write_text(yaml.safe_dump(cfg))
print(run.name, "stopped at step", step)
