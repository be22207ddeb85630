#!/usr/bin/env bash
# Container health check of the mmts-search image, installed as /usr/local/bin/mmts-healthcheck.
#
#   mmts-healthcheck URL   healthy when an HTTP GET of URL returns a status below 400
#                          (Ray head: http://127.0.0.1:8265/api/version,
#                          MLflow: http://127.0.0.1:5000/health)
#   mmts-healthcheck       healthy when `ray status` reaches the cluster: the head at
#                          RAY_ADDRESS on a worker, the local head otherwise
set -euo pipefail

if [[ $# -gt 1 ]]; then
    echo "usage: mmts-healthcheck [URL]" >&2
    exit 2
fi

if [[ $# -eq 1 ]]; then
    exec python - "$1" <<'PYTHON'
import sys
import urllib.request

url = sys.argv[1]
try:
    with urllib.request.urlopen(url, timeout=5) as response:
        status = response.status
except OSError as error:
    sys.exit(f"health check of {url} failed: {error}")
if status >= 400:
    sys.exit(f"health check of {url} failed: HTTP {status}")
PYTHON
fi

exec ray status >/dev/null
