"""`hangup stats [URL]`: a running proxy's totals at a glance, without Grafana.

Reads the proxy's /metrics (the same text Prometheus scrapes) and prints the summary the demo
prints, plus spend and savings per client. With `--workers N` any worker's /metrics already
returns the sum over all workers, so one read describes the whole server.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import schema, summarize_text

TOKEN_ENV = "HANGUP_METRICS_TOKEN"
DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_CONFIG = "config/hangup.yaml"  # as for `hangup run`
# A proxy listening on every address is read on loopback.
_WILDCARD = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
# A scrape of a healthy proxy is a few hundred KiB at most (see docs/metrics.md on series).
_MAX_BODY = 64 * 1024 * 1024


# No HTTP(S)_PROXY from the environment: the proxy's /metrics is read directly (a corporate
# proxy would not reach 127.0.0.1, and must not be handed the metrics token).
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class StatsError(Exception):
    """Why the metrics could not be read, as one line for the user."""


def metrics_url(url: str) -> str:
    """The /metrics URL for a base URL (`http://host:port`), or the URL itself if it has a path."""
    if "://" not in url:
        url = "http://" + url
    scheme, _, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    if not slash or not path:
        return f"{scheme}://{host}/metrics"
    return url


def fetch(url: str, token: str | None, timeout_s: float = 5.0) -> str:
    request = urllib.request.Request(url, headers={"Accept": "text/plain"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            body: bytes = response.read(_MAX_BODY)
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            hint = "a wrong token" if token else f"no token: pass --token or set {TOKEN_ENV}"
            raise StatsError(f"{url} needs metrics.bearer_token (401, {hint})") from exc
        raise StatsError(f"{url} answered HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatsError(f"cannot read {url}: {reason}") from exc
    text = body.decode("utf-8", errors="replace")
    if schema.BUILD_INFO.name not in text:
        raise StatsError(f"{url} does not look like a hangup /metrics endpoint")
    return text


def by_client(text: str) -> list[str]:
    """One line per client that used or saved anything: requests, spend and savings."""
    requests: dict[str, float] = defaultdict(float)
    used: dict[str, float] = defaultdict(float)
    saved: dict[str, float] = defaultdict(float)
    tokens: dict[str, float] = defaultdict(float)
    saved_tokens: dict[str, float] = defaultdict(float)
    sums = {
        schema.REQUESTS.name: requests,
        schema.COST.name: used,
        schema.COST_SAVED.name: saved,
        schema.TOKENS.name: tokens,
        schema.TOKENS_SAVED.name: saved_tokens,
    }
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            target = sums.get(sample.name)
            client = sample.labels.get("client")
            if target is not None and client is not None:
                target[client] += sample.value
    lines = []
    for client in sorted(requests, key=lambda c: (-used[c], -requests[c], c)):
        lines.append(
            f"  {client:<20} {requests[client]:>8,.0f} requests  "
            f"{tokens[client]:>10,.0f} tokens  ${used[client]:,.4f} used  "
            f"~{saved_tokens[client]:,.0f} tokens / ~${saved[client]:,.4f} saved"
        )
    return lines


def render(url: str, text: str) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    out = [f"hangup at {url} ({stamp})", "", summarize_text(text)]
    clients = by_client(text)
    if clients:
        out += ["", "by client:", *clients]
    return "\n".join(out)


def from_config(path: str | None) -> tuple[str, str | None] | None:
    """(metrics URL, scrape token) of the proxy a config file describes, when there is one:
    `--config`, else $HANGUP_CONFIG, else config/hangup.yaml if present. None without a file."""
    from proxy.config import ConfigError
    from proxy.config_file import load_config

    chosen = path or os.environ.get("HANGUP_CONFIG") or DEFAULT_CONFIG
    if path is None and not os.environ.get("HANGUP_CONFIG") and not Path(chosen).exists():
        return None
    try:
        config = load_config(chosen)
    except ConfigError as exc:
        raise StatsError(f"config error: {exc}") from exc
    host = _WILDCARD.get(config.listen.host, config.listen.host)
    shown = f"[{host}]" if ":" in host else host
    token = config.metrics.bearer_token
    return (
        f"http://{shown}:{config.listen.port}{config.metrics.path}",
        token.get_secret_value() if token is not None else None,
    )


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="hangup stats",
        description="Print a running hangup's totals: requests by outcome, tokens used and "
        "saved, dollars used and saved, cancel propagation, and spend per client.",
    )
    p.add_argument(
        "url",
        nargs="?",
        help="the proxy's base URL or its metrics URL (default: the listen address and "
        f"metrics.path of the config file, else {DEFAULT_URL})",
    )
    p.add_argument(
        "--config",
        help=f"read the URL and metrics.bearer_token from this config (default: $HANGUP_CONFIG, "
        f"else {DEFAULT_CONFIG} if present)",
    )
    p.add_argument(
        "--token",
        help=f"metrics.bearer_token, if the proxy sets one (default: ${TOKEN_ENV}, else the "
        "config's)",
    )
    p.add_argument(
        "--watch",
        type=float,
        metavar="N",
        help="print again every N seconds until Ctrl-C",
    )
    args = p.parse_args(argv)
    if args.watch is not None and args.watch <= 0:
        p.error("--watch must be a positive number of seconds")
    configured: tuple[str, str | None] | None = None
    if args.url is None or args.config is not None:
        try:
            configured = from_config(args.config)
        except StatsError as exc:
            print(f"hangup stats: {exc}", file=sys.stderr)
            return 2
    if args.url is not None:
        url = metrics_url(args.url)
    else:
        url = configured[0] if configured is not None else metrics_url(DEFAULT_URL)
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if token is None and configured is not None:
        token = configured[1]
    clear = args.watch is not None and sys.stdout.isatty()
    try:
        while True:
            try:
                text = fetch(url, token)
            except StatsError as exc:
                print(f"hangup stats: {exc}", file=sys.stderr)
                if args.watch is None:
                    return 1
            else:
                if clear:
                    print("\033[H\033[J", end="")
                print(render(url, text), flush=True)
            if args.watch is None:
                return 0
            if not clear:
                print(flush=True)
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0
