"""The demo model and the synthetic visual task suite it was trained on.

- `scenes.py`: coloured shapes and words drawn on plain backgrounds;
- `tasks.py`: the six tasks (colour, count, grounding, text, video, two images) as seeded cases;
- `score.py`: whether an answer is right; `evaluate.py`: `qwen2vl eval demo`;
- `vocab.py`, `blank.py`, `dataset.py`: the tokenizer, an untrained checkpoint folder and the
  training data, i.e. everything `scripts/train_demo.sh` needs to rebuild `checkpoint/`;
- `checkpoint/`: the trained model, loaded by the name "demo" (`LLM("demo")`, `--model demo`).
"""
