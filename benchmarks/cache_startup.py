"""Start-up cost of the KV cache: allocating the default 2 GiB for Qwen2-VL-2B's shapes on the CPU,
and an `LLM` on a (tiny) checkpoint with that cache, wall clock.

    python -m benchmarks.cache_startup --model .cache/server_tiny_qwen2vl

To compare with another checkout, run it from that checkout's folder (the current folder's
package is the one imported), with this file copied there and an absolute --model path.
"""

import argparse
import time

import torch

import qwen2vl
from qwen2vl.config import TextConfig
from qwen2vl.engine.kv_cache import KVCache, num_blocks_for

QWEN2VL_2B = TextConfig(hidden_size=1536, num_attention_heads=12, num_key_value_heads=2, num_hidden_layers=28)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder for the LLM start-up")
    parser.add_argument("--gib", type=float, default=2.0, help="KV cache size (default 2, the CPU default)")
    args = parser.parse_args()
    cpu = torch.device("cpu")
    n = num_blocks_for(QWEN2VL_2B, 16, torch.bfloat16, cpu, kv_cache_gib=args.gib, gpu_memory_utilization=0.9)
    start = time.perf_counter()
    cache = KVCache(QWEN2VL_2B, n, 16, torch.bfloat16, cpu)
    alone = time.perf_counter() - start
    del cache
    start = time.perf_counter()
    qwen2vl.LLM(args.model, dtype="bfloat16", kv_cache_gib=args.gib)
    llm = time.perf_counter() - start
    print(f"code {qwen2vl.__file__}")
    print(f"KVCache {args.gib:g} GiB (2B shapes): {alone * 1000:.1f} ms; LLM({args.model}) start-up: {llm:.2f} s")


if __name__ == "__main__":
    main()
