"""Load test: N concurrent streaming clients against the OpenAI-compatible server, on loopback only.

    python -m benchmarks.load_test --model .cache/server_tiny_qwen2vl --clients 8 --requests 64
    python -m benchmarks.load_test --url http://127.0.0.1:8000 --api-key KEY --clients 4 --image 448
    python -m benchmarks.load_test --model .cache/server_tiny_qwen2vl --clients 32 --requests 128 --engine-alone

With --model it starts `qwen2vl serve` on a free loopback port and stops it afterwards; with --url
it uses a running server, which must be on a loopback address. Bounded: at most 256 clients,
10,000 requests and 600 seconds (requests still running at the deadline are cancelled and counted).
Prints throughput (requests/s, generated tokens/s), time to first token and latency percentiles,
inter-token latency, and errors by kind. --engine-alone runs the same requests (messages, seeds,
max_tokens, temperature, the checkpoint's defaults otherwise) through `LLM.chat` in this process
with max_num_seqs = --clients and no server: its tok/s over the server's is the server's own cost.
Both print the CPU time the engine's process used per generated token (the server's, not the load
generator's): on a shared machine the steadier comparison (run both with OMP_NUM_THREADS=1, or the
idle OpenMP threads' spinning counts too).
"""

import argparse
import asyncio
import base64
import io
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

import httpx

MAX_CLIENTS, MAX_REQUESTS, MAX_SECONDS = 256, 10_000, 600.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint folder: start a server for the test")
    src.add_argument("--url", help="a running server on loopback, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", default="load-test-key")
    p.add_argument("--clients", type=int, default=8, help=f"concurrent streams (<= {MAX_CLIENTS})")
    p.add_argument("--requests", type=int, default=64, help=f"total requests (<= {MAX_REQUESTS})")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    p.add_argument("--image", type=int, default=0, metavar="SIDE", help="add a SIDE x SIDE image to every prompt")
    p.add_argument("--duration", type=float, default=300.0, help=f"stop after this many seconds (<= {MAX_SECONDS:g})")
    p.add_argument("--server-args", default="", help="extra `qwen2vl serve` arguments with --model")
    p.add_argument("--engine-alone", action="store_true", help="with --model: the same requests through LLM.chat")
    args = p.parse_args()
    if not 1 <= args.clients <= MAX_CLIENTS or not 1 <= args.requests <= MAX_REQUESTS:
        p.error(f"--clients must be in [1, {MAX_CLIENTS}] and --requests in [1, {MAX_REQUESTS}]")
    args.duration = min(args.duration, MAX_SECONDS)
    if args.engine_alone:
        if not args.model or args.image:
            p.error("--engine-alone needs --model and no --image")
        return engine_alone(args)

    server = None
    if args.model:
        server, url = start_server(args.model, args.api_key, args.server_args.split())
    else:
        url = args.url.rstrip("/")
        host = urlsplit(url).hostname or ""
        if not _is_loopback(host):
            p.error(f"--url must be a loopback address (127.0.0.1, ::1, localhost), got {host!r}")
    try:
        cpu = cpu_seconds(server.pid) if server is not None else None
        results, wall = asyncio.run(run(url, args))
        if server is not None:
            cpu = cpu_seconds(server.pid) - cpu
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    report(results, wall, args)
    if cpu is not None:
        tokens = sum(r["tokens"] for r in results if "error" not in r)
        print(f"server CPU: {cpu:.1f} s, {cpu / max(tokens, 1) * 1e3:.2f} ms per generated token")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) process `pid` has used: what it costs, whatever else runs."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def engine_alone(args) -> None:
    from qwen2vl import LLM

    llm = LLM(args.model, dtype="float32", device="cpu", max_num_seqs=args.clients)
    llm.chat([{"role": "user", "content": "warm-up"}], llm.default_sampling_params(max_tokens=4))
    conversations = [[{"role": "user", "content": f"Request {i}: describe a busy street in detail."}]
                     for i in range(args.requests)]
    params = [llm.default_sampling_params(max_tokens=args.max_tokens, seed=i, temperature=args.temperature)
              for i in range(args.requests)]
    start, cpu = time.monotonic(), cpu_seconds(os.getpid())
    outs = llm.chat(conversations, params)
    wall, cpu = time.monotonic() - start, cpu_seconds(os.getpid()) - cpu
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    print(f"engine alone (LLM.chat, max_num_seqs {args.clients}): requests {len(outs)}, max_tokens "
          f"{args.max_tokens}, temperature {args.temperature:g}, wall {wall:.1f} s")
    print(f"throughput: {len(outs) / wall:.2f} req/s, {tokens / wall:.1f} generated tok/s ({tokens} tokens)")
    print(f"engine CPU: {cpu:.1f} s, {cpu / max(tokens, 1) * 1e3:.2f} ms per generated token")


def _is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback
                   for info in socket.getaddrinfo(host, None))
    except (socket.gaierror, ValueError):
        return False


def start_server(model: str, api_key: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "qwen2vl", "serve", model, "--host", "127.0.0.1", "--port", str(port),
           "--api-key", api_key, "--dtype", "float32", "--max-queue", str(MAX_CLIENTS * 2), "--log-level", "warning",
           *extra]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.terminate()
    raise SystemExit("the server did not come up within 300 s")


def image_part(side: int) -> dict:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": uri}}


async def run(url: str, args) -> tuple[list[dict], float]:
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(args.requests):
        queue.put_nowait(i)
    image = [image_part(args.image)] if args.image else []
    headers = {"Authorization": f"Bearer {args.api_key}"}
    results: list[dict] = []
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            content = [*image, {"type": "text", "text": f"Request {i}: describe a busy street in detail."}]
            body = {"messages": [{"role": "user", "content": content}], "max_tokens": args.max_tokens, "seed": i,
                    "temperature": args.temperature, "stream": True, "stream_options": {"include_usage": True}}
            results.append(await one(http, url, body, headers))

    start = time.monotonic()
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as http:
        tasks = [asyncio.create_task(client(http)) for _ in range(args.clients)]
        done, pending = await asyncio.wait(tasks, timeout=args.duration)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    in_flight = args.requests - len(results) - queue.qsize()
    results += [{"error": "cancelled at the deadline"}] * in_flight
    results += [{"error": "not started before the deadline"}] * queue.qsize()
    return results, time.monotonic() - start


async def one(http: httpx.AsyncClient, url: str, body: dict, headers: dict) -> dict:
    sent = time.monotonic()
    first, stamps, tokens = None, [], 0
    try:
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                return {"error": f"HTTP {r.status_code}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return {"error": "error event in stream"}
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                if any(c["delta"].get("content") for c in event.get("choices", [])):
                    now = time.monotonic()
                    first = first if first is not None else now
                    stamps.append(now)
    except httpx.HTTPError as e:
        return {"error": type(e).__name__}
    end = time.monotonic()
    if first is None:
        return {"error": "no content streamed"}
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft": first - sent, "latency": end - sent, "tokens": tokens, "itl": sum(gaps) / len(gaps) if gaps else 0}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def report(results: list[dict], wall: float, args) -> None:
    ok = [r for r in results if "error" not in r]
    errors: dict[str, int] = {}
    for r in results:
        if "error" in r:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] * 1000 for r in ok]
    latency = [r["latency"] for r in ok]
    itl = [r["itl"] * 1000 for r in ok if r["itl"]]
    print(f"clients {args.clients}, requests {len(results)} ({len(ok)} ok), max_tokens {args.max_tokens}, "
          f"temperature {args.temperature:g}, image {args.image or 'none'}, wall {wall:.1f} s")
    print(f"throughput: {len(ok) / wall:.2f} req/s, {tokens / wall:.1f} generated tok/s ({tokens} tokens)")
    print(f"TTFT ms:    p50 {pct(ttft, 50):.0f}  p90 {pct(ttft, 90):.0f}  p99 {pct(ttft, 99):.0f}  "
          f"max {max(ttft, default=float('nan')):.0f}")
    print(f"latency s:  p50 {pct(latency, 50):.2f}  p90 {pct(latency, 90):.2f}  p99 {pct(latency, 99):.2f}")
    print(f"inter-token ms (mean per request): p50 {pct(itl, 50):.1f}  p90 {pct(itl, 90):.1f}")
    print(f"errors: {errors or 'none'}")


if __name__ == "__main__":
    main()
