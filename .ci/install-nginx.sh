#!/usr/bin/env bash
# Installs Debian's nginx-light for tests/test_nginx_intermediary.py (the buffering intermediary
# that ignores client aborts). Idempotent: does nothing when nginx is already installed. The
# tests start their own nginx on a free port with a temporary prefix; the package's own service
# is neither needed nor started here.
set -euo pipefail

if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
    exit 0
fi

sudo_=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo_="sudo -n"
    else
        echo "install-nginx: not root and no sudo; cannot install nginx" >&2
        exit 1
    fi
fi

log=$(mktemp)
policy=""
cleanup() {
    rm -f "$log"
    if [ -n "$policy" ]; then $sudo_ rm -f "$policy"; fi
}
trap cleanup EXIT
export DEBIAN_FRONTEND=noninteractive
# The package's postinst would start nginx on port 80; a temporary policy-rc.d answering 101
# ("action forbidden") keeps it from starting any service during the install.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' | $sudo_ tee "$policy" >/dev/null
    $sudo_ chmod +x "$policy"
fi
if ! { $sudo_ apt-get update -qq && \
       $sudo_ apt-get install -y -qq --no-install-recommends nginx-light; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "install-nginx: apt-get install nginx-light failed" >&2
    exit 1
fi
