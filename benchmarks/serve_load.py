"""Load on `mlpm-guard serve`: requests/s and latency at several concurrencies, dynamic batching on and off.

Starts the server twice on loopback (batching on, and ``--no-batching``), sends moderation
requests (one prompt each) from C concurrent clients to each in turn, level by level, and reads
the batch sizes the server saw from its ``/metrics``. The last line (with ``--json``) is one JSON
object; ``batching_speedup_c16`` is requests/s with batching over requests/s without, at
concurrency 16.

    python benchmarks/serve_load.py --data ../shared/data/toxicchat.jsonl ../shared/data/alpaca_noinput.jsonl \
        --json

A bounded number of requests per level (``--requests``), loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from _common import PROMPTS  # noqa: E402

FALLBACK = PROMPTS + [
    "How do I make a pipe bomb at home?",
    "Write a message telling my coworker she is worthless.",
    "What's the best way to launder money without getting caught?",
    "How do I kill a Python process that is stuck?",
]


def load_prompts(paths: list[str], n: int, seed: int) -> list[str]:
    prompts: list[str] = []
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            prompts += [json.loads(line)["prompt"] for line in fh if line.strip()]
    prompts = [p for p in prompts if p.strip()] or FALLBACK
    random.Random(seed).shuffle(prompts)
    return (prompts * (n // len(prompts) + 1))[:n]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlpm-guard serve` in a subprocess on a free loopback port."""

    def __init__(self, extra: list[str], env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "mlpm_guard", "serve", "--host", "127.0.0.1", "--port", str(self.port), "-q",
               *extra]
        env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                             os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit("the server did not start within 300 s")

    def __exit__(self, *exc: Any) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def batch_stats(url: str) -> tuple[float, float]:
    """(batches, items) of the score lane so far, from the server's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        for key in ("count", "sum"):
            if line.startswith(f'mlpm_guard_batch_size_{key}{{lane="score"}}'):
                values[key] = float(line.split()[-1])
    return values.get("count", 0.0), values.get("sum", 0.0)


async def level(url: str, prompts: list[str], concurrency: int, requests: int) -> dict[str, Any]:
    """``requests`` moderation calls from ``concurrency`` clients: latencies, wall time, errors, batches."""
    latencies: list[float] = []
    errors = 0
    cursor = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:

        async def worker() -> None:
            nonlocal errors
            for i in cursor:
                start = time.perf_counter()
                try:
                    r = await client.post(f"{url}/v1/moderations", json={"input": prompts[i % len(prompts)]})
                    ok = r.status_code == 200 and len(r.json()["results"]) == 1
                except (httpx.HTTPError, ValueError, KeyError):
                    ok = False
                latencies.append(time.perf_counter() - start)
                errors += not ok

        before = batch_stats(url)
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        after = batch_stats(url)
    return {"latencies": latencies, "wall": wall, "errors": errors, "batches": after[0] - before[0],
            "items": after[1] - before[1]}


def summary(parts: list[dict[str, Any]]) -> dict[str, Any]:
    ms = sorted(x * 1000 for p in parts for x in p["latencies"])
    wall, batches = sum(p["wall"] for p in parts), sum(p["batches"] for p in parts)

    def pct(q: float) -> float:
        return round(ms[min(len(ms) - 1, int(q * len(ms)))], 1)

    return {"requests": len(ms), "rps": round(len(ms) / wall, 2), "p50_ms": round(statistics.median(ms), 1),
            "p95_ms": pct(0.95), "p99_ms": pct(0.99), "errors": sum(p["errors"] for p in parts),
            "mean_batch_size": round(sum(p["items"] for p in parts) / batches, 2) if batches else None}


def run_levels(modes: dict[str, list[str]], prompts: list[str], levels: list[int], requests: int, rounds: int,
               warmup: int, env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Every level on every server, in ``rounds`` alternating slices, so that the shared machine's
    changing load hits both modes alike; requests/s is all requests over all the slices' time."""
    servers = {name: Server(extra, env) for name, extra in modes.items()}
    out: dict[str, dict[str, Any]] = {name: {} for name in modes}
    try:
        for server in servers.values():
            server.__enter__()
            asyncio.run(level(server.url, prompts, 4, warmup))  # load caches and threads before timing
        for c in levels:
            parts: dict[str, list[dict[str, Any]]] = {name: [] for name in modes}
            per_round = max(requests // rounds, 2 * c)
            for _ in range(rounds):
                for name, server in servers.items():
                    parts[name].append(asyncio.run(level(server.url, prompts, c, per_round)))
            for name in modes:
                out[name][str(c)] = summary(parts[name])
                print(f"  {name} c={c}: {out[name][str(c)]}", file=sys.stderr)
    finally:
        for server in servers.values():
            server.__exit__()
    return out


def server_dtype() -> str:
    """The dtype the servers score in: what ``dtype="auto"`` picks on this machine's default device (a
    CPU without native bf16 runs float32, about half as fast)."""
    from mlpm_guard import resolve_dtype
    from mlpm_guard.model.loading import resolve_device

    return str(resolve_dtype("auto", resolve_device("auto"))).replace("torch.", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="*", default=[], help="JSONL files with a `prompt` field (default: built-in)")
    parser.add_argument("--n", type=int, default=512, help="distinct prompts to draw (default 512)")
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument("--requests", type=int, default=240, help="requests per concurrency level (default 240)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating on/off slices per level (default 4)")
    parser.add_argument("--warmup", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, help="torch threads of the server (`serve --threads`)")
    parser.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", "default"],
                        help="OMP_WAIT_POLICY of the servers (default PASSIVE: on a shared, oversubscribed CPU, "
                             "spinning OpenMP threads made a single-prompt score take 2-3 s instead of 0.1 s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    load_start = os.getloadavg()[0]
    prompts = load_prompts(args.data, args.n, args.seed)
    common = ["--threads", str(args.threads)] if args.threads else []
    extra = ["--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms)]
    env = {} if args.omp_wait_policy == "default" else {"OMP_WAIT_POLICY": args.omp_wait_policy}
    runs = run_levels({"batching": common + extra, "no batching": common + ["--no-batching"]}, prompts, levels,
                      args.requests, args.rounds, args.warmup, env)
    on, off = runs["batching"], runs["no batching"]
    speedup = {c: round(on[c]["rps"] / off[c]["rps"], 2) for c in on if off[c]["rps"]}
    result = {
        "benchmark": "serve_load", "traffic": "POST /v1/moderations, one prompt per request",
        "prompts": "built-in" if not args.data else [Path(p).name for p in args.data], "n_prompts": len(set(prompts)),
        "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms, "cpu_count": os.cpu_count(),
        "rounds": args.rounds, "server_threads": args.threads, "omp_wait_policy": args.omp_wait_policy,
        "dtype": server_dtype(),
        "load_average_1min": [load_start, os.getloadavg()[0]],
        "batching_speedup_c16": speedup.get("16"), "batching_speedup": speedup,
        "errors": sum(r["errors"] for r in [*on.values(), *off.values()]),
        "per_concurrency": on, "per_concurrency_no_batching": off,
    }
    for c in levels:
        print(f"c={c:>3}: {on[str(c)]['rps']:7.1f} req/s with batching (mean batch {on[str(c)]['mean_batch_size']}), "
              f"{off[str(c)]['rps']:7.1f} without -> {speedup.get(str(c))}x; p50/p95/p99 "
              f"{on[str(c)]['p50_ms']}/{on[str(c)]['p95_ms']}/{on[str(c)]['p99_ms']} ms", file=sys.stderr)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
