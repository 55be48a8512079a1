"""Serving throughput and latency: `lmforge serve` against llama-cpp-python's server, same GGUF, same load.

Each server runs in its own process on a free loopback port, one after the other in one run. A client
keeps C streaming chat requests in flight (C = 1, 4, 16) and measures aggregate output tokens/s (all
tokens over the wall time of the level) and time to first token (request sent -> first content
delta), p50 and p99. Requests are greedy, `max_tokens` each, with distinct prompts.

    python benchmarks/serve.py [--model smollm2-135m-instruct] [--max-tokens 64] [--requests-per-slot 2]
    python benchmarks/serve.py --engines lmforge --levels 1,16 --device cuda

llama.cpp's OpenAI server (`pip install 'llama-cpp-python[server]'`) is measured when it imports; it
serves one request at a time, so its aggregate stays near its single-stream speed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
from common import machine

TOPICS = ["the sea", "a robot", "a small town", "the moon", "autumn", "a lost key", "trains", "a garden",
          "winter", "a library", "mountains", "a clock", "the desert", "rain", "a lighthouse", "bread",
          "a violin", "birds", "a bridge", "snow", "the river", "a market", "stars", "a cat", "coffee",
          "a forest", "the city", "a letter", "dragons", "a ship", "summer", "a painter"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, timeout: float = 300) -> subprocess.Popen:
    # The server's log goes to a file: an unread pipe fills up (llama.cpp logs every request) and then
    # blocks the server on its next write.
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited: {log.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start")


async def one(client: httpx.AsyncClient, model: str, topic: str, max_tokens: int, extra: dict) -> tuple[float, int]:
    body = {"model": model, "messages": [{"role": "user", "content": f"Write a long story about {topic}."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, **extra}
    t0 = time.perf_counter()
    ttft, chunks, usage = None, 0, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            import json

            obj = json.loads(line[6:])
            if obj.get("usage"):
                usage = obj["usage"]["completion_tokens"]
            for ch in obj.get("choices") or []:
                if (ch.get("delta") or {}).get("content"):
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    return (ttft if ttft is not None else time.perf_counter() - t0), (usage if usage is not None else chunks)


async def level(url: str, model: str, conc: int, n_requests: int, max_tokens: int, extra: dict) -> dict:
    topics = iter((TOPICS * 4)[:n_requests])
    ttfts: list[float] = []
    tokens = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        for topic in topics:
            t, n = await one(client, model, topic, max_tokens, extra)
            ttfts.append(t)
            tokens += n

    limits = httpx.Limits(max_connections=conc + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await one(client, model, "warm-up", 4, extra)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(conc)))
        wall = time.perf_counter() - t0
    ttfts.sort()
    p99 = ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))]
    return {"tok_s": tokens / wall, "p50": statistics.median(ttfts), "p99": p99, "tokens": tokens, "wall": wall}


def run_server(name: str, cmd: list[str], port: int, model: str, levels: list[int], args: argparse.Namespace,
               extra: dict) -> dict[int, dict]:
    print(f"starting {name} ...", file=sys.stderr)
    proc = start(cmd, port)
    out: dict[int, dict] = {}
    try:
        for c in levels:
            out[c] = asyncio.run(level(f"http://127.0.0.1:{port}", model, c, c * args.requests_per_slot,
                                       args.max_tokens, extra))
            r = out[c]
            print(f"  {name} c={c}: {r['tok_s']:.1f} tok/s, TTFT p50 {r['p50'] * 1000:.0f} ms, "
                  f"p99 {r['p99'] * 1000:.0f} ms ({r['tokens']} tokens in {r['wall']:.1f} s)", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    ap.add_argument("--requests-per-slot", type=int, default=2, help="requests per concurrent client (default 2)")
    ap.add_argument("--levels", default="1,4,16", help="concurrency levels (default 1,4,16)")
    ap.add_argument("--engines", default="lmforge,llama.cpp")
    ap.add_argument("--device", default=None, help="passed to `lmforge serve --device` (default: the server's)")
    ap.add_argument("--draft-tokens", type=int, default=0,
                    help="passed to `lmforge serve --draft-tokens` (default 0: plain decoding, as llama.cpp's server "
                         "runs; speculative decoding is measured in speculative.py)")
    args = ap.parse_args()
    # A time limit's SIGTERM unwinds like Ctrl-C, so the `finally` below still stops the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    levels = [int(x) for x in args.levels.split(",")]
    from lmforge.registry import resolve

    gguf = resolve(args.model)
    engines = args.engines.split(",")
    results: dict[str, dict[int, dict]] = {}
    if "lmforge" in engines:
        port = free_port()
        cmd = [sys.executable, "-m", "lmforge.cli", "serve", str(gguf), "--port", str(port),
               "--max-batch", str(max(levels)), "--max-queue", "256", "--draft-tokens", str(args.draft_tokens)]
        if args.device:
            cmd += ["--device", args.device]
        # ignore_eos: every request yields exactly max_tokens, so levels compare like with like
        results["lmforge"] = run_server("lmforge", cmd, port, gguf.name, levels, args,
                                        {"ignore_eos": True, "stream_options": {"include_usage": True}})
    if "llama.cpp" in engines:
        try:
            import llama_cpp.server.app  # noqa: F401
        except ImportError as e:
            print(f"llama.cpp server not measured: {e}", file=sys.stderr)
        else:
            port = free_port()
            cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
                   "--n_ctx", "2048", "--n_threads", str(os.cpu_count()),
                   # by default a new request cuts off the one being streamed; queue them instead
                   "--interrupt_requests", "False"]
            results["llama.cpp"] = run_server("llama.cpp", cmd, port, str(gguf), levels, args, {})

    where = f", lmforge on {args.device}" if args.device else ""
    print(f"\nMachine: {machine()}{where}. Model: {gguf.name}. {args.max_tokens} greedy tokens per request, "
          f"{args.requests_per_slot} requests per concurrent client.\n")
    names = list(results)
    head = ["concurrency"] + [f"{n} {m}" for n in names for m in ("tok/s", "TTFT p50 ms", "TTFT p99 ms")]
    if "lmforge" in results and "llama.cpp" in results:
        head.append("lmforge / llama.cpp tok/s")
    if "lmforge" in results:
        head.append("lmforge tok/s vs c=1")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for c in levels:
        row = [str(c)]
        for n in names:
            r = results[n][c]
            row += [f"{r['tok_s']:.1f}", f"{r['p50'] * 1000:.0f}", f"{r['p99'] * 1000:.0f}"]
        if "lmforge" in results and "llama.cpp" in results:
            row.append(f"{results['lmforge'][c]['tok_s'] / results['llama.cpp'][c]['tok_s']:.2f}x")
        if "lmforge" in results:
            row.append(f"{results['lmforge'][c]['tok_s'] / results['lmforge'][levels[0]]['tok_s']:.2f}x")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
