"""Typed settings, read once from the environment.

Every field is named after its environment variable (``rename="upper"``), so a
msgspec conversion error already names the variable an operator must fix.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Protocol
from urllib.parse import unquote, urlsplit

import msgspec
from msgspec import Meta


class TaskDefaults(Protocol):
    """What the settings read of a task (adapter/tasks): its variables' suffix and its defaults."""

    @property
    def env_suffix(self) -> str: ...
    @property
    def cache_ttl(self) -> float: ...
    @property
    def rate_limit(self) -> str: ...

Seconds = Annotated[float, Meta(gt=0, le=86_400)]
# msgspec applies a pattern with re.search, where `$` also matches before a final newline: `\Z` ends them.
RATE = r"^(off|[1-9][0-9]{0,6}/[0-9]+(\.[0-9]+)?)\Z"
PROVIDERS = r"^[A-Za-z0-9_.-]+(\s*,\s*[A-Za-z0-9_.-]+)*\Z"
Port = Annotated[int, Meta(ge=0, le=65_535)]
# Settings with one variable per task, named `<FIELD>_<TASK>` (CACHE_TTL_LEAD_QUALIFY).
PER_TASK = ("CACHE_TTL", "RATE_LIMIT")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """Invalid configuration: one line naming every bad variable, each with what it must be."""

    def __init__(self, *problems: str) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


def default_agents_dir() -> str:
    here = Path(__file__).resolve().parent
    packaged = here / "_agents"  # wheel installs carry the folder inside the package
    return str(packaged if packaged.is_dir() else here.parent / "conductor-agents")


class Settings(msgspec.Struct, kw_only=True, frozen=True, rename="upper", forbid_unknown_fields=False):
    adapter_host: str = "127.0.0.1"
    adapter_port: Port = 8080
    # Server processes per container (`adapter serve --workers N`); they share nothing but Redis.
    adapter_workers: Annotated[int, Meta(ge=1, le=64)] = 1
    conductor_gateway_url: str = "http://localhost:5006"
    crm_backend_url: str = "http://localhost:8001"
    redis_url: str | None = None
    # Issue 24: a highly available Redis. Sentinel: the sentinels (`host:port,host:port`) and the name
    # they know the master by (or one `redis+sentinel://` REDIS_URL); Cluster: REDIS_CLUSTER with
    # REDIS_URL naming any node (or a `redis+cluster://` REDIS_URL naming several). See RedisTarget.
    redis_sentinels: str | None = None
    redis_sentinel_master: str | None = None
    redis_sentinel_password: str | None = None  # the sentinels' own (`requirepass` in sentinel.conf)
    redis_password: str | None = None  # the data nodes' password with REDIS_SENTINELS (a URL carries its own)
    redis_cluster: bool = False
    # One provider, or several in order of preference (`claude,gemini`): a run that fails in a
    # way another provider could fix is tried once more on the next one.
    conductor_ai_provider: Annotated[str, Meta(pattern=PROVIDERS)] | None = None
    # The real Conductor API refuses every task without a screenplay id, and current gateways
    # refuse calls without a working directory. Any screenplay id is accepted (an unknown one
    # is only logged); a real one's `working_directory` is what the agent would otherwise get.
    conductor_screenplay_id: Annotated[str, Meta(min_length=1, max_length=200)] = "crm-ai-sidecar"
    conductor_cwd: Annotated[str, Meta(min_length=1, max_length=4096)] = "/tmp"
    # Every synchronous execute leaves an `agent_instances` document on the gateway: remove it.
    conductor_cleanup_instances: bool = True
    conductor_agents_dir: str = msgspec.field(default_factory=default_agents_dir)

    # The gateway's own client waits up to 600 s for the model, so ours must too;
    # the whole-call deadline bounds retries of the repair loop as a whole.
    gateway_connect_timeout: Seconds = 5.0
    gateway_read_timeout: Seconds = 600.0
    gateway_call_timeout: Seconds = 900.0
    crm_connect_timeout: Seconds = 3.0
    crm_read_timeout: Seconds = 15.0
    crm_call_timeout: Seconds = 20.0
    health_probe_timeout: Seconds = 2.0
    # Every open stream holds one gateway connection while the model thinks.
    gateway_max_connections: Annotated[int, Meta(ge=1, le=100_000)] = 2_000
    # Requests beyond this wait in an asyncio queue: httpcore's own pool queue is quadratic
    # in its length, and a burst of a thousand lookups there starves the event loop.
    # httpcore polls every idle pooled connection on every request (py-spy: 18 % of a miss at
    # 32 clients with 64/100 connections): small pools are fast pools.
    crm_max_connections: Annotated[int, Meta(ge=1, le=10_000)] = 16
    gateway_keepalive_connections: Annotated[int, Meta(ge=0, le=10_000)] = 16

    # Browser origins allowed to call the sidecar directly (the Angular dev server, say):
    # comma-separated, "*" for any; unset means no CORS headers at all.
    cors_allow_origins: str = ""
    crm_proxy_fallthrough: bool = True
    crm_write_back: bool = True
    proxy_max_connections: Annotated[int, Meta(ge=1, le=100_000)] = 512
    proxy_read_timeout: Seconds = 60.0
    # On SIGTERM running jobs get this long to finish before they are handed over (or, without
    # Redis, ended with an error); /readyz answers 503 meanwhile.
    shutdown_grace_seconds: Seconds = 10.0
    # Keep-alive races: a request sent on a connection the other side is closing is lost.
    # Clients' idle connections must outlive theirs on our side, and ours to the upstreams
    # (uvicorn/FastAPI close after 5 s) must expire first.
    keepalive_seconds: Seconds = 75.0
    upstream_keepalive_expiry: Seconds = 3.0

    # Retries only where they cannot double the model's work: connect failures and the gateway's 503.
    upstream_retries: Annotated[int, Meta(ge=0, le=10)] = 2
    retry_base_delay: Seconds = 0.2
    retry_max_delay: Seconds = 2.0
    # Circuit breakers (one per upstream, per process): open when at least CIRCUIT_FAILURE_RATIO of
    # the calls in the last CIRCUIT_WINDOW_SECONDS failed, once the window holds CIRCUIT_MIN_CALLS;
    # after CIRCUIT_RESET_SECONDS, CIRCUIT_HALF_OPEN_PROBES calls go through, and that many successes
    # close it. CIRCUIT_FAILURE_THRESHOLD (once: consecutive failures) is still read, as the minimum
    # number of calls when CIRCUIT_MIN_CALLS is unset: with the upstream down, that many failures
    # still open the circuit, as before.
    circuit_failure_threshold: Annotated[int, Meta(ge=1, le=1000)] | None = None
    circuit_min_calls: Annotated[int, Meta(ge=1, le=100_000)] | None = None
    circuit_failure_ratio: Annotated[float, Meta(gt=0, le=1)] = 0.5
    circuit_window_seconds: Annotated[float, Meta(ge=1, le=3600)] = 60.0
    circuit_half_open_probes: Annotated[int, Meta(ge=1, le=100)] = 3
    circuit_reset_seconds: Seconds = 30.0
    gateway_max_concurrency: Annotated[int, Meta(ge=1, le=100_000)] = 200
    gateway_queue_timeout: Annotated[float, Meta(ge=0, le=3600)] = 10.0

    # RATE_LIMIT_<TASK>: per-user token buckets, "<requests>/<seconds>" or "off", keyed by the task's
    # name in upper case (LEAD_QUALIFY). A task without one keeps its module's default. Cache hits are free.
    rate_limit: dict[str, Annotated[str, Meta(pattern=RATE)]] = {}
    # The CRM backend's SECRET_KEY: verify bearer tokens here first (401 before any upstream call).
    crm_jwt_secret: str | None = None
    max_body_bytes: Annotated[int, Meta(ge=1024, le=100 * 1024 * 1024)] = 64 * 1024
    max_header_bytes: Annotated[int, Meta(ge=1024, le=1024 * 1024)] = 16 * 1024
    # A slow client holds a connection (and, proxied, a pass-through pool connection) only this long:
    # headers from the connection's first byte, the whole body from the end of the headers. 408 after.
    header_timeout_seconds: Seconds = 10.0
    body_timeout_seconds: Seconds = 30.0

    agent_repair_attempts: Annotated[int, Meta(ge=0, le=5)] = 1

    cache_prefix: Annotated[str, Meta(pattern=r"^[A-Za-z0-9:_.-]{1,64}\Z")] = "crm-ai"
    # CACHE_TTL_<TASK>: freshness in seconds, keyed like rate_limit; else the task module's default.
    cache_ttl: dict[str, Seconds] = {}
    cache_stale_grace: Annotated[float, Meta(ge=0, le=7 * 86_400)] = 86_400.0
    cache_memory_max_entries: Annotated[int, Meta(ge=1, le=1_000_000)] = 2_000
    cache_lock_timeout: Seconds = 30.0
    cache_retry_interval: Seconds = 5.0

    sse_heartbeat_seconds: Seconds = 15.0
    sse_retry_ms: Annotated[int, Meta(ge=100, le=600_000)] = 3_000
    job_max_seconds: Seconds = 900.0
    job_retention_seconds: Seconds = 900.0
    job_max_jobs: Annotated[int, Meta(ge=1, le=1_000_000)] = 10_000
    # With Redis, the replica running a job renews a lease this long (three times per lease);
    # a job whose lease lapses before `done` is taken over by the next replica that sees it.
    job_lease_seconds: Annotated[float, Meta(ge=0.3, le=600)] = 10.0
    job_token_ttl: Seconds = 900.0
    # Batches (POST /api/v1/ai/batches): ids per batch, items asked at a time per batch, and a
    # batch's lifetime (its events_url's token lives as long).
    batch_max_items: Annotated[int, Meta(ge=1, le=10_000)] = 500
    batch_concurrency: Annotated[int, Meta(ge=1, le=64)] = 4
    batch_max_seconds: Seconds = 21_600.0
    # Threads (issue 25): turns per thread (each later prompt replays them all), and a follow-up's length.
    thread_max_turns: Annotated[int, Meta(ge=1, le=50)] = 20
    thread_message_max: Annotated[int, Meta(ge=1, le=8_000)] = 2_000
    # Live threads one user may hold about one record: each is a conversation in the Conductor.
    thread_max_per_record: Annotated[int, Meta(ge=1, le=1_000)] = 50
    # Replicas behind one load balancer must share it; unset means a random per-process secret.
    job_token_secret: Annotated[str, Meta(min_length=32)] | None = None
    # While rotating JOB_TOKEN_SECRET: also accepted (never issued with), as REDIS_SIGNING_KEY_PREVIOUS.
    job_token_secret_previous: Annotated[str, Meta(min_length=32)] | None = None

    # Forwarding headers (issue 22 §6): peers whose X-Forwarded-*, Forwarded and X-Real-IP are believed
    # (an ingress in front), as uvicorn's variable of the same name: comma-separated addresses or networks
    # (10.0.0.0/8), `*` for any peer. From any other peer they are ignored and never reach the backend.
    forwarded_allow_ips: str = "127.0.0.1"

    # Issue 22: every value read back from Redis carries an HMAC under this key (storage/signing.py).
    # Replicas must share it; `adapter serve` with REDIS_URL refuses to start without it. While
    # rotating, the other key is accepted too (never signed with): see the README's Security section.
    redis_signing_key: Annotated[str, Meta(min_length=32)] | None = None
    redis_signing_key_previous: Annotated[str, Meta(min_length=32)] | None = None

    # Every user's work is bounded (a user: the verified `sub` with CRM_JWT_SECRET, else a hash of
    # the bearer token; job and batch tokens carry their creator's). Beyond a limit: 429 naming it.
    # Open event streams (task streams, job and batch events) per user, on each replica.
    max_streams_per_user: Annotated[int, Meta(ge=1, le=100_000)] = 20
    # Open event streams per replica (503 beyond): lowered at start-up to what the process's
    # file-descriptor limit leaves once the upstream pools have theirs (web/streams.py).
    max_streams: Annotated[int, Meta(ge=1, le=1_000_000)] = 10_000
    # Running batches per user, across replicas when REDIS_URL is set.
    max_batches_per_user: Annotated[int, Meta(ge=1, le=10_000)] = 2
    # CRM record reads per user, `<reads>/<seconds>` or `off`: interactive requests beyond it get 429;
    # batches wait for the bucket, leaving a quarter of it to the user's interactive requests.
    crm_reads_per_user: Annotated[str, Meta(pattern=RATE)] = "20/1"

    # Notifications (issue 26, adapter/notify): triggers the task modules declare, evaluated on every
    # fresh answer; events go through an outbox (a Redis Stream with REDIS_URL) to two optional sinks.
    # Sink 1: the CRM's own `notifications` collection (the backend's MongoDB; a user that may only insert).
    crm_notifications_mongodb_uri: str | None = None
    # Sink 2: Standard Webhooks. URLs comma-separated; secrets `whsec_<base64>`, comma-separated, each
    # delivery signed with every one (rotation). Only these URLs are ever contacted.
    webhook_urls: str = ""
    webhook_secrets: str = ""
    webhook_timeout: Seconds = 10.0
    # Retries with exponential backoff and full jitter, from WEBHOOK_RETRY_BASE_DELAY up to
    # WEBHOOK_RETRY_MAX_DELAY between attempts, for WEBHOOK_RETRY_WINDOW; then the dead-letter list.
    webhook_retry_base_delay: Seconds = 5.0
    webhook_retry_max_delay: Seconds = 3_600.0
    webhook_retry_window: Annotated[float, Meta(ge=1, le=30 * 86_400)] = 86_400.0
    # Triggers switched off, comma-separated trigger names (`lead.classification_changed`).
    notify_triggers_off: str = ""
    # The deal trigger `deal.score_dropped`: a drop of win probability (against the deal's `probability`) or health score
    # (against its `ai_score`) by more than this many points notifies.
    notify_deal_drop_points: Annotated[int, Meta(ge=0, le=100)] = 15
    # The deal trigger `deal.high_risk`: a new risk factor holding one of these words (comma-separated) is high-severity.
    notify_deal_risk_words: str = "lost,cancel,churn,competitor,legal,budget cut,no budget,no decision maker,stalled,blocked"
    # An outbox entry a replica read and did not acknowledge for this long is taken by another replica.
    notify_claim_idle_seconds: Annotated[float, Meta(ge=0.1, le=3_600)] = 30.0

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"

    def __post_init__(self) -> None:
        for name in ("conductor_gateway_url", "crm_backend_url"):
            _check_base_url(name.upper(), getattr(self, name))
        if not self.conductor_cwd.startswith("/"):
            raise ValueError("CONDUCTOR_CWD must be an absolute path on the Conductor's machine "
                             "(current gateways refuse runs without a working directory)")
        self.redis  # noqa: B018  # a bad Redis setting (or mix of them) stops start-up, naming the variable
        self.forwarders  # noqa: B018  # a bad FORWARDED_ALLOW_IPS stops start-up, naming the variable
        if self.job_token_secret_previous is not None and self.job_token_secret is None:
            raise ValueError("JOB_TOKEN_SECRET_PREVIOUS is only accepted beside JOB_TOKEN_SECRET (the secret that issues)")
        if self.crm_notifications_mongodb_uri is not None:
            uri = urlsplit(self.crm_notifications_mongodb_uri)
            if uri.scheme not in {"mongodb", "mongodb+srv"} or not uri.path.strip("/"):
                raise ValueError("CRM_NOTIFICATIONS_MONGODB_URI must be a mongodb:// URL naming the CRM backend's database "
                                 "(mongodb://user:password@host:27017/<database>)")
        self.webhook_targets  # noqa: B018  # a bad WEBHOOK_URLS or WEBHOOK_SECRETS stops start-up, naming it
        if self.redis_signing_key_previous is not None and self.redis_signing_key is None:
            raise ValueError("REDIS_SIGNING_KEY_PREVIOUS is only accepted beside REDIS_SIGNING_KEY (the key that signs)")

    def serving_problems(self) -> list[str]:
        """What `adapter serve` refuses although each variable alone is valid (the demo and in-process apps allow it)."""
        if self.redis is not None and self.redis_signing_key is None:
            return ["REDIS_SIGNING_KEY: must be set (32+ characters, the same on every replica) when REDIS_URL is: "
                    "it authenticates everything the sidecar reads back from Redis"]
        return []

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        names = {f.encode_name for f in msgspec.structs.fields(cls)} - set(PER_TASK)
        # An empty variable means "unset" (docker compose writes `REDIS_URL=` for optional values).
        raw: dict[str, object] = {k: v for k, v in env.items() if k in names and v != ""}
        variables: dict[str, tuple[str, object]] = {k: (k, v) for k, v in raw.items()}
        # Per-task variables are read by pattern (CACHE_TTL_<TASK>): the settings do not know the
        # tasks; the app checks at start-up that each one names a registered task.
        for key, value in env.items():
            for field in PER_TASK:
                if key.startswith(field + "_") and key != field + "_" and value != "":
                    raw.setdefault(field, {})[key[len(field) + 1:]] = value  # type: ignore[index]
                    variables[key] = (field, {key[len(field) + 1:]: value})
        try:
            return msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError:
            pass
        # msgspec stops at the first bad field: convert each variable alone to find them all,
        # so an operator fixes the environment once, not once per variable.
        problems = []
        for name, (field, value) in variables.items():
            try:
                msgspec.convert({field: value}, cls, strict=False)
            except msgspec.ValidationError as exc:
                problems.append(_in_words(name, env[name], str(exc)))
        raise ConfigError(*(problems or ["the settings are inconsistent"]))

    @property
    def redis(self) -> RedisTarget | None:
        """The Redis every replica shares, from REDIS_URL or the Sentinel/Cluster settings; None: no Redis."""
        return RedisTarget.of(self)

    @property
    def webhook_targets(self) -> tuple[tuple[str, ...], tuple[bytes, ...]]:
        """WEBHOOK_URLS and the decoded WEBHOOK_SECRETS (Standard Webhooks' `whsec_<base64>`)."""
        urls = tuple(u.strip() for u in self.webhook_urls.split(",") if u.strip())
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in {"http", "https"} or not parts.hostname or parts.fragment:
                raise ValueError(f"WEBHOOK_URLS must hold absolute http(s) URLs, got {redact_url(url)!r}")
        keys = []
        for secret in (s.strip() for s in self.webhook_secrets.split(",") if s.strip()):
            try:
                if not secret.startswith("whsec_"):
                    raise ValueError
                keys.append(base64.b64decode(secret.removeprefix("whsec_"), validate=True))
            except ValueError:
                raise ValueError("WEBHOOK_SECRETS must be comma-separated `whsec_<base64>` secrets") from None
        return urls, tuple(keys)

    @property
    def notify_off(self) -> frozenset[str]:
        return frozenset(t.strip() for t in self.notify_triggers_off.split(",") if t.strip())

    @property
    def providers(self) -> tuple[str, ...]:
        """CONDUCTOR_AI_PROVIDER as a list; empty means the gateway's default provider."""
        return tuple(p.strip() for p in (self.conductor_ai_provider or "").split(",") if p.strip())

    @property
    def circuit_breaker_min_calls(self) -> int:
        """CIRCUIT_MIN_CALLS, else the older CIRCUIT_FAILURE_THRESHOLD, else 20."""
        return self.circuit_min_calls or self.circuit_failure_threshold or 20

    @property
    def cors_origins(self) -> list[str]:
        return [o.strip() for o in self.cors_allow_origins.split(",") if o.strip()]

    @property
    def forwarders(self) -> tuple[IPNetwork, ...] | None:
        """FORWARDED_ALLOW_IPS as networks (an address is a network of one); None when every peer is trusted."""
        items = [item.strip() for item in self.forwarded_allow_ips.split(",") if item.strip()]
        if "*" in items:
            return None
        try:
            return tuple(ipaddress.ip_network(item) for item in items)
        except ValueError as exc:
            raise ValueError(f"FORWARDED_ALLOW_IPS must be `*` or comma-separated IP addresses or networks "
                             f"(127.0.0.1, 10.0.0.0/8): {exc}") from None

    def ttl_for(self, task: TaskDefaults) -> float:
        return self.cache_ttl.get(task.env_suffix, task.cache_ttl)

    def rate_limit_for(self, task: TaskDefaults) -> str:
        return self.rate_limit.get(task.env_suffix, task.rate_limit)


def _check_base_url(var: str, value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"{var} must be an absolute http(s) URL, got {redact_url(value)!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"{var} must not carry a query or fragment")
    # Credentials in the URL would replace the caller's bearer on every call (and aiohttp refuses
    # to send both): each request carries its caller's own identity, never one of ours.
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{var} must not carry credentials (user:password@); got {redact_url(value)!r}")


# What a pattern-checked variable must look like, in words rather than its regex.
_SHAPES = {
    "RATE_LIMIT_": "`<requests>/<seconds>` (for example 20/60) or `off`",
    "CRM_READS_PER_USER": "`<reads>/<seconds>` (for example 20/1) or `off`",
    "CACHE_PREFIX": "1 to 64 letters, digits or `:_.-`",
}
_SECRET = ("SECRET", "TOKEN", "PASSWORD", "SIGNING_KEY", "MONGODB_URI")


def _in_words(name: str, value: str, message: str) -> str:
    """`ADAPTER_PORT: must be a whole number, got 'eighty'` from msgspec's `Expected `int`, got `str` - at `$.ADAPTER_PORT``."""
    message = re.sub(r" - at `\$[^`]*`$", "", message)
    shown = "" if any(word in name for word in _SECRET) else f", got {value!r}"
    words = None
    if match := re.match(r"Expected `(\w+)` (>=|>|<=|<) ([\d.e+-]+)", message):
        kind, op, bound = match.groups()
        bound = f"{float(bound):g}"
        words = {">=": f"at least {bound}", ">": f"more than {bound}", "<=": f"at most {bound}", "<": f"less than {bound}"}[op]
        words = f"must be {'a whole number' if kind == 'int' else 'a number'} {words}"
    elif match := re.match(r"Expected `str` of length >= (\d+)", message):
        words = f"must be at least {match.group(1)} characters long"
    elif "matching regex" in message:
        shape = next((v for k, v in _SHAPES.items() if name.startswith(k)), "the documented format")
        words = f"must be {shape}"
    elif message.startswith("Invalid enum value"):
        field = next(f for f in msgspec.structs.fields(Settings) if f.encode_name == name)
        choices = ", ".join(getattr(field.type, "__args__", ()))
        words = f"must be one of {choices}"
    elif match := re.match(r"Expected `(\w+)(?: \| null)?`, got", message):
        words = {"int": "must be a whole number", "float": "must be a number", "bool": "must be true or false"}.get(
            match.group(1), f"must be a {match.group(1)}")
    if words is None:  # our own checks (__post_init__) already speak in words, naming the variable
        return f"{name}: {message.removeprefix(name).strip()}"
    return f"{name}: {words}{shown}"


# --- which Redis (issue 24) ---------------------------------------------------------------------

RedisMode = Literal["single", "sentinel", "cluster"]
_SCHEMES = {"redis": ("single", False), "rediss": ("single", True), "unix": ("single", False),
            "redis+sentinel": ("sentinel", False), "rediss+sentinel": ("sentinel", True),
            "redis+cluster": ("cluster", False), "rediss+cluster": ("cluster", True)}


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """One Redis, a Sentinel-watched master or a Cluster: what storage/connect.py opens.

    `redis+sentinel://[user:password@]host:port,host:port/<master>[/<db>][?sentinel_password=...]`
    `redis+cluster://[user:password@]host:port,host:port` (any nodes: the rest are discovered)
    (`rediss+...` for TLS), or the same from REDIS_SENTINELS/REDIS_SENTINEL_MASTER and REDIS_CLUSTER.
    """

    mode: RedisMode
    shown: str  # what `adapter check` and the start-up line print (passwords redacted)
    # Secrets stay out of repr(): a traceback or a log line showing the target never shows them.
    url: str | None = field(default=None, repr=False)  # single: REDIS_URL as redis-py reads it
    hosts: tuple[tuple[str, int], ...] = ()
    master: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)
    tls: bool = False

    @classmethod
    def of(cls, s: Settings) -> RedisTarget | None:
        if s.redis_sentinels is not None:
            if s.redis_url is not None or s.redis_cluster:
                raise ValueError("REDIS_SENTINELS names the Redis already: unset REDIS_URL and REDIS_CLUSTER "
                                 "(or use one redis+sentinel:// REDIS_URL)")
            if not s.redis_sentinel_master:
                raise ValueError("REDIS_SENTINEL_MASTER must be set beside REDIS_SENTINELS "
                                 "(the name in the sentinels' `sentinel monitor <name> ...`)")
            hosts = _hosts("REDIS_SENTINELS", s.redis_sentinels)
            return cls("sentinel", f"sentinel {s.redis_sentinels} master {s.redis_sentinel_master}", hosts=hosts,
                       master=s.redis_sentinel_master, password=s.redis_password, sentinel_password=s.redis_sentinel_password)
        if s.redis_sentinel_master is not None:
            raise ValueError("REDIS_SENTINEL_MASTER is only read beside REDIS_SENTINELS")
        if s.redis_url is None:
            if s.redis_cluster:
                raise ValueError("REDIS_CLUSTER needs REDIS_URL naming one of the cluster's nodes")
            return None
        return cls.from_url(s.redis_url, cluster=s.redis_cluster, sentinel_password=s.redis_sentinel_password)

    @classmethod
    def from_url(cls, url: str, *, cluster: bool = False, sentinel_password: str | None = None) -> RedisTarget:
        """REDIS_URL read; `cluster`: REDIS_CLUSTER, which makes a redis:// URL a cluster's seed node."""
        scheme, sep, rest = url.partition("://")
        if scheme not in _SCHEMES or not sep:
            raise ValueError("REDIS_URL must be a redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// URL")
        mode, tls = _SCHEMES[scheme]
        if mode == "single" and not cluster:
            return cls("single", redact_url(url), url=url)
        if mode == "sentinel" and cluster:
            raise ValueError("REDIS_CLUSTER does not go with a redis+sentinel:// REDIS_URL")
        if scheme == "unix":
            raise ValueError("REDIS_CLUSTER needs a redis:// or rediss:// REDIS_URL (a cluster's nodes talk TCP)")
        rest, _, query = rest.partition("?")
        netloc, _, path = rest.partition("/")
        userinfo, at, hostlist = netloc.rpartition("@")
        user, _, password = userinfo.partition(":") if at else ("", "", "")
        hosts = _hosts("REDIS_URL", hostlist)
        parts = [unquote(p) for p in path.split("/") if p]
        params = dict(item.partition("=")[::2] for item in query.split("&") if item)
        common = dict(hosts=hosts, username=unquote(user) or None, password=unquote(password) or None, tls=tls,
                      shown=redact_url(url))
        if mode == "sentinel":
            if not parts:
                raise ValueError("a redis+sentinel:// REDIS_URL names the master after the hosts: "
                                 "redis+sentinel://host:26379,host:26380/<master>")
            db = parts[1] if len(parts) > 1 else "0"
            if not db.isdigit():
                raise ValueError(f"REDIS_URL: the database after the master's name must be a number, got {db!r}")
            return cls("sentinel", master=parts[0], db=int(db),
                       sentinel_password=unquote(params.get("sentinel_password", "")) or sentinel_password, **common)
        if parts and parts != ["0"]:
            raise ValueError("a Redis Cluster has one database, 0: REDIS_URL must not name another")
        return cls("cluster", **common)


def _hosts(var: str, text: str) -> tuple[tuple[str, int], ...]:
    hosts = []
    for item in (x.strip() for x in text.split(",")):
        host, colon, port = item.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{var} must list host:port pairs separated by commas, got {item!r}")
        hosts.append((host.strip("[]"), int(port)))
    if not hosts:
        raise ValueError(f"{var} must name at least one host:port")
    return tuple(hosts)


# --- secrets in URLs (issue 22 §5) ------------------------------------------------------------
# A URL is shown (by `adapter check`, the start-up line, /api/v1/ai/health, any log event) only
# through `redact_url`: REDIS_URL carries Redis's password, and a gateway behind basic auth its own.

def redact_url(url: str) -> str:
    """`url` with its password replaced by `***`: the userinfo's, and a `password` query value
    (redis-py reads one there too). Scheme, user, host, port, path and the rest stay, so an
    operator still sees which server is meant. String surgery, not urlunsplit, so nothing else
    of the URL is rewritten; the netloc ends where urlsplit ends it (the first `/`, `?` or `#`).
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, host = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{host}"
    before, question, query = tail.partition("?")
    if question and "password" in query.lower():
        query, hash_, fragment = query.partition("#")
        items = [f"{name}=***" if unquote(name).lower().endswith("password") else f"{name}{eq}{value}"
                 for name, eq, value in (item.partition("=") for item in query.split("&"))]
        tail = f"{before}?{'&'.join(items)}{hash_}{fragment}"
    return f"{scheme}://{netloc}{tail}"
