"""Liveness and readiness for orchestrators."""

from __future__ import annotations

from litestar import Request, Response, get
from litestar.di import NamedDependency

from ..errors import NotReady
from ..pipeline.jobs import Jobs
from ..models import Liveness
from ..pipeline.service import AiService
from .openapi import problem


@get("/healthz", summary="The process is alive (no upstream calls)", tags=["ops"])
async def healthz() -> Liveness:
    return Liveness(status="ok")


@get("/metrics", summary="Prometheus metrics", tags=["ops"], media_type="text/plain; version=0.0.4; charset=utf-8")
async def metrics(request: Request) -> Response[bytes]:
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@get("/readyz", summary="Ready when the Conductor Gateway answers", tags=["ops"],
     responses={503: problem("The named dependency is failing")})
async def readyz(service: NamedDependency[AiService], jobs: NamedDependency[Jobs]) -> Liveness:
    ready = service.metrics.ready  # what the last probe answered: "not ready for long" is an alert
    if jobs.draining:  # SIGTERM: the balancer must stop sending work here while running jobs finish
        ready.set(0)
        raise NotReady(f"shutting down: draining {jobs.running} running job(s)")
    try:
        await service.gateway.health()
    except Exception as exc:  # any failure of the probe means "not ready", never a 500
        ready.set(0)
        raise NotReady(f"dependency conductor-gateway is failing: {type(exc).__name__}: {exc}"[:300]) from None
    cache = await service.cache.store.state()
    ready.set(1)
    return Liveness(status="ready", cache=cache.status)
