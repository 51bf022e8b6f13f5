#!/usr/bin/env bash
# Reading on strips, from J2, the demo shipped then (docs/demo.md, "Reading from scratch ...", "Reading on strips" and
# "Every task on the reading decoder"): the tower taught glyphs (G1, G2 on word pictures, TS1 on strips), a new
# decoder at rope_theta 10 taught strips (N10), then the suite's words (NS), then every task's lines (Y1; Y2 the
# same from a new decoder; Y3, Y3b Z's recipe on TS1's tower), and colours alone at two rotary bases (C10,
# C10000). Not shipped (the demo was J2 then; K7j_L since, scripts/train_demo_anchored.sh).
#
#   scripts/train_demo_strips.sh WORK_DIR    # DEVICE=cuda on a GPU
#
# Where it ran (2 vCPUs of an AMD Zen 3, fp32, 2026-12-07; minutes): G1 9.6, G2 28.5, TS1 36 (from H1, whose
# tower is G2's: H1 trained J2's decoder on it, frozen), N10 18, NS 15, Y1 50 (stopped), Y2 40, Y3 16, Y3b 17, C10
# and C10000 8.5 each. The strip sets st1 and st2 that N10 trained on were drawn by the strip code before it was
# committed (st3's, seed 9604, are these commands' pictures), so a rebuild trains on other strips of the same kind.
set -euo pipefail
WORK=${1:-/tmp/qwen2vl-strips}
DEVICE=${DEVICE:-cpu}
export OMP_WAIT_POLICY=PASSIVE
mkdir -p "$WORK"
source "$(dirname "$0")/demo_runs.sh"  # mix, run, set_of, every_task_sets, joined, rotary_copy, j2_folder
j2_folder "$WORK/J2"  # the package's checkpoint when these ran (commit caf2fce's)
E=(--adam-beta2 0.95 --weight-decay 0.01 --device "$DEVICE")  # every run (the tower frozen unless --train-vision)
tower() {  # BASE OUT SEED STEPS BATCH MIX: the tower lesson, the tower kept and taught further
    python -m qwen2vl.demo.tower "$1" "$WORK/$2" --keep-tower --seed "$3" --steps "$4" --batch-size "$5" --mix "$6" \
        --lr 1e-3 --head-lr 1e-2 --heads-first 50 --device "$DEVICE" 2>&1 | tee "$WORK/$2.log"
}

tower "$WORK/J2" G1 21 400 16 word=1            # characters 18.1%, shapes 94.7%
tower "$WORK/G1" G2 22 1200 16 word=1      # characters 44.3%, shapes 95.2%
tower "$WORK/G2" TS1 31 1000 64 strip=6,word=1,picture=0.5   # characters 81.5%

# N10: a new decoder whose rotary base is 10, not 10,000 (every other weight of TS1's config kept)
rotary_copy "$WORK/TS1" "$WORK/TS1t10" 10
for s in 9601 9603 9604; do set_of st$s $s 20000 --words 3-6 --strip; done
joined st123.jsonl st9601 st9603 st9604
run N10 "${E[@]}" --model "$WORK/TS1t10" --init-random decoder --data "$WORK/st123.jsonl" --train-vision --lr 1e-3 \
    --vision-lr 1e-4 --steps 1000 --batch-size 32 --warmup-steps 30 --seed 0   # strips 78.7% of characters in place

# NS: the suite's words (a word beside 0-2 shapes), half the lines strips
set_of sx 9605 6000 --only text
joined st3.jsonl st9604
head -6000 "$WORK/st3.jsonl" > "$WORK/st3a.jsonl"
joined sx.jsonl sx
mix mixNS.jsonl 5 sx.jsonl st3a.jsonl
run NS "${E[@]}" --model "$WORK/N10" --data "$WORK/mixNS.jsonl" --train-vision --lr 5e-4 --vision-lr 1e-4 --steps 300 \
    --batch-size 32 --warmup-steps 20 --seed 0   # the suite's words 28% whole

# Y1: every task's lines (scripts/train_demo_decoder.sh's mixZ, drawn again) with the suite's words and strips
every_task_sets y 141
set_of y_text 149 6000 --only text
joined st12.jsonl st9601 st9603
mix mixY.jsonl 7 y_{suite,col,on,cnt,pr,vid,many,lone,text}/train.jsonl st12.jsonl:6000   # 55,000
Y=(--data "$WORK/mixY.jsonl" --train-vision --lr 7e-4 --vision-lr 5e-5 --steps 2400 --batch-size 16
   --warmup-steps 50 --seed 0 --save-every 400)
run Y1 "${E[@]}" --model "$WORK/NS" "${Y[@]}" --stop-after 1085   # stopped by hand there; colours 13 of 100 at step 800
run Y2 "${E[@]}" --model "$WORK/TS1t10" --init-random decoder "${Y[@]}" --stop-after 800   # the same from a new decoder

# Y3, Y3b: Z's recipe (mixZ's kinds alone, the tower frozen, 1e-3) on TS1's tower at rope_theta 10 and 10,000
# (colours 16 and 22 of 100 at step 600; Z 62)
cp -r "$WORK/TS1" "$WORK/TS1t10000"
mix mixY0.jsonl 7 y_{suite,col,on,cnt,pr,vid,many,lone}/train.jsonl   # 43,000
Y3=(--init-random decoder --data "$WORK/mixY0.jsonl" --lr 1e-3 --steps 2400 --stop-after 600 --batch-size 16
    --warmup-steps 50 --seed 0)
run Y3 "${E[@]}" --model "$WORK/TS1t10" "${Y3[@]}"
run Y3b "${E[@]}" --model "$WORK/TS1t10000" "${Y3[@]}"

# C10, C10000: colours alone, a new decoder on TS1's frozen tower at rope_theta 10 and 10,000 (107 and 104 of 200)
set_of c_on 150 3000 --only color
mix mixC.jsonl 3 y_col/train.jsonl c_on/train.jsonl
for t in 10 10000; do
    run C$t "${E[@]}" --model "$WORK/TS1t$t" --init-random decoder --data "$WORK/mixC.jsonl" --lr 1e-3 --steps 400 \
        --batch-size 16 --warmup-steps 30 --seed 0
done
