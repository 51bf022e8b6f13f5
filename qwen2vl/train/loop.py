"""The training loop: AdamW, a cosine schedule with warmup, gradient accumulation, a progress line,
held-out loss, resumable checkpoints, and the result written at the end (checkpoint.py).

A step is `grad_accum` micro-batches of `batch_size` rows each; its loss is the mean over every trained
token of the step (sum of the micro-batches' summed losses / their token count), so accumulating equals
one big batch. Rows are shuffled per epoch by (seed, epoch) alone, and a checkpoint keeps the RNG, so a
resumed run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from qwen2vl.adapter import DECODER_LINEARS
from qwen2vl.hub import resolve_model_path
from qwen2vl.loader import checkpoint_dtype
from qwen2vl.processing.processor import Processor
from qwen2vl.train.checkpoint import latest_checkpoint, load_state, save_full, save_state
from qwen2vl.train.data import read_rows
from qwen2vl.train.feed import Encoder, StepBatches, check_rows, in_order
from qwen2vl.train.lora import save_lora
from qwen2vl.train.precision import training_dtype
from qwen2vl.train.setup import load_for_training, trainable_parameters
from qwen2vl.train.step import loss_sum

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class TrainConfig:
    model: str  # checkpoint folder or hub id
    data: str  # JSONL
    output: str
    eval_data: str | None = None
    full: bool = False  # else LoRA
    train_vision: bool = False
    train_layers: list[int] | None = None  # with full: only these decoder layers trained
    train_tokens: list[int] | None = None  # these rows of the embedding trained (beside LoRA, or alone: full)
    init_random: str = ""  # "all": random weights; "decoder": the checkpoint's vision tower, a new decoder
    init_vision_scale: float = 1.0  # with init_random: the merger's output layer scaled by this
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: list(DECODER_LINEARS))
    loraplus_ratio: float | None = None  # LoRA+: B's learning rate is this times A's
    lr: float | None = None  # default: 1e-4 for LoRA, 1e-5 full
    vision_lr: float | None = None  # the vision tower's (with train_vision); default lr
    token_lr: float | None = None  # the train_tokens rows'; default lr
    warmup_steps: int | None = None
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    batch_size: int = 1
    grad_accum: int = 1
    epochs: int = 1
    steps: int | None = None  # overrides epochs
    stop_after: int | None = None  # end after this step, the schedule still that of all the steps
    max_length: int | None = None  # longer rows are skipped
    min_pixels: int | None = None
    max_pixels: int | None = None
    gradient_checkpointing: bool = False
    dtype: str = "auto"  # "auto": bf16 where the device has bf16 matmuls, else fp32 (precision.py)
    device: str = "cpu"
    workers: int = 0  # processes encoding the next steps' rows (0: the training process, between steps)
    seed: int = 0
    log_every: int = 1
    save_every: int | None = None
    eval_every: int | None = None  # default: at each save and at the end
    resume: str | None = None  # a checkpoint folder, or "latest"
    overwrite: bool = False  # write into an output folder that already holds a result or checkpoints

    def resumable_settings(self) -> dict:
        """What a resumed run must keep (the data order and the trained tensors depend on it)."""
        keep = ("data", "full", "train_vision", "train_layers", "train_tokens", "lora_rank", "lora_alpha",
                "lora_targets", "loraplus_ratio", "batch_size", "grad_accum", "seed", "max_length", "min_pixels",
                "max_pixels")
        return {k: v for k, v in asdict(self).items() if k in keep}


def train(cfg: TrainConfig, log=print, objective=loss_sum) -> Path:
    """Run `cfg`; returns the folder holding the result. `objective(model, batch)` is what the steps minimise (summed
    over the batch's trained tokens; a lesson may add its own terms); held-out loss stays `loss_sum`."""
    out = Path(cfg.output)
    if out.is_dir() and any(out.iterdir()) and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"{out} is not empty; --resume to continue its run, --overwrite to replace it, "
                         "or choose another --output")
    if cfg.init_random not in ("", "all", "decoder"):
        raise ValueError(f"init_random is '', 'all' or 'decoder', got {cfg.init_random!r}")
    if cfg.train_tokens and cfg.full and (cfg.train_vision or cfg.init_random or cfg.weight_decay):
        raise ValueError("--full --train-tokens trains some embedding rows of a trained model and nothing else: "
                         "no --train-vision, --init-random or --weight-decay (which would shrink the frozen rows "
                         "too)")
    dtype = training_dtype(cfg.dtype, cfg.device, log)
    torch.manual_seed(cfg.seed)
    folder = resolve_model_path(cfg.model)
    processor = Processor.from_pretrained(folder)
    rows = read_rows(cfg.data, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    eval_rows = read_rows(cfg.eval_data, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels) if cfg.eval_data else []
    check_rows(rows + eval_rows, processor, cfg.workers)  # template problems show up now, not hours in
    lora = None if cfg.full else dict(targets=cfg.lora_targets, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                                      dropout=cfg.lora_dropout)
    model = load_for_training(folder, dtype=DTYPES[dtype], device=cfg.device, full=cfg.full,
                              train_vision=cfg.train_vision, init_random=cfg.init_random,
                              init_vision_scale=cfg.init_vision_scale, lora=lora,
                              gradient_checkpointing=cfg.gradient_checkpointing, train_tokens=cfg.train_tokens,
                              train_layers=cfg.train_layers)
    params = trainable_parameters(model)
    lr = cfg.lr or (1e-5 if cfg.full else 1e-4)
    groups = []
    for vision in (False, True):  # the vision tower's own learning rate (--vision-lr)
        part = [p for name, p in params.items() if name.startswith("visual.") == vision]
        group_lr = (cfg.vision_lr or lr) if vision else lr
        groups += [{"params": [p for p in part if p.dim() >= 2], "weight_decay": cfg.weight_decay, "lr": group_lr},
                   {"params": [p for p in part if p.dim() < 2], "weight_decay": 0.0, "lr": group_lr}]  # biases, norms
    if cfg.train_tokens:  # the rows: their own rate, no decay (it would pull them toward zero, not the base's)
        _own_group(groups, [p for name, p in params.items() if name.endswith(("token_rows.rows", "embed_tokens.weight"))
                            or name == "lm_head.weight"], weight_decay=0.0, lr=cfg.token_lr or lr)
    if cfg.loraplus_ratio:  # LoRA+ (Hayou et al. 2024): B, which starts at zero, learns ratio x faster than A
        _own_group(groups, [p for name, p in params.items() if name.endswith("lora_B")],
                   weight_decay=cfg.weight_decay, lr=lr * cfg.loraplus_ratio)
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, cfg.adam_beta2))
    per_epoch = math.ceil(len(rows) / cfg.batch_size)
    total = cfg.steps or math.ceil(per_epoch * cfg.epochs / cfg.grad_accum)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, warmup, total))
    stop = cfg.stop_after or total
    if stop > total:
        raise ValueError(f"--stop-after {stop} is past the run's last step ({total})")
    start = 0
    if cfg.resume:
        ckpt = latest_checkpoint(out) if cfg.resume == "latest" else Path(cfg.resume)
        if ckpt is None or not (ckpt / "state.json").is_file():
            raise FileNotFoundError(f"--resume: no checkpoint to resume from in {ckpt or out}")
        start = load_state(ckpt, params, optimizer, scheduler, cfg.resumable_settings())
        log(f"resumed from {ckpt} (step {start})")
        if start >= stop:
            raise ValueError(f"--stop-after {stop}: {ckpt} is already at step {start}")
    n_params = sum(p.numel() for p in params.values())
    if cfg.full and cfg.train_tokens:  # the embedding's (and an untied head's) rows that the gradient reaches
        n_params = sum(p[0].numel() for p in params.values()) * len(set(cfg.train_tokens))
    token_rows = f"the rows of {len(set(cfg.train_tokens or []))} tokens"
    if not cfg.full:
        what = f"a LoRA adapter and {token_rows}" if cfg.train_tokens else "a LoRA adapter"
    elif cfg.train_tokens:
        what = token_rows
    elif cfg.train_layers:
        what = "decoder layers " + ", ".join(map(str, cfg.train_layers))
    else:
        what = "the whole model" if cfg.train_vision else "the decoder"
    cut = f", stopping after step {stop}" if stop < total else ""
    log(f"training {what}: {n_params:,} parameters, {len(rows)} rows, {total} steps of {cfg.grad_accum} x "
        f"{cfg.batch_size} rows, {dtype}{' (auto)' if cfg.dtype == 'auto' else ''} on {cfg.device}{cut}")

    max_length = cfg.max_length or model.config.text.max_position_embeddings
    encoder = Encoder(processor, model.config, max_length, log)

    def autocast():
        if dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(torch.device(cfg.device).type, dtype=DTYPES[dtype])

    # a run cut short (stop < total) keeps the cosine of all its steps: what a run stopped by hand had
    steps = StepBatches(rows, encoder, cfg.batch_size, cfg.grad_accum, cfg.seed, start, stop)
    began, tokens_seen = time.perf_counter(), 0
    for step, group in enumerate(in_order(steps, cfg.workers), start):
        targets = sum(b.num_targets for b in group)
        loss = 0.0
        for b in group:
            with autocast():
                part = objective(model, b) / max(targets, 1)
            part.backward()
            loss += part.item()
            tokens_seen += b.num_tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % cfg.log_every == 0 or done == stop:
            elapsed = time.perf_counter() - began
            rate = (done - start) / elapsed
            log(f"step {done}/{total} | epoch {done * cfg.grad_accum / per_epoch:.2f} | loss {loss:.4f} | "
                f"lr {lr:.2e} | grad {float(grad_norm):.3f} | {tokens_seen / elapsed:.0f} tok/s | "
                f"{_clock(elapsed)} < {_clock((stop - done) / rate)}")
        saving = cfg.save_every and done % cfg.save_every == 0 and done < total
        if saving:
            ckpt = save_state(out / f"checkpoint-{done}", done, params, optimizer, scheduler,
                              cfg.resumable_settings())
            if not cfg.full:
                save_lora(model, ckpt, cfg.lora_targets, cfg.lora_dropout, str(cfg.model))
            log(f"saved {ckpt}")
        if eval_rows and (done == stop or (cfg.eval_every and done % cfg.eval_every == 0)
                          or (saving and not cfg.eval_every)):
            n, size = len(eval_rows), cfg.batch_size
            held_out = encoder.batches([list(range(i, min(i + size, n))) for i in range(0, n, size)], eval_rows)
            log(f"step {done}/{total} | eval loss {evaluate(model, held_out, autocast):.4f}")
    if not cfg.full:
        return save_lora(model, out, cfg.lora_targets, cfg.lora_dropout, str(cfg.model))
    return save_full(model, folder, out, checkpoint_dtype(folder))


def _own_group(groups: list[dict], params: list, **settings) -> None:
    """Move `params` out of the optimizer's `groups` into a group of their own with `settings` (lr, decay)."""
    moved = {id(p) for p in params}
    for g in groups:
        g["params"] = [p for p in g["params"] if id(p) not in moved]
    groups.append({"params": params, **settings})


@torch.no_grad()
def evaluate(model, held_out: list, autocast) -> float:
    """Mean loss per trained token over the held-out batches (dropout off)."""
    model.eval()
    total, count = 0.0, 0
    for b in held_out:
        with autocast():
            total += loss_sum(model, b).item()
        count += b.num_targets
    model.train()
    return total / max(count, 1)


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """The learning-rate factor at `step`: linear from 0 over `warmup` steps, then half a cosine to 0."""
    if step < warmup:
        return step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def stderr_log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
