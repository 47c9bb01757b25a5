"""Latency the sidecar adds to an uncached call, sequential calls, against the doubles directly.

    python -m bench.overhead [N]

Per iteration, side by side on the same connections: (a) the CRM double's GET of
the lead plus the gateway double's execute, called directly, one after the other;
(b) the same question through the sidecar with `Cache-Control: no-store`, which
makes exactly those two upstream calls. The difference is what the sidecar adds.
"""

from __future__ import annotations

import sys
import time

import httpx

from bench.stack import Stack, lead_qualify_input, percentile


def run(n: int) -> dict[str, float]:
    # Write-back off: the direct baseline makes no PATCH either.
    with Stack(env={"RATE_LIMIT_LEAD_QUALIFY": "off", "CRM_WRITE_BACK": "false"}) as stack, httpx.Client() as client:
        token, lead = stack.seed["token"], stack.seed["leads"][0]
        auth = {"Authorization": f"Bearer {token}"}
        record = client.get(f"{stack.crm_url}/api/v1/leads/{lead}", headers=auth).json()
        body = {"input_text": lead_qualify_input(record), "context_mode": "stateless", "instance_id": "i", "conversation_id": "c"}
        direct, through = [], []
        for i in range(n + 50):  # the first 50 warm up connections and caches
            t0 = time.perf_counter()
            r1 = client.get(f"{stack.crm_url}/api/v1/leads/{lead}", headers=auth)
            r2 = client.post(f"{stack.gateway_url}/api/agents/LeadQualifier_CRM_Agent/execute", json=body)
            t1 = time.perf_counter()
            r3 = client.post(f"{stack.url}/api/v1/ai/lead/qualify", json={"lead_id": lead}, headers={**auth, "Cache-Control": "no-store"})
            t2 = time.perf_counter()
            assert r1.status_code == r2.status_code == r3.status_code == 200, (r1.text, r2.text, r3.text)
            assert r3.headers["x-cache"] == "BYPASS"
            if i >= 50:
                direct.append((t1 - t0) * 1000)
                through.append((t2 - t1) * 1000)
    added = [b - a for a, b in zip(direct, through)]
    return {
        "direct_p50": percentile(direct, 50), "direct_p99": percentile(direct, 99),
        "sidecar_p50": percentile(through, 50), "sidecar_p99": percentile(through, 99),
        "added_p50": percentile(through, 50) - percentile(direct, 50),
        "added_p99": percentile(through, 99) - percentile(direct, 99),
        "added_pairwise_p50": percentile(added, 50),
    }


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    result = run(n)
    print(f"{n} sequential uncached lead qualifications (ms)")
    for key, value in result.items():
        print(f"  {key:20s} {value:8.3f}")
