#!/usr/bin/env bash
# Installs Debian's prometheus package (prometheus + promtool) for tests/test_metrics_prometheus.py.
# Idempotent: does nothing when both binaries are already on PATH. Quiet unless something fails.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    exit 0
fi

sudo_=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo_="sudo -n"
    else
        echo "install-prometheus: not root and no sudo; cannot install prometheus" >&2
        exit 1
    fi
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
# The package's postinst may try to start a service; on CI there is no init to start it with,
# and the tests start their own prometheus on a free port anyway.
if ! { $sudo_ apt-get update -qq && \
       $sudo_ apt-get install -y -qq --no-install-recommends prometheus; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "install-prometheus: apt-get install prometheus failed" >&2
    exit 1
fi

command -v prometheus >/dev/null && command -v promtool >/dev/null || {
    echo "install-prometheus: package installed but prometheus/promtool not on PATH" >&2
    exit 1
}
