"""Helpers the tests share (bench/ may use them too); test modules never import each other.

Plain helpers only: the fixtures live in conftest.py. Every wait is bounded: a `Replica`
reports its log lines as they come (the test awaits the line it needs, never a sleep), a
`Reader` reports each event it receives, and `job_done` waits on a job's own events.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import redis as redis_sync
from prometheus_client.parser import text_string_to_metric_families

from adapter import servers
from adapter.settings import Settings
from litestar import Litestar

ROOT = Path(__file__).resolve().parent.parent
AGENTS_DIR = Path(Settings.from_env({}).conductor_agents_dir)

LEAD_AGENT, EMAIL_AGENT, DEAL_AGENT = "LeadQualifier_CRM_Agent", "EmailAssistant_CRM_Agent", "DealPredictor_CRM_Agent"
QUALIFY = "/api/v1/ai/lead/qualify"
QUALIFY_STREAM = "/api/v1/ai/lead/qualify/stream"
RECORD_ID = "65f1c0ffee0000000000a001"  # a well-formed record id the validators accept


# --- the app under test, its settings and answers -------------------------------------------

# What every test app with Redis signs with (unless the test names its own): apps of one test share it,
# as replicas do. An app built without any would use a key of its own (adapter/assembly.py redis_signer).
TEST_SIGNING_KEY = "test-signing-key-" + "k" * 24


def make_settings(**overrides: object) -> Settings:
    env = {"GATEWAY_CALL_TIMEOUT": "5", "CRM_CALL_TIMEOUT": "5", "RETRY_BASE_DELAY": "0.005", "RETRY_MAX_DELAY": "0.01"}
    env.update({k.upper(): str(v) for k, v in overrides.items()})
    if env.get("REDIS_URL"):
        env.setdefault("REDIS_SIGNING_KEY", TEST_SIGNING_KEY)
    return Settings.from_env(env)


def decode(response: httpx.Response) -> dict:
    return msgspec.json.decode(response.content)


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict:
    assert slug, "name the expected slug: an empty one matches any type"
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = decode(response)
    assert body["type"].endswith(slug) and body["status"] == status
    assert body["title"] and body["detail"]
    assert "Traceback" not in response.text
    return body


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a Prometheus exposition, by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(text: str, name: str, **labels: str) -> float:
    """The sample with exactly these labels; 0 when absent (a counter never incremented)."""
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


class Clock:
    """A wall clock the test moves by hand (`clock.now += 61`).

    It starts far ahead of the real time (2033): what the app stamps with it (cache entries,
    job expiries) is compared with the real clock by some stores, and must never look expired.
    """

    def __init__(self, now: float = 2_000_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def job_done(app: Litestar, job_id: str, timeout: float = 60) -> Any:
    """The in-process job once finished: waits on its own events (no polling), within `timeout`."""
    job = app.state.jobs.get(job_id)
    async with asyncio.timeout(timeout):
        while not job.finished:
            await job.after(len(job.events), timeout)
    return job


# --- serving: in process, over TCP, or nowhere ---------------------------------------------

def asgi_client(app: Litestar, base_url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url)


@asynccontextmanager
async def running(app: Litestar, base_url: str = "http://sidecar.test") -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, and an in-process client of it, in this event loop.

    The lifespan is held by a task of its own: fixtures are set up and torn down in
    different tasks, and the lifespan's cancel scope must be left where it was entered.
    """
    started, stop = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with app.lifespan():
            started.set()
            await stop.wait()

    holder = asyncio.create_task(hold())
    ready = asyncio.create_task(started.wait())
    await asyncio.wait({holder, ready}, return_when=asyncio.FIRST_COMPLETED)
    if holder.done():
        ready.cancel()
        holder.result()  # start-up failed: raise its error here
    try:
        async with asgi_client(app, base_url) as client:
            yield client
    finally:
        stop.set()
        await holder


@asynccontextmanager
async def serving(app: Litestar) -> AsyncIterator[str]:
    """Serve an ASGI app over real TCP in this event loop; yields its base URL."""
    sock = servers.bind("127.0.0.1", 0)
    server = servers.server(app, quiet=True, graceful=1.0)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield servers.url_of(sock)
    finally:
        server.should_exit = True
        await task
        sock.close()


@asynccontextmanager
async def serving_by_name(app: Any) -> AsyncIterator[str]:
    """`serving`, with the base URL naming the host (`http://localhost:<port>`) instead of its address.

    Clients treat the two differently: aiohttp's cookie jar ignores cookies from IP addresses, so
    state kept between callers shows only when an upstream is reached by name, as deployments do.
    """
    async with serving(app) as url:
        yield url.replace("://127.0.0.1:", "://localhost:", 1)


@dataclass(frozen=True)
class Arrival:
    method: str
    path: str
    authorization: str | None
    cookie: str | None  # every Cookie line it carried, joined; None when there was none


class CookieSetter:
    """An upstream (any ASGI app) whose every answer sets a cookie, and which keeps what reached it.

    Answer n sets `session=set-by-answer-<n>`: a client that keeps cookies sends one back with a
    later request, whoever that request is for. `arrivals` lists each request's method, path,
    Authorization and Cookie.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.arrivals: list[Arrival] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        cookies = [v.decode("latin-1") for k, v in headers if k == b"cookie"]
        authorization = next((v.decode("latin-1") for k, v in headers if k == b"authorization"), None)
        n = len(self.arrivals)
        self.arrivals.append(Arrival(scope["method"], scope["path"], authorization, "; ".join(cookies) if cookies else None))

        async def setting(message: Any) -> None:
            if message["type"] == "http.response.start":
                cookie = (b"set-cookie", b"session=set-by-answer-%d; Path=/" % n)
                message = {**message, "headers": [*message.get("headers", []), cookie]}
            await send(message)

        await self.app(scope, receive, setting)

    def sent_by(self, authorization: str) -> list[Arrival]:
        return [a for a in self.arrivals if a.authorization == authorization]


@asynccontextmanager
async def replica_pair(gateway: Any, crm: Any, settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient, list[Litestar]]]:
    """Two sidecars in this process, each over TCP, sharing one Redis (through `settings`), one gateway
    double (over TCP) and one CRM double: a client of each, and the two apps."""
    from adapter.app import create_app

    async with serving(gateway.app) as gw_url, httpx.AsyncClient(base_url=gw_url) as gw, \
            asgi_client(crm.app, "http://crm.test") as backend:
        apps = [create_app(settings, gateway_http=gw, crm_http=backend) for _ in range(2)]
        async with serving(apps[0]) as url_a, serving(apps[1]) as url_b, \
                httpx.AsyncClient(base_url=url_a, timeout=30) as a, httpx.AsyncClient(base_url=url_b, timeout=30) as b:
            yield a, b, apps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port_url() -> str:
    """A loopback URL on which nothing listens: connections are refused."""
    return f"http://127.0.0.1:{free_port()}"


class Restartable:
    """An upstream on a fixed port that a test can take down and bring back."""

    def __init__(self, app) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = None
        self._task = None
        self._sock = None

    async def start(self) -> None:
        self._sock = servers.bind("127.0.0.1", self.port)
        self._server = servers.server(self.app, quiet=True, graceful=0.5)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            await self._task
            self._sock.close()
            self._server = None


def redis_answers(url: str) -> bool:
    try:
        with redis_sync.Redis.from_url(url, socket_connect_timeout=0.5) as r:
            return bool(r.ping())
    except redis_sync.RedisError:
        return False


class RedisProcess:
    """A redis-server the suite owns: it can be stopped and restarted on the same port.

    With `password`, it asks for one (`requirepass`), and `url` carries it.
    """

    def __init__(self, port: int | None = None, password: str | None = None) -> None:
        self.port = port or free_port()
        self.password = password
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{f':{self.password}@' if self.password else ''}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed; .ci/run installs it (apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no",
             *(["--requirepass", self.password] if self.password else [])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # Redis prints this line once it accepts connections: read until it appears, no polling.
        for line in self.proc.stdout:  # type: ignore[union-attr]
            if "Ready to accept connections" in line:
                return
        raise RuntimeError(f"redis-server exited with {self.proc.wait()}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc.stdout.close()  # type: ignore[union-attr]
            self.proc = None


# --- the `adapter` command and its replicas ---------------------------------------------------

def run_adapter(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adapter.cli", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


async def run_adapter_async(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "adapter.cli", *args, cwd=ROOT,
                                                env={**os.environ, **env}, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()



def _die_with_parent() -> None:
    # If the test runner itself is killed (a CI timeout), the replica goes too: no orphan keeps a port.
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Changes:
    """Something that grows (log lines, events); `until` waits for a condition on it, with a deadline."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def changed(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def until(self, condition: Callable[[], Any], timeout: float, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while not (value := condition()):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{what} not reached within {timeout} s")
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                pass
        return value


class Replica(Changes):
    """One `adapter serve` process; its JSON log lines are collected as they are written."""

    def __init__(self, name: str, port: int, env: dict[str, str]) -> None:
        super().__init__()
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[dict[str, Any]] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 30) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "LOG_FORMAT": "json", **self.env}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "adapter.cli", "serve", "--port", str(self.port), cwd=ROOT, env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            preexec_fn=_die_with_parent)
        self._reader = asyncio.create_task(self._read())
        # The socket is bound before the lifespan logs `startup`: from then on connections queue in its backlog.
        await self.until(lambda: self.logged("startup") or self.proc.returncode is not None, timeout, f"{self.name} start-up")
        if self.proc.returncode is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.lines[-5:]}")

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            try:
                line = json.loads(raw)
            except ValueError:
                line = {"event": raw.decode(errors="replace").rstrip()}
            self.lines.append(line)
            self.changed()
        self.changed()

    def logged(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [line for line in self.lines
                if line.get("event") == event and all(line.get(k) == v for k, v in fields.items())]

    async def saw(self, event: str, timeout: float = 30, **fields: Any) -> dict[str, Any]:
        return (await self.until(lambda: self.logged(event, **fields), timeout, f"{self.name} logging {event}"))[0]

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)

    async def exited(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def stop(self) -> None:
        """Clean-up: SIGKILL by pid if still running, and reap it."""
        if self.proc is None:
            return
        self.kill()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        finally:
            if self._reader is not None:
                self._reader.cancel()


@dataclass
class Event:
    id: int
    event: str
    data: str
    at: float  # time.monotonic() when it arrived
    wall: float = 0.0  # time.time() when it arrived (to compare with timestamps another process wrote)

    @property
    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class Reader(Changes):
    """A browser's EventSource, reduced: reconnects with Last-Event-ID, to the next replica, until `done`."""

    urls: list[str]
    path: str
    first: int = 0
    events: list[Event] = field(default_factory=list)
    pings: int = 0
    connections: list[tuple[str, int | str]] = field(default_factory=list)  # (replica url, status or error)

    def __post_init__(self) -> None:
        Changes.__init__(self)

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1].event == "done"

    async def run(self, client: httpx.AsyncClient, timeout: float) -> list[Event]:
        deadline = time.monotonic() + timeout
        turn = self.first
        while not self.done:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no `done` within {timeout} s; got {[e.id for e in self.events]}, "
                                   f"connections {self.connections}")
            url = self.urls[turn % len(self.urls)]
            headers = {"Accept": "text/event-stream"}
            if self.events:
                headers["Last-Event-ID"] = str(self.events[-1].id)
            try:
                async with client.stream("GET", url + self.path, headers=headers,
                                         timeout=httpx.Timeout(5, read=max(deadline - time.monotonic(), 0.1))) as response:
                    self.connections.append((url, response.status_code))
                    if response.status_code == 200:
                        await self._consume(response)
            except (httpx.TransportError, httpx.StreamError) as exc:
                self.connections.append((url, type(exc).__name__))
            if not self.done:
                turn += 1  # like a balancer: the next connection lands on another replica
                self.changed()
        return self.events

    async def _consume(self, response: httpx.Response) -> None:
        block: dict[str, str] = {}
        async for line in response.aiter_lines():
            if line == "":
                if "id" in block:
                    self.events.append(Event(int(block["id"]), block.get("event", "message"), block.get("data", ""),
                                             time.monotonic(), time.time()))
                    self.changed()
                    if self.done:
                        return
                block = {}
            elif line.startswith(":"):
                self.pings += 1
                self.changed()
            else:
                name, _, value = line.partition(":")
                block[name] = value[1:] if value.startswith(" ") else value

    def check_sequence(self) -> None:
        """Consecutive ids from 1, no gap, no repeat, ending in `done`; no replica refused it (a 404, say)."""
        refused = [(url, status) for url, status in self.connections if isinstance(status, int) and status != 200]
        assert not refused, refused
        ids = [e.id for e in self.events]
        assert ids == list(range(1, len(ids) + 1)), ids
        assert self.done and sum(e.event == "done" for e in self.events) == 1


# --- several `adapter serve` replicas against the doubles and one Redis --------------------------

# The replica tests load the cluster as one user: its per-user bounds (tests/test_limits.py) are lifted too.
NO_RATE_LIMITS = {"RATE_LIMIT_LEAD_QUALIFY": "off", "RATE_LIMIT_DEAL_PREDICT": "off", "RATE_LIMIT_EMAIL_GENERATE": "off",
                  "CRM_READS_PER_USER": "off", "MAX_STREAMS_PER_USER": "100000", "MAX_BATCHES_PER_USER": "10000"}


@asynccontextmanager
async def replica_cluster(n: int, *, gateway_url: str, crm_url: str, redis_url: str, lease: float, prefix: str,
                          logged: tuple[str, ...], **overrides: object) -> AsyncIterator[tuple[list[Replica], httpx.AsyncClient]]:
    """`n` real replicas sharing Redis (env overrides by setting name), and a client; each replica is
    SIGKILLed by pid and reaped at the end. When the test fails, pytest shows what each replica
    logged under the `logged` event prefixes."""
    from contextlib import AsyncExitStack
    import uuid

    env = {"REDIS_URL": redis_url, "CACHE_PREFIX": f"{prefix}-{uuid.uuid4().hex[:8]}",
           "CONDUCTOR_GATEWAY_URL": gateway_url, "CRM_BACKEND_URL": crm_url, "JOB_TOKEN_SECRET": "r" * 40,
           "REDIS_SIGNING_KEY": TEST_SIGNING_KEY,  # replicas share it; `adapter serve` with Redis refuses to start without
           "JOB_LEASE_SECONDS": str(lease), "SSE_HEARTBEAT_SECONDS": "0.5", "SHUTDOWN_GRACE_SECONDS": "5",
           "GATEWAY_CALL_TIMEOUT": "30", "RETRY_BASE_DELAY": "0.01", "RETRY_MAX_DELAY": "0.05",
           **NO_RATE_LIMITS, **{k.upper(): str(v) for k, v in overrides.items()}}
    async with AsyncExitStack() as stack:
        replicas = [Replica(f"replica-{i}", free_port(), env) for i in range(n)]
        for r in replicas:
            stack.push_async_callback(r.stop)
        stack.callback(print_logs, replicas, logged)
        await asyncio.gather(*(r.start() for r in replicas))
        client = await stack.enter_async_context(httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=1000)))
        yield replicas, client


def print_logs(replicas: list[Replica], prefixes: tuple[str, ...]) -> None:
    # Shown by pytest when a test fails: what each replica logged under these event prefixes.
    for r in replicas:
        for line in r.lines:
            if str(line.get("event", "")).startswith(prefixes):
                print(r.name, line)


@asynccontextmanager
async def stale_after_500(app: Any) -> AsyncIterator[Any]:
    """`app` (the CRM double's) served over TCP behind `StaleAfter500`, which drops the keep-alive
    connection after each 500 as the real backend does; yields the front (`.url`, `.dropped`)."""
    from adapter.doubles.crm import StaleAfter500

    async with serving(app) as backend:
        host, port = backend.removeprefix("http://").split(":")
        front = StaleAfter500(host, int(port))
        front.url = await front.start()
        try:
            yield front
        finally:
            await front.stop()


def deploy_tool(*names: str) -> str:
    """The path of the first of these command-line tools on PATH (kubectl, kustomize, promtool).

    Outside CI a missing tool skips the checks that need it; in CI (.ci/run installs them) it fails."""
    for name in names:
        if found := shutil.which(name):
            return found
    if os.environ.get("CI"):
        pytest.fail(f"none of {', '.join(names)} is installed: .ci/run installs them")
    pytest.skip(f"none of {', '.join(names)} is installed (.ci/run installs them)")


# --- highly available Redis (issue 24): a Sentinel set-up and a Cluster, on loopback ports --------

def _redis_exe() -> str:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed; .ci/run installs it (apt-get install redis-server)")
    return exe


def _until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `check` (a question to a server, which has no way to tell us) until true, with a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if value := check():
                return value
        except (redis_sync.RedisError, OSError):
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        time.sleep(0.05)


class _Server:
    """One redis-server process (data node or sentinel) started with `args`, ready once it logs `ready`."""

    def __init__(self, port: int, args: list[str], ready: str) -> None:
        self.port, self.args, self.ready = port, args, ready
        self.proc: subprocess.Popen | None = None
        self._drainer: threading.Thread | None = None

    def start(self, timeout: float = 20) -> None:
        self.proc = subprocess.Popen([_redis_exe(), *self.args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        for line in self.proc.stdout:  # type: ignore[union-attr]
            seen = [*seen[-4:], line.strip()]
            if self.ready in line:
                # Its later output is drained by a thread: a full pipe would stall the server.
                self._drainer = threading.Thread(target=self._drain, daemon=True)
                self._drainer.start()
                return
            if time.monotonic() > deadline:
                break
        self.kill()
        raise RuntimeError(f"redis-server {' '.join(self.args[:4])} did not get ready: {seen}")

    def _drain(self) -> None:
        proc = self.proc
        if proc is not None and proc.stdout is not None:
            for _ in proc.stdout:
                pass

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL by pid, and reap it."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            if self._drainer is not None:
                self._drainer.join(10)  # the pipe's end reached: the drainer has stopped reading it
            self.proc.stdout.close()  # type: ignore[union-attr]
            self.proc = None


def _data_node(port: int, workdir: Path, *extra: str) -> _Server:
    return _Server(port, ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                          "--daemonize", "no", "--dir", str(workdir), *extra], "Ready to accept connections")


class SentinelSet:
    """One master, one replica and three sentinels watching them (quorum 2), as production runs it.

    `url` is a `redis+sentinel://` URL naming the three sentinels and the master's name. Failover is
    quick (down after 1 s) so a test can kill the master and see it replaced.
    """

    MASTER = "sidecar"

    def __init__(self, workdir: Path, down_after_ms: int = 1000) -> None:
        self.workdir = workdir
        self.down_after_ms = down_after_ms
        self.nodes: list[_Server] = []
        self.sentinels: list[_Server] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.MASTER}"

    def start(self) -> None:
        master, replica = free_port(), free_port()
        self.nodes = [_data_node(master, self.workdir), _data_node(replica, self.workdir, "--replicaof", "127.0.0.1", str(master))]
        for node in self.nodes:
            node.start()
        with redis_sync.Redis(port=replica) as r:
            _until(lambda: r.info("replication").get("master_link_status") == "up", 20, "the replica's link to its master")
        for _ in range(3):
            port = free_port()
            conf = self.workdir / f"sentinel-{port}.conf"  # a sentinel rewrites its file: one each, writable
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {self.workdir}\n"
                            f"sentinel monitor {self.MASTER} 127.0.0.1 {master} 2\n"
                            f"sentinel down-after-milliseconds {self.MASTER} {self.down_after_ms}\n"
                            f"sentinel failover-timeout {self.MASTER} 10000\n"
                            f"sentinel parallel-syncs {self.MASTER} 1\n")
            sentinel = _Server(port, [str(conf), "--sentinel"], "+monitor master")
            sentinel.start()
            self.sentinels.append(sentinel)
        for s in self.sentinels:  # each must know the replica and its two peers before a failover can work
            with redis_sync.Redis(port=s.port) as r:
                _until(lambda: (m := r.sentinel_master(self.MASTER)) and int(m["num-slaves"]) >= 1
                       and int(m["num-other-sentinels"]) >= 2, 30, "sentinels discovering the replica and each other")

    def master_port(self) -> int:
        with redis_sync.Redis(port=self.sentinels[0].port) as r:
            return int(r.sentinel_get_master_addr_by_name(self.MASTER)[1])

    def kill_master(self) -> int:
        """SIGKILL the current master; returns its port."""
        port = self.master_port()
        next(n for n in self.nodes if n.port == port).kill()
        return port

    def wait_failover(self, old_port: int, timeout: float = 30) -> int:
        """Until every sentinel names a new master; its port."""
        def moved() -> int | None:
            ports = set()
            for s in self.sentinels:
                with redis_sync.Redis(port=s.port) as r:
                    ports.add(int(r.sentinel_get_master_addr_by_name(self.MASTER)[1]))
            return ports.pop() if len(ports) == 1 and old_port not in ports else None
        return _until(moved, timeout, "a sentinel failover")

    def stop(self) -> None:
        for server in [*self.sentinels, *self.nodes]:
            server.kill()


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    for _ in range(200):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port + 10_000 > 65_535:
                continue
            try:
                b.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port pair for a cluster node")


class ClusterSet:
    """A Redis Cluster of three masters (no replicas), created with `redis-cli --cluster create`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.nodes: list[_Server] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> None:
        for _ in range(3):
            port = cluster_port()
            node = _data_node(port, self.workdir, "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                              "--cluster-node-timeout", "2000")
            node.start()
            self.nodes.append(node)
        cli = shutil.which("redis-cli")
        if cli is None:
            pytest.fail("redis-cli is not installed; .ci/run installs it (apt-get install redis-server)")
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes), "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        for n in self.nodes:
            with redis_sync.Redis(port=n.port) as r:
                _until(lambda: r.cluster("info")["cluster_state"] == "ok", 30, "cluster_state:ok on every node")

    def client(self) -> redis_sync.RedisCluster:
        return redis_sync.RedisCluster(host="127.0.0.1", port=self.nodes[0].port)

    def reshard(self, slots: int, source: int, target: int, timeout: float = 120) -> subprocess.CompletedProcess:
        """Move `slots` hash slots from node index `source` to node index `target` (`redis-cli --cluster reshard`)."""
        def node_id(port: int) -> str:
            with redis_sync.Redis(port=port) as r:
                return r.execute_command("CLUSTER", "MYID").decode()
        return subprocess.run([shutil.which("redis-cli") or "redis-cli", "--cluster", "reshard", f"127.0.0.1:{self.nodes[0].port}",
                               "--cluster-from", node_id(self.nodes[source].port), "--cluster-to", node_id(self.nodes[target].port),
                               "--cluster-slots", str(slots), "--cluster-yes", "--cluster-pipeline", "100"],
                              check=True, capture_output=True, timeout=timeout, text=True)

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


def sync_client(url: str) -> Any:
    """A synchronous client of any REDIS_URL the sidecar accepts (tests clean up and inspect with it)."""
    if url.startswith("redis+cluster://"):
        host, _, port = url.removeprefix("redis+cluster://").split(",")[0].partition(":")
        return redis_sync.RedisCluster(host=host, port=int(port))
    if url.startswith("redis+sentinel://"):
        hosts, _, name = url.removeprefix("redis+sentinel://").partition("/")
        sentinels = [(h, int(p)) for h, _, p in (x.partition(":") for x in hosts.split(","))]
        return redis_sync.Sentinel(sentinels, socket_timeout=2).master_for(name.strip("/"), socket_timeout=2)
    return redis_sync.Redis.from_url(url)


@dataclass
class Disrupted:
    """What readers and synchronous callers saw while Redis was disrupted (a failover, a reshard)."""

    readers: list[Reader]
    hung: int  # readers without `done` by the deadline
    lost: int  # events the runner logged that a reader never got
    repeated: int  # events a reader got twice
    longest_gap: float  # seconds between two events of one reader (heartbeats aside)
    sync: dict[int | str, int]  # synchronous requests during the disruption, by status (or error)
    reference: list[list[tuple[int, str, str]]]  # each job's log as the runner's replica finally serves it


async def stream_through(disrupt: Callable[[], Any], *, urls: list[str], client: httpx.AsyncClient, crm: Any, owner: str,
                         token: str, jobs: int, timeout: float = 90) -> Disrupted:
    """Start `jobs` jobs on `urls[0]`, each read (as an EventSource would) from `urls[1]`; once every job has
    begun streaming, call `disrupt` (in a thread: it may block on servers) while synchronous cache hits go to
    every replica; then wait for every reader's `done` and compare each reader's events with the job's log."""
    auth = {"Authorization": f"Bearer {token}"}
    hot = crm.add_lead(owner, name="Warm lead")
    assert (await client.post(urls[0] + QUALIFY, json={"lead_id": hot}, headers=auth)).status_code == 200
    made = []
    for i in range(jobs):
        lead = crm.add_lead(owner, name=f"Streaming lead {i:04d}")  # its prompts are counted by this name
        r = await client.post(urls[0] + "/api/v1/ai/jobs", json={"task": "lead.qualify", "input": {"lead_id": lead}}, headers=auth)
        assert r.status_code == 202, r.text
        made.append(r.json())
    readers = [Reader(urls, job["events_url"], first=1) for job in made]
    tasks = [asyncio.create_task(r.run(client, timeout=timeout)) for r in readers]
    for r in readers:
        await r.until(lambda r=r: len(r.events) >= 2 or r.done, 30, "every job streaming")
    sync: dict[int | str, int] = {}
    stop = asyncio.Event()

    async def hits() -> None:
        turn = 0
        while not stop.is_set():
            try:
                resp = await client.post(urls[turn % len(urls)] + QUALIFY, json={"lead_id": hot}, headers=auth, timeout=10)
                outcome: int | str = resp.status_code
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
            sync[outcome] = sync.get(outcome, 0) + 1
            turn += 1
            await asyncio.sleep(0.02)

    hitter = asyncio.create_task(hits())
    try:
        await asyncio.to_thread(disrupt)
        done, _ = await asyncio.wait(tasks, timeout=timeout)
    finally:
        stop.set()
        await hitter
    hung = sum(1 for t in tasks if t not in done or t.exception() is not None)
    for t in tasks:
        t.cancel()
    reference = []
    for job in made:
        ref = Reader(urls[:1], job["events_url"])
        await ref.run(client, timeout=30)
        reference.append([(e.id, e.event, e.data) for e in ref.events])
    lost = repeated = 0
    gap = 0.0
    for r, ref in zip(readers, reference):
        got = [(e.id, e.event, e.data) for e in r.events]
        repeated += len(got) - len(set(got))
        lost += len(set(ref) - set(got))
        gap = max([gap, *(b.at - a.at for a, b in zip(r.events, r.events[1:]))])
    return Disrupted(readers, hung, lost, repeated, gap, sync, reference)


# --- MongoDB: a real wire-protocol server (nx-27017, MongoDB's protocol over SQLite) ------------

class MongoProcess:
    """An nx-27017 server the test owns, on a free port with its own data directory; stopped by pid.

    It is what the fidelity rig runs for the CRM backend's database (nx-27017 0.8.1 on neosqlite 1.17.2).
    """

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.proc: subprocess.Popen | None = None
        self._watcher = threading.Thread()

    def uri(self, database: str = "conductor_dev") -> str:
        return f"mongodb://127.0.0.1:{self.port}/{database}"

    def start(self, timeout: float = 30) -> None:
        exe = shutil.which("nx-27017", path=str(Path(sys.executable).parent)) or shutil.which("nx-27017")
        if exe is None:
            pytest.fail("nx-27017 is not installed: `pip install -e '.[test]'` brings it")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [exe, "--data-dir", str(self.data_dir), "--pid-file", str(self.data_dir / "nx.pid"),
             "--log-file", str(self.data_dir / "nx.log"), "--host", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=_die_with_parent)
        # It logs this line once it accepts connections: read until it appears (a reader thread keeps the deadline).
        ready = threading.Event()

        def watch() -> None:
            for line in self.proc.stdout:  # type: ignore[union-attr]
                if "Listening on" in line:
                    ready.set()
            ready.set()  # it exited

        self._watcher = threading.Thread(target=watch, daemon=True)
        self._watcher.start()
        if not ready.wait(timeout) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"nx-27017 did not start within {timeout} s")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self._watcher.join(10)  # it reads to the end of the output, which the kill closed
            self.proc.stdout.close()  # type: ignore[union-attr]
            self.proc = None


def sse_events(response: httpx.Response) -> list[tuple[str, dict]]:
    """(event, data) pairs of a whole SSE body (the in-process transport buffers it)."""
    events = []
    for block in response.text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "event" in fields:
            events.append((fields["event"], json.loads(fields["data"])))
    return events
