"""No password is ever printed: `adapter check`, `serve`'s start-up and every request's output show
URLs through `redact_url`, with `***` for the password (issue 22 §5)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from adapter.settings import ConfigError, Settings, redact_url
from tests.helpers import (TEST_SIGNING_KEY, QUALIFY, QUALIFY_STREAM, RedisProcess, closed_port_url, decode, make_settings, replica_cluster,
                           run_adapter_async, serving)

pytestmark = pytest.mark.redis

REDIS_PASSWORD, WRONG_PASSWORD, GATEWAY_PASSWORD = "s3cret-pw", "wr0ng-pw", "gateway-hunter2"
PASSWORDS = (REDIS_PASSWORD, WRONG_PASSWORD, GATEWAY_PASSWORD)


@pytest.fixture
def locked_redis() -> Iterator[RedisProcess]:
    """A redis-server of the test's own that asks for REDIS_PASSWORD."""
    own = RedisProcess(password=REDIS_PASSWORD)
    own.start()
    yield own
    own.stop()


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:s3cret-pw@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("rediss://app:p%40ss:w@redis.internal:6380/2?ssl_cert_reqs=none", "rediss://app:***@redis.internal:6380/2?ssl_cert_reqs=none"),
    ("redis://:a@b@host/0", "redis://:***@host/0"),  # an unencoded @ in the password: urlsplit splits at the last
    ("unix:///run/redis.sock?db=1&password=pw#x", "unix:///run/redis.sock?db=1&password=***#x"),  # redis-py reads this one too
    ("http://svc:pw@gateway:5006/base?q=1", "http://svc:***@gateway:5006/base?q=1"),
    ("http://user@localhost:8001", "http://user@localhost:8001"),  # no password, nothing hidden
    ("http://localhost:8001", "http://localhost:8001"),
])
def test_a_url_is_shown_with_its_password_hidden_and_the_rest_kept(url, shown):
    assert redact_url(url) == shown


@pytest.mark.parametrize("variable", ["CONDUCTOR_GATEWAY_URL", "CRM_BACKEND_URL"])
def test_an_upstream_url_with_credentials_is_refused_without_showing_them(variable):
    """Credentials there would replace each caller's own identity on every call (aiohttp refuses both at once)."""
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({variable: f"http://svc:{GATEWAY_PASSWORD}@upstream:8000"})
    assert str(refused.value) == f"{variable}: must not carry credentials (user:password@); got 'http://svc:***@upstream:8000'"


def test_a_refused_url_setting_names_it_without_its_password():
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"CONDUCTOR_GATEWAY_URL": "ftp://svc:gateway-hunter2@gateway"})
    assert "CONDUCTOR_GATEWAY_URL" in str(refused.value) and GATEWAY_PASSWORD not in str(refused.value)
    assert "ftp://svc:***@gateway" in str(refused.value)


async def test_check_serve_and_every_kind_of_request_never_show_a_password(gateway, crm, seed, locked_redis):
    auth = {"Authorization": f"Bearer {seed['token']}"}
    wrong = locked_redis.url.replace(REDIS_PASSWORD, WRONG_PASSWORD)
    shown_redis = f"redis://:***@127.0.0.1:{locked_redis.port}/0"
    async with serving(gateway.app) as gateway_url, serving(crm.app) as crm_url:
        # Upstream URLs may not carry credentials (the settings refuse them): Redis's password is the one to hide.
        env = {"REDIS_URL": locked_redis.url, "CONDUCTOR_GATEWAY_URL": gateway_url, "CRM_BACKEND_URL": crm_url,
               "REDIS_SIGNING_KEY": TEST_SIGNING_KEY}
        checked = await run_adapter_async("check", env=env)
        refused = await run_adapter_async("check", env={**env, "REDIS_URL": wrong})
        async with replica_cluster(1, gateway_url=gateway_url, crm_url=crm_url, redis_url=locked_redis.url, lease=10,
                                   prefix="secrets", logged=("",)) as ([replica], client):
            base = replica.url
            answers = [
                await client.post(base + QUALIFY, json={"lead_id": seed["leads"][0]}, headers=auth),
                await client.post(base + QUALIFY_STREAM, json={"lead_id": seed["leads"][1]}, headers=auth),
                job := await client.post(base + "/api/v1/ai/jobs", headers=auth,
                                         json={"task": "lead.qualify", "input": {"lead_id": seed["leads"][2]}}),
                await client.get(base + decode(job)["events_url"]),
                await client.get(base + "/api/v1/leads/", headers=auth),
                health := await client.get(base + "/api/v1/ai/health"),
            ]
            await replica.until(lambda: len(replica.logged("request")) == len(answers), 30, "every request's log line")
            lines = list(replica.lines)
    assert [a.status_code for a in answers] == [200, 200, 202, 200, 200, 200], [a.text[:200] for a in answers]
    assert "event: done" in answers[1].text and "event: done" in answers[3].text
    # Everything printed or answered, searched for every password (Redis's, a wrong one, the gateway's).
    printed = [*checked[1:], *refused[1:], *(json.dumps(line) for line in lines),
               *(f"{a.headers}\n{a.text}" for a in answers)]
    for password in PASSWORDS:
        assert not [text for text in printed if password in text], password
    # ... and the URLs are there, with `***`: the search looked where they are shown.
    assert checked[0] == 0 and f"ok    Redis at {shown_redis}" in checked[1]
    assert refused[0] == 1 and f"FAIL  Redis unreachable at {shown_redis}: AuthenticationError" in refused[2]
    assert f"ok    Conductor Gateway at {gateway_url}/health" in checked[1]
    assert replica.logged("startup")[0]["redis"] == shown_redis
    assert decode(health)["cache"]["status"] == "up"  # the replica used the locked Redis, with its password


async def test_health_and_the_start_up_lines_show_urls_without_their_password(make_client):
    """In process, with a password in Redis's URL (and no Redis listening): nothing logged or answered shows it."""
    closed = closed_port_url().replace("http://", f"redis://:{REDIS_PASSWORD}@") + "/0"
    settings = make_settings(redis_url=closed)
    with capture_logs() as logs:
        async with make_client(settings=settings) as client:
            health = await client.get("/api/v1/ai/health")
    for password in PASSWORDS:
        assert password not in health.text, password
        assert password not in repr(logs), password
    assert decode(health)["cache"]["status"] != "up"  # it did try the Redis named (and failed)
    [startup] = [line for line in logs if line["event"] == "startup"]
    assert startup["redis"] == redact_url(closed) and ":***@127.0.0.1:" in startup["redis"]
    assert [line["event"] for line in logs if line["log_level"] == "warning"] == ["cache.redis_unavailable"]


@pytest.mark.parametrize("via", ["structlog", "logging"])
def test_a_console_traceback_shows_no_local_variables(via):
    """On a terminal (LOG_FORMAT=console, or `auto` on a TTY: `docker run -t`), tracebacks were drawn by
    rich with every frame's locals: an internal error printed the Settings (JOB_TOKEN_SECRET,
    REDIS_SIGNING_KEY, CRM_JWT_SECRET in full up to 80 characters) and the request's bearer."""
    log = ("structlog.get_logger('adapter.test').exception('failed')" if via == "structlog" else
           "logging.getLogger('uvicorn.error').exception('Exception in ASGI application')")
    code = ("import logging, structlog\nfrom adapter import logs\nlogs.configure('info', 'console')\n"
            "def handler(secret):\n    try:\n        1 / 0\n    except ZeroDivisionError:\n"
            f"        {log}\nhandler('hunter2-' + 'not-for-logs')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "ZeroDivisionError" in done.stderr and "handler" in done.stderr  # the traceback itself is there
    assert "hunter2-not-for-logs" not in done.stderr
