"""The README's first command end to end, wall time, against a bare `import torch` in the same run:

    qwen2vl chat --model demo --image qwen2vl/demo/examples/shapes.png "What color is the triangle?"

Each round runs both as fresh processes (the baseline first), so the page cache and the machine's load
are alike for the pair; the figure is the median of the per-round differences and ratios. Also whether
the command's process loaded torch._dynamo (2.2 s of imports on a Zen 3 before backends/cpu/untraced.py).

    python -m benchmarks.cli_startup --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import qwen2vl

IMAGE = Path(qwen2vl.__file__).parent / "demo" / "examples" / "shapes.png"
CHAT = [sys.executable, "-m", "qwen2vl", "chat", "--model", "demo", "--image", str(IMAGE),
        "What color is the triangle?"]
TORCH = [sys.executable, "-c", "import torch"]
DYNAMO = """
import runpy, sys
sys.argv = ["qwen2vl", *sys.argv[1:]]
try:
    runpy.run_module("qwen2vl", run_name="__main__")
except SystemExit:
    pass
print("torch._dynamo loaded:", "torch._dynamo" in sys.modules, file=sys.stderr)
"""


def wall(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, done.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    chat, torch_only, answers = [], [], set()
    for _ in range(args.rounds):
        torch_only.append(wall(TORCH)[0])
        seconds, answer = wall(CHAT)
        chat.append(seconds)
        answers.add(answer)
    loaded = subprocess.run([sys.executable, "-c", DYNAMO, *CHAT[3:]], capture_output=True, text=True, check=True)
    print(f"answers {sorted(answers)}; {loaded.stderr.strip().splitlines()[-1]}")
    print(f"qwen2vl chat --model demo: median {statistics.median(chat):.2f} s [{', '.join(f'{t:.2f}' for t in chat)}]")
    print(f"import torch alone:        median {statistics.median(torch_only):.2f} s "
          f"[{', '.join(f'{t:.2f}' for t in torch_only)}]")
    print(f"chat - torch, round by round: median {statistics.median(c - t for c, t in zip(chat, torch_only)):.2f} s; "
          f"chat / torch: median {statistics.median(c / t for c, t in zip(chat, torch_only)):.2f}")


if __name__ == "__main__":
    main()
