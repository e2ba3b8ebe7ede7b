"""A real Prometheus server for tests: started on a free loopback port, queried over its HTTP API,
always stopped. Also extracts the PromQL of the shipped dashboard and alert rules.

Binaries come from Debian's `prometheus` package (.ci/install-prometheus.sh).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "hangup-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
SCRAPE_EXAMPLE = ROOT / "deploy" / "prometheus" / "prometheus.yml"


@dataclass(frozen=True)
class Binaries:
    prometheus: str
    promtool: str


def find_binaries() -> Binaries:
    """The binaries, or a skip (a failure on CI, where .ci/run installs them)."""
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if prometheus and promtool:
        return Binaries(prometheus, promtool)
    reason = "prometheus/promtool not on PATH; install them with: bash .ci/install-prometheus.sh"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI runs that script, so this is a broken install step)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Prometheus:
    """One server process. Use through the `prometheus` fixture, which stops it."""

    def __init__(self, binary: str, workdir: Path, config: dict[str, Any]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log_path = workdir / "prometheus.log"
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self._log = self._log_path.open("wb")
        self._proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def log(self) -> str:
        return self._log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        self._log.close()

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise AssertionError(f"prometheus exited early:\n{self.log()}")
            try:
                async with session.get(f"{self.url}/-/ready") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"prometheus not ready after {timeout}s:\n{self.log()}")
            await asyncio.sleep(0.1)

    async def query(self, session: aiohttp.ClientSession, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector; raises on a PromQL error."""
        async with session.get(f"{self.url}/api/v1/query", params={"query": expr}) as resp:
            body = await resp.json()
        if body.get("status") != "success":
            raise AssertionError(f"{expr}\n  -> {body.get('errorType')}: {body.get('error')}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def wait_for(
        self, session: aiohttp.ClientSession, expr: str, timeout: float = 15.0
    ) -> list[dict[str, Any]]:
        """Poll until `expr` returns a non-empty result."""
        deadline = time.monotonic() + timeout
        while True:
            result = await self.query(session, expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"no data for {expr} after {timeout}s:\n{self.log()}")
            await asyncio.sleep(0.2)


def scrape_config(
    targets: list[str], *, metrics_path: str = "/metrics", bearer_token: str | None = None
) -> dict[str, Any]:
    job: dict[str, Any] = {
        "job_name": "hangup",
        "metrics_path": metrics_path,
        "scrape_interval": "1s",
        "scrape_timeout": "900ms",
        "static_configs": [{"targets": targets}],
    }
    if bearer_token is not None:
        job["authorization"] = {"type": "Bearer", "credentials": bearer_token}
    return {"global": {"evaluation_interval": "1s"}, "scrape_configs": [job]}


def finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in result)


# --- the shipped PromQL ----------------------------------------------------------------------


def substitute(expr: str, *, route: str = "chat", model: str = "gpt-4o-mini|llama-3.1-8b") -> str:
    """Replace Grafana's built-in and our template variables by what Grafana would send; the
    default model is a multi-select of two."""
    values = {
        "$__rate_interval": "1m",
        "$__interval": "15s",
        "$__range": "1h",
        "${route:regex}": route,
        "${model:regex}": model,
        "$route": route,
        "$model": model,
    }
    for var, replacement in values.items():
        expr = expr.replace(var, replacement)
    leftover = re.search(r"\$\{?\w+", expr)
    assert leftover is None, f"unsubstituted variable {leftover.group(0)} in {expr}"
    return expr


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, expr) for every panel target of the dashboard."""
    out = []
    for panel in iter_panels(load_dashboard()["panels"]):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    return out


LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")


def variable_queries() -> list[tuple[str, str, str]]:
    """(variable, series selector, label) for every `label_values(...)` template variable."""
    out = []
    for var in load_dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = LABEL_VALUES.match(query.strip())
        assert m, f"variable {var['name']}: expected label_values(selector, label), got {query}"
        out.append((var["name"], m["selector"], m["label"]))
    return out


def alert_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [
        (f"alert {rule.get('alert') or rule.get('record')}", rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]


METRIC_NAME = re.compile(r"\bhangup_[a-z0-9_]+\b")


def metric_names(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(expr))
