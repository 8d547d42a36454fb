#!/bin/bash
# The H200 experiment of issue 11 (fourth session of 2026-11-28). Carry a folder (here gpujob/) holding the diffusers
# and importlib_metadata wheels (whl/) and the VAE to train on (vae/); run from the repository root:
#   bash benchmarks/gpu_unet_sweep/run.sh; then, on the still-warm machine, RESUME=1 TRAIN_S=190 bash …/run.sh
# One device call: render the cpu-preset world, train three U-Nets side by side on the GPU for TRAIN_S seconds each
# (checkpoints every 250 steps), end each at its last checkpoint (constant lr + EMA: stopping at step k = configuring
# k steps), evaluate, and pack fp16 U-Nets + records into $OUT. RESUME=1 continues the three runs of an earlier call
# (same W) instead of starting them: no world is rendered, each training resumes from its checkpoint.
set -u
D=$(dirname "$0"); VAE=${VAE:-gpujob/vae}; WHL=${WHL:-gpujob/whl}; RESUME=${RESUME:-0}
PY=${PY:-python3}; CFG=${CFG:-$D}; TRAIN_S=${TRAIN_S:-400}; N=${N:-4000}; W=${W:-/tmp/gj}; OUT=${OUT:-/tmp/gj_out}; T=${T:-5}
export PYTHONUNBUFFERED=1
if [ -d $WHL ] && [ "$PY" = python3 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $WHL/*.whl || exit 1
  export PYTHONPATH=$PWD/src:/tmp/site
else
  export PYTHONPATH=$PWD/src
fi
mkdir -p $W $OUT; date +%s > $OUT/t0
(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv -l 20 > $OUT/gpu_util.csv 2>/dev/null &)
nvidia-smi -L 2>/dev/null; $PY -c "import torch, diffusers; print(torch.__version__, diffusers.__version__, torch.cuda.is_available())"
if [ "$RESUME" = 1 ]; then
  ls $W/data/meta.json > /dev/null || exit 1
else
  $PY -m sceneprobe scenes --preset cpu --out $W/data --n $N --workers 16 --no-progress --force || exit 1
  echo "world done at $(( $(date +%s) - $(cat $OUT/t0) )) s"
fi
for X in A B C; do
  rm -rf $W/pack_$X
  if [ "$RESUME" = 1 ]; then R=--resume; else R=; rm -rf $W/$X; mkdir -p $W/$X; cp -r $VAE $W/$X/vae; fi
  OMP_NUM_THREADS=$T timeout -s TERM $TRAIN_S $PY -m sceneprobe train-ldm --preset cpu --config $CFG/$X.yaml \
      --data $W/data --out $W/$X $R --no-progress >> $W/$X/train.log 2>&1 &
done
wait
echo "training done at $(( $(date +%s) - $(cat $OUT/t0) )) s"
for X in A B C; do
  ( $PY $D/finish.py $W/$X $CFG/$X.yaml &&
    OMP_NUM_THREADS=$T $PY -m sceneprobe train-ldm --preset cpu --config $W/${X}_final.yaml --data $W/data --out $W/$X \
        --resume --no-progress >> $W/$X/train.log 2>&1 &&
    $PY $D/pack.py $W/$X $W/pack_$X && tar -C $W -czf $OUT/$X.tgz pack_$X ) > $W/$X.finish.log 2>&1 &
done
wait
for X in A B C; do echo "== $X"; cat $W/$X.finish.log; tail -3 $W/$X/train.log; tail -1 $W/$X/train_ldm/metrics.jsonl; done
echo "all done at $(( $(date +%s) - $(cat $OUT/t0) )) s"; ls -la $OUT
