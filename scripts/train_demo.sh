#!/usr/bin/env bash
# Rebuild the demo model (qwen2vl/demo/checkpoint) from nothing: training data, an untrained
# checkpoint folder, twelve seeded `qwen2vl train` runs (a curriculum), then a fresh vision tower and twenty-two more
# runs (scripts/train_demo_tower.sh), eleven runs of boxes (scripts/train_demo_boxes.sh) and two of the embedding
# rows of unused tokens (the letters), which made J2; then J2's tower taught the glyphs, a new decoder on it and ten
# runs to K7j, K7j's letters and those rows again beside reading lines (scripts/train_demo_anchored.sh with TRIED=0);
# the loss plot and the evaluation.
#
#   scripts/train_demo.sh [WORK_DIR]          # default /tmp/qwen2vl-demo; run from the repository root
#
# Everything is seeded; the data is ~300 MB of PNGs under WORK_DIR. See README.md ("Demo model") and
# docs/demo.md for the wall time it took and the accuracy it reached.
#
# Why a curriculum: from random weights, every mix of the six tasks (with or without extra questions
# per picture, at one learning rate or with the vision tower's lower) stayed at chance for 400-1,170
# steps, the answers independent of the picture. The colour of the only shape in a picture, trained
# alone, leaves chance within 100 steps; from there the one-word questions on pictures of <= 2 shapes
# and then on all pictures build on a tower that already sees colours. Stage 3 left it naming a colour
# of the picture rather than the asked shape's; the colour of one of two shapes (stage 4, again one
# answer per picture) taught which shape is which, and stage 5 mixes it into stage 3's questions.
# Boxes and words (grounding, text) are left out of every stage here: their many hard tokens were most of
# the loss of every mix that stayed at chance, and 800 steps with boxes back in left grounding at 0
# (see docs/demo.md). The boxes come last, on the finished model (scripts/train_demo_boxes.sh); words only on a
# new decoder (scripts/train_demo_anchored.sh), which reads before it learns the other tasks.
set -euo pipefail
WORK=${1:-/tmp/qwen2vl-demo}
# On shared cores, OpenMP threads that spin while waiting for a descheduled sibling burn the CPU
# they wait for: measured 41 s a step spinning vs 5.4 s passive on 2 busy cores.
export OMP_WAIT_POLICY=PASSIVE

mkdir -p "$WORK"
python -m qwen2vl.demo.dataset "$WORK/data" --cases 32000 --seed 1           # every task, <= 6 extra questions
python -m qwen2vl.demo.dataset "$WORK/held_out" --cases 300 --seed 2 --extra-turns 0
python -m qwen2vl.demo.dataset "$WORK/color1" --only color --shapes 1 --cases 1700 --seed 1000
python -m qwen2vl.demo.dataset "$WORK/color2" --only color --shapes 2 --cases 3000 --seed 1001
python -m qwen2vl.demo.dataset "$WORK/data/short.jsonl" --subset-of "$WORK/data/train.jsonl" --max-shapes 2
python -m qwen2vl.demo.dataset "$WORK/data/short6.jsonl" --subset-of "$WORK/data/train.jsonl" --max-shapes 6 --pairs
python -m qwen2vl.demo.blank "$WORK/blank"
# stage 5's data: the stage-3 lines and the two-shape colour cases, shuffled (paths made relative to data/)
python -m qwen2vl.demo.mix "$WORK/data/mix.jsonl" 0 "$WORK/data/short6.jsonl" "$WORK/color2/train.jsonl"

# --adam-beta2 0.95: with torch's 0.999 the first steps' large gradients shrink later steps ~10x.
# --vision-lr / --init-vision-scale: at one rate the visual features grew into one constant direction.
COMMON="--full --train-vision --adam-beta2 0.95 --seed 0 --log-every 10 --save-every 100 --overwrite"
stage() {  # NAME: the rest are qwen2vl train arguments; the log goes to WORK/NAME.log
    local name=$1 start
    shift
    start=$(date +%s)
    python -m qwen2vl train --output "$WORK/$name" $COMMON "$@" 2>&1 | tee "$WORK/$name.log"
    echo "$name took $(( $(date +%s) - start )) s of wall time" | tee -a "$WORK/$name.log"
}
# 1. the colour of the only shape: 100 steps from random weights, then 200 more
stage stage1a --model "$WORK/blank" --init-random --init-vision-scale 0.1 --data "$WORK/color1/train.jsonl" \
    --steps 100 --batch-size 16 --lr 1e-3 --vision-lr 1e-4 --warmup-steps 20 --weight-decay 0.05
stage stage1b --model "$WORK/stage1a" --data "$WORK/color1/train.jsonl" \
    --steps 200 --batch-size 16 --lr 1e-3 --vision-lr 1e-4 --warmup-steps 20 --weight-decay 0.01
# 2. one-word questions (colours, counts, lists, directions) on pictures of <= 2 shapes, and the videos
stage stage2 --model "$WORK/stage1b" --data "$WORK/data/short.jsonl" \
    --steps 300 --batch-size 8 --lr 1e-3 --vision-lr 1e-4 --warmup-steps 20 --weight-decay 0.01
# 3. one-word questions on every picture, pair and video, at half the rate (a restart at 1e-3 undid half of
# what stage 1 had learned; the full mix, boxes and words included, took colours back to chance in 200 steps)
stage stage3 --model "$WORK/stage2" --data "$WORK/data/short6.jsonl" --eval-data "$WORK/held_out/train.jsonl" \
    --steps 900 --eval-every 900 --batch-size 8 --lr 5e-4 --vision-lr 5e-5 --warmup-steps 50 --weight-decay 0.01

# 4. the colour of one of two shapes: which shape is which (stage 3 left the model naming a colour in the
# picture, not the one asked about: 54 / 60 present, 21 / 60 right), one answer per picture again
stage stage4 --model "$WORK/stage3" --data "$WORK/color2/train.jsonl" \
    --steps 500 --batch-size 16 --lr 5e-4 --vision-lr 5e-4 --warmup-steps 30 --weight-decay 0.01
# 5. stage 3's questions with the two-shape colours mixed in (one line in six), at a lower rate
stage stage5 --model "$WORK/stage4" --data "$WORK/data/mix.jsonl" \
    --steps 1000 --batch-size 8 --lr 2e-4 --vision-lr 2e-4 --warmup-steps 30 --weight-decay 0.01

# 6-9. the videos (issue 15's direction question), easiest first as stage 1 did for colours: the full videos
# alone stayed at chance for 300-350 steps (tried, below), while the first two frames of a shape moving alone (one
# temporal patch: the patch embedding sees the move) broke the plateau in ~500 steps (6c, 6d); then the 4-8-frame
# videos of it (6e), then with 0-2 still shapes besides it (7, the suite's videos); stages 8 and 9 bring the other
# questions back (stage 5's lines with one in four a video, then stage 5's own lines), at stage 5's rate.
# Wall time on 2 cores shared with other jobs (2026-12-03): 6c-6e 3.4 + 3.3 + 4.7 min, 7 7.2, 8 32, 9 9.4 min.
python -m qwen2vl.demo.dataset "$WORK/video" --only video --cases 5000 --seed 1002       # 0-2 still shapes
python -m qwen2vl.demo.dataset "$WORK/video0" --only video --shapes 0 --cases 3000 --seed 1003  # the moving one only
python - "$WORK" <<'PY'   # the moving shape alone, cut to its first two frames
import json, sys
work = sys.argv[1]
rows = [json.loads(t) for t in open(f"{work}/video0/train.jsonl")]
open(f"{work}/video0/two.jsonl", "w").write("".join(json.dumps({**r, "videos": [r["videos"][0][:2]]}) + "\n" for r in rows))
PY
# stage 7: the first 2,400 videos with still shapes; stage 8: stage 5's lines and the last 2,000 of them, shuffled
head -n 2400 "$WORK/video/train.jsonl" > "$WORK/video/first2400.jsonl"
tail -n +3001 "$WORK/video/train.jsonl" > "$WORK/video/last2000.jsonl"
python -m qwen2vl.demo.mix "$WORK/data/mixv.jsonl" 0 "$WORK/data/mix.jsonl" "$WORK/video/last2000.jsonl"   # one in four a video
stage stage6c --model "$WORK/stage5" --data "$WORK/video0/two.jsonl" \
    --steps 250 --batch-size 16 --lr 5e-4 --vision-lr 1e-3 --warmup-steps 20 --weight-decay 0.01
stage stage6d --model "$WORK/stage6c" --data "$WORK/video0/two.jsonl" \
    --steps 300 --batch-size 16 --lr 5e-4 --vision-lr 1e-3 --warmup-steps 20 --weight-decay 0.01
stage stage6e --model "$WORK/stage6d" --data "$WORK/video0/train.jsonl" \
    --steps 200 --batch-size 12 --lr 5e-4 --vision-lr 1e-3 --warmup-steps 20 --weight-decay 0.01
stage stage7 --model "$WORK/stage6e" --data "$WORK/video/first2400.jsonl" \
    --steps 200 --batch-size 12 --lr 5e-4 --vision-lr 5e-4 --warmup-steps 20 --weight-decay 0.01
stage stage8 --model "$WORK/stage7" --data "$WORK/data/mixv.jsonl" \
    --steps 1500 --batch-size 8 --lr 2e-4 --vision-lr 2e-4 --warmup-steps 30 --weight-decay 0.01
stage stage9 --model "$WORK/stage8" --data "$WORK/data/mix.jsonl" --seed 1 \
    --steps 700 --batch-size 8 --lr 2e-4 --vision-lr 2e-4 --warmup-steps 20 --weight-decay 0.01

# Tried and not shipped (docs/demo.md): the full videos alone from stage 5 stayed at chance:
#   stage stage6 --model "$WORK/stage5" --data "$WORK/video/train.jsonl" \
#       --steps 600 --batch-size 12 --lr 5e-4 --vision-lr 5e-4 --warmup-steps 30 --weight-decay 0.01   # stopped at 350
#   stage stage6b --model "$WORK/stage5" --data "$WORK/video0/train.jsonl" \
#       --steps 300 --batch-size 12 --lr 5e-4 --vision-lr 1e-3 --warmup-steps 30 --weight-decay 0.01
# and 900 more steps of stage 5's lines from stage 9 (on the 200 cases of seed 78 colour 63 -> 56%, count 36 -> 40%,
# video 94 -> 96%, pairs 87 -> 92%; on the table's seed colour and count lower; 25 min):
#   stage stage10 --model "$WORK/stage9" --data "$WORK/data/mix.jsonl" --seed 2 \
#       --steps 900 --batch-size 8 --lr 3e-4 --vision-lr 3e-4 --warmup-steps 20 --weight-decay 0.01

# Tried after stage 9 and not shipped (docs/demo.md; 2026-12-04, 2 cores shared with 2-4 other jobs):
#   python -m qwen2vl.demo.dataset "$WORK/ground1" --only grounding --shapes 1 --cases 3000 --seed 1004
#   stage stage11 --model "$WORK/stage9" --data "$WORK/ground1/train.jsonl" \
#       --steps 400 --batch-size 16 --lr 5e-4 --vision-lr 2e-4 --warmup-steps 20 --weight-decay 0.01   # 8.4 min
#   stage stage11b --model "$WORK/stage11" --data "$WORK/ground1/train.jsonl" \
#       --steps 600 --batch-size 16 --lr 5e-4 --vision-lr 2e-4 --warmup-steps 20 --weight-decay 0.01
#   stage stage11c --model "$WORK/stage11b" --data "$WORK/ground1/train.jsonl" \
#       --steps 500 --batch-size 16 --lr 5e-4 --vision-lr 2e-4 --warmup-steps 20 --weight-decay 0.01
#   (single-shape boxes 0 / 40 after stage 11, 6 / 40 after 11b, 5 / 40 after 11c; every other task 0: no mix yet)
#   python -m qwen2vl.demo.dataset "$WORK/count" --only count --cases 3000 --seed 1006      # any number of shapes
#   python -m qwen2vl.demo.dataset "$WORK/color" --only color --cases 3000 --seed 1007
#   python - "$WORK" <<'PY'
#   import json, random, sys
#   work = sys.argv[1]
#   new = []
#   for d in ("count", "color"):
#       for text in open(f"{work}/{d}/train.jsonl"):
#           line = json.loads(text)
#           line["images"] = ["../" + d + "/" + p for p in line["images"]]   # relative to data/
#           new.append(json.dumps(line))
#   cc, mix = list(new), open(f"{work}/data/mixv.jsonl").read().splitlines() + new
#   random.Random(0).shuffle(cc)
#   random.Random(0).shuffle(mix)
#   open(f"{work}/data/cc.jsonl", "w").write("\n".join(cc) + "\n")
#   open(f"{work}/data/mix13.jsonl", "w").write("\n".join(mix) + "\n")   # 26,238 lines
#   PY
#   stage stage12 --model "$WORK/stage9" --data "$WORK/data/cc.jsonl" \
#       --steps 300 --batch-size 16 --lr 5e-4 --vision-lr 5e-4 --warmup-steps 20 --weight-decay 0.01   # 6.5 min
#   stage stage13 --model "$WORK/stage12" --data "$WORK/data/mix13.jsonl" --save-every 250 \
#       --steps 1000 --batch-size 8 --lr 2e-4 --vision-lr 2e-4 --warmup-steps 20 --weight-decay 0.01    # 18 min
#   stage stage14 --model "$WORK/stage13" --data "$WORK/data/mix.jsonl" --seed 3 \
#       --steps 400 --batch-size 8 --lr 1e-4 --vision-lr 1e-4 --warmup-steps 20 --weight-decay 0.01     # 10 min
#   (the table's 200 cases at bf16: count 36 -> 46%, the rest level; but colours 63 -> 55% on seed 78's 200,
#   and the README's first command answers orange: not shipped)

# Tried after stage 9, a second attempt, not shipped (docs/demo.md: the model does not know the shapes' kinds;
# 2026-12-04, 2 idle cores):
#   python -m qwen2vl.demo.dataset "$WORK/m5" --cases 9000 --seed 5 --mix color=1.5,count=1.5,video=0.5,two_images=0.75
#   python -m qwen2vl.demo.dataset "$WORK/m6" --cases 9000 --seed 6 --mix color=1.5,count=1.5,video=0.5,two_images=0.75
#   python -m qwen2vl.demo.dataset "$WORK/m5/short.jsonl" --subset-of "$WORK/m5/train.jsonl" --max-shapes 6 --pairs
#   python -m qwen2vl.demo.dataset "$WORK/m6/short.jsonl" --subset-of "$WORK/m6/train.jsonl" --max-shapes 6 --pairs
#   (mix15.jsonl in $WORK: the two short.jsonl files' lines, paths made relative to $WORK, shuffled: 18,000 lines)
#   python -m qwen2vl.demo.dataset "$WORK/k1" --kinds 1 --cases 3000 --seed 2001          # "Which shape is red?"
#   python -m qwen2vl.demo.dataset "$WORK/k6" --kinds 2-6 --cases 4000 --seed 2002
#   python -m qwen2vl.demo.dataset "$WORK/kb" --kinds 1 --fraction 0.4-0.8 --cases 2000 --seed 2003   # big shapes
#   (mix16.jsonl: mix15's lines with k1's, k6's and kb's, shuffled: 27,000 lines)
#   stage stage15 --model "$WORK/stage9" --data "$WORK/mix15.jsonl" --save-every 500 \
#       --steps 3000 --batch-size 8 --lr 3e-4 --vision-lr 3e-4 --warmup-steps 50 --weight-decay 0.01   # stopped at ~1,030
#   stage k1s --model "$WORK/stage9" --data "$WORK/k1/train.jsonl" \
#       --steps 300 --batch-size 16 --lr 5e-4 --vision-lr 5e-4 --warmup-steps 20 --weight-decay 0.01
#   stage k1t --model "$WORK/k1s" --data "$WORK/k1/train.jsonl" --seed 1 \
#       --steps 500 --batch-size 16 --lr 5e-4 --vision-lr 1e-3 --warmup-steps 20 --weight-decay 0.01   # kinds 45 / 80
#   stage kbs --model "$WORK/k1t" --data "$WORK/kb/train.jsonl" --seed 2 \
#       --steps 300 --batch-size 16 --lr 5e-4 --vision-lr 1e-3 --warmup-steps 20 --weight-decay 0.01
#   stage stage16 --model "$WORK/kbs" --data "$WORK/mix16.jsonl" --seed 3 --save-every 350 \
#       --steps 1400 --batch-size 8 --lr 3e-4 --vision-lr 3e-4 --warmup-steps 30 --weight-decay 0.01   # 21.7 min
#   stage stage17 --model "$WORK/stage16" --data "$WORK/mix15.jsonl" --seed 4 \
#       --steps 400 --batch-size 8 --lr 1e-4 --vision-lr 1e-4 --warmup-steps 20 --weight-decay 0.01    # video 95 -> 33%

# Then the tower (docs/demo.md, "Why the kinds do not come"): a fresh tower on per-token shape labels, put in
# stage 9's checkpoint, then the decoder taught to read it (the tower used came from a throwaway version of
# qwen2vl/demo/tower.py that cached 6,000 pictures; 95.4% of held-out shapes named after 1,800 steps, 35 min):
#   python -m qwen2vl.demo.tower "$WORK/stage9" "$WORK/tower" --steps 1800 --seed 5   # its own 600-step run: 72%
#   python -m qwen2vl.demo.dataset "$WORK/vid" --only video --cases 2000 --seed 1002
#   (mixA.jsonl: mix15's lines and vid's, shuffled: 20,000 lines)
#   stage alignA --model "$WORK/tower" --data "$WORK/mixA.jsonl" --save-every 250 \
#       --steps 1000 --batch-size 8 --lr 3e-4 --vision-lr 1e-4 --warmup-steps 30 --weight-decay 0.01   # 15 min
#   stage kA --model "$WORK/alignA" --data "$WORK/k1/train.jsonl" --seed 1 \
#       --steps 300 --batch-size 16 --lr 5e-4 --vision-lr 5e-5 --warmup-steps 20 --weight-decay 0.01   # kinds 58 / 80
#   (k16.jsonl: k1's and k6's lines, shuffled, 7,000; mixB.jsonl: mixA's and k16's, shuffled, 27,000)
#   stage kB --model "$WORK/kA" --data "$WORK/k16.jsonl" --seed 2 \
#       --steps 300 --batch-size 16 --lr 5e-4 --vision-lr 5e-5 --warmup-steps 20 --weight-decay 0.01   # 65 / 80, 27 / 80
#   stage mB --model "$WORK/kB" --data "$WORK/mixB.jsonl" --seed 3 \
#       --steps 600 --batch-size 8 --lr 2e-4 --vision-lr 5e-5 --warmup-steps 20 --weight-decay 0.01    # video 24%

# 10-19. a fresh vision tower taught on per-token labels, put in stage 9's checkpoint, then twenty-two runs, to E20
# (scripts/train_demo_tower.sh; docs/demo.md, "After stage 9: the tower lesson, shipped").
# The tower came from the GPU recipe's second run (scripts/train_demo_gpu.sh on an H200, 170 s); DEVICE=cuda here
# does the same where there is a GPU (on these 2 cores it is hours).
bash scripts/train_demo_tower.sh "$WORK"
# 20-30. boxes beside the other tasks, from E20: eleven more runs, the last shipped (scripts/train_demo_boxes.sh;
# docs/demo.md, "Boxes beside the other tasks" and "Boxes shipped")
bash scripts/train_demo_boxes.sh "$WORK"
# 31-33. the letters: Q4's embedding rows of the tokens no suite text holds (the bytes that spell other words), so
# that a LoRA can answer in new words (docs/demo.md, "The letters lesson"). J1 trains them on a lesson that repeats
# random strings, beside a rank-16 LoRA that learns to copy (--train-tokens beside LoRA, the rows at 10x its rate);
# only the rows are kept (merge --tokens-only). J2 trains the rows alone (--full --train-tokens, every other weight
# frozen) on suite lines beside letters lines, whose answers push the rows back under the suite answers' tokens.
# (L1 / L2, shipped before J2, were the same two steps without the LoRA: scripts/train_demo.sh at face60c.)
source scripts/demo_runs.sh  # letters
letters Q4 J1a J1 J2
# 34-48. J2's tower taught the glyphs with its other tokens held (TK), a new decoder on it taught strips (K5), then
# every task with reading (K7 to K7j), K7j's letters as J2's, and those rows again beside reading lines (K7j_R;
# docs/demo.md, "A tower taught glyphs" to "K7j_R")
TRIED=0 J2="$WORK/J2" bash scripts/train_demo_anchored.sh "$WORK"
FINAL=K7j_R

{
    logs scripts/train_demo.sh stage{1a,1b,2,3,4,5,6c,6d,6e,7,8,9}
    logs scripts/train_demo_tower.sh tower A B C D E E2 E3 E{6..20}
    logs scripts/train_demo_boxes.sh G1 N1 N2 V1 M2 P1 P2 Q1 Q2 Q3 Q4
    # K5 is a new decoder (the loss starts high again); TK, the tower lesson before it, logs another loss
    logs scripts/train_demo_anchored.sh K5 K7 K7b K7c0 K7d K7e K7f K7h K7j
} > "$WORK/train.log"
python scripts/plot_loss.py "$WORK/train.log" docs/demo_loss.png   # the letters' rows (another task) left out
{
    logs "scripts/train_demo.sh, the letters" J1a J2
    logs "scripts/train_demo_anchored.sh, the tower's glyph lesson" TK
    logs "scripts/train_demo_anchored.sh, the letters" K7j_La K7j_L
    logs "scripts/train_demo_anchored.sh, the letters' rows beside reading lines" K7j_R
} >> "$WORK/train.log"
mkdir -p qwen2vl/demo/checkpoint
cp "${CHECKPOINT_FILES[@]/#/$WORK/$FINAL/}" qwen2vl/demo/checkpoint/
cp "$WORK/train.log" qwen2vl/demo/checkpoint/train.log
python -m qwen2vl eval demo --quantization int8 --quantization int4 --server --dtype bfloat16,float32
