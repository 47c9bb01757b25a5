"""The committed contract, exercised by schemathesis in process against the app and its doubles."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from adapter.app import create_app
from adapter.tasks import TASKS
from adapter.doubles.crm import CrmDouble
from adapter.doubles.gateway import GatewayDouble
from tests.helpers import asgi_client, make_settings

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]

gateway, crm = GatewayDouble(), CrmDouble()
seed = crm.seed(examples=True)
TOKEN = crm.token(seed["alice"], expires_in=86_400)
# The per-user limits are lifted: one user makes every call, and a limit that depends on time or on
# which batches are still running would make the state machine's draws depend on them too.
app = create_app(make_settings(**{f"rate_limit_{t.env_suffix}": "off" for t in TASKS.values()},
                               crm_reads_per_user="off", max_batches_per_user=1_000, max_streams_per_user=1_000),
                 gateway_http=asgi_client(gateway.app, "http://gateway.test"), crm_http=asgi_client(crm.app, "http://crm.test"))
schema = schemathesis.openapi.from_asgi("/schema/openapi.json", app)


@schema.parametrize()
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_honours_the_contract(case):
    case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS)


def walk_links(path_regex: str, examples: int = 30) -> list[tuple[str, str, int]]:
    """Run schemathesis' state machine over the operations under `path_regex`, following the
    OpenAPI links from one answer to the next; what it called, and with what status."""
    seen: list[tuple[str, str, int]] = []

    class Workflow(schema.include(path_regex=path_regex).as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case):
            return {"headers": {"Authorization": f"Bearer {TOKEN}"}}

        def after_call(self, response, case):
            super().after_call(response, case)
            seen.append((case.method, case.operation.path, response.status_code))

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs)

    Workflow.run(settings=settings(max_examples=examples, stateful_step_count=5, deadline=None,
                                   suppress_health_check=list(HealthCheck)))
    return seen


def test_stateful_job_workflow_follows_the_links():
    """POST /api/v1/ai/jobs, then the job's state and its events."""
    seen = walk_links("^/api/v1/ai/jobs")
    followed = {(m, p) for m, p, status in seen if status == 200}
    assert ("GET", "/api/v1/ai/jobs/{job_id}") in followed, seen[:20]
    assert ("GET", "/api/v1/ai/jobs/{job_id}/events") in followed


def test_stateful_batch_workflow_follows_the_links():
    """POST /api/v1/ai/batches, then the batch's state, its events and its cancel."""
    seen = walk_links("^/api/v1/ai/batches")
    followed = {(m, p) for m, p, status in seen if status in (200, 202)}
    assert ("POST", "/api/v1/ai/batches") in followed, seen[:20]
    assert ("GET", "/api/v1/ai/batches/{batch_id}") in followed
    assert ("GET", "/api/v1/ai/batches/{batch_id}/events") in followed


def test_stateful_thread_workflow_follows_the_links():
    """POST /api/v1/ai/threads, then a link from its answer (the thread, a turn, its deletion) to a success.

    Most generated bodies are refused (a task with another task's input) and the walk picks among five
    operations, so which links it reaches with a live thread varies from run to run; that each link
    answers as documented is test_threads' business, that the links lead somewhere is this test's."""
    seen = walk_links("^/api/v1/ai/threads", examples=60)
    followed = {(m, p) for m, p, status in seen if status in (200, 201, 204)}
    assert ("POST", "/api/v1/ai/threads") in followed, seen[:20]
    linked = {("GET", "/api/v1/ai/threads/{thread_id}"), ("POST", "/api/v1/ai/threads/{thread_id}/turns"),
              ("POST", "/api/v1/ai/threads/{thread_id}/turns/stream"), ("DELETE", "/api/v1/ai/threads/{thread_id}")}
    assert followed & linked, seen[:20]