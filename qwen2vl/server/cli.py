"""`qwen2vl serve MODEL [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--replicas N] [limits...]`.

`qwen2vl/cli.py` owns the command; it calls `add_serve_arguments(parser)` and `run_serve(args)`.
Safe by default: loopback only, no local files, no private-network media; binding elsewhere
without an API key prints a warning.
"""

import argparse
import logging
import os
import sys
import threading
from functools import partial

from qwen2vl.backends.quant import QUANTIZATIONS
from qwen2vl.hub import DEFAULT_MODEL, DEMO_MODEL
from qwen2vl.server.limits import add_limit_arguments, limits_from_args


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                        help=f"local folder, hub repo id or {DEMO_MODEL!r} (the model shipped in the package; "
                             f"default {DEFAULT_MODEL})")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("QWEN2VL_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                             "(default: $QWEN2VL_API_KEY)")
    parser.add_argument("--served-model-name", help="the model id clients send (default: the MODEL argument)")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                        help="serve a LoRA adapter (PEFT format, e.g. from `qwen2vl train`) as model NAME; "
                             "repeat for several: requests for any of them and the base are batched together")
    e = parser.add_argument_group("engine")
    e.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "auto"])
    e.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    e.add_argument("--quantization", choices=list(QUANTIZATIONS),
                   help="int8/int4 weights for the language model's linears: ~1.8x / ~2.8x faster CPU decode "
                        "than bf16 (int4: groups of 32; int4-g64/-g128: fewer bytes, more error), "
                        "see docs/performance.md")
    e.add_argument("--matmul", choices=["int8"], help="the vision tower and prefill in int8 on the CPU (faster "
                   "time to first token, some error; docs/performance.md)")
    e.add_argument("--kv-cache-gib", type=float, help="KV cache size on CPU (default 2), per tensor-parallel rank")
    e.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="split the decoder over N processes (N GPUs from --device's on, or the CPU's cores); "
                        "N must divide the attention heads")
    e.add_argument("--gpu-memory-utilization", type=float, help="fraction of GPU memory for weights + cache")
    e.add_argument("--max-model-len", type=int, help="context length cap")
    e.add_argument("--max-num-seqs", type=int, help="sequences decoded together")
    e.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    r = parser.add_argument_group("replicas on Ray Serve (pip install -e \".[ray]\"; docs/deployment.md)")
    r.add_argument("--replicas", type=int, help="run N engine replicas behind this server, each request routed "
                                                "to one (prefix/image affinity, else the least loaded)")
    r.add_argument("--ray-address", help="join this Ray cluster ('auto', 'HOST:6379', 'ray://HOST:10001') "
                                         "instead of starting Ray on this machine")
    r.add_argument("--replica-cpus", type=float, default=1.0,
                   help="CPUs Ray reserves for each replica (and its torch threads; default 1)")
    add_limit_arguments(parser)


def run_serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from qwen2vl.engine.async_engine import AsyncLLM
    from qwen2vl.server.app import create_app

    limits = limits_from_args(args)  # bad limits fail before the model loads
    name = args.served_model_name or args.model
    adapters = parse_lora_arguments(args.lora, name)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach this port can use the "
              "model", file=sys.stderr)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    engine_args = {k: v for k, v in (("kv_cache_gib", args.kv_cache_gib), ("max_model_len", args.max_model_len),
                                     ("max_num_seqs", args.max_num_seqs),
                                     ("gpu_memory_utilization", args.gpu_memory_utilization)) if v is not None}
    llm_args = dict(dtype=args.dtype, device=device, quantization=args.quantization, lora=adapters or None,
                    tensor_parallel_size=args.tensor_parallel_size, matmul=args.matmul,
                    **engine_args)
    if args.replicas is not None:
        from qwen2vl.replicas.launch import start_replicas, stop_replicas

        print(f"starting {args.replicas} replicas of {args.model} on {device} (Ray Serve) ...", file=sys.stderr)
        gpus = args.tensor_parallel_size if device.startswith("cuda") else 0  # a replica's ranks, one GPU each
        engine = start_replicas(args.model, llm_args, args.replicas, ray_address=args.ray_address,
                                replica_cpus=args.replica_cpus, replica_gpus=gpus,
                                torch_threads=max(1, int(args.replica_cpus)), name=name)
        stop = partial(stop_replicas, engine)
    else:
        if args.ray_address:
            raise ValueError("--ray-address: only used with --replicas N")
        print(f"loading {args.model} on {device} ...", file=sys.stderr)
        engine = AsyncLLM(args.model, **llm_args)
        stop = engine.shutdown
    app = create_app(engine, limits, api_key=args.api_key, model_name=name)
    print(f"serving {name!r} at http://{args.host}:{args.port}/v1 (key {'required' if args.api_key else 'off'})",
          file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=5))

    def stop_when_failed():  # an engine that can't serve any more (a tensor-parallel rank died): exit
        engine.failed.wait()
        server.should_exit = True

    threading.Thread(target=stop_when_failed, daemon=True).start()
    try:
        server.run()
    finally:
        stop()
    if engine.failure is not None:
        print(f"error: {engine.failure}; the server stopped", file=sys.stderr)
        return 1
    return 0


def parse_lora_arguments(values: list[str], model_name: str) -> dict[str, str]:
    """{name: folder} from repeated `--lora NAME=DIR`, checked before the model loads."""
    adapters: dict[str, str] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--lora {value}: expected NAME=DIR, e.g. --lora forms=./forms-adapter")
        if name in adapters or name == model_name:
            raise ValueError(f"--lora {value}: the name {name!r} is already taken; give each adapter its own")
        if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
            raise FileNotFoundError(f"--lora {value}: {folder} has no adapter_config.json")
        adapters[name] = folder
    return adapters
