"""Fine-tuning: `qwen2vl train` (LoRA or full) and `qwen2vl merge`. See loop.py for the run, data.py for
the JSONL layouts, examples.py for which tokens are trained."""
