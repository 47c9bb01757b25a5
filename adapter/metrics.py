"""Prometheus metrics, one registry per app (tests run several apps in one process)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        # (route, method, status) -> request counter and latency children; routes are templates, so few keys.
        self._served: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self.requests = Counter("crm_ai_http_requests", "HTTP requests by route, method and status", ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram("crm_ai_http_request_duration_seconds", "HTTP request latency by route", ["route"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.gateway_calls = Counter("crm_ai_gateway_calls", "Conductor Gateway calls by agent and outcome", ["agent", "outcome"], registry=r)
        self.gateway_seconds = Histogram("crm_ai_gateway_call_duration_seconds", "Conductor Gateway call latency by agent", ["agent"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.cache = Counter("crm_ai_cache_events", "Result cache: hit, miss, stale, bypass, coalesced", ["task", "result"], registry=r)
        self.agent_output = Counter("crm_ai_agent_output", "Agent answers: valid, normalised, invalid, repaired, corrected, failed",
                                    ["agent", "outcome"], registry=r)
        # Guidance breaches (a task's `guidance`, tasks/reading.py `Breach`): accepted answers that did not follow a persona's style rule.
        self.agent_guidance = Counter("crm_ai_agent_guidance", "Accepted agent answers breaching a persona's guidance rule",
                                      ["agent", "rule"], registry=r)
        # Its help names no task: the tasks with a write-back (`Task.write_back`) are the registry's to say.
        self.write_backs = Counter("crm_ai_write_backs", "Record write-backs to the CRM after a fresh answer: ok, failed, skipped",
                                   ["outcome"], registry=r)
        self.open_streams = Gauge("crm_ai_open_streams", "SSE connections open to clients", registry=r)
        self.running_jobs = Gauge("crm_ai_running_jobs", "Streamed jobs still running", registry=r)
        self.circuit = Gauge("crm_ai_circuit_state", "Circuit breaker per upstream: 0 closed, 1 half-open, 2 open", ["upstream"], registry=r)
        self.gateway_in_flight = Gauge("crm_ai_gateway_calls_in_flight", "Agent runs holding a bulkhead slot", registry=r)
        self.provider_fallbacks = Counter("crm_ai_provider_fallbacks", "Runs retried on the next CONDUCTOR_AI_PROVIDER",
                                          ["agent", "from_provider", "to_provider"], registry=r)
        self.instance_cleanups = Counter("crm_ai_gateway_instance_cleanups", "Removal of the gateway's agent_instances "
                                         "document after a synchronous run: ok, failed", ["outcome"], registry=r)
        self.lost_streams = Counter("crm_ai_gateway_lost_streams", "Gateway jobs whose stream was lost before the outcome "
                                    "(404, broken off, ended without a result): recovered by one synchronous run", ["agent"], registry=r)
        self.rate_limited = Counter("crm_ai_rate_limited", "Requests refused by the per-user rate limit", ["task"], registry=r)
        # Issue 22: what came back from Redis (or a stored body that is no answer of its task) and was never served.
        self.tampered = Counter("crm_ai_cache_tampered", "Stored values that failed their check and were not used, once "
                                "per value: cache, flight, job-log, batch-inputs", ["kind"], registry=r)
        # Refusals at a concurrency limit, by the setting that sets it (MAX_STREAMS_PER_USER, MAX_STREAMS, MAX_BATCHES_PER_USER).
        self.limit_refusals = Counter("crm_ai_limit_refusals", "Requests refused at a concurrency limit", ["limit"], registry=r)
        # What a fleet is watched by (deploy/grafana, deploy/prometheus): the CRM's latency, the
        # shared store, readiness, and how jobs move between replicas.
        self.crm_calls = Counter("crm_ai_crm_calls", "CRM backend calls (record reads and write-backs) by method and outcome",
                                 ["method", "outcome"], registry=r)
        self.crm_seconds = Histogram("crm_ai_crm_call_duration_seconds", "CRM backend call latency by method", ["method"],
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.store_up = Gauge("crm_ai_cache_store_up", "1 while the cache store answers, 0 while Redis fails (then answers are uncached)",
                              ["backend"], registry=r)
        self.ready = Gauge("crm_ai_ready", "1 when /readyz last answered ready, 0 when it answered 503 (draining, or the gateway "
                           "failing), NaN before the first probe", registry=r)
        self.ready.set(float("nan"))  # unknown, not "not ready": where nothing probes (compose), nothing alerts
        self.running_batches = Gauge("crm_ai_running_batches", "Batches this process runs (crm_ai_running_jobs counts them too)",
                                     registry=r)
        # Notifications (issue 26, adapter/notify): events written to the outbox, and each sink's deliveries.
        self.notify_events = Counter("crm_ai_notify_events", "Notification events by trigger: written to the outbox, "
                                     "duplicate (written before), lost (the outbox could not be written)", ["type", "outcome"], registry=r)
        self.notify_delivered = Counter("crm_ai_notify_delivered", "Notifications delivered, by sink (crm, webhook)", ["sink"], registry=r)
        self.notify_retried = Counter("crm_ai_notify_retried", "Notification deliveries that failed and were scheduled again",
                                      ["sink"], registry=r)
        self.notify_dead_lettered = Counter("crm_ai_notify_dead_lettered", "Notification deliveries given up after "
                                            "WEBHOOK_RETRY_WINDOW (in the dead-letter list)", ["sink"], registry=r)
        self.notify_outbox_lag = Histogram("crm_ai_notify_outbox_lag_seconds", "From an event's creation to its first "
                                           "delivery attempt", buckets=LATENCY_BUCKETS, registry=r)
        self.job_takeovers = Counter("crm_ai_job_takeovers", "Jobs and batches taken over from another replica: handed_over "
                                     "(it drained) or lease_lapsed (it died)", ["reason"], registry=r)
        self.job_handovers = Counter("crm_ai_job_handovers", "Jobs and batches handed over to other replicas while shutting down",
                                     registry=r)
        for reason in ("handed_over", "lease_lapsed"):
            self.job_takeovers.labels(reason)  # both series from the start: the alert counts one of them
        self.follower_lag = Histogram("crm_ai_job_follower_lag_seconds", "From an event's write to Redis by the replica running a "
                                      "job to its read by a replica following the job", buckets=LAG_BUCKETS, registry=r)

    def request_done(self, route: str, method: str, status: str, seconds: float) -> None:
        """One served request: its count and its latency. The labelled children are kept, not looked up each time."""
        try:
            count, latency = self._served[route, method, status]
        except KeyError:
            count, latency = self._served[route, method, status] = (self.requests.labels(route, method, status),
                                                                     self.request_seconds.labels(route))
        count.inc()
        latency.observe(seconds)

    def watch_jobs(self, running: Callable[[], int]) -> None:
        self.running_jobs.set_function(running)

    def watch_store(self, backend: str, healthy: Callable[[], bool]) -> None:
        self.store_up.labels(backend).set_function(lambda: 1 if healthy() else 0)

    def prime(self, tasks: Any) -> None:
        """Every task's series at 0 from the start: a rate over a series that appears with its first
        event reads as no data, and an alert on it would not fire until the second."""
        for task in tasks.values():
            for result in ("hit", "miss", "stale", "bypass", "coalesced"):
                self.cache.labels(task.name, result)
            self.rate_limited.labels(task.name)
            for outcome in ("valid", "normalised", "invalid", "repaired", "corrected", "failed"):
                self.agent_output.labels(task.agent_id, outcome)
            self.gateway_calls.labels(task.agent_id, "ok")
        for method in ("GET", "PATCH"):
            self.crm_calls.labels(method, "ok")

    def watch_breaker(self, upstream: str, state: Callable[[], str]) -> None:
        codes = {"closed": 0, "half_open": 1, "open": 2}
        self.circuit.labels(upstream).set_function(lambda: codes[state()])

    def render(self) -> bytes:
        return generate_latest(self.registry)
