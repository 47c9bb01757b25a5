"""Bad input is a 400, never a 500 (issue 22, finding 7).

Record ids are matched in full: msgspec applies a pattern with `re.search`, and `$` also matches
before a final newline, so `<id>\\n` passed the check and failed later (a 500; inside a batch, a
202 that then cancelled every item). JSON nested deeper than MAX_JSON_DEPTH is refused by name
(msgspec decodes nesting recursively: 30,000 levels were a RecursionError, a 500). And a
Hypothesis run puts newlines, NUL and deep nesting into every string and body field of the AI,
job and batch routes (their OpenAPI examples name every field), and into their path and query
strings, asserting that no answer is a 500.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litestar.testing import TestClient

from adapter.app import create_app
from adapter.doubles.crm import CrmDouble
from adapter.doubles.gateway import GatewayDouble
from adapter.tasks import TASKS
from adapter.web.openapi import examples
from adapter.web.requests import MAX_JSON_DEPTH
from tests.helpers import QUALIFY, asgi_client, assert_problem, make_settings

BATCHES = "/api/v1/ai/batches"
# Every hostile fragment the issue names, and a few of their relatives.
HOSTILE = ["\n", "\r\n", "\x00", "\r", "\t", "\u2028", "\x1b[2J", " "]


def body_bytes(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


# --- ids are matched in full ----------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["\n", "\r\n", "\x00", " "])
@pytest.mark.parametrize(("path", "body", "field"), [
    (QUALIFY, lambda i: {"lead_id": i}, "lead_id"),
    ("/api/v1/ai/lead/qualify/stream", lambda i: {"lead_id": i}, "lead_id"),
    ("/api/v1/ai/email/generate", lambda i: {"lead_id": i, "tone": "casual"}, "lead_id"),
    ("/api/v1/ai/jobs", lambda i: {"task": "lead.qualify", "input": {"lead_id": i}}, "input.lead_id"),
])
async def test_an_id_with_a_trailing_newline_or_nul_is_400_naming_its_field(client, auth, seed, crm, gateway, path, body,
                                                                           field, suffix):
    r = await client.post(path, json=body(seed["leads"][0] + suffix), headers=auth)
    problem = assert_problem(r, 400, "invalid-request")
    assert f"`{field}`" in problem["detail"], problem
    assert crm.calls.total() == 0 and sum(gateway.calls.values()) == 0  # refused before any upstream call


@pytest.mark.parametrize("bad", ["\n", "\r\n", "\x00"])
async def test_a_batch_with_one_bad_id_is_refused_whole_naming_it(client, auth, seed, crm, bad):
    ids = [seed["leads"][0], seed["leads"][1] + bad, seed["leads"][2]]
    r = await client.post(BATCHES, json={"task": "lead.qualify", "ids": ids}, headers=auth)
    problem = assert_problem(r, 400, "invalid-request")
    assert problem["detail"].startswith("invalid request body: `ids[1]`: ") and "MongoDB ObjectId" in problem["detail"]
    assert problem["errors"][0]["field"] == "ids[1]"
    assert crm.calls.total() == 0  # nothing ran: no item was read


# --- nesting is bounded -----------------------------------------------------------------------


def nested(depth: int, kind: str = "list", inner: bytes = b"1") -> bytes:
    """`depth` arrays (or objects) around `inner`, as JSON text (json.dumps itself recurses)."""
    if kind == "list":
        return b"[" * depth + inner + b"]" * depth
    return b'{"k":' * depth + inner + b"}" * depth


@pytest.mark.parametrize(("where", "depth", "kind"), [
    ("body", 30_000, "list"),  # the reproduction: a RecursionError in msgspec, a 500
    ("body", MAX_JSON_DEPTH + 1, "object"),
    ("field", 5_000, "object"),
    ("field", MAX_JSON_DEPTH, "list"),  # one more level: the body object around it
])
async def test_json_nested_deeper_than_the_limit_is_400_naming_it(client, auth, crm, where, depth, kind):
    content = nested(depth, kind) if where == "body" else b'{"lead_id": ' + nested(depth, kind) + b"}"
    r = await client.post(QUALIFY, content=content, headers={**auth, "Content-Type": "application/json"})
    problem = assert_problem(r, 400, "invalid-request")
    assert f"more than {MAX_JSON_DEPTH} levels deep" in problem["detail"], problem
    assert crm.calls.total() == 0


async def test_nesting_within_the_limit_is_judged_on_its_merits(client, auth, seed):
    # 64 levels in all (the body object and 63 arrays): no depth complaint, the field's own.
    inner = nested(MAX_JSON_DEPTH - 1, "list", b'"x"')
    r = await client.post("/api/v1/ai/jobs", content=b'{"task": "lead.qualify", "input": {"lead_id": %s}}' % inner[1:-1],
                          headers={**auth, "Content-Type": "application/json"})
    problem = assert_problem(r, 400, "invalid-request")
    assert "levels deep" not in problem["detail"] and "`input.lead_id`" in problem["detail"], problem


# --- an upstream's answer nested too deep is the upstream's fault, not a 500 ------------------
# msgspec raises RecursionError, not DecodeError, past about 1,000 levels: the gateway's execute
# document (its `result` may hold parsed JSON), its stream's envelopes, the CRM's record and either's
# error `detail` were read with only DecodeError caught.

DEEP = nested(30_000)


def _gateway(execute: bytes, status: int = 200):
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/execute"):
            return httpx.Response(status, content=execute, headers={"Content-Type": "application/json"})
        if request.url.path.endswith("/stream-execute"):
            return httpx.Response(200, json={"job_id": "deep"})
        if request.url.path.startswith("/api/v1/stream/"):  # an envelope too deep, then nothing: the stream is lost
            return httpx.Response(200, content=b"data: " + DEEP + b"\n\n", headers={"Content-Type": "text/event-stream"})
        return httpx.Response(404)
    return httpx.AsyncClient(transport=httpx.MockTransport(answer), base_url="http://gateway.test")


@pytest.mark.parametrize(("status", "execute", "slug", "words"), [
    (200, b'{"status": "ok", "result": {"status": "ok", "result": ' + DEEP + b"}}", "gateway-protocol-error",
     "nesting arrays and objects too deep to read"),
    (400, b'{"detail": ' + DEEP + b"}", "gateway-error", "answered 400"),
])
@pytest.mark.parametrize("route", [QUALIFY, QUALIFY + "/stream"])
async def test_a_gateway_answer_nested_too_deep_is_a_502_not_a_500(make_client, auth, seed, status, execute, slug, words, route):
    async with _gateway(execute, status) as gateway_http, make_client(gateway_http=gateway_http) as client:
        r = await client.post(route, json={"lead_id": seed["leads"][0]}, headers=auth)
    if route == QUALIFY:
        problem = assert_problem(r, 502, slug)
    else:  # the stream's envelope is unreadable, so the run is asked once synchronously: its problem ends the stream
        assert r.status_code == 200
        error = next(line for line in r.text.splitlines() if line.startswith("data: ") and '"status":' in line)
        problem = json.loads(error.removeprefix("data: "))
        assert problem["status"] == 502 and problem["type"].endswith(slug), problem
    assert words in problem["detail"], problem


async def test_a_crm_record_nested_too_deep_is_a_502_not_a_500(make_client, auth, seed, gateway):
    def backend(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b'{"id": "x", "notes": ' + DEEP + b"}", headers={"Content-Type": "application/json"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(backend), base_url="http://crm.test") as crm_http, \
            make_client(crm_http=crm_http) as client:
        r = await client.post(QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth)
    problem = assert_problem(r, 502, "crm-unavailable")
    assert problem["detail"].endswith("with a record nesting arrays and objects too deep to read"), problem
    assert sum(gateway.calls.values()) == 0


# --- Hypothesis: hostile strings and nesting in every field of every AI, job and batch route ----


@dataclass(frozen=True)
class Nest:
    """A value wrapped in `depth` arrays or objects: encoded by hand, as json.dumps would recurse."""

    value: Any
    depth: int
    kind: str


def encode(value: Any) -> bytes:
    if isinstance(value, Nest):
        return nested(value.depth, value.kind, encode(value.value))
    if isinstance(value, dict):
        return b"{" + b",".join(body_bytes(k) + b":" + encode(v) for k, v in value.items()) + b"}"
    if isinstance(value, list):
        return b"[" + b",".join(encode(v) for v in value) + b"]"
    return body_bytes(value)


def paths(value: Any, at: tuple = ()) -> Iterator[tuple]:
    """Every place in a JSON value: the whole, each member, each element, recursively."""
    yield at
    if isinstance(value, dict):
        for key, child in value.items():
            yield from paths(child, (*at, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from paths(child, (*at, i))


def replaced(value: Any, at: tuple, new: Any) -> Any:
    if not at:
        return new
    head, rest = at[0], at[1:]
    if isinstance(value, dict):
        return {**value, head: replaced(value[head], rest, new)}
    return [replaced(v, rest, new) if i == head else v for i, v in enumerate(value)]


def leaf(value: Any, at: tuple) -> Any:
    for step in at:
        value = value[step]
    return value


hostile_text = st.lists(st.one_of(st.sampled_from(HOSTILE), st.text(max_size=3)), min_size=1, max_size=4).map("".join)


@st.composite
def mutation(draw: st.DrawFn, value: Any) -> Any:
    """A hostile fragment in a string (before, inside or after it), a string replaced, or a value nested deep."""
    at = draw(st.sampled_from(list(paths(value))))
    old = leaf(value, at)
    how = draw(st.sampled_from(["insert", "replace", "nest"] if isinstance(old, str) else ["replace", "nest"]))
    if how == "insert":
        cut = draw(st.sampled_from([0, len(old) // 2, len(old)]))
        return replaced(value, at, old[:cut] + draw(hostile_text) + old[cut:])
    if how == "replace":
        return replaced(value, at, draw(hostile_text))
    # Around the limit, and far beyond it (30,000 arrays are 60 KB: under MAX_BODY_BYTES).
    depth = draw(st.sampled_from([2, MAX_JSON_DEPTH - 2, MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1, 1_000, 30_000]))
    kind = "list" if depth > 10_000 else draw(st.sampled_from(["list", "object"]))
    return replaced(value, at, Nest(old, depth, kind))


gateway, crm = GatewayDouble(), CrmDouble()
SEED = crm.seed(examples=True)
TOKEN = crm.token(SEED["alice"], expires_in=86_400)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REQUESTS, _ = examples(TASKS)  # each route's example body: every field it takes
# The limits that would answer before the code under test (429s) are lifted: the run is about input.
app = create_app(make_settings(rate_limit_lead_qualify="off", rate_limit_email_generate="off", rate_limit_deal_predict="off",
                               crm_reads_per_user="off", max_batches_per_user=1_000, max_streams_per_user=1_000),
                 gateway_http=asgi_client(gateway.app, "http://gateway.test"), crm_http=asgi_client(crm.app, "http://crm.test"))


@pytest.fixture(scope="module")
def sidecar() -> Iterator[tuple[TestClient, dict[str, str]]]:
    """The app (lifespan running) and a real job's and batch's ids and tokens, for the reading routes."""
    with TestClient(app, base_url="http://sidecar.test", raise_server_exceptions=False) as client:
        job = client.post("/api/v1/ai/jobs", json=REQUESTS["/api/v1/ai/jobs"], headers=AUTH).json()
        batch = client.post(BATCHES, json=REQUESTS[BATCHES], headers=AUTH).json()
        made = {"job": job["job_id"], "job_token": job["events_url"].rpartition("token=")[2],
                "batch": batch["batch_id"], "batch_token": batch["events_url"].rpartition("token=")[2]}
        yield client, made
    gateway.stop()


def check(response: Any, what: str, *, ours: bool = True) -> None:
    """Never a 500; and a refusal of ours is a problem (`ours=False`: the path may have left the sidecar's
    routes for the pass-through, whose answers are the backend's own)."""
    assert response.status_code < 500, f"{what}: {response.status_code} {response.text[:500]}"
    if response.status_code >= 400 and ours:
        assert response.headers["content-type"] == "application/problem+json", what
        assert "Traceback" not in response.text


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_hostile_strings_and_nesting_in_any_body_field_are_never_a_500(sidecar, data):
    client, _ = sidecar
    path = data.draw(st.sampled_from(sorted(REQUESTS)), label="path")
    body = data.draw(mutation(REQUESTS[path]), label="body")
    content = encode(body)
    response = client.post(path, content=content, headers={**AUTH, "Content-Type": "application/json"})
    check(response, f"POST {path} {content[:300]!r}")


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_hostile_ids_tokens_and_queries_on_the_reading_routes_are_never_a_500(sidecar, data):
    client, made = sidecar
    kind = data.draw(st.sampled_from(["job", "batch"]), label="kind")
    base = "/api/v1/ai/jobs/" if kind == "job" else BATCHES + "/"
    ident, token = made[kind], made[f"{kind}_token"]
    spoil = data.draw(st.sampled_from(["id", "token", "query"]), label="spoil")
    fragment = data.draw(hostile_text, label="fragment")
    if spoil == "id":
        ident = data.draw(st.sampled_from([ident + fragment, fragment + ident, fragment]))
    elif spoil == "token":
        token = data.draw(st.sampled_from([token + fragment, fragment]))
    suffix = data.draw(st.sampled_from(["", "/events"] + (["?status"] if kind == "batch" else [])), label="route")
    query: dict[str, str] = {"token": token}
    if suffix == "?status":
        suffix, query["status"] = "", fragment if spoil == "query" else "failed"
    elif spoil == "query":
        query["lastEventId"] = fragment
    method = data.draw(st.sampled_from(["GET", "DELETE"] if kind == "batch" and not suffix else ["GET"]), label="method")
    # Percent-encoded here (the client refuses control characters in a URL): the route gets the text itself.
    response = client.request(method, base + quote(ident, safe="") + suffix, params=query,
                              headers=AUTH if method == "DELETE" else {})
    # A `/` in the id (sent as %2F, routed decoded) makes another path: the backend answers it, as it may.
    check(response, f"{method} {base}{ident!r}{suffix} {query!r}", ours="/" not in ident)


# A resume point is digits to `str.isdigit`, which also takes `²` and Arabic-Indic digits, and to `int`,
# which refuses more than 4,300 of them: both were a 500. A resume point that is not a small ASCII
# number is no resume point (the stream starts from its first event), like any other text there.
@pytest.mark.parametrize("value", ["\u00b2", "\u0663", "9" * 5_000])
@pytest.mark.parametrize("where", ["header", "query"])
@pytest.mark.parametrize("kind", ["job", "batch"])
def test_a_resume_point_that_is_not_a_small_ascii_number_is_ignored_not_a_500(sidecar, kind, where, value):
    client, made = sidecar
    base = "/api/v1/ai/jobs/" if kind == "job" else BATCHES + "/"
    query, headers = {"token": made[f"{kind}_token"]}, {}
    if where == "query":
        query["lastEventId"] = value
    else:
        headers["Last-Event-ID"] = value.encode()  # bytes: a header is not limited to ASCII on the wire
    with client.stream("GET", base + made[kind] + "/events", params=query, headers=headers) as response:
        assert response.status_code == 200, response.read()[:500]
        first = next(response.iter_lines())
    assert first.startswith("retry: ")
