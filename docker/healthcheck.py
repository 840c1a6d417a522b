#!/usr/bin/env python3
"""Container health check: exit 0 when the server on $HEALTH_URL (or localhost:$PORT) answers
/healthz with status ok."""

import json
import os
import sys
import urllib.request

url = os.environ.get("HEALTH_URL") or f"http://127.0.0.1:{os.environ.get('RELAY_PORT', '8080')}"
try:
    with urllib.request.urlopen(f"{url}/healthz", timeout=3) as response:
        sys.exit(0 if json.load(response).get("status") == "ok" else 1)
except Exception as exc:  # any failure means "unhealthy"
    print(f"unhealthy: {exc}", file=sys.stderr)
    sys.exit(1)
