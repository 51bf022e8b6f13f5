"""`qwen2vl chat`: one question answered and exit, or an interactive chat in the terminal.

The answer streams to stdout; progress, timings and grounded boxes go to stderr, so
`qwen2vl chat --image x.jpg "Describe it." > answer.txt` keeps only the answer. In interactive
mode the history is kept; `/image PATH` and `/video PATH` attach media to the next message.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import time
from pathlib import Path

from qwen2vl.backends.quant import QUANTIZATIONS
from qwen2vl.cli_errors import explain
from qwen2vl.grounding import drop_markup
from qwen2vl.hub import DEFAULT_MODEL, DEMO_MODEL

HELP = "commands: /image PATH, /video PATH, /reset (forget the conversation), /quit"


def positive(kind):
    """argparse type: a positive int or float, with the limit in the error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def add_chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("question", nargs="?", help="ask this once and exit; without it, chat interactively")
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"folder, hub repo id or {DEMO_MODEL!r} (the small model shipped in the package, for trying "
                        f"things offline; default {DEFAULT_MODEL})")
    p.add_argument("--image", action="append", default=[], metavar="PATH_OR_URL", help="repeat for several")
    p.add_argument("--video", action="append", default=[], metavar="PATH_OR_URL", help="repeat for several")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-tokens", type=positive(int), default=512, help="per answer (default 512)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the model's generation_config.json)")
    p.add_argument("--seed", type=int)
    p.add_argument("--min-pixels", type=positive(int), help="per image or video frame, before resizing")
    p.add_argument("--max-pixels", type=positive(int), help="per image or video frame; lower = fewer tokens")
    p.add_argument("--fps", type=positive(float), help="video frames sampled per second (default 2)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "auto"])
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--quantization", choices=list(QUANTIZATIONS),
                   help="int8/int4 weights for the language model's linears (faster CPU decode, some error)")
    p.add_argument("--matmul", choices=["int8"], help="the vision tower and prefill in int8 on the CPU (faster "
                   "time to first token, some error; docs/performance.md)")
    p.add_argument("--lora", metavar="DIR", help="apply this LoRA adapter (PEFT format, e.g. from `qwen2vl train`)")
    p.add_argument("--kv-cache-gib", type=positive(float), help="KV cache size on CPU (default 2)")
    p.add_argument("--max-model-len", type=positive(int), help="context length cap")
    p.add_argument("--draw", metavar="OUT.png", help="save the image with the answer's boxes drawn on it")


def run_chat(args) -> int:
    for kind, sources in (("image", args.image), ("video", args.video)):
        for source in sources:
            check_local(source, kind)
    if args.draw and not args.image:
        raise ValueError("--draw needs an --image to draw the boxes on")
    if args.quantization and importlib.util.find_spec("qwen2vl.backends.quant") is None:
        raise ValueError("--quantization is not available in this build (no qwen2vl.backends.quant); leave it out")
    llm = load(args)
    session = ChatSession(llm, args)
    for source in args.image:
        session.attach("image", source)
    for source in args.video:
        session.attach("video", source)
    if args.question is not None:
        session.ask(args.question)
        return 0
    return interactive(session)


def check_local(source: str, kind: str) -> None:
    """Fail before the (slow) model load when a local media file is missing."""
    if source.startswith(("http://", "https://", "data:")):
        return
    path = Path(source.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{kind} file not found: {source}")


def load(args):
    import torch

    from qwen2vl.engine.llm import LLM
    from qwen2vl.gptq import QuantConfig, weights_in
    from qwen2vl.hub import resolve_model_path
    from qwen2vl.loader import checkpoint_files, read_header

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    print(f"resolving {args.model} ...", file=sys.stderr, flush=True)
    folder = resolve_model_path(args.model)
    print(f"loading {folder} ({args.dtype}, {device}) ...", file=sys.stderr, flush=True)
    engine_args = {k: v for k, v in (("kv_cache_gib", args.kv_cache_gib), ("max_model_len", args.max_model_len),
                                     ("seed", args.seed)) if v is not None}
    llm = LLM(folder, dtype=args.dtype, device=device, quantization=args.quantization, lora=args.lora,
              matmul=args.matmul, **engine_args)
    # from the checkpoint's headers: after load the CPU backend keeps packed weights outside parameters()
    quant = QuantConfig.from_folder(folder)  # a GPTQ/AWQ checkpoint's packed words count what they hold
    n = sum(weights_in(name, t["shape"], quant) for f in checkpoint_files(folder) for name, t in read_header(f).items())
    size = f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"
    print(f"ready in {time.perf_counter() - start:.1f} s ({size} parameters)", file=sys.stderr, flush=True)
    return llm


class ChatSession:
    """The conversation so far, media waiting for the next message, and how to answer."""

    def __init__(self, llm, args):
        self.llm, self.args = llm, args
        self.system = [{"role": "system", "content": args.system}] if args.system else []
        self.messages = list(self.system)
        self.pending: list[dict] = []
        self.last_image: str | None = None  # grounded boxes refer to it

    def attach(self, kind: str, source: str) -> None:
        a = self.args
        options = {"min_pixels": a.min_pixels, "max_pixels": a.max_pixels}
        if kind == "video":
            options["fps"] = a.fps
            if a.max_pixels is not None and a.min_pixels is None:  # a cap under the video floor lowers the floor
                options["min_pixels"] = min(self.llm.processor.vision.video_min_pixels, a.max_pixels)
        self.pending.append({"type": kind, kind: source, **{k: v for k, v in options.items() if v is not None}})
        if kind == "image":
            self.last_image = source

    def reset(self) -> None:
        self.messages, self.pending, self.last_image = list(self.system), [], None

    def ask(self, question: str) -> str:
        """Stream the answer to stdout, print timings (and boxes) to stderr, keep the turn."""
        self.messages.append({"role": "user", "content": [*self.pending, {"type": "text", "text": question}]})
        self.pending = []
        try:
            answer = self._stream()
        except Exception:
            self.messages.pop()  # a turn that failed (bad image, too long) is not history
            raise
        # history without the box tokens: text holding special tokens is refused or read as plain text
        self.messages.append({"role": "assistant", "content": drop_markup(answer)})
        self._show_grounding(answer)
        return answer

    def _stream(self) -> str:
        a = self.args
        overrides = {"max_tokens": a.max_tokens, "skip_special_tokens": False, "seed": a.seed}  # keep box markup
        if a.temperature is not None:
            overrides["temperature"] = a.temperature
        params = self.llm.default_sampling_params(**{k: v for k, v in overrides.items() if v is not None})
        start, first, parts, usage = time.perf_counter(), None, [], None
        try:
            with contextlib.closing(self.llm.stream(self.messages, params)) as chunks:  # closing aborts the request
                for chunk in chunks:
                    if first is None and chunk.token_ids:
                        first = time.perf_counter()
                    sys.stdout.write(chunk)
                    sys.stdout.flush()
                    parts.append(str(chunk))
                    usage = chunk.usage or usage
        except KeyboardInterrupt:
            print("\n[stopped]", file=sys.stderr)
        end = time.perf_counter()
        print()
        print(stats_line(usage, len(parts), start, first, end), file=sys.stderr, flush=True)
        return "".join(parts)

    def _show_grounding(self, answer: str) -> None:
        from qwen2vl.grounding import draw_regions, parse_grounding

        if self.last_image is None or ("<|box_start|>" not in answer and "<|quad_start|>" not in answer):
            if self.args.draw:
                print(f"  no boxes in this answer; {self.args.draw} not written", file=sys.stderr)
            return
        from qwen2vl.processing.image import load_image

        image = load_image(self.last_image)
        regions = parse_grounding(answer, image.width, image.height)
        for r in regions:
            where = " ".join(f"({x},{y})" for x, y in r.points)
            print(f"  {r.kind} {r.label or '(no label)'}: {where}", file=sys.stderr)
        if self.args.draw and regions:
            draw_regions(image, regions).save(self.args.draw)
            print(f"  boxes drawn on {self.last_image} -> {self.args.draw}", file=sys.stderr)


def stats_line(usage, chunks: int, start: float, first: float | None, end: float) -> str:
    """`[12 tokens, prompt 301, time to first token 0.41 s, 23.5 tokens/s]`; the rate counts
    the tokens after the first over the time after it (decode speed, not prompt speed)."""
    n = usage.completion_tokens if usage else chunks
    parts = [f"{n} tokens"]
    if usage:
        parts.append(f"prompt {usage.prompt_tokens}")
    if first is not None:
        parts.append(f"time to first token {first - start:.2f} s")
        rate = (n - 1) / (end - first) if n > 1 and end > first else float("nan")
        parts.append(f"{rate:.1f} tokens/s")
    return "[" + ", ".join(parts) + "]"


def interactive(session: ChatSession) -> int:
    tty = sys.stdin.isatty()
    print(f"chatting with {session.args.model}; {HELP}", file=sys.stderr)
    while True:
        try:
            line = input("> " if tty else "").strip()
        except EOFError:
            return 0
        if not line:
            continue
        command, _, rest = line.partition(" ")
        rest = rest.strip()
        try:
            if command in ("/quit", "/exit"):
                return 0
            elif command == "/reset":
                session.reset()
                print("[conversation cleared]", file=sys.stderr)
            elif command in ("/image", "/video"):
                if not rest:
                    raise ValueError(f"usage: {command} PATH_OR_URL")
                check_local(rest, command[1:])
                session.attach(command[1:], rest)
                print(f"[{command[1:]} attached to your next message: {rest}]", file=sys.stderr)
            elif command in ("/help", "/?"):
                print(HELP, file=sys.stderr)
            elif command.startswith("/"):
                raise ValueError(f"unknown command {command}; {HELP}")
            else:
                session.ask(line)
        except (KeyboardInterrupt, EOFError):
            return 0
        except Exception as e:  # one bad turn does not end the chat
            print(f"error: {explain(e)}", file=sys.stderr)
