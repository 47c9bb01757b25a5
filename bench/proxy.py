"""Pass-through latency: the CRM double directly, through the sidecar, and through nginx, in one run.

    python -m bench.proxy [N]      (needs Debian's nginx: apt-get install nginx)

Each iteration asks the three for the same lead, one after the other, on kept-alive
connections, so all three see the same machine state.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.stack import Stack, _wait_up, percentile

NGINX_PORT = 18104
CONF = """
worker_processes 1;
error_log {tmp}/error.log warn;
pid {tmp}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
    upstream crm {{ server 127.0.0.1:{crm}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://crm;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
"""


def main(n: int) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    with Stack() as stack, tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp, "nginx.conf")
        conf.write_text(CONF.format(tmp=tmp, crm=stack.crm_port, port=NGINX_PORT))
        proc = subprocess.Popen([nginx, "-c", str(conf), "-p", tmp, "-g", "daemon off;"])
        try:
            _wait_up(f"http://127.0.0.1:{NGINX_PORT}/health")
            auth = {"Authorization": f"Bearer {stack.seed['token']}"}
            path = f"/api/v1/leads/{stack.seed['leads'][0]}"
            targets = {"direct": stack.crm_url, "sidecar": stack.url, "nginx": f"http://127.0.0.1:{NGINX_PORT}"}
            timings: dict[str, list[float]] = {k: [] for k in targets}
            with httpx.Client(headers=auth) as client:
                for i in range(n + 100):
                    for name, base in targets.items():
                        t0 = time.perf_counter()
                        r = client.get(base + path)
                        elapsed = (time.perf_counter() - t0) * 1000
                        assert r.status_code == 200, (name, r.status_code, r.text[:200])
                        if i >= 100:
                            timings[name].append(elapsed)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    print(f"{n} sequential GET {path.rsplit('/', 1)[0]}/<id> per target (ms)")
    print(f"{'':10s}{'p50':>8s}{'p99':>8s}{'added p50':>11s}{'added p99':>11s}")
    d50, d99 = percentile(timings["direct"], 50), percentile(timings["direct"], 99)
    for name, samples in timings.items():
        p50, p99 = percentile(samples, 50), percentile(samples, 99)
        print(f"{name:10s}{p50:8.3f}{p99:8.3f}{p50 - d50:11.3f}{p99 - d99:11.3f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
