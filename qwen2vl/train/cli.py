"""`qwen2vl train` and `qwen2vl merge`: arguments, their checks, and the calls into loop.py / merge.py.

`qwen2vl/cli.py` owns the commands; it calls `add_train_arguments(parser)` / `run_train(args)` and
`add_merge_arguments(parser)` / `run_merge(args)`.
"""

from __future__ import annotations

import argparse
import sys

from qwen2vl.adapter import DECODER_LINEARS
from qwen2vl.chat_cli import positive
from qwen2vl.train.precision import CHOICES

TRAIN_EPILOG = """\
data: JSONL, one conversation per line, either LLaMA-Factory's multimodal sharegpt layout
  {"messages": [{"role": "user", "content": "<image>What is this?"},
                {"role": "assistant", "content": "A cat."}], "images": ["cat.png"]}
  (each <image>/<video> tag takes the next of "images"/"videos"; a video is a file or a list of
  frame images) or the Qwen/OpenAI message form the Python API takes, with
  {"type": "image", "image": "cat.png"} items. Paths are relative to the JSONL file. Only the
  assistant's answers (and the <|im_end|> closing each) are trained.

examples:
  qwen2vl train --model Qwen/Qwen2-VL-2B-Instruct --data train.jsonl --output my-adapter
  qwen2vl train --model base/ --data train.jsonl --output my-model --full --train-vision --lr 1e-5
  qwen2vl chat --model Qwen/Qwen2-VL-2B-Instruct --lora my-adapter --image x.png "What is this?"
"""


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _targets(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = sorted(set(names) - set(DECODER_LINEARS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {unknown or 'none'}; choose among {','.join(DECODER_LINEARS)}")
    return names


def _numbers(text: str) -> list[int]:
    """'3,7,10-12' -> [3, 7, 10, 11, 12]: --train-tokens' ids and --train-layers' layers."""
    ids = []
    try:
        for part in (t.strip() for t in text.split(",") if t.strip()):
            lo, _, hi = part.partition("-")
            ids += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers and ranges such as 3,7,10-12, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("no numbers given")
    return ids


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = TRAIN_EPILOG
    p.add_argument("--model", "-m", required=True, help="base checkpoint: folder or hub repo id")
    p.add_argument("--data", required=True, metavar="JSONL", help="training conversations (see below)")
    p.add_argument("--output", "-o", required=True, metavar="DIR",
                   help="where the adapter (LoRA) or checkpoint (--full) and the checkpoint-STEP folders go")
    p.add_argument("--eval-data", metavar="JSONL", help="held-out conversations: their loss is reported")
    m = p.add_argument_group("what is trained")
    m.add_argument("--full", action="store_true", help="train every decoder weight (default: a LoRA adapter)")
    m.add_argument("--train-vision", action="store_true", help="with --full: train the vision tower too "
                   "(default: frozen)")
    m.add_argument("--train-layers", type=_numbers, metavar="LAYERS", help="with --full: train only these "
                   "decoder layers (numbers and ranges: 4,5 or 4-5), every other weight frozen (new layers on top "
                   "of a trained decoder: python -m qwen2vl.demo.grow)")
    m.add_argument("--train-tokens", type=_numbers, metavar="IDS", help="train these tokens' rows of the "
                   "embedding (ids and ranges: 3,7,10-12): new tokens, or tokens the model never saw. With LoRA, "
                   "beside the adapter and saved in it (PEFT's trainable_token_indices; a tied head uses them "
                   "too); with --full, only them (and an untied head's), every other weight frozen")
    m.add_argument("--init-random", nargs="?", const="all", choices=["all", "decoder"], help="with --full: start "
                   "from random weights (the folder needs only config.json, tokenizer and preprocessor files); "
                   "'decoder': keep the folder's vision tower, a new decoder, embeddings and head")
    m.add_argument("--init-vision-scale", type=positive(float), help="with --init-random: scale the vision "
                   "merger's output layer by this, so that visual features start near the text embeddings' "
                   "size (0.1 for the demo model's shapes; default 1)")
    m.add_argument("--lora-rank", type=positive(int), help="LoRA rank r (default 16)")
    m.add_argument("--lora-alpha", type=positive(float), help="LoRA alpha; the update is scaled by alpha/r "
                   "(default 2 x rank)")
    m.add_argument("--lora-dropout", type=_fraction, help="dropout on the LoRA input (default 0.05)")
    m.add_argument("--lora-targets", type=_targets, metavar="NAMES",
                   help=f"comma-separated decoder linears to adapt (default {','.join(DECODER_LINEARS)})")
    m.add_argument("--loraplus-ratio", type=positive(float), metavar="RATIO", help="LoRA+: the B matrices "
                   "learn at RATIO x --lr (16 is the paper's choice; faster on small data)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--lr", type=positive(float), help="peak learning rate (default 1e-4 LoRA, 1e-5 full)")
    o.add_argument("--vision-lr", type=positive(float), help="with --train-vision: peak learning rate of the vision "
                   "tower and its merger (default --lr; from scratch, 1/10 of it keeps the visual features from "
                   "blowing up into one constant direction)")
    o.add_argument("--token-lr", type=positive(float), help="with --train-tokens: the token rows' peak "
                   "learning rate (default --lr; new rows usually want several times an adapter's)")
    o.add_argument("--warmup-steps", type=int, help="linear warmup steps (default: --warmup-ratio of the steps)")
    o.add_argument("--warmup-ratio", type=_fraction, default=0.0, help="warmup as a fraction of the steps")
    o.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (not on biases/norms)")
    o.add_argument("--adam-beta2", type=_fraction, default=0.999, help="AdamW's second-moment decay (default "
                   "0.999, torch's; 0.95 forgets the large gradients of a from-scratch start within tens of steps)")
    o.add_argument("--max-grad-norm", type=positive(float), default=1.0, help="clip gradients to this norm")
    o.add_argument("--batch-size", type=positive(int), default=1, help="conversations per micro-batch, "
                   "packed along the token axis (no padding)")
    o.add_argument("--grad-accum", type=positive(int), default=1, help="micro-batches per optimizer step")
    o.add_argument("--epochs", type=positive(int), default=1, help="passes over the data (default 1)")
    o.add_argument("--steps", type=positive(int), help="optimizer steps (overrides --epochs)")
    o.add_argument("--stop-after", type=positive(int), metavar="STEP", help="end the run after this step and "
                   "write its result, the learning rate still following the schedule of all the steps (to "
                   "repeat a run that was stopped by hand)")
    o.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer's activations "
                   "in the backward pass: less memory, more time")
    o.add_argument("--seed", type=int, default=0, help="LoRA init, data order and dropout")
    d = p.add_argument_group("inputs")
    d.add_argument("--max-length", type=positive(int), help="skip conversations longer than this many tokens "
                   "(default: the model's context)")
    d.add_argument("--min-pixels", type=positive(int), help="per image / video frame (default: the processor's)")
    d.add_argument("--max-pixels", type=positive(int), help="per image / video frame: fewer visual tokens; "
                   "use the same limit at inference")
    r = p.add_argument_group("run")
    r.add_argument("--dtype", choices=CHOICES, default="auto", help="bf16: frozen weights in bf16, compute under "
                   "autocast, trained weights kept in fp32; fp32: everything fp32; auto (default): bf16 where the "
                   "device multiplies bf16 in hardware (CUDA, a CPU with AVX-512 BF16 or AMX), else fp32 (an AVX2 "
                   "CPU emulates bf16 matmuls: 13-20x slower)")
    r.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    r.add_argument("--workers", type=int, default=0, help="processes that prepare the next steps' rows "
                   "(pictures, tokens) while one trains; worth it on a GPU, whose step is shorter than the "
                   "rows' preparation (default 0: prepared by the training process)")
    r.add_argument("--log-every", type=positive(int), default=1, help="steps between progress lines")
    r.add_argument("--save-every", type=positive(int), help="steps between resumable checkpoints")
    r.add_argument("--eval-every", type=positive(int), help="steps between held-out losses "
                   "(default: at each checkpoint and at the end)")
    r.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="continue from OUTPUT's latest checkpoint-STEP (or the one given)")
    r.add_argument("--overwrite", action="store_true", help="write into a non-empty --output")


def config_from_args(args):
    from qwen2vl.train.loop import TrainConfig

    lora_args = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "loraplus_ratio")
    lora_given = [n for n in lora_args if getattr(args, n) is not None]
    if args.full and lora_given:
        raise ValueError(f"--{lora_given[0].replace('_', '-')} is for LoRA runs; leave it out with --full")
    if args.train_vision and not args.full:
        raise ValueError("--train-vision needs --full (a LoRA adapter covers the decoder's linears only)")
    if args.init_random and not args.full:
        raise ValueError("--init-random needs --full (an adapter on random weights learns nothing useful)")
    if args.train_layers and not args.full:
        raise ValueError("--train-layers needs --full (a LoRA adapter already trains only what it adds)")
    if args.train_layers and (args.train_tokens or args.train_vision or args.init_random):
        raise ValueError("--train-layers trains those decoder layers and nothing else: no --train-tokens, "
                         "--train-vision or --init-random")
    if args.token_lr is not None and not args.train_tokens:
        raise ValueError("--token-lr needs --train-tokens (the rows it sets the rate of)")
    if args.vision_lr is not None and not args.train_vision:
        raise ValueError("--vision-lr needs --train-vision (the vision tower is frozen otherwise)")
    if args.init_vision_scale is not None and args.init_random != "all":
        raise ValueError("--init-vision-scale needs --init-random (all weights new: a kept tower is not scaled)")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise ValueError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    rank = args.lora_rank or 16
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return TrainConfig(
        model=args.model, data=args.data, output=args.output, eval_data=args.eval_data, full=args.full,
        train_vision=args.train_vision, train_layers=args.train_layers, train_tokens=args.train_tokens,
        init_random=args.init_random or "",
        lora_rank=rank, lora_alpha=args.lora_alpha or 2.0 * rank,
        lora_dropout=0.05 if args.lora_dropout is None else args.lora_dropout,
        lora_targets=args.lora_targets or list(DECODER_LINEARS), loraplus_ratio=args.loraplus_ratio,
        lr=args.lr, vision_lr=args.vision_lr, token_lr=args.token_lr,
        init_vision_scale=args.init_vision_scale or 1.0, warmup_steps=args.warmup_steps,
        warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay, adam_beta2=args.adam_beta2,
        max_grad_norm=args.max_grad_norm,
        batch_size=args.batch_size, grad_accum=args.grad_accum, epochs=args.epochs, steps=args.steps,
        stop_after=args.stop_after,
        max_length=args.max_length, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
        gradient_checkpointing=args.gradient_checkpointing, dtype=args.dtype, device=device, workers=args.workers,
        seed=args.seed,
        log_every=args.log_every, save_every=args.save_every, eval_every=args.eval_every, resume=args.resume,
        overwrite=args.overwrite)


def run_train(args) -> int:
    from qwen2vl.train.loop import stderr_log, train

    cfg = config_from_args(args)
    out = train(cfg, log=stderr_log)
    print(out)
    return 0


def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="the checkpoint the adapter was trained on: folder or hub repo id")
    p.add_argument("adapter", help="LoRA adapter folder (adapter_config.json + adapter_model.safetensors), or a "
                   "full run's OUTPUT/checkpoint-STEP (its weights at that step become a checkpoint folder)")
    p.add_argument("output", help="folder for the merged checkpoint")
    p.add_argument("--tokens-only", action="store_true", help="put only the adapter's trained token rows "
                   "(--train-tokens) in the checkpoint, not its LoRA: an adapter trained to teach new rows, "
                   "then set aside")


def run_merge(args) -> int:
    from qwen2vl.train.merge import merge

    out = merge(args.base, args.adapter, args.output, tokens_only=args.tokens_only)
    what = "the token rows of " if args.tokens_only else ""
    print(f"merged {what}{args.adapter} into {args.base}", file=sys.stderr)
    print(out)
    return 0
