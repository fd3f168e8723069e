"""Soak test of a running server: N chat requests at a concurrency level, mixed streaming and not.

    .venv/bin/python benchmarks/soak.py URL [--requests 1000] [--concurrency 64] [--max-tokens 32]

Reports requests lost (no final finish_reason), 5xx and other errors, latency percentiles, and the KV pool
state from /metrics at the end (it must be fully free). Exits 1 if anything was lost or a 5xx happened.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time

import httpx


async def one(client: httpx.AsyncClient, i: int, args) -> tuple[str, float]:
    rng = random.Random(i)
    prompt = f"Request {i}: say something about {rng.random()}"
    body = {"model": "soak", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": rng.randint(1, args.max_tokens), "temperature": rng.choice([0, 0.7, 1.0])}
    start = time.perf_counter()
    if i % 2:
        r = await client.post("/v1/chat/completions", json=body)
        if r.status_code >= 500:
            return "5xx", 0.0
        if r.status_code != 200:
            return f"{r.status_code}", 0.0
        ok = r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        return ("ok" if ok else "lost"), time.perf_counter() - start
    finish = None
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        if r.status_code >= 500:
            return "5xx", 0.0
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                data = json.loads(line[6:])
                if "error" in data:
                    return "in-band error", 0.0
                for c in data.get("choices", []):
                    finish = c.get("finish_reason") or finish
    return ("ok" if finish in ("stop", "length") else "lost"), time.perf_counter() - start


async def main(args) -> int:
    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=args.url, timeout=600, limits=limits) as client:
        sem = asyncio.Semaphore(args.concurrency)

        async def bounded(i):
            async with sem:
                try:
                    return await one(client, i, args)
                except httpx.HTTPError as e:
                    return f"transport error {type(e).__name__}", 0.0

        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(i) for i in range(args.requests)))
        elapsed = time.perf_counter() - start
        metrics = (await client.get("/metrics")).text
    counts: dict[str, int] = {}
    for status, _ in results:
        counts[status] = counts.get(status, 0) + 1
    latencies = sorted(t for s, t in results if s == "ok")
    kv = [line for line in metrics.splitlines() if line.startswith(("tokenmill:kv_cache_usage_perc",
                                                                     "tokenmill:num_requests_running"))]
    print(f"{args.requests} requests at concurrency {args.concurrency} in {elapsed:.1f}s: {counts}")
    if latencies:
        q = statistics.quantiles(latencies, n=100)
        print(f"latency p50 {q[49]:.2f}s p90 {q[89]:.2f}s p99 {q[98]:.2f}s")
    print("\n".join(kv))
    return 0 if counts.get("ok", 0) == args.requests else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    sys.exit(asyncio.run(main(ap.parse_args())))
