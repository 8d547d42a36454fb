#!/bin/bash
# Second call on the warm machine: continue the three runs of run.sh for TRAIN_S more seconds, then end and pack them.
set -u
D=$(dirname "$0")
PY=python3; CFG=$D; TRAIN_S=${TRAIN_S:-250}; W=/tmp/gj; T=5
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:/tmp/site
ls $W/data/meta.json /tmp/site/diffusers >/dev/null || exit 1
date +%s > $OUT/t0
for X in A B C; do
  rm -rf $W/pack_$X
  OMP_NUM_THREADS=$T timeout -s TERM $TRAIN_S $PY -m sceneprobe train-ldm --preset cpu --config $CFG/$X.yaml \
      --data $W/data --out $W/$X --resume --no-progress >> $W/$X/train.log 2>&1 &
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
for X in A B C; do echo "== $X"; cat $W/$X.finish.log; tail -1 $W/$X/train_ldm/metrics.jsonl; done
echo "all done at $(( $(date +%s) - $(cat $OUT/t0) )) s"
