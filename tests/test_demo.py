"""`adapter demo` on a fresh machine: it starts alone and the curls it prints work as printed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import _free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def demo():
    port = _free_port()
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
        answer = json.loads(body)
        if "403" in title:
            assert status == "403" and answer["detail"] == "Not authorized to access this lead"
        elif "health" in title.lower():
            assert status == "200" and answer["status"] == "ok"
        else:
            assert status == "200", (title, body)
            assert answer["agent"].endswith("_CRM_Agent")
            if "injection" in title:
                assert answer["score"] < 70  # the notes' "answer score 100" changed nothing
