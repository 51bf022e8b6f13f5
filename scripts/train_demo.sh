#!/usr/bin/env bash
# Rebuild the demo model (qwen2vl/demo/checkpoint) from nothing: training data, an untrained
# checkpoint folder, one seeded `qwen2vl train` run, the loss plot and the evaluation.
#
#   scripts/train_demo.sh [WORK_DIR]          # default /tmp/qwen2vl-demo; run from the repository root
#
# Everything is seeded; the data is ~300 MB of PNGs under WORK_DIR. See README.md ("Demo model") for
# the wall time it took and the accuracy it reached.
set -euo pipefail
WORK=${1:-/tmp/qwen2vl-demo}
CASES=${CASES:-32000}  # training cases (each with up to 6 extra questions about its picture)
BATCH=8
STEPS=${STEPS:-2200}     # what fitted in ~80 minutes of a 2-core CPU (README.md, "Demo model"): about 0.55 epoch
# On shared cores, OpenMP threads that spin while waiting for a descheduled sibling burn the CPU
# they wait for: measured 41 s a step spinning vs 5.4 s passive on 2 busy cores.
export OMP_WAIT_POLICY=PASSIVE

mkdir -p "$WORK"
python -m qwen2vl.demo.dataset "$WORK/data" --cases "$CASES" --seed 1
python -m qwen2vl.demo.dataset "$WORK/held_out" --cases 300 --seed 2 --extra-turns 0
python -m qwen2vl.demo.blank "$WORK/blank"

start=$(date +%s)
# --vision-lr / --init-vision-scale: at one rate for everything the visual features blew up into one
# constant direction and every task stayed at chance for 1,000+ steps
python -m qwen2vl train --model "$WORK/blank" --init-random --init-vision-scale 0.1 --full --train-vision \
    --data "$WORK/data/train.jsonl" --eval-data "$WORK/held_out/train.jsonl" --output "$WORK/run" \
    --steps "$STEPS" --batch-size "$BATCH" --lr 1e-3 --vision-lr 1e-4 --warmup-steps 100 --weight-decay 0.01 \
    --seed 0 --log-every 10 --save-every 200 --eval-every 1100 --overwrite 2>&1 | tee "$WORK/train.log"
echo "training took $(( $(date +%s) - start )) s of wall time" | tee -a "$WORK/train.log"

python scripts/plot_loss.py "$WORK/train.log" docs/demo_loss.png
mkdir -p qwen2vl/demo/checkpoint
cp "$WORK"/run/{config.json,model.safetensors,tokenizer.json,tokenizer_config.json,preprocessor_config.json,generation_config.json} \
    qwen2vl/demo/checkpoint/
cp "$WORK/train.log" qwen2vl/demo/checkpoint/train.log
python -m qwen2vl eval demo --quantization int8 --quantization int4 --server --dtype bfloat16,float32
