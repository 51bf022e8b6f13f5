# Sourced by train_demo.sh (its letters) and the CPU recipes after stage 9 (train_demo_tower.sh, train_demo_boxes.sh,
# train_demo_reading.sh, train_demo_decoder.sh, train_demo_strips.sh, train_demo_anchored.sh): their mixes, their runs,
# sets, the E-runs' fresh lesson sets and the letters' rows.
# Reads WORK.

mix() {  # OUT SEED FILE[:N]...: in WORK, qwen2vl.demo.mix (each FILE's lines, N of them if given, shuffled)
    local out=$1 seed=$2
    shift 2
    python -m qwen2vl.demo.mix "$WORK/$out" "$seed" "${@/#/$WORK/}"
}
run() {  # NAME: the rest are qwen2vl train arguments (torch's AdamW betas, unlike train_demo.sh's stages)
    local name=$1
    shift
    python -m qwen2vl train --output "$WORK/$name" --full --log-every 25 --overwrite "$@" 2>&1 | tee "$WORK/$name.log"
}
set_of() {  # NAME SEED CASES ARGS...: one of qwen2vl.demo.dataset's sets, in WORK
    local name=$1 seed=$2 cases=$3
    shift 3
    python -m qwen2vl.demo.dataset "$WORK/$name" "$@" --cases "$cases" --seed "$seed"
}
lesson_sets() {  # K: run E{K}'s fresh sets: colour lesson col{K-1}, count questions on{K+2}, count lesson
    # cnt{K-8}, picture pairs pr{K-9}, seeded from 5144 + 4 (K - 16)
    local k=$1 b=$((5144 + 4 * ($1 - 16)))
    python -m qwen2vl.demo.dataset "$WORK/col$((k - 1))" --colors --cases 5000 --seed $b
    python -m qwen2vl.demo.dataset "$WORK/on$((k + 2))" --only count --cases 5000 --seed $((b + 1))
    python -m qwen2vl.demo.dataset "$WORK/cnt$((k - 8))" --counts --cases 5000 --seed $((b + 2))
    python -m qwen2vl.demo.dataset "$WORK/pr$((k - 9))" --cases 1500 --mix two_images=1 --seed $((b + 3))
}
every_task_sets() {  # P SEED: a new decoder's every-task lines (mixZ's kinds), P_suite ... P_lone, seeded SEED-SEED+7
    local p=$1 s=$2
    set_of "${p}_suite" "$s" 12000
    set_of "${p}_col" $((s + 1)) 5000 --colors
    set_of "${p}_on" $((s + 2)) 5000 --only count
    set_of "${p}_cnt" $((s + 3)) 5000 --counts
    set_of "${p}_pr" $((s + 4)) 3000 --mix two_images=1
    set_of "${p}_vid" $((s + 5)) 3000 --only video
    set_of "${p}_many" $((s + 6)) 6000 --where 1-6
    set_of "${p}_lone" $((s + 7)) 4000 --where 1
}
joined() {  # OUT SET...: the sets' lines one after another, as trained (the trainer shuffles them)
    local out=$1
    shift
    for s in "$@"; do sed "s#\"img/#\"$s/img/#g" "$WORK/$s/train.jsonl"; done > "$WORK/$out"
}
rotary_copy() {  # FROM TO THETA [T,H,W]: checkpoint FROM copied to TO with rope_theta THETA (and M-RoPE's sections
    # T,H,W, summing to head_dim / 2) in its config (a new decoder's runs take their rotary from there)
    cp -r "$1" "$2"
    python - "$2/config.json" "$3" "${4:-}" <<'PY'
import json, sys
config = json.load(open(sys.argv[1]))
config["rope_theta"] = float(sys.argv[2])
if sys.argv[3]:
    config["rope_scaling"]["mrope_section"] = [int(n) for n in sys.argv[3].split(",")]
json.dump(config, open(sys.argv[1], "w"), indent=2)
PY
}
with_tower() {  # FROM TOWER TO: checkpoint FROM copied to TO with TOWER's vision weights (a decoder on another tower)
    cp -r "$1" "$3" && rm -rf "$3"/checkpoint-*
    python - "$3" "$2" <<'PY'
import sys
from safetensors.torch import load_file, save_file
out, tower = sys.argv[1], sys.argv[2]
weights, vision = load_file(f"{out}/model.safetensors"), load_file(f"{tower}/model.safetensors")
assert {k for k in weights if k.startswith("visual.")} == {k for k in vision if k.startswith("visual.")}
weights.update({k: t for k, t in vision.items() if k.startswith("visual.")})
save_file(weights, f"{out}/model.safetensors", metadata={"format": "pt"})
PY
}
letters() {  # FROM ADAPTER ROWS OUT [--keep-read]: the letters' rows (docs/demo.md, "The letters lesson") on FROM:
    # taught beside a LoRA on the letters (ADAPTER), kept alone (ROWS, merge --tokens-only), then taught alone on
    # suite and letters lines (OUT); on DEVICE if set (else qwen2vl train's default). --keep-read: not the rows of
    # the characters a read word is spelled with (for a decoder that reads)
    local rows device=(${DEVICE:+--device "$DEVICE"})
    python -m qwen2vl.demo.letters "$WORK/letters" --cases 20000 --seed 1
    rows=$(python -m qwen2vl.demo.vocab "$WORK/$1" "${@:5}")
    python -m qwen2vl train --model "$WORK/$1" --data "$WORK/letters/train.jsonl" --output "$WORK/$2" --overwrite \
        --train-tokens "$rows" --lora-dropout 0 --lr 1e-3 --token-lr 1e-2 --steps 1500 --batch-size 32 \
        --warmup-steps 20 --adam-beta2 0.95 --log-every 100 "${device[@]}" 2>&1 | tee "$WORK/$2.log"
    python -m qwen2vl merge "$WORK/$1" "$WORK/$2" "$WORK/$3" --tokens-only
    rows_suite
    mix l2.jsonl 5 rows_suite/train.jsonl letters/train.jsonl:3000
    rows_run "$4" "$3" l2.jsonl "$rows"
}
rows_run() {  # OUT FROM LINES ROWS: the rows alone taught on LINES (every other weight frozen): the letters' second
    # step and read_rows
    run "$1" --model "$WORK/$2" --data "$WORK/$3" --train-tokens "$4" --steps 400 --batch-size 16 --lr 3e-3 \
        --warmup-steps 20 --adam-beta2 0.95 --log-every 50 ${DEVICE:+--device "$DEVICE"}
}
rows_suite() {  # the suite's lines the letters' rows are taught beside (no words read: the rows' own step)
    python -m qwen2vl.demo.dataset "$WORK/rows_suite" --cases 3000 --seed 7701 \
        --mix color=1,count=1.5,grounding=1,video=1,two_images=1
}
read_rows() {  # FROM OUT: FROM's letters' rows (vocab --keep-read) taught again beside reading lines, every other
    # weight frozen: the rows the letters step moved stop answering where a word is read (K7j_L read `PKLCT4` as
    # `at X7F`), and the letters and the suite's lines keep what they are for (docs/demo.md, "K7j_R: shipped")
    [ -f "$WORK/letters/train.jsonl" ] || python -m qwen2vl.demo.letters "$WORK/letters" --cases 20000 --seed 1
    rows_suite
    set_of r_text 9701 3000 --only text
    set_of r_st 9702 3000 --words 3-6 --strip
    mix "$2.jsonl" 5 rows_suite/train.jsonl letters/train.jsonl:3000 r_text/train.jsonl r_st/train.jsonl
    rows_run "$2" "$1" "$2.jsonl" "$(python -m qwen2vl.demo.vocab "$WORK/$1" --keep-read)"
}
CHECKPOINT_FILES=(config.json model.safetensors tokenizer.json tokenizer_config.json preprocessor_config.json
    generation_config.json)  # what the package's checkpoint folder ships besides train.log
j2_folder() {  # DIR: J2, the demo shipped from 2026-12-06 until K7j_L (2026-12-07), as commit caf2fce holds it,
    # unless DIR has it already: the start of the recipes written while it was the shipped demo
    [ -f "$1/model.safetensors" ] && return
    mkdir -p "$1"
    local f
    for f in "${CHECKPOINT_FILES[@]}"; do
        git -C "$(dirname "${BASH_SOURCE[0]}")" show "caf2fce:qwen2vl/demo/checkpoint/$f" > "$1/$f"
    done
}
logs() {  # LABEL NAME...: each run's log from WORK under a "# NAME (LABEL)" line, as train.log holds them
    local label=$1 name
    shift
    for name in "$@"; do echo "# $name ($label)"; cat "$WORK/$name.log"; done
}
