#!/usr/bin/env bash
# The GPU check of issues 21 and 23: one call on a lent GPU machine, under 8 minutes. Nothing here may be quoted as a
# GPU figure unless this script printed it on a GPU.
#
# Prepare here, once (the device image has torch but not diffusers): in the repository root
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata zipp
# then run it with the `run` tool: command `bash benchmarks/gpu_check.sh`, carry [".whl"], timeout_s 540.
#
# 1. SD v1.4's architecture at 512 px (random weights): plain sampling, the profile of one streamed batch, and the
#    streamed study with the permuted control (benchmarks/bench_sd.py): per-image capture time, probe-fit time on
#    the GPU, peak GPU memory, the projection to the paper's 617 prompts.
# 2. PixArt-Σ's transformer at its native width, 512 px (benchmarks/bench_dit.py): plain pipeline vs the streamed
#    study, peak GPU memory, the projection.
# 3. The scale arithmetic of every family (benchmarks/bench_scale.py), for the record beside the measurements.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=$PWD/src:/tmp/site
else
  export PYTHONPATH=$PWD/src
fi
nvidia-smi -L 2>/dev/null
python3 - <<'PY' || exit 1
import torch, diffusers, transformers
print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__,
      "cuda", torch.cuda.is_available())
PY
t0=$(date +%s)
timeout 300 python3 benchmarks/bench_sd.py --size 512 --prompts 24 --batch 8 --modes sample,profile,streamed \
  --json "$OUT/sd.json" 2>&1 | grep -v "it/s\]" | tee "$OUT/sd.log"
echo "== SD done at $(( $(date +%s) - t0 )) s"
timeout 180 python3 benchmarks/bench_dit.py --size 512 --prompts 16 --batch 8 --json "$OUT/dit.json" 2>&1 \
  | grep -v "it/s\]" | tee "$OUT/dit.log"
echo "== DiT done at $(( $(date +%s) - t0 )) s"
python3 benchmarks/bench_scale.py | tee "$OUT/scale.log"
