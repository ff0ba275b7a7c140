#!/usr/bin/env bash
# The dashboard in a real headless browser: installs Debian's chromium and chromium-driver (and selenium),
# starts `streamlit run app/streamlit_app.py` on a free loopback port, and runs tests/app/browser_check.py
# against it (every page renders without an exception, plotly charts drawn, URL state works).
# Screenshots go to .ci/artifacts/ (gitignored).  Exit status non-zero on any failure.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ARTIFACTS=.ci/artifacts
mkdir -p "$ARTIFACTS"
started=$(date +%s)

if ! command -v apt-get >/dev/null 2>&1; then
    echo "browser check skipped: apt-get is not available to install chromium"
    exit 0
fi
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    echo "chromium present: $(chromium --version 2>/dev/null | head -n 1)"
else
    echo "installing chromium and chromium-driver (apt-get) ..."
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi

python -c "import streamlit, plotly" 2>/dev/null || python -m pip install -q -e ".[app]"
python -c "import selenium" 2>/dev/null || python -m pip install -q "selenium==4.50.0"

port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
url="http://127.0.0.1:${port}"
log="$ARTIFACTS/streamlit.log"
python -m streamlit run app/streamlit_app.py --server.headless true --server.address 127.0.0.1 \
    --server.port "$port" --browser.gatherUsageStats false --server.fileWatcherType none >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT

for _ in $(seq 1 120); do
    if python -c "import urllib.request, sys; sys.exit(0 if urllib.request.urlopen('${url}/_stcore/health', timeout=2).read() == b'ok' else 1)" 2>/dev/null; then
        break
    fi
    if ! kill -0 "$server" 2>/dev/null; then
        echo "browser check: the streamlit server exited; its log:" >&2
        cat "$log" >&2
        exit 1
    fi
    sleep 1
done
echo "streamlit serving at $url"

set +e
python tests/app/browser_check.py --url "$url" --out "$ARTIFACTS"
rc=$?
set -e
echo "browser check finished in $(( $(date +%s) - started )) s (exit $rc)"
if [ "$rc" -ne 0 ]; then
    echo "streamlit log: $log" >&2
fi
exit "$rc"
