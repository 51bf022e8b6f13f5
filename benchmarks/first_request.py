"""Start-up and first-request latency of `qwen2vl serve`: the time until /health answers 200, then
the latency of a plain request (the engine's first), and of the first and second `json_schema`
requests (the first used to build llguidance's tokenizer table, ~2-3 s).

    python -m benchmarks.first_request --model .cache/server_tiny_qwen2vl
    python -m benchmarks.first_request --model .cache/server_tiny_qwen2vl --code /tmp/older-checkout

`--code` runs the server from another checkout of the package (PYTHONPATH), to compare before and
after a change on the same machine. The server binds a free loopback port and is stopped after.
"""

import argparse
import os
import socket
import subprocess
import sys
import time

import httpx

SCHEMA = {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--code", help="run the server from this checkout (default: this one)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for the server")
    args = parser.parse_args()

    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.path.abspath(args.code or ".")}
    cmd = [sys.executable, "-m", "qwen2vl", "serve", os.path.abspath(args.model), "--port", str(port),
           "--dtype", "float32", "--device", "cpu", "--kv-cache-gib", "0.05", "--log-level", "warning"]
    start = time.monotonic()
    server = subprocess.Popen(cmd, env=env, cwd=args.code or ".", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if server.poll() is not None:
                sys.exit(f"the server exited: {server.stderr.read().decode()[-2000:]}")
            if time.monotonic() - start > args.timeout:
                sys.exit("the server did not become ready in time")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        ready = time.monotonic() - start

        def request(**extra) -> float:
            body = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4,
                    "temperature": 0, **extra}
            t = time.monotonic()
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=args.timeout)
            r.raise_for_status()
            return time.monotonic() - t

        fmt = {"response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}}}
        plain = request()
        first, second = request(**fmt), request(**fmt)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"code           {os.path.abspath(args.code or '.')}")
    print(f"ready          {ready:.2f} s (start to /health 200)")
    print(f"plain          {plain:.2f} s (the first request)")
    print(f"json_schema    first {first:.2f} s, second {second:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
