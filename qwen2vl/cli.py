"""The `qwen2vl` command (also `python -m qwen2vl`): chat, serve, train, merge, download, quantize, info, tokens,
eval.

Every failure a user can cause (no network, missing folder, wrong format, out of memory, bad
option) ends as one line on stderr saying what to do next, and a non-zero exit code; set
QWEN2VL_DEBUG=1 to get the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from qwen2vl.cli_errors import explain
from qwen2vl.hub import DEFAULT_MODEL, DEMO_MODEL, is_repo_id, no_such_model

PUBLISHED_PREPROCESSOR = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 16384}  # Qwen2-VL-*-Instruct on the hub
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_HUB_HELP = "offline, download it on another machine and pass the local folder instead"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as e:  # the edge: one line for the user, the traceback only on request
        if os.environ.get("QWEN2VL_DEBUG"):
            raise
        print(f"error: {explain(e)}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    from qwen2vl import chat_cli

    parser = argparse.ArgumentParser(prog="qwen2vl", description="Qwen2-VL: chat, serve an OpenAI-compatible API, "
                                     "inspect checkpoints and media.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    chat = sub.add_parser("chat", help="ask about images and videos, once or interactively")
    chat_cli.add_chat_arguments(chat)
    chat.set_defaults(run=chat_cli.run_chat)

    _add_serve(sub.add_parser("serve", help="serve the OpenAI-compatible API and the web page"))

    from qwen2vl.train import cli as train_cli

    train = sub.add_parser("train", help="fine-tune on your conversations: a LoRA adapter, or all weights (--full)",
                           description="Fine-tune Qwen2-VL on JSONL conversations with images and videos.")
    train_cli.add_train_arguments(train)
    train.set_defaults(run=train_cli.run_train)

    merge = sub.add_parser("merge", help="fold a LoRA adapter into a full checkpoint, "
                           "or make a full run's checkpoint-STEP one")
    train_cli.add_merge_arguments(merge)
    merge.set_defaults(run=train_cli.run_merge)

    download = sub.add_parser("download", help="download a model from the Hugging Face hub")
    download.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"hub repo id (default {DEFAULT_MODEL})")
    download.set_defaults(run=run_download)

    from qwen2vl.quantize_cli import add_quantize_arguments, run_quantize

    quantize = sub.add_parser("quantize", help="write a checkpoint's decoder linears quantized, in GPTQ's format")
    add_quantize_arguments(quantize)
    quantize.set_defaults(run=run_quantize)

    info = sub.add_parser("info", help="sizes, dtypes, parameter counts and memory of a checkpoint, without loading; "
                                       "--system: this machine's CPU tier, kernels and memory bandwidth")
    info.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                      help=f"local folder, hub repo id or {DEMO_MODEL!r} (the model shipped in the package)")
    info.add_argument("--system", action="store_true",
                      help="describe this machine instead: CPU tier, which kernels load and why not the others, "
                           "the compiler, a memory-bandwidth probe and the decode speed it bounds")
    info.set_defaults(run=run_info)

    tokens = sub.add_parser("tokens", help="how many visual tokens an image or video costs")
    tokens.add_argument("media", metavar="IMAGE_OR_VIDEO", help="path or URL")
    tokens.add_argument("--model", help=f"read the pixel settings of this model (a folder, hub repo id or "
                        f"{DEMO_MODEL!r}; default: the published Qwen2-VL ones)")
    tokens.add_argument("--min-pixels", type=chat_cli.positive(int))
    tokens.add_argument("--max-pixels", type=chat_cli.positive(int))
    tokens.add_argument("--fps", type=chat_cli.positive(float), help="video frames sampled per second")
    tokens.set_defaults(run=run_tokens)

    from qwen2vl.demo.evaluate import add_eval_arguments, run_eval

    evaluate = sub.add_parser("eval", help="accuracy per task of the demo model on fresh synthetic cases")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(run=run_eval)
    return parser


def _add_serve(parser: argparse.ArgumentParser) -> None:
    try:
        from qwen2vl.server.cli import add_serve_arguments, run_serve
    except Exception as e:  # the server is optional for everything else the command does
        reason = " ".join(str(e).split())

        def unavailable(args):
            raise RuntimeError(f"the server could not be imported ({reason})")

        parser.add_argument("rest", nargs=argparse.REMAINDER)
        parser.set_defaults(run=unavailable)
        return
    add_serve_arguments(parser)
    parser.set_defaults(run=run_serve)


# -- download ------------------------------------------------------------------------------

def run_download(args) -> int:
    if args.model == DEMO_MODEL:
        print(f"the {DEMO_MODEL} model ships with the package; nothing to download")
        return 0
    if Path(args.model).expanduser().is_dir():
        print(f"{args.model} is a local folder already; nothing to download")
        return 0
    from huggingface_hub import snapshot_download

    from qwen2vl.hub import FILE_PATTERNS

    if not is_repo_id(args.model):
        raise no_such_model(args.model)
    print(f"downloading {args.model} from the Hugging Face hub ...", file=sys.stderr)
    try:
        folder = snapshot_download(args.model, allow_patterns=FILE_PATTERNS, etag_timeout=10)
    except Exception as e:
        reason = " ".join(str(e).split())[:200]
        raise ConnectionError(f"could not download {args.model!r} ({type(e).__name__}: {reason}); "
                              f"check the repo id and the network ({_HUB_HELP})") from None
    print(folder)
    return 0


# -- info ----------------------------------------------------------------------------------

def run_info(args) -> int:
    if args.system:
        from qwen2vl.backends.system import report

        print(report())
        return 0
    config, headers, where = checkpoint_headers(args.model)
    from qwen2vl.config import Qwen2VLConfig

    cfg = Qwen2VLConfig.from_dict(config)
    tensors = {name: t for header in headers.values() for name, t in header.items()}
    counts: dict[str, int] = {}
    by_tower = {"vision": 0, "language": 0}
    stored = 0
    for name, t in tensors.items():
        n = math.prod(t["shape"])
        counts[t["dtype"]] = counts.get(t["dtype"], 0) + n
        by_tower["vision" if "visual." in name else "language"] += n
        stored += t["data_offsets"][1] - t["data_offsets"][0]
    quant_lines, quant_weights, quant_bytes = [], 0, 0
    if "quantization_config" in config:  # packed tensors count the weights they stand for, not their words
        from qwen2vl.quantize_cli import describe

        quant_lines, quant_weights, quant_bytes = describe(config, tensors)
        packed = [n for n in tensors if n.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx")]
        for name in packed:
            t = tensors[name]
            counts[t["dtype"]] -= math.prod(t["shape"])
            by_tower["vision" if "visual." in name else "language"] -= math.prod(t["shape"])
        by_tower["language"] += quant_weights
        counts = {dtype: n for dtype, n in counts.items() if n}
    total = sum(counts.values())
    text, vision = cfg.text, cfg.vision
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * 2  # k and v, 16-bit
    print(f"model       {args.model}  ({where}, {cfg.model_type})")
    print(f"language    {text.num_hidden_layers} layers, hidden {text.hidden_size}, {text.num_attention_heads} heads "
          f"({text.num_key_value_heads} kv), vocab {text.vocab_size}, context {text.max_position_embeddings}"
          f"{', tied embeddings' if cfg.tie_word_embeddings else ''}")
    windows = (f", windows of {vision.window_size} px (whole frames in blocks "
               f"{', '.join(map(str, vision.fullatt_block_indexes)) or 'none'})" if vision.window_size else "")
    print(f"vision      {vision.depth} blocks, width {vision.embed_dim}, {vision.num_heads} heads, "
          f"patch {vision.patch_size}, merge {vision.spatial_merge_size}x{vision.spatial_merge_size}{windows}")
    print(f"files       {len(headers)} safetensors file(s), {_gib(stored)} of tensors")
    print(f"parameters  {total + quant_weights:,} (language {by_tower['language']:,}, vision {by_tower['vision']:,})")
    print("stored as   " + ", ".join(f"{dtype.lower()} {n:,}" for dtype, n in sorted(counts.items()))
          + (f", quantized {quant_weights:,}" if quant_weights else ""))
    for line in quant_lines:
        print(line)
    kv = f"plus the KV cache, {_gib(kv_per_token * 1000)} per 1,000 tokens in 16-bit"
    if quant_weights:
        print(f"memory      weights as loaded {_gib(quant_bytes + total * 2)} (quantized linears "
              f"{_gib(quant_bytes)}, the rest in bfloat16/float16 {_gib(total * 2)}); {kv}")
    else:
        print(f"memory      weights in bfloat16/float16 {_gib(total * 2)}, in float32 {_gib(total * 4)}; {kv}")
    return 0


def checkpoint_headers(name: str) -> tuple[dict, dict[str, dict], str]:
    """(config.json, {file: {tensor: {dtype, shape, data_offsets}}}, where) without reading weights:
    a local folder (or the hub cache) from the files, a hub repo from the headers alone."""
    path = Path(name).expanduser()
    if name == DEMO_MODEL:
        from qwen2vl.hub import resolve_model_path

        path = resolve_model_path(name)
    elif not path.is_dir() and is_repo_id(name):
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"], local_files_only=True))
        except Exception:
            return _remote_headers(name)
    if not path.is_dir():
        raise no_such_model(name)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; is this a Qwen2-VL or Qwen2.5-VL checkpoint folder?")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files (only safetensors checkpoints are supported)")
    from qwen2vl.loader import read_header

    return json.loads((path / "config.json").read_text()), {f.name: read_header(f) for f in files}, "local folder"


def _remote_headers(name: str) -> tuple[dict, dict[str, dict], str]:
    from huggingface_hub import HfApi, snapshot_download

    try:  # snapshot_download fails at once offline, where hf_hub_download retries for ~25 s
        folder = Path(snapshot_download(name, allow_patterns=["config.json"], etag_timeout=10))
        config = json.loads((folder / "config.json").read_text())
        meta = HfApi().get_safetensors_metadata(name)
    except Exception as e:
        raise ConnectionError(f"could not read {name!r} from the Hugging Face hub ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]}); {_HUB_HELP}") from None
    headers = {file: {t: {"dtype": i.dtype, "shape": i.shape, "data_offsets": i.data_offsets}
                      for t, i in m.tensors.items()} for file, m in meta.files_metadata.items()}
    return config, headers, "hub, headers only"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# -- tokens --------------------------------------------------------------------------------

def run_tokens(args) -> int:
    from qwen2vl.processing.headers import VideoHeader, media_header
    from qwen2vl.processing.image import image_token_count
    from qwen2vl.processing.media import MediaPolicy, open_source
    from qwen2vl.processing.video import sample_frames, video_token_count
    from qwen2vl.processing.vision_config import VisionProcessingConfig

    if args.model:
        from qwen2vl.hub import resolve_model_path

        cfg, origin = VisionProcessingConfig.from_pretrained(resolve_model_path(args.model)), f"from {args.model}"
    else:
        cfg, origin = VisionProcessingConfig.from_dict(PUBLISHED_PREPROCESSOR), "published Qwen2-VL defaults"
    policy = MediaPolicy()
    header = media_header(open_source(args.media, policy, max_bytes=policy.max_video_bytes), args.media)
    lo, hi = args.min_pixels, args.max_pixels
    if isinstance(header, VideoHeader):
        indices, fps = sample_frames(header.frames, header.fps, cfg, fps=args.fps)
        t = video_token_count(header.height, header.width, cfg, num_frames=len(indices), min_pixels=lo, max_pixels=hi)
        print(f"video       {header.width}x{header.height}, {header.frames} frames at {header.fps:g} fps "
              f"({header.seconds:.1f} s) -> {len(indices)} frames ({fps:.2f} per s), each resized to "
              f"{t.width}x{t.height}")
        limits = (f"fps {args.fps or cfg.fps:g}, pixels per frame in [{lo or cfg.video_min_pixels:,}, "
                  f"{hi or cfg.video_max_pixels:,}] within the clip's total budget")
    else:
        if args.fps is not None:
            raise ValueError("--fps applies to videos; this is an image")
        width, height = header  # as it is seen: EXIF orientation applied, as the processor does
        t = image_token_count(height, width, cfg, min_pixels=lo, max_pixels=hi)
        print(f"image       {width}x{height} -> resized to {t.width}x{t.height}")
        limits = f"min_pixels {lo or cfg.min_pixels:,}, max_pixels {hi or cfg.max_pixels:,}"
    print(f"grid        t={t.grid_thw[0]}, h={t.grid_thw[1]}, w={t.grid_thw[2]} ({cfg.patch_size}-px patches, "
          f"{cfg.merge_size}x{cfg.merge_size} merged per token)")
    print(f"tokens      {t.num_tokens} visual tokens (+2 for <|vision_start|>, <|vision_end|>)")
    print(f"settings    {limits} ({origin})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
