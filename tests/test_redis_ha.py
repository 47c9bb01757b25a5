"""Issue 24: the sidecar on a Sentinel-watched Redis and on a Redis Cluster, both real (tests/helpers.py).

What is checked here beyond the parametrised cache, flight, job, batch and rate-limit tests (marker
`redis_topologies`): what `adapter check` reports, the compose examples, that every command and
script the sidecar sends keeps its keys in one Cluster slot, and jobs streaming through a Sentinel
failover (SIGKILL of the master) and a Cluster slot migration (`redis-cli --cluster reshard`).
"""

from __future__ import annotations

import asyncio
import os
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_sync
import yaml

from adapter.settings import Settings
from tests.helpers import (LEAD_AGENT, QUALIFY, ROOT, ClusterSet, Reader, SentinelSet, make_settings, replica_cluster, replica_pair,
                           run_adapter, serving, sync_client)

pytestmark = pytest.mark.redis


# --- adapter check ------------------------------------------------------------------------------

def _check(env: dict[str, str]) -> tuple[list[str], list[str]]:
    done = run_adapter("check", env={"CONDUCTOR_GATEWAY_URL": "http://127.0.0.1:9", "CRM_BACKEND_URL": "http://127.0.0.1:9",
                                     "REDIS_SIGNING_KEY": "k" * 40, "REDIS_URL": "", **env})
    return done.stdout.splitlines(), done.stderr.splitlines()


def test_adapter_check_names_the_master_the_sentinels_give(sentinel_set):
    for env in ({"REDIS_URL": sentinel_set.url},
                {"REDIS_SENTINELS": ",".join(f"127.0.0.1:{s.port}" for s in sentinel_set.sentinels),
                 "REDIS_SENTINEL_MASTER": SentinelSet.MASTER}):
        out, _ = _check(env)
        [line] = [line for line in out if "Redis" in line]
        assert line.startswith(f"ok    Redis master '{SentinelSet.MASTER}' at 127.0.0.1:{sentinel_set.master_port()} (Sentinel ")


def test_adapter_check_reports_the_clusters_masters_and_state(redis_cluster):
    out, _ = _check({"REDIS_URL": redis_cluster.url})
    [line] = [line for line in out if "Redis" in line]
    assert line.startswith("ok    Redis Cluster at redis+cluster://") and line.endswith(": 3 masters, state ok")
    # One node named with REDIS_CLUSTER: the others are discovered.
    out, _ = _check({"REDIS_URL": f"redis://127.0.0.1:{redis_cluster.nodes[1].port}", "REDIS_CLUSTER": "1"})
    assert any(line.endswith(": 3 masters, state ok") for line in out)


def test_adapter_check_fails_naming_sentinels_that_do_not_answer():
    from tests.helpers import free_port
    _, err = _check({"REDIS_URL": f"redis+sentinel://127.0.0.1:{free_port()}/nobody"})
    assert any(line.startswith("FAIL  Redis master 'nobody' via Sentinel unreachable at redis+sentinel://") for line in err), err


# --- the compose examples (no Docker engine here: read, not run) ---------------------------------

def _compose(name: str) -> dict:
    return yaml.safe_load((ROOT / "deploy" / "redis-ha" / name).read_text())


def _sidecar_settings(doc: dict) -> Settings:
    env = {k: str(v) for k, v in doc["services"]["crm-ai-sidecar"]["environment"].items()}
    env = {k: v.replace("${REDIS_PASSWORD}", "pw") for k, v in env.items()}
    return Settings.from_env({**env, "REDIS_SIGNING_KEY": "k" * 40})


def test_the_sentinel_example_names_its_sentinels_and_the_master_they_monitor():
    doc = _compose("compose.sentinel.yml")
    target = _sidecar_settings(doc).redis
    assert target is not None and target.mode == "sentinel" and target.password == "pw"
    for host, port in target.hosts:
        service = doc["services"][host]
        script = " ".join(service["command"])
        assert f"port {port}" in script and f"sentinel monitor {target.master} redis 6379 2" in script
        assert "--sentinel" in script and f"{port}" in service["expose"][0]
    assert len(target.hosts) == 3  # a quorum of 2 survives one sentinel's loss
    replica = " ".join(doc["services"]["redis-replica"]["command"])
    assert "--replicaof redis 6379" in replica and "--masterauth" in replica


def test_the_cluster_example_seeds_from_a_node_it_creates():
    doc = _compose("compose.cluster.yml")
    target = _sidecar_settings(doc).redis
    assert target is not None and target.mode == "cluster"
    nodes = [name for name, s in doc["services"].items() if "--cluster-enabled" in (s.get("command") or [])]
    assert len(nodes) == 3 and target.hosts[0][0] in nodes
    init = " ".join(doc["services"]["redis-cluster-init"]["command"])
    assert "--cluster create" in init and all(node in init for node in nodes)
    assert doc["services"]["crm-ai-sidecar"]["depends_on"] == {"redis-cluster-init": {"condition": "service_completed_successfully"}}


# --- every script's keys in one slot ------------------------------------------------------------

class Recorder:
    """Every command the sidecar's cluster clients send (pipelined ones too), with its arguments."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from redis.asyncio.cluster import ClusterPipeline, RedisCluster

        for cls in (RedisCluster, ClusterPipeline):
            original = cls.execute_command

            def recording(self_, *args, _original=original, **kwargs):
                self.sent.append(args)
                return _original(self_, *args, **kwargs)

            monkeypatch.setattr(cls, "execute_command", recording)


def _keys(node: redis_sync.Redis, args: tuple[Any, ...]) -> list[bytes]:
    name = str(args[0]).upper()
    if name in ("EVAL", "EVALSHA"):
        return [k if isinstance(k, bytes) else str(k).encode() for k in args[3:3 + int(args[2])]]
    if name in ("PING", "PUBLISH", "SCRIPT LOAD", "SCRIPT", "CLIENT SETNAME", "CLUSTER", "INFO", "COMMAND", "SUBSCRIBE", "UNSUBSCRIBE"):
        return []
    try:
        return node.command_getkeys(*args)
    except redis_sync.ResponseError:  # a command without keys
        return []


async def test_every_command_and_script_keeps_its_keys_in_one_cluster_slot(monkeypatch, redis_cluster, gateway, crm, seed, auth):
    """Runs what writes to Redis (answers, single flight, a job followed and taken over, a batch and its cancel,
    rate limits) on the Cluster, records every command, and asks CLUSTER KEYSLOT for each command's keys."""
    recorder = Recorder()
    recorder.install(monkeypatch)
    prefix = "slots-" + os.urandom(4).hex()
    settings = make_settings(redis_url=redis_cluster.url, cache_prefix=prefix, job_token_secret="s" * 40, rate_limit_lead_qualify="50/60")
    async with replica_pair(gateway, crm, settings) as (a, b, _):
        assert (await a.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)).status_code == 200
        assert (await b.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)).headers["x-cache"] == "HIT"
        job = (await a.post("/api/v1/ai/jobs", json={"task": "lead.qualify", "input": {"lead_id": seed["leads"][1]}}, headers=auth)).json()
        reader = Reader([str(b.base_url)], job["events_url"])
        await reader.run(b, timeout=30)
        reader.check_sequence()
        batch = await a.post("/api/v1/ai/batches", json={"task": "lead.qualify", "ids": seed["leads"]},
                             headers=auth)
        assert batch.status_code == 202, batch.text
        await Reader([str(b.base_url)], batch.json()["events_url"]).run(b, timeout=30)
        assert (await b.delete(f"/api/v1/ai/batches/{batch.json()['batch_id']}", headers=auth)).status_code in (200, 202, 409)
    await _every_outbox_command(redis_cluster.url, prefix)
    node = redis_sync.Redis(port=redis_cluster.nodes[0].port)
    try:
        written, checked = set(), 0
        for args in recorder.sent:
            keys = _keys(node, args)
            if not keys:
                continue
            slots = {node.execute_command("CLUSTER", "KEYSLOT", k) for k in keys}
            assert len(slots) == 1, f"{args[0]} over {keys} spans slots {slots}"
            checked += 1
            written.update(k.decode() if isinstance(k, bytes) else str(k) for k in keys)
    finally:
        node.close()
    assert checked > 20
    ours = {k for k in written if k.startswith(prefix + ":")}
    assert ours == written, written - ours  # every key the sidecar touches is under its prefix
    kinds = {k.removeprefix(prefix + ":").split(":", 1)[0] for k in ours}
    assert {"result", "lock", "job"} <= kinds, kinds
    notify = {k for k in ours if k.startswith(f"{prefix}:{{{prefix}:notify}}:")}
    assert {k.rsplit(":", 1)[-1] for k in notify} >= {"outbox", "retry", "dead"} and any(":seen:" in k for k in notify), notify


async def _every_outbox_command(url: str, prefix: str) -> None:
    """The notifications' outbox (adapter/notify/outbox.py) sends each of its commands, scripts and transactions
    once on the Cluster: written (the seen-marker with the entry), read, claimed, a retry scheduled, taken when
    due, buried and replayed from the dead letters. Driven directly: which answers make a trigger fire is
    test_notifications' business, and these are every command the outbox has."""
    from adapter.notify.outbox import Delivery, RedisOutbox
    from adapter.notify.triggers import Event
    from adapter.settings import RedisTarget
    from adapter.storage.connect import open_client
    from adapter.storage.signing import Signer

    client = open_client(RedisTarget.from_url(url))
    try:
        outbox = RedisOutbox(client, prefix=prefix, signer=Signer.random(), claim_idle=0.0)
        event = Event(id="msg_" + os.urandom(12).hex(), type="lead.classification_changed", crm_type="lead_qualified",
                      user_id=None, title="t", message="m", priority="low")
        assert await outbox.add(event) and not await outbox.add(event)  # the second is seen: not written again
        [(entry, read)] = await outbox.read("census-a", count=10, block_ms=100)
        assert read == event
        [(claimed, _)] = await outbox.claim("census-b", count=10)  # unacknowledged, and idle for 0 s
        assert claimed == entry
        await outbox.done([entry], [(Delivery(event=event, sink="crm", attempt=1, first=0.0), 0.0)])
        [(member, delivery)] = await outbox.due(count=10, lease=30.0)
        await outbox.settle(member, dead=delivery)
        assert [d.event for d in await outbox.dead()] == [event]
        assert await outbox.replay() == 1
        [(member, _)] = await outbox.due(count=10, lease=30.0)
        await outbox.settle(member)
        assert await outbox.add(Event(id="msg_" + os.urandom(12).hex(), type="t", crm_type="c", user_id=None, title="t",
                                      message="m", priority="low"))
        [(entry, _)] = await outbox.read("census-a", count=10, block_ms=100)
        await outbox.bury(entry, [delivery])
        assert await outbox.pending() == 0
        await outbox.prune(idle=0.0)
    finally:
        await client.aclose()


# --- jobs streaming through a failover and a reshard --------------------------------------------

def job_calls(gateway) -> int:
    return sum("Streaming lead" in prompt for _, prompt in gateway.prompts)


async def _through(disrupt, redis_url: str, gateway, crm, seed, *, jobs: int = 8, lease: float = 3.0):
    from tests.helpers import stream_through

    gateway.default, gateway.stream_tokens, gateway.token_interval = "tokens", 60, 0.1  # ~6 s per job
    async with AsyncExitStack() as stack:
        gw_url = await stack.enter_async_context(serving(gateway.app))
        crm_url = await stack.enter_async_context(serving(crm.app))
        replicas, client = await stack.enter_async_context(replica_cluster(
            2, gateway_url=gw_url, crm_url=crm_url, redis_url=redis_url, lease=lease, prefix="ha",
            logged=("job.", "cache.", "shutdown.")))
        outcome = await stream_through(disrupt, urls=[r.url for r in replicas], client=client, crm=crm, owner=seed["alice"],
                                       token=seed["token"], jobs=jobs)
        return outcome, replicas


async def test_jobs_stream_through_a_sentinel_failover(tmp_path, gateway, crm, seed):
    """SIGKILL the master while jobs stream: every reader ends with one gapless log, synchronous requests
    fail open (never a 5xx), and no job is run twice."""
    sentinels = SentinelSet(tmp_path)
    try:
        sentinels.start()

        def fail_over() -> None:
            sentinels.wait_failover(sentinels.kill_master())

        outcome, (a, b) = await _through(fail_over, sentinels.url, gateway, crm, seed)
    finally:
        sentinels.stop()
    for reader in outcome.readers:
        reader.check_sequence()
    assert (outcome.hung, outcome.lost, outcome.repeated) == (0, 0, 0)
    assert set(outcome.sync) <= {200}, outcome.sync
    # The synchronous hits become model calls while Redis is away (fail open); the jobs are asked once each.
    assert job_calls(gateway) == len(outcome.readers), "a job was run twice (taken over from a live runner)"


async def test_jobs_stream_through_a_cluster_reshard(tmp_path, gateway, crm, seed):
    """Move a third of the slots (hundreds of them, the jobs' among them) while jobs stream."""
    cluster = ClusterSet(tmp_path)
    try:
        cluster.start()
        outcome, _ = await _through(lambda: cluster.reshard(2000, 0, 1), cluster.url, gateway, crm, seed)
    finally:
        cluster.stop()
    for reader in outcome.readers:
        reader.check_sequence()
    assert (outcome.hung, outcome.lost, outcome.repeated) == (0, 0, 0)
    assert set(outcome.sync) <= {200}, outcome.sync
    assert job_calls(gateway) == len(outcome.readers)


# --- many jobs on one runner: leases; many followed jobs on one replica: the stream hub ----------

@pytest.mark.redis_topologies
async def test_every_lease_is_renewed_in_one_round_trip_and_others_are_never_taken(redis_url, cache_prefix):
    from adapter.settings import RedisTarget
    from adapter.storage.connect import open_client
    from adapter.storage.leases import LeaseKeeper

    lost, gone, sent = [], [], []
    client = open_client(RedisTarget.from_url(redis_url), role="leases")
    keeper = LeaseKeeper(client, replica="me", lease=5.0, lease_key=lambda j: f"{cache_prefix}:job:{{{j}}}:lease",
                         meta_key=lambda j: f"{cache_prefix}:job:{{{j}}}", on_lost=lost.append, on_gone=gone.append,
                         on_fault=lambda exc: pytest.fail(str(exc)))
    jobs = [f"j{i}" for i in range(3000)]
    r = sync_client(redis_url)
    try:
        with r.pipeline(transaction=False) as pipe:
            for j in jobs:
                pipe.hset(f"{cache_prefix}:job:{{{j}}}", "owner", "me")
                pipe.set(f"{cache_prefix}:job:{{{j}}}:lease", "me", px=1000)
            pipe.execute()
        r.set(f"{cache_prefix}:job:{{j1}}:lease", "another", px=60_000)  # taken over by another replica
        r.delete(f"{cache_prefix}:job:{{j2}}:lease")  # lapsed, nobody took it
        r.delete(f"{cache_prefix}:job:{{j3}}")  # Redis lost the job's metadata
        for j in jobs:
            keeper._held.add(j)  # held without starting the renewing task: this test turns the crank
        original = client.pipeline

        def counting(*args, **kwargs):
            sent.append(1)
            return original(*args, **kwargs)

        client.pipeline = counting  # type: ignore[method-assign]
        await keeper.renew()
        assert len(sent) == 2  # every lease in one pipeline, and the one lapsed lease set again in another
        assert lost == ["j1"] and gone == ["j3"] and not keeper.holds("j1")
        assert r.get(f"{cache_prefix}:job:{{j1}}:lease") == b"another" and r.get(f"{cache_prefix}:job:{{j2}}:lease") == b"me"
        with r.pipeline(transaction=False) as pipe:
            for j in jobs:
                pipe.pttl(f"{cache_prefix}:job:{{{j}}}:lease")
            ttls = pipe.execute()
        assert all(ttl > 1000 for j, ttl in zip(jobs, ttls) if j != "j1")  # set with 1 s, so each was extended
    finally:
        r.close()
        keeper.close()
        await client.aclose()


async def test_the_hub_follows_thousands_of_streams_on_a_handful_of_connections(redis_url, cache_prefix):
    from adapter.settings import RedisTarget
    from adapter.storage.connect import open_client
    from adapter.storage.stream_hub import StreamHub

    client = open_client(RedisTarget.from_url(redis_url), socket_timeout=5.0, role="blocking")
    hub = StreamHub(client, wake_key=f"{cache_prefix}:hub:test", block=1.0, chunk=1000)
    r = sync_client(redis_url)
    try:
        keys = [f"{cache_prefix}:job:{{j{i}}}:log" for i in range(2500)]
        watches = [hub.watch({k: "0-0"}) for k in keys]
        twice = hub.watch({keys[7]: "0-0"})  # a second reader of one job shares its stream
        with r.pipeline(transaction=False) as pipe:
            for i, k in enumerate(keys):
                pipe.xadd(k, {"e": str(i)}, id="1-0")
            pipe.execute()
        for i, w in enumerate(watches):
            got = await w.get(timeout=10)
            assert [(s, [(e[0], e[1][b"e"]) for e in entries]) for s, entries in got] == [(keys[i], [(b"1-0", str(i).encode())])]
        assert (await twice.get(timeout=10))[0][0] == keys[7]
        named = [c for c in r.client_list() if c.get("name") == f"crm-ai-blocking-{os.getpid()}"]
        # Three chunks, each blocking on one connection, and at most one wake in flight per chunk: not 2,500.
        assert hub.streams == 2500 and 3 <= len(named) <= 6
        late = hub.watch({f"{cache_prefix}:job:{{late}}:log": "0-0"})  # added while every chunk blocks
        r.xadd(f"{cache_prefix}:job:{{late}}:log", {"e": "x"}, id="1-0")
        assert (await late.get(timeout=0.9))  # sooner than a block: the wake stream ended the chunk's XREAD
    finally:
        hub.close()
        r.close()
        await client.aclose()


# --- after Redis restarts empty: no 404 for a live id, no 202 before the log is readable -----------

async def test_a_live_job_is_503_never_404_while_redis_is_empty_then_served_once_repaired(redis_process, gateway, crm, seed, auth):
    from tests.helpers import assert_problem

    settings = make_settings(redis_url=redis_process.url, cache_prefix="restart-" + os.urandom(3).hex(), job_token_secret="s" * 40,
                             job_lease_seconds=1.5)
    gateway.gate = asyncio.Event()  # the model thinks: the job stays live, and silent
    async with replica_pair(gateway, crm, settings) as (a, b, apps):
        job = (await a.post("/api/v1/ai/jobs", json={"task": "lead.qualify", "input": {"lead_id": seed["leads"][0]}}, headers=auth)).json()
        # Every event before the model's answer (the gateway's progress, then the held model) is in Redis.
        local = apps[0].state.jobs.get(job["job_id"])
        while not any(b"processando" in e.data for e in local.events):
            assert await local.after(len(local.events), 10) is not None, "no progress from the gateway"
        await apps[0].state.jobs.mirror.written(local)
        # The runner's next renewal (which would find the log gone and repair it) waits for the test.
        leases, repair = apps[0].state.jobs.mirror.writer.leases, asyncio.Event()
        renew = leases.renew

        async def held() -> None:
            await repair.wait()
            await renew()

        leases.renew = held
        redis_process.stop()  # B has never read the job: it has no copy of its own
        redis_process.start()  # empty, on the same port
        gone = await b.get(f"/api/v1/ai/jobs/{job['job_id']}?token={job['events_url'].rsplit('=', 1)[-1]}")
        body = assert_problem(gone, 503, "job-log-unavailable")
        assert gone.headers["retry-after"] == "1" and "may still be running" in body["detail"]
        repair.set()
        # Within a lease the runner's renewal finds the log gone and writes it again, silent model or not.
        deadline = asyncio.get_running_loop().time() + 10
        while (answer := await b.get(f"/api/v1/ai/jobs/{job['job_id']}", headers=auth)).status_code != 200:
            assert answer.status_code == 503 and asyncio.get_running_loop().time() < deadline, answer.text
            await asyncio.sleep(0.1)
        gateway.gate.set()
        reader = Reader([str(b.base_url)], job["events_url"])
        await reader.run(b, timeout=30)
        # An id that does not say when it was made (the release before's: a `4` where the mark is) is still a 404.
        old = "aijob_" + os.urandom(6).hex() + "4" + os.urandom(10).hex()[:19]
        assert (await b.get(f"/api/v1/ai/jobs/{old}", headers=auth)).status_code == 404
    reader.check_sequence()


async def test_no_202_until_the_log_is_readable_in_redis(gateway, crm, seed, auth):
    from tests.helpers import assert_problem, closed_port_url

    redis_url = closed_port_url().replace("http://", "redis://")
    settings = make_settings(redis_url=redis_url, cache_prefix="noredis", job_token_secret="s" * 40)
    async with replica_pair(gateway, crm, settings) as (a, _, apps):
        job = await a.post("/api/v1/ai/jobs", json={"task": "lead.qualify", "input": {"lead_id": seed["leads"][0]}}, headers=auth)
        body = assert_problem(job, 503, "job-log-unavailable")
        assert "nothing was started" in body["detail"] and job.headers["retry-after"] == "1"
        batch = await a.post("/api/v1/ai/batches", json={"task": "lead.qualify", "ids": seed["leads"][:2]}, headers=auth)
        assert_problem(batch, 503, "job-log-unavailable")
        assert not apps[0].state.jobs.running  # the runs were stopped, not left behind
