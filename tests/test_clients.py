"""Named clients, end to end through the `hangup` command: who spent and saved what shows in the
access log and in /metrics under the client's name, and no key value appears anywhere (log
output, scrape). The access log's other new fields (address, user agent, attempts) and its
text format are checked here too, as an operator reads them."""

from __future__ import annotations

import re
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.logs import access_fields
from proxy.sim import SimulatedProvider
from proxy.tracing.context import TraceIds
from tests import test_metrics_prometheus as prometheus_tests
from tests.cli_support import (
    ROOT,
    HangupProcess,
    Line,
    one_per_request,
    owner_of,
    sim_config,
    wait_ready,
    write_config,
)
from tests.metrics_support import parse, total
from tests.prometheus_support import dashboard_exprs, scrape_config, substitute
from tests.support import RawClient
from tests.test_metrics_prometheus import StartPrometheus
from tests.test_tracing_attributes import full_record

# Not sk-shaped: the log redaction would hide sk- keys and so mask a leak.
# The real-Prometheus fixtures of the metrics contract tests, used here as they are.
binaries = prometheus_tests.binaries
start_prometheus = prometheus_tests.start_prometheus

KEY_A = "team-a-6f1c0e2d9b8a7f6e5d4c"
KEY_BARE = "bare-key-0a1b2c3d4e5f60718293"
METRICS_TOKEN = "metrics-token-3c2b1a0f9e8d"
SECRETS = (KEY_A, KEY_BARE, METRICS_TOKEN)
MODEL = "gpt-4o-mini"
PRICE = {"input_per_mtok": 2.0, "output_per_mtok": 8.0}
# What a header value can carry past the HTTP parser (which refuses control characters): a tab,
# quotes, a backslash, UTF-8 and length.
HOSTILE_UA = 'evil\t"red"\\ caf\u00e9 ' + "A" * 400


@pytest.fixture
def sim_tokens_per_s() -> float:
    return 50.0  # slow enough that a client can hang up mid-stream


def clients_config(upstream: str | None, **top: Any) -> dict[str, Any]:
    assert upstream is not None
    data = sim_config(
        upstream,
        auth={"keys": [{"name": "team-a", "key": KEY_A}, KEY_BARE]},
        metrics={"bearer_token": METRICS_TOKEN},
        prices={MODEL: PRICE},
        **top,
    )
    # Billed like a hosted provider whose bill stops at a hang-up, so hanging up saves dollars
    # (a loopback upstream is otherwise self-hosted: tokens saved, no dollars).
    data["upstreams"]["sim"]["billing"] = {"stream": "stops"}
    return data


def chat_body(stream: bool, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": "Tell me a story."}]
    return {"model": MODEL, "stream": stream, "messages": messages, **extra}


async def run_traffic(url: str) -> None:
    """team-a: one stream read whole, one hung up after 3 chunks (hostile User-Agent);
    key-1 (the bare key): one plain answer; one wrong key; one request without a key."""
    async with aiohttp.ClientSession() as session:
        for request_id, key, stream in (
            ("a-complete", KEY_A, True),
            ("bare-complete", KEY_BARE, False),
            ("wrong-key", "sk-not-a-configured-key-0000", False),
        ):
            async with session.post(
                f"{url}/v1/chat/completions",
                json=chat_body(stream),
                headers={
                    "authorization": f"Bearer {key}",
                    "x-request-id": request_id,
                    "user-agent": "OpenAI/Python 1.99.0",
                },
            ) as response:
                await response.read()
                assert response.status == (401 if request_id == "wrong-key" else 200)
        async with session.post(
            f"{url}/v1/chat/completions", json=chat_body(False), headers={"x-request-id": "no-key"}
        ) as response:
            assert response.status == 401
    host, port = url.removeprefix("http://").rsplit(":", 1)
    client = await RawClient.connect(host, int(port))
    await client.post_json(
        "/v1/chat/completions",
        chat_body(True, max_tokens=500, stream_options={"include_usage": True}),
        {"authorization": f"Bearer {KEY_A}", "x-request-id": "a-cancel", "user-agent": HOSTILE_UA},
    )
    await client.read_until(lambda got: got.count(b"data: ") >= 3)
    client.close()


async def scrape(url: str, token: str | None = METRICS_TOKEN) -> tuple[int, str]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(url + "/metrics", headers=headers) as r,
    ):
        return r.status, await r.text()


async def test_named_clients_in_the_log_and_metrics_and_no_key_anywhere(
    sim: SimulatedProvider, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "hangup.yaml", clients_config(sim.base_url))
    proc = HangupProcess("--config", str(config))
    try:
        await proc.start()
        url = await proc.listening_url()
        await run_traffic(url)
        await proc.wait_line(lambda _: len(proc.access_lines()) >= 5, 10, "five access-log lines")
        status, text = await scrape(url)
        assert status == 200
    finally:
        await proc.close()

    lines = one_per_request(proc.access_lines())
    assert {rid: line["client"] for rid, line in lines.items()} == {
        "a-complete": "team-a",
        "a-cancel": "team-a",
        "bare-complete": "key-1",
        "wrong-key": None,
        "no-key": None,
    }
    for line in lines.values():
        assert line["client_address"] == "127.0.0.1"
    assert lines["a-complete"]["user_agent"] == "OpenAI/Python 1.99.0"
    assert lines["a-complete"]["upstream_attempts"] == 1
    assert lines["wrong-key"]["upstream_attempts"] == 0
    assert lines["a-cancel"]["outcome"] == "client_cancelled"
    ua = lines["a-cancel"]["user_agent"]
    # Bounded, printable ASCII, no quotes or escapes: safe in any log viewer or text line.
    assert len(ua) <= 256 + 3 and ua.endswith("...")
    assert re.fullmatch(r"[\x20-\x7e]*", ua) and '"' not in ua and "\\" not in ua
    assert ua.startswith("evil??red?? caf? AAA")

    series = parse(text)
    requests = {
        c: total(series, "hangup_requests_total", client=c)
        for c in ("team-a", "key-1", "none", "anonymous")
    }
    assert requests == {"team-a": 2, "key-1": 1, "none": 2, "anonymous": 0}
    a_cost = total(series, "hangup_cost_usd_total", client="team-a")
    bare_cost = total(series, "hangup_cost_usd_total", client="key-1")
    assert a_cost > 0 and bare_cost > 0
    assert a_cost + bare_cost == pytest.approx(total(series, "hangup_cost_usd_total"))
    assert total(series, "hangup_cost_saved_usd_total", client="team-a") > 0
    assert total(series, "hangup_tokens_saved_total", client="team-a") > 0
    assert total(series, "hangup_cost_saved_usd_total", client="key-1") == 0
    a_tokens = total(series, "hangup_tokens_total", client="team-a")
    logged = sum(
        lines[r]["tokens"]["prompt"] + lines[r]["tokens"]["completion"]
        for r in ("a-complete", "a-cancel")
    )
    assert a_tokens == logged > 0

    # No key, and not the scrape token, in anything hangup printed or exported.
    for secret in SECRETS:
        assert secret not in proc.text
        assert secret not in text


def stats_counts(output: str) -> dict[str, float]:
    """`requests  N: completed N, ...` of the summary, as numbers."""
    match = re.search(r"^requests\s+([\d,]+)(?::\s*(.*))?$", output, re.M)
    assert match, output
    counts = {"total": float(match.group(1).replace(",", ""))}
    for part in (match.group(2) or "").split(", "):
        if part:
            name, n = part.rsplit(" ", 1)
            counts[name] = float(n.replace(",", ""))
    return counts


async def run_stats(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """`hangup stats ARGS` in a subprocess: its exit code and everything it printed. An HTTP
    proxy in the environment that nothing listens on: stats must read /metrics directly."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
    proxy_env = {"http_proxy": dead, "HTTP_PROXY": dead, "no_proxy": "", "NO_PROXY": ""}
    proc = HangupProcess("stats", *args, env={**proxy_env, **(env or {})})
    try:
        await proc.start()
        code = await proc.wait_exit(timeout=20)
    finally:
        await proc.close()
    return code, proc.text


async def test_stats_reads_a_running_proxy(sim: SimulatedProvider, tmp_path: Path) -> None:
    config = write_config(tmp_path / "hangup.yaml", clients_config(sim.base_url))
    proc = HangupProcess("--config", str(config))
    try:
        await proc.start()
        url = await proc.listening_url()
        await run_traffic(url)
        await proc.wait_line(lambda _: len(proc.access_lines()) >= 5, 10, "five access lines")
        _, text = await scrape(url)

        code, out = await run_stats(url, "--token", METRICS_TOKEN)
        assert code == 0, out
        assert stats_counts(out) == {
            "total": 5,
            "completed": 2,
            "client_cancelled": 1,
            "rejected": 2,
        }
        series = parse(text)
        used = total(series, "hangup_cost_usd_total")
        saved = total(series, "hangup_cost_saved_usd_total")
        assert f"${used:,.4f} used" in out and f"~${saved:,.4f} saved" in out
        team_a = next(line for line in out.splitlines() if line.strip().startswith("team-a"))
        assert "2 requests" in team_a
        a_used = total(series, "hangup_cost_usd_total", client="team-a")
        assert f"${a_used:,.4f} used" in team_a
        assert "cancel -> close p50" in out

        # Without a URL or token: both from the config file (its listen address and
        # metrics.bearer_token), here a copy of the running proxy's with its real port.
        port = int(url.rsplit(":", 1)[1])
        running = clients_config(sim.base_url, listen={"host": "0.0.0.0", "port": port})
        copy = write_config(tmp_path / "running.yaml", running)
        code, out = await run_stats("--config", str(copy))
        assert code == 0, out
        assert f"hangup at http://127.0.0.1:{port}/metrics" in out
        assert stats_counts(out)["total"] == 5

        # The token from the environment works too; without one, a single clear line.
        code, out = await run_stats(url, env={"HANGUP_METRICS_TOKEN": METRICS_TOKEN})
        assert code == 0 and stats_counts(out)["total"] == 5
        code, out = await run_stats(url, env={"HANGUP_METRICS_TOKEN": ""})
        assert code == 1
        assert "needs metrics.bearer_token (401" in out and "Traceback" not in out

        # --watch prints again and again until Ctrl-C, which ends it quietly with 0.
        watch = HangupProcess("stats", url, "--token", METRICS_TOKEN, "--watch", "0.2")
        try:
            await watch.start()
            await watch.wait_line(
                lambda _: watch.text.count("hangup at ") >= 3, 20, "three refreshes"
            )
            watch.signal(signal.SIGINT)
            assert await watch.wait_exit(timeout=10) == 0
        finally:
            await watch.close()
        # (6 requests by now: the refused token-less scrape above is a rejected request too)
        assert watch.text.count("\nrequests        6:") >= 3 and "Traceback" not in watch.text
    finally:
        await proc.close()
    code, out = await run_stats(url)
    assert code == 1 and "cannot read" in out and "Traceback" not in out
    for secret in SECRETS:
        assert secret not in out


async def test_text_log_format_is_one_readable_line_per_request(
    sim: SimulatedProvider, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "hangup.yaml",
        clients_config(sim.base_url, logging={"format": "text"}),
    )
    proc = HangupProcess("--config", str(config))
    try:
        await proc.start()
        listening = await proc.wait_line(
            lambda ln: "listening on http://" in str(ln.get("msg")), 20, "the listening line"
        )
        found = re.search(r"listening on (http://[\d.]+:\d+)", str(listening["msg"]))
        assert found is not None
        url = found.group(1)
        await run_traffic(url)

        def request_lines() -> list[Line]:
            return [ln for ln in proc.lines if " /v1/chat/completions " in str(ln.get("msg"))]

        await proc.wait_line(lambda _: len(request_lines()) >= 5, 10, "five request lines")
    finally:
        await proc.close()
    by_id = {}
    for line in request_lines():
        text = str(line["msg"])
        assert line.get("raw") is True, "the text format must not be JSON"
        match = re.search(r"request_id=(\S+)", text)
        assert match is not None, text
        by_id[match.group(1)] = text
    assert set(by_id) == {"a-complete", "a-cancel", "bare-complete", "wrong-key", "no-key"}
    assert re.match(
        r"\d{4}-\d\d-\d\dT[\d:.]+Z INFO +POST /v1/chat/completions 200 completed [\d.]+ms "
        r"client=team-a route=default model=gpt-4o-mini tokens=~?\d+\+16 cost=\$[\d.]+ ",
        by_id["a-complete"],
    ), by_id["a-complete"]
    assert "client_cancelled" in by_id["a-cancel"] and "saved=~" in by_id["a-cancel"]
    assert " 401 rejected " in by_id["wrong-key"] and "error=" in by_id["wrong-key"]
    for secret in SECRETS:
        assert secret not in proc.text


async def test_stats_sums_every_worker_of_a_multiprocess_proxy(
    sim: SimulatedProvider, tmp_path: Path
) -> None:
    """`--workers 2`: requests served by both workers (the kernel says which process held each
    connection), and every `hangup stats` answer, whichever worker serves it, counts all."""
    config = write_config(tmp_path / "hangup.yaml", clients_config(sim.base_url))
    proc = HangupProcess("--config", str(config), "--workers", "2", env={"TMPDIR": str(tmp_path)})
    try:
        await proc.start()
        url = await proc.listening_url()
        listening = await proc.wait_events("listening", 3, timeout=20)
        pids = sorted({int(line["pid"]) for line in listening[1:]})
        assert len(pids) == 2, listening
        await wait_ready(url)
        host, port = url.removeprefix("http://").rsplit(":", 1)
        served: dict[int, int] = dict.fromkeys(pids, 0)
        # Short streams: the connection is still open when the kernel is asked who holds it.
        body = chat_body(True)
        sent = 0
        while min(served.values()) < 2 and sent < 60:
            client = await RawClient.connect(host, int(port))
            local_port = client.writer.get_extra_info("sockname")[1]
            await client.post_json(
                "/v1/chat/completions",
                body,
                {"authorization": f"Bearer {KEY_A}", "connection": "close"},
            )
            await client.read_until(lambda got: b"data: " in got)
            owner = owner_of(int(port), local_port, pids)
            await client.read_to_eof()
            client.close()
            assert owner is not None
            served[owner] += 1
            sent += 1
        assert min(served.values()) >= 2, served
        await proc.wait_line(lambda _: len(proc.access_lines()) >= sent, 10, "every access line")
        for _ in range(4):
            code, out = await run_stats(url, "--token", METRICS_TOKEN)
            assert code == 0, out
            assert stats_counts(out) == {"total": sent, "completed": sent}
            assert re.search(rf"^ +team-a +{sent} requests ", out, re.M), out
    finally:
        await proc.close()
    print(f"\n--workers 2: requests per worker {served}; stats counted {sent} each time")


async def test_dashboard_client_panels_show_each_clients_spend_in_prometheus(
    sim: SimulatedProvider, tmp_path: Path, start_prometheus: StartPrometheus
) -> None:
    """The dashboard's per-client panels, evaluated by a real Prometheus scraping a proxy that
    served two named clients, give each client's own figures from the scrape."""
    config = write_config(tmp_path / "hangup.yaml", clients_config(sim.base_url))
    proc = HangupProcess("--config", str(config))
    try:
        await proc.start()
        url = await proc.listening_url()
        async with aiohttp.ClientSession() as session:
            target = url.removeprefix("http://")
            prom = start_prometheus(scrape_config([target], bearer_token=METRICS_TOKEN))
            await prom.wait_ready(session)
            await prom.wait_for(session, f'up{{instance="{target}"}} == 1')
            # Twice with a scrape between: increase() needs the series to exist, then move.
            for run in (1, 2):
                await run_traffic(url)
                await prom.wait_for(session, f"sum(hangup_requests_total) == {run * 5}")
            _, text = await scrape(url)
            series = parse(text)
            panels = {
                where: expr
                for where, expr in dashboard_exprs()
                if "client" in where.lower() and "by (client)" in expr
            }
            assert len(panels) == 4, panels
            seen: dict[str, dict[str, float]] = {}
            for where, expr in panels.items():
                result = await prom.query(session, substitute(expr, route="default", model=MODEL))
                seen[where] = {r["metric"]["client"]: float(r["value"][1]) for r in result}
    finally:
        await proc.close()

    def panel(word: str) -> dict[str, float]:
        return next(v for k, v in seen.items() if word in k)

    spent, saved = panel("Spent by client"), panel("Saved by client")
    assert set(spent) >= {"team-a", "key-1"} and "none" not in spent
    # increase() over the range extrapolates, so compare shares, not absolute values.
    a_share = total(series, "hangup_cost_usd_total", client="team-a") / total(
        series, "hangup_cost_usd_total"
    )
    assert spent["team-a"] / sum(spent.values()) == pytest.approx(a_share, rel=0.05)
    assert saved.get("team-a", 0) > 0 and saved.get("key-1", 0) == 0
    for secret in SECRETS:
        assert secret not in text


def test_every_access_log_field_is_documented() -> None:
    record = full_record(sdk_retry_count=1, background_response_id="resp_1")
    record.trace = TraceIds(trace_id=1, span_id=2, parent=None, sampled=True)
    fields = access_fields(record)
    docs = (ROOT / "docs" / "observability.md").read_text()
    names = set(fields) | set(fields["tokens"])
    missing = sorted(name for name in names if f"`{name}`" not in docs)
    assert not missing
