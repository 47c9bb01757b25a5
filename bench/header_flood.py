"""Memory of `adapter serve` while one client sends 64 MiB of headers that never end.

    python -m bench.header_flood [--root DIR]

Reports the sidecar's RSS before and after, and the first bytes of its answer. DIR (default:
this checkout) selects the code to run, to compare versions.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from bench.stack import ROOT, _wait_up
from tests.helpers import free_port


def rss_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return -1


def main(root: Path) -> dict:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(root), "REDIS_URL": "", "LOG_FORMAT": "json",
           "CONDUCTOR_GATEWAY_URL": "http://127.0.0.1:9", "CRM_BACKEND_URL": "http://127.0.0.1:9"}
    sidecar = subprocess.Popen([sys.executable, "-m", "adapter.cli", "serve", "--port", str(port)], cwd=root, env=env,
                               stderr=subprocess.DEVNULL)
    try:
        _wait_up(f"http://127.0.0.1:{port}/healthz")
        before = rss_mib(sidecar.pid)
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            line = b"X-Filler: " + b"a" * 8000 + b"\r\n"
            sent = 0
            try:
                while sent < 64 * 1024 * 1024:
                    s.sendall(line)
                    sent += len(line)
                s.sendall(b"\r\n")
            except OSError:
                pass
            try:
                answer = s.recv(60)
            except OSError as exc:
                answer = repr(exc).encode()
        return {"root": str(root), "rss_mib_before": before, "rss_mib_after": rss_mib(sidecar.pid), "answer": answer}
    finally:
        sidecar.terminate()
        sidecar.wait(timeout=30)


if __name__ == "__main__":
    args = sys.argv[1:]
    print(main(Path(args[args.index("--root") + 1]).resolve() if "--root" in args else ROOT))
