"""Every lease of one replica renewed in one round trip, on connections of its own (issue 24).

A replica running many jobs used to renew each lease with its own script call, on the pool the
followers and the requests share: at 1,000+ running jobs the pool was full, renewals failed at
once (`MaxConnectionsError`), leases lapsed, and followers took over jobs whose runner was alive.

Here one task renews them all: one non-transactional pipeline per turn (per node in a Cluster,
which redis-py splits by itself) of, per job, `PEXPIRE lease`, `GET lease` and `EXISTS meta`.
No script: a Cluster pipeline refuses EVALSHA, and none is needed. The PEXPIRE runs before the GET
on the same key, so a GET naming this replica means the lease was ours and is extended. A lease
that lapsed (nobody took the job: the GET is empty) is set again with NX. A lease naming another
replica was taken over: the job is lost (its writer learns it from the append too). A job whose
metadata is gone (Redis restarted empty) is handed to `on_gone`, so its log is repaired even if
the job is silent. Whatever PEXPIRE did to a lease that turned out to be another's only extends
that replica's own lease, never takes it.

The pipeline goes over a client of its own (a few connections per node), so neither followers
nor a burst of requests can starve it. A turn that fails is retried within a tenth of the lease
and keeps being retried until it succeeds: a lease lapses only when Redis was unreachable for
most of a lease, not because one renewal hit a full pool or a failover's first seconds.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import structlog

from .connect import Client
from .redis_store import FAULTS

log = structlog.get_logger("adapter.jobs")


class LeaseKeeper:
    def __init__(self, client: Client, *, replica: str, lease: float, lease_key: Callable[[str], str],
                 meta_key: Callable[[str], str], on_lost: Callable[[str], None], on_gone: Callable[[str], None],
                 on_fault: Callable[[BaseException], None], on_ok: Callable[[], None] = lambda: None) -> None:
        self._r = client
        self.replica = replica
        self.lease = lease
        self._lease_ms = max(int(lease * 1000), 100)
        self._lease_key, self._meta_key = lease_key, meta_key
        self._on_lost, self._on_gone, self._on_fault, self._on_ok = on_lost, on_gone, on_fault, on_ok
        self._held: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self.last_renewed = time.monotonic()
        self.renewals = 0  # turns that reached Redis (the bench counts them)

    def hold(self, job_id: str) -> None:
        self._held.add(job_id)
        if self._task is None or self._task.done():
            self.last_renewed = time.monotonic()  # nothing was held before: no turn is overdue
            self._task = asyncio.create_task(self._run(), name="job lease keeper")

    def release(self, job_id: str) -> None:
        self._held.discard(job_id)

    def holds(self, job_id: str) -> bool:
        return job_id in self._held

    async def renew(self) -> None:
        """One turn: every held lease extended (or set again), in one round trip per node."""
        ids = list(self._held)
        if not ids:
            return
        async with self._r.pipeline(transaction=False) as pipe:
            for job_id in ids:
                lease = self._lease_key(job_id)
                pipe.pexpire(lease, self._lease_ms)
                pipe.get(lease)
                pipe.exists(self._meta_key(job_id))
            out = await pipe.execute()
        me = self.replica.encode()
        lapsed = []
        for i, job_id in enumerate(ids):
            holder, meta = out[3 * i + 1], out[3 * i + 2]
            if job_id not in self._held:  # released while the turn was in flight
                continue
            if holder is None:
                lapsed.append(job_id)
            elif holder != me:
                self._held.discard(job_id)
                self._on_lost(job_id)
                continue
            if not meta:
                self._on_gone(job_id)
        if lapsed:  # nobody took them: ours again (a takeover sets the lease first, so NX cannot steal one back)
            async with self._r.pipeline(transaction=False) as pipe:
                for job_id in lapsed:
                    pipe.set(self._lease_key(job_id), self.replica, nx=True, px=self._lease_ms)
                taken = await pipe.execute()
            for job_id, ok in zip(lapsed, taken):
                if not ok and job_id in self._held:
                    self._held.discard(job_id)
                    self._on_lost(job_id)
        self.renewals += 1

    async def _run(self) -> None:
        # A quarter of the lease apart; a failed turn is retried quickly, and again, until one succeeds.
        while self._held:
            await asyncio.sleep(self.lease / 4)
            late = time.monotonic() - self.last_renewed
            if late > self.lease / 2:
                # Alive but slow (an event loop starved of CPU): a follower may read the lease as lapsed.
                log.warning("job.lease_renewal_late", jobs=len(self._held), since_renewed_s=round(late, 2), lease_s=self.lease)
            delay = min(0.05, self.lease / 20)
            while self._held:
                try:
                    await self.renew()
                except FAULTS as exc:
                    self._on_fault(exc)
                    log.warning("job.lease_renewal_failed", jobs=len(self._held), error=f"{type(exc).__name__}: {exc}"[:200],
                                since_renewed_s=round(time.monotonic() - self.last_renewed, 2), effect="retrying")
                    await asyncio.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, self.lease / 10)
                    continue
                self.last_renewed = time.monotonic()
                self._on_ok()
                break

    def background(self) -> list[asyncio.Task[None]]:
        return [self._task] if self._task is not None else []

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
