"""`adapter demo` on a fresh machine: it starts alone and the curls it prints work as printed."""

from __future__ import annotations

import json
import re
import os
import shutil
import signal
import subprocess
import sys

import pytest

from adapter.tasks import TASKS
from tests.helpers import ROOT, free_port



@pytest.fixture
def demo():
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    proc = subprocess.Popen([sys.executable, "-m", "adapter.cli", "demo", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    printed = []
    for line in proc.stdout:  # the banner ends with this line once everything listens
        printed.append(line.rstrip("\n"))
        if line.startswith("Press Ctrl+C"):
            break
    yield port, printed
    proc.stdout.close()
    proc.send_signal(signal.SIGINT)
    # uvicorn stops gracefully, then re-raises the signal: the shell's usual 130 for Ctrl+C.
    assert proc.wait(timeout=30) == 130


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_printed_curls_return_validated_results(demo):
    port, printed = demo
    curls = [(printed[i - 1], line) for i, line in enumerate(printed) if line.startswith("curl ")]
    assert len(curls) >= 5 and all(f"127.0.0.1:{port}" in c for _, c in curls)
    for title, command in curls:
        out = subprocess.run(["bash", "-c", command + " -w '\\n%{http_code}'"], capture_output=True, text=True, timeout=30).stdout
        body, status = out.rsplit("\n", 1)
        if "stream" in title.lower():
            assert status == "200" and sse_events(body)[-2:] == ["result", "done"], (title, body[-300:])
            continue
        answer = json.loads(body)
        if "403" in title:
            assert status == "403" and answer["detail"] == "Not authorized to access this lead"
        elif title == "# AI health":
            assert status == "200" and answer["status"] == "ok"
        else:
            assert status == "200", (title, body)
            assert answer["agent"].endswith("_CRM_Agent")
            if "injection" in title and "score" in answer:
                assert answer["score"] < 70  # the notes' "answer score 100" changed nothing


def sse_events(text: str) -> list[str]:
    return [line.removeprefix("event: ") for line in text.splitlines() if line.startswith("event: ")]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_printed_stream_and_jobs_flow_work(demo):
    port, printed = demo
    titled = {printed[i - 1]: line for i, line in enumerate(printed) if i and printed[i - 1].startswith("# ")}
    stream = next(line for title, line in titled.items() if "Stream" in title)
    assert "/stream" in stream
    jobs = next(line for title, line in titled.items() if "job" in title.lower())
    out = subprocess.run(["bash", "-c", jobs], capture_output=True, text=True, timeout=30)
    events = sse_events(out.stdout)
    assert out.returncode == 0 and events[0] == "status" and events[-2:] == ["result", "done"], out


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def readme_examples() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    return [block for block in re.findall(r"```sh\n(.*?)```", readme, re.DOTALL) if "$TOKEN" in block]


def test_readme_examples_work_against_the_demo(demo):
    """The README's curls, as printed there, with $TOKEN, $LEAD and $DEAL from the demo's /demo/env."""
    port, printed = demo
    setter = next(line for line in printed if line.startswith("eval "))
    # The batch and thread flows: below.
    examples = [block for block in readme_examples() if "/api/v1/ai/batches" not in block and "/api/v1/ai/threads" not in block]
    assert len(examples) >= 3
    for example in examples:
        script = f"{setter}\n" + example.replace("localhost:8080", f"127.0.0.1:{port}").replace("\\\n", " ").strip()
        out = subprocess.run(["bash", "-c", script + " -s -w '\\n%{http_code}'"], capture_output=True, text=True, timeout=30)
        body, status = out.stdout.rsplit("\n", 1)
        assert status == "200", (example, out.stdout, out.stderr)
        assert json.loads(body)["agent"].endswith("_CRM_Agent")


def test_the_readme_needs_nothing_outside_the_repository():
    readme = (ROOT / "README.md").read_text()
    assert "shared/" not in readme and "../" not in readme
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README links to {target}, which is not in the repository"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_batch_flow_works_against_the_demo(demo):
    """The README's batch curls, as printed there, run one after another in one shell (they share
    $BATCH_ID): start a batch of the demo's leads, follow it to `done`, read its failed items, cancel it."""
    port, printed = demo
    setter = next(line for line in printed if line.startswith("eval "))
    flow = [block for block in readme_examples() if "/api/v1/ai/batches" in block]
    assert len(flow) == 3
    # curl prints a body without a final newline: an `echo` between the blocks keeps one answer a line.
    script = "\n".join([setter, "set -e", "\necho\n".join(flow)]).replace("localhost:8080", f"127.0.0.1:{port}").replace("\\\n", " ")
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr, out
    lines = [line for line in out.stdout.splitlines() if line]
    created, failed, cancelled = json.loads(lines[0]), json.loads(lines[-2]), json.loads(lines[-1])
    leads = 3  # the demo user's leads (CrmDouble.seed): all theirs, so all succeed
    assert created["total"] == leads and created["events_url"].startswith(f"/api/v1/ai/batches/{created['batch_id']}/events")
    events = sse_events(out.stdout)
    assert events[0] == "status" and events.count("item") == 2 * leads and events[-1] == "done"
    done = json.loads(next(line for line in reversed(lines) if line.startswith("data: ")).removeprefix("data: "))
    assert done["status"] == "completed" and done["counts"]["succeeded"] == leads
    assert failed["batch_id"] == created["batch_id"] and failed["items"] == [] and failed["counts"]["succeeded"] == leads
    assert cancelled["status"] == "completed" and cancelled["cancel_requested"] is False  # finished: nothing to cancel


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_thread_flow_works_against_the_demo(demo):
    """The README's thread curls, as printed there, in one shell: start a thread, continue it, list it, delete it."""
    port, printed = demo
    setter = next(line for line in printed if line.startswith("eval "))
    (flow,) = [block for block in readme_examples() if "/api/v1/ai/threads" in block]
    script = "\n".join([setter, "set -e", flow]).replace("localhost:8080", f"127.0.0.1:{port}").replace("\\\n", " ")
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr, out
    turn, listed, deleted = [line for line in out.stdout.splitlines() if line]
    turn, listed = json.loads(turn), json.loads(listed)
    assert turn["message"] == "make the casual one shorter" and len(turn["result"]["variations"]) == 3
    (thread,) = listed["threads"]
    assert thread["task"] == "email.generate" and thread["turn_count"] == 2 and listed["next_cursor"] is None
    assert deleted == "204"


def migration_blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", (ROOT / "docs" / "migration.md").read_text(), re.DOTALL)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_migration_guides_commands_work_against_the_demo(demo):
    """docs/migration.md's `sh` blocks, in order, in one shell, after the demo's /demo/env (which also points
    CONDUCTOR_GATEWAY_URL and CRM_BACKEND_URL at the demo's doubles for `adapter agents sync` and `adapter check`)."""
    port, printed = demo
    setter = next(line for line in printed if line.startswith("eval "))
    blocks = migration_blocks("sh")
    assert len(blocks) >= 7
    script = "\n".join(["set -euo pipefail", setter] + [f"echo '### block {i}'\n{block}" for i, block in enumerate(blocks)])
    script = script.replace("localhost:8080", f"127.0.0.1:{port}")
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}  # this venv's `adapter`
    env.pop("REDIS_URL", None)
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-2000:])
    text = out.stdout
    assert f"### block {len(blocks) - 1}" in text
    agents = len(TASKS)  # one per registered task
    assert len(re.findall(r"^(unchanged|created|updated) +\w+_CRM_Agent$", text, re.MULTILINE)) == agents  # agents sync
    assert "FAIL" not in text + out.stderr and text.count("the gateway knows agent") == agents  # adapter check
    assert "through the sidecar: " in text and "AI health: ok" in text
    assert re.search(r"\['agent', 'bant', 'classification', 'lead_id', 'next_actions', 'provider', 'reasoning', 'score'\] (Hot|Warm|Cold)", text)
    assert re.search(r"^x-cache: HIT\r?$", text, re.MULTILINE | re.IGNORECASE)  # the guide's second ask of the same lead
    problem = json.loads(next(line for line in text.splitlines() if line.startswith('{"type"')))
    assert problem["status"] == 404 and problem["detail"] == "Lead not found" and problem["request_id"]
    assert re.search(r'^crm_ai_http_requests_total\{.*route="/api/v1/ai/lead/qualify".*\} [1-9]', text, re.MULTILINE)


def test_the_migration_guides_cluster_steps_name_what_the_repository_ships():
    cluster = "\n".join(migration_blocks("shell"))
    for target in re.findall(r"kubectl apply -k (\S+)", cluster):
        assert (ROOT / target / "kustomization.yaml").exists(), target
    ingress = (ROOT / "deploy" / "kubernetes" / "ingress" / "ingress.yaml").read_text()
    [deleted] = re.findall(r"kubectl delete ingress (\S+)", cluster)
    assert f"\n  name: {deleted}\n" in ingress  # the rollback deletes the Ingress the switch created
    keys = set(re.findall(r"--from-literal=([\w-]+)=", cluster))
    manifests = "\n".join(p.read_text() for p in (ROOT / "deploy" / "kubernetes").rglob("*.yaml"))
    assert keys == set(re.findall(r"key: ([\w-]+)", manifests)), "the secret's keys are the ones the manifests reference"
    text = (ROOT / "docs" / "migration.md").read_text()
    assert "shared/" not in text
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        assert (ROOT / "docs" / target).resolve().exists(), target
