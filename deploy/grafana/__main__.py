"""`python -m deploy.grafana` writes deploy/grafana/crm-ai-sidecar.json; `--check` exits 1 when it differs."""

from __future__ import annotations

import sys

from . import OUTPUT, render

if __name__ == "__main__":
    if "--check" in sys.argv[1:]:
        sys.exit(0 if OUTPUT.read_text() == render() else 1)
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")
