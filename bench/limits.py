"""What the input and per-user bounds (issue 22, findings 4 and 7) cost a request.

    python -m bench.limits [--repeat R]

1. The nesting check of a request body (web/requests.py: msgspec's decode, which the guard
   does anyway, then the bracket count and, past MAX_JSON_DEPTH brackets, the walk), on
   adversarial bodies of 64 KiB (MAX_BODY_BYTES' default) and 1 MiB: the decode alone beside
   it, and on c0a4b67 a 30,000-deep body was a RecursionError (a 500).
2. The per-request bookkeeping of the limits: a stream's place taken and given back, one
   token of the in-process CRM read bucket, and of the Redis one (one EVAL round trip; needs
   Redis at $BENCH_REDIS_URL, default redis://127.0.0.1:6379/0).

Each figure is the best of R runs (the machine is shared: the best is the least disturbed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid

import msgspec

from adapter.storage.ratelimit import CRM_READS, Policy, RateLimiter
from adapter.storage.redis_store import RedisStore, redis_client
from adapter.storage.signing import Signer
from adapter.web.requests import MAX_JSON_DEPTH, too_deep
from adapter.web.streams import StreamSlots, release

_decode = msgspec.json.Decoder().decode


def bodies(size: int) -> dict[str, bytes]:
    def fill(unit: bytes, head: bytes = b"[", tail: bytes = b"[]]") -> bytes:
        return head + unit * ((size - len(head) - len(tail)) // len(unit)) + tail

    return {
        "30,000 nested arrays (60 KB)": b"[" * 30_000 + b"]" * 30_000,
        "flat arrays [[],[],...]": fill(b"[],"),
        "flat objects [{},{},...]": fill(b"{},", tail=b"{}]"),
        "brackets inside strings": fill(b'"[[[[[[[[",', tail=b'""]'),
        "an ordinary body (64 levels, then scalars)": fill(b"1,", head=b"[" * 64, tail=b"1" + b"]" * 64),
    }


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def nesting(repeat: int) -> None:
    print("1. nesting check (decode + check) vs decode alone, ms, best of", repeat)
    for size in (64 * 1024, 1024 * 1024):
        for name, body in bodies(size).items():
            if name.startswith("30,000") and size > 64 * 1024:
                continue

            def check() -> bool:
                try:
                    value = _decode(body)
                except RecursionError:
                    return True
                return too_deep(body, value, MAX_JSON_DEPTH)

            def decode() -> None:
                try:
                    _decode(body)
                except RecursionError:
                    pass

            refused = check()
            print(f"   {len(body):>9,} B  {name:<44} check {best(check, repeat) * 1000:7.2f}  "
                  f"decode alone {best(decode, repeat) * 1000:7.2f}  refused={refused}")


async def bookkeeping(repeat: int, n: int = 20_000) -> None:
    print(f"2. per-request bookkeeping, µs per request, best of {repeat} runs of {n:,}")
    slots = StreamSlots(per_user=20, total=10_000)

    def streams() -> None:
        for i in range(n):
            scope: dict = {}
            slots.take(scope, f"user-{i % 100}")  # type: ignore[arg-type]
            release(scope)  # type: ignore[arg-type]

    print(f"   stream place taken and given back      {best(streams, repeat) / n * 1e6:7.2f}")
    local = RateLimiter({CRM_READS: Policy(10**9, 1.0)}, prefix="bench", store=None)

    async def take(limiter: RateLimiter, count: int) -> float:
        t = time.perf_counter()
        for i in range(count):
            await limiter.take(CRM_READS, f"user-{i % 100}")
        return time.perf_counter() - t

    print(f"   CRM read token, in process              {min([await take(local, n) for _ in range(repeat)]) / n * 1e6:7.2f}")
    url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    store = RedisStore(redis_client(url), prefix=f"bench-limits-{uuid.uuid4().hex[:6]}", lock_ttl=30, retry_log_interval=5,
                       signer=Signer.random())
    try:
        shared = RateLimiter({CRM_READS: Policy(10**9, 1.0)}, prefix=store.prefix, store=store)
        count = n // 10
        print(f"   CRM read token, in Redis (one EVAL)     {min([await take(shared, count) for _ in range(repeat)]) / count * 1e6:7.2f}")
        keys = [k async for k in store.redis.scan_iter(f"{store.prefix}:*")]
        if keys:
            await store.redis.delete(*keys)
    finally:
        await store.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    nesting(args.repeat)
    asyncio.run(bookkeeping(args.repeat))


if __name__ == "__main__":
    main()
