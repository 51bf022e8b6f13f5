# Sourced by the GPU recipes (train_demo_gpu.sh, train_demo_boxes_gpu.sh): their log line and their training
# stage under the budget. Reads WORK, OUT, PY, BUDGET, began, BATCH, WORKERS, DEVICE, SAVE_EVERY.

say() { echo "[$(date +%T)] $*" | tee -a "$OUT/run.log"; }

# stage NAME DATA [qwen2vl train arguments]: `qwen2vl train --full` on DATA into WORK/NAME. A stage that runs
# past the budget is stopped 20 s before it, and its last checkpoint comes back (OUT/NAME-checkpoint.safetensors:
# the trained tensors, the rest as the stage began). Succeeds when the stage finished (OUT/NAME.safetensors).
stage() {
    local name=$1 data=$2 last
    shift 2
    timeout $(( BUDGET - (SECONDS - began) - 20 )) $PY -m qwen2vl train --data "$data" --full \
        --batch-size "$BATCH" --workers "$WORKERS" --device "$DEVICE" --weight-decay 0.01 --log-every 50 \
        --save-every "$SAVE_EVERY" --output "$WORK/$name" "$@" 2>&1 | tee -a "$OUT/run.log" || true
    if [[ -f "$WORK/$name/model.safetensors" ]]; then
        cp "$WORK/$name/model.safetensors" "$OUT/$name.safetensors"
        return 0
    fi
    last=$(ls -d "$WORK/$name"/checkpoint-* 2>/dev/null | sort -V | tail -1 || true)
    if [[ -n "$last" ]]; then
        cp "$last/trainable.safetensors" "$OUT/$name-checkpoint.safetensors"
        say "$name stopped by the budget; its last checkpoint: $last"
    fi
    return 1
}
