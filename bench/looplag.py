"""Event-loop lag while the largest inputs within the configured limits flow through hangup.

hangup runs in this process (the production runner, `ProxyServer`, with the CLI's config
resolution and its JSON log to a file), so that a lag probe with a 1 ms timer can watch its
loop; clients and the fake upstream (bench/fake_upstream.py) are other processes. Cases:

- ordinary traffic: wrk, small completions, 2 s (what lag normal load shows);
- a 60 MiB request body (`limits.max_request_body_mb` is 64): one 60 MiB string;
- a 60 MiB request body with no long string: ~1.3 million short messages;
- ~60 MiB of distinct short messages, gzipped (~3.5 MiB on the wire; the routes accept gzip);
- a streamed 60 MiB body (one string) with `stream_options`, which hangup rewrites to ask for
  usage;
- a small stream's request padded with 60 MiB of spaces before its closing brace (`padded
  body`: whitespace outside every string, where no long string can be left out of the parse);
- a 60 MiB body (short messages) on a route whose fallback names another model (`fallback
  rename`: the rename is built at admission for every target), and one to an SGLang upstream
  (`sglang naming`: hangup adds a `rid` member);
- a streamed 60 MiB body (short messages) whose stream stalls after three tokens on a route
  with `continue_cut_streams` and a fallback that accepts an assistant prefix
  (`continuation`: hangup builds the request that goes on from the delivered text); the
  upstream here is the simulator (`python -m proxy.sim`, which stalls when asked by model);
- a stream with one 15 MiB SSE event (hangup refuses events over 16 MiB);
- a Responses stream whose `response.completed` carries 40,000 tokens' logprobs (13.7 MiB
  of small objects: `include: ["message.output_text.logprobs"]` on a long answer);
- an 8 MiB non-streamed answer (the largest hangup keeps to read its usage);
- a `/metrics` scrape with every label at its bound (`series_bound()` series).

For each case: the largest lag the probe saw, and how much of it this process spent on the CPU
(thread CPU time over the late tick): on a shared machine the OS can deschedule us, which looks
like lag but is nobody's callback. The target: no callback over 10 ms.

`python -m bench.looplag [--repeat 3] [--out FILE]`
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import gzip
import itertools
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from bench import fake_upstream
from bench.common import HOST, REPO, Procs, free_port, report, table, wait_http

MIB = 1024 * 1024
CASES = (
    "ordinary",
    "large body",
    "many small messages",
    "large gzip body",
    "large streamed body",
    "padded body",
    "fallback rename",
    "sglang naming",
    "continuation",
    "huge SSE event",
    "logprobs event",
    "large answer",
    "metrics at bound",
)


@dataclass
class Watch:
    """The 1 ms probe: every tick's lag and the thread CPU time it covered."""

    interval: float = 0.001
    samples: list[tuple[float, float]] = field(default_factory=list)
    _due: float = 0.0
    _cpu: float = 0.0
    _handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._cpu = time.thread_time()
        self._due = loop.time() + self.interval
        self._handle = loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now, cpu = loop.time(), time.thread_time()
        lag = max(0.0, now - self._due)
        # CPU this thread used since the tick was due (at most the lag): callbacks, not the OS
        self.samples.append((lag, min(lag, cpu - self._cpu)))
        self._cpu = cpu
        self._due = now + self.interval
        self._handle = loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()

    def take(self) -> list[tuple[float, float]]:
        out, self.samples = self.samples, []
        return out


class GcPauses:
    """Full (generation 2) collections and how long each took: a pause of the whole process,
    whichever callback happened to allocate when it started."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append(time.perf_counter() - self._started)

    def take(self) -> list[float]:
        out, self.pauses = self.pauses, []
        return out


class Callbacks:
    """Times every callback the (pure-Python) asyncio loop runs, by wrapping `Handle._run`:
    the longest ones, with what they were. uvloop's handles cannot be wrapped; the probe's
    lag is then the only figure."""

    def __init__(self) -> None:
        self.longest: list[tuple[float, float, str]] = []  # (wall s, CPU s, what)
        self._real = asyncio.events.Handle._run
        self.installed = False

    def install(self) -> None:
        real, longest = self._real, self.longest

        def timed(handle: asyncio.Handle) -> None:
            t0, c0 = time.perf_counter(), time.thread_time()
            real(handle)
            wall = time.perf_counter() - t0
            if wall > 0.002:
                longest.append((wall, time.thread_time() - c0, _describe(handle)))

        asyncio.events.Handle._run = timed  # type: ignore[method-assign,assignment]
        self.installed = True

    def uninstall(self) -> None:
        asyncio.events.Handle._run = self._real  # type: ignore[method-assign]

    def take(self) -> list[tuple[float, float, str]]:
        out = sorted(self.longest, reverse=True)
        self.longest.clear()
        return out


def _describe(handle: asyncio.Handle) -> str:
    callback = getattr(handle, "_callback", None)
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        frame = getattr(coro, "cr_frame", None)
        where = f" at {frame.f_code.co_filename.split('/')[-1]}:{frame.f_lineno}" if frame else ""
        return f"task {getattr(coro, '__qualname__', coro)}{where}"
    return getattr(callback, "__qualname__", repr(callback))


def _post(url: str, body: bytes, headers: dict[str, str], timeout: float = 120) -> int:
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        n = 0
        while chunk := resp.read(1 << 20):
            n += len(chunk)
        return n


def client(case: str, base: str, repeat: int) -> None:
    """Runs in a child process: `repeat` requests of one case, blocking I/O."""
    url = base + "/v1/chat/completions"
    small = {"model": fake_upstream.MODEL, "messages": [{"role": "user", "content": "hi"}]}
    json_type = {"Content-Type": "application/json"}
    for _ in range(repeat):
        if case == "large body":
            text = "x" * (60 * MIB)
            body = json.dumps({**small, "messages": [{"role": "user", "content": text}]})
            _post(url, body.encode(), json_type)
        elif case == "many small messages":
            message = {"role": "user", "content": "a short message"}
            count = 60 * MIB // (len(json.dumps(message)) + 2)  # with its ", "
            body = json.dumps({**small, "messages": [message] * count})
            _post(url, body.encode(), json_type)
        elif case == "large gzip body":
            # Distinct messages, so that it inflates less than limits.max_inflate_ratio.
            messages = [{"role": "user", "content": f"message {i}"} for i in range(1_350_000)]
            data = json.dumps({**small, "messages": messages}).encode()
            headers = {**json_type, "Content-Encoding": "gzip"}
            _post(url, gzip.compress(data, compresslevel=1), headers)
        elif case == "large streamed body":
            text = "x" * (60 * MIB)
            streamed = {**small, "stream": True, "stream_options": {"include_usage": False}}
            body = json.dumps({**streamed, "messages": [{"role": "user", "content": text}]})
            _post(url, body.encode(), json_type)
        elif case == "padded body":
            # A small stream's request padded with spaces before its closing brace (as
            # bench.cancel's request-body window sends): whitespace outside every string.
            raw = json.dumps({**small, "stream": True}).encode()
            _post(url, raw[:-1] + b" " * (60 * MIB - len(raw)) + b"}", json_type)
        elif case in ("fallback rename", "sglang naming"):
            # The models two routes of their own match (`_with_rare_routes`).
            model = "bench-rename" if case == "fallback rename" else "bench-sglang"
            message = {"role": "user", "content": "a short message"}
            count = 60 * MIB // (len(json.dumps(message)) + 2)
            body = json.dumps({"model": model, "messages": [message] * count})
            _post(url, body.encode(), json_type)
        elif case == "continuation":
            # The simulator stalls after three tokens (its model directive); the route of that
            # model continues on a fallback (`_with_rare_routes`).
            message = {"role": "user", "content": "a short message"}
            count = 60 * MIB // (len(json.dumps(message)) + 2)
            streamed = {"model": CONTINUE_MODEL, "stream": True, "messages": [message] * count}
            _post(url, json.dumps(streamed).encode(), json_type)
        elif case == "huge SSE event":
            headers = {**json_type, "x-bench-events": "5", "x-bench-content-bytes": str(15 * MIB)}
            _post(url, json.dumps({**small, "stream": True}).encode(), headers)
        elif case == "logprobs event":
            headers = {**json_type, "x-bench-logprobs-tokens": "40000"}
            responses = {"model": fake_upstream.MODEL, "input": "hi", "stream": True}
            _post(base + "/v1/responses", json.dumps(responses).encode(), headers)
        elif case == "large answer":
            headers = {**json_type, "x-bench-content-bytes": str(8 * MIB - 2048)}
            _post(url, json.dumps(small).encode(), headers)
        elif case == "metrics at bound":
            with urllib.request.urlopen(base + "/metrics", timeout=60) as resp:
                resp.read()
        else:
            raise SystemExit(f"unknown case {case}")


def saturate_labels(state: Any) -> int:
    """Finish synthetic records until every label of every metric is at its bound."""
    from proxy.metrics import schema, series_bound
    from proxy.outcome import Cost, Outcome, RequestRecord, Savings, TimeoutKind, Usage

    metrics = state.metrics
    routes = [r.name for r in state.router.routes] + ["nowhere"]
    models = [f"model-{i}" for i in range(state.config.metrics.max_models + 2)] + [None]
    endpoints = [f"endpoint.e{i}" for i in range(schema.MAX_ENDPOINTS + 2)]
    ids = itertools.count()

    def record(**kw: Any) -> RequestRecord:
        fields: dict[str, Any] = {
            "request_id": f"sat-{next(ids)}",
            "method": "POST",
            "path": "/v1/chat/completions",
            "started_at": 1000.0,
            "wall_started_at": 0.0,
            "status": 200,
            "upstream_status": 200,
            "ended_at": 1001.0,
            "first_token_at": 1000.5,
            "client_gone_at": 1000.7,
            "upstream_closed_at": 1000.701,
            "usage": Usage(prompt_tokens=3, completion_tokens=2, cached_tokens=1,
                           reasoning_tokens=1, prompt_estimated=True, completion_estimated=True),
            "savings": Savings(tokens_saved=5, tokens_saved_upper=9, tokens_wasted=1),
            "cost": Cost(1.0, 1.0, 1.0),
            **kw,
        }  # fmt: skip
        return RequestRecord(**fields)

    for route, model, outcome in itertools.product(routes, models, list(Outcome)):
        rec = record(route=route, model=model, outcome=outcome, timeout_kind=TimeoutKind.IDLE)
        metrics.request_started()
        metrics.request_ended()
        metrics.request_finished(rec)
    for route, path, status in itertools.product(routes, endpoints, (200, 404, 503, None)):
        rec = record(route=route, path=path, endpoint=path, status=status,
                     outcome=Outcome.COMPLETED)  # fmt: skip
        metrics.request_started()
        metrics.request_ended()
        metrics.request_finished(rec)
    configured = set(state.config.prices) | state.router.exact_models()
    return series_bound(len(state.router.routes), len(configured), state.config.metrics.max_models)


CONTINUE_MODEL = "stall:after=3"  # the simulator's directive: three tokens, then silence


def _with_rare_routes(config: Any, sim_url: str | None = None) -> Any:
    """Two routes before the catch-all, by model: one with a fallback that names another
    model, one to the same upstream as an SGLang engine (hangup names attempts by `rid`);
    with `sim_url`, a third to the simulator whose stalled streams are continued on a
    fallback (the simulator again) that accepts an assistant prefix."""
    from proxy.config import HangupConfig

    # Built as `config_for_upstream` builds them: a dumped route re-validated would carry
    # its resolved None options as settings.
    data = config.model_dump(exclude={"upstreams", "routes"})
    url = config.upstreams["default"].base_url
    data["upstreams"] = {
        "default": {"base_url": url},
        "sglang": {"base_url": url, "engine": "sglang"},
    }
    data["routes"] = [
        {"name": "rename", "match": {"model": "bench-rename"}, "upstream": "default",
         "fallbacks": [{"upstream": "default", "model": "bench-other"}]},
        {"name": "sglang", "match": {"model": "bench-sglang"}, "upstream": "sglang"},
        {"name": "default", "match": {"path_prefix": "/v1/"}, "upstream": "default"},
    ]  # fmt: skip
    if sim_url is not None:
        data["upstreams"]["sim"] = {"base_url": sim_url + "/v1"}
        data["upstreams"]["sim-prefix"] = {
            "base_url": sim_url + "/v1",
            "assistant_prefix": "prefix",
        }
        data["routes"].insert(0, {
            "name": "continue", "match": {"model": CONTINUE_MODEL}, "upstream": "sim",
            "fallbacks": [{"upstream": "sim-prefix", "model": "bench-other"}],
            "continue_cut_streams": True, "circuit_failures": 0,
            "timeouts": {"idle_s": 0.5},
        })  # fmt: skip
    return HangupConfig.model_validate(data)


async def _wrk_chat(workdir: Path, base: str, seconds: int) -> None:
    from bench import wrk

    exe = wrk.wrk_binary()
    if exe is None:
        raise SystemExit("needs wrk (apt-get install wrk)")
    script = wrk.lua_script(workdir, "chat")
    argv = [exe, "-t1", "-c50", f"-d{seconds}s", "-s", str(script), base + "/v1/chat/completions"]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.DEVNULL)
    await asyncio.wait_for(proc.wait(), seconds + 30)


async def run(repeat: int, log_file: TextIO, cases: list[str]) -> dict[str, Any]:
    from proxy.__main__ import resolve_config
    from proxy.logs import configure_logging
    from proxy.looplag import freeze_startup_heap
    from proxy.server import ProxyServer
    from proxy.state import STATE

    results: dict[str, Any] = {}
    with Procs() as procs:
        up = fake_upstream.start(procs)
        config = resolve_config(None, up.url + "/v1")
        if "large gzip body" in cases:
            gzip_ok = config.defaults.model_copy(update={"request_encodings": ("gzip",)})
            config = config.model_copy(update={"defaults": gzip_ok})
        sim_url = None
        if "continuation" in cases:
            sim_port = free_port()
            sim = procs.spawn(
                "sim",
                [sys.executable, "-m", "proxy.sim", "--port", str(sim_port),
                 "--tokens-per-s", "200", "--max-records", "10"],
            )  # fmt: skip
            sim_url = f"http://{HOST}:{sim_port}"
            wait_http(sim_url + "/v1/models", sim.proc)
        if {"fallback rename", "sglang naming", "continuation"} & set(cases):
            config = _with_rare_routes(config, sim_url)
        configure_logging("INFO", stream=log_file)
        port = free_port()
        server = ProxyServer(config, host=HOST, port=port)
        await server.start()
        freeze_startup_heap()  # as the CLI does (proxy/looplag.py)
        base = f"http://{HOST}:{port}"
        watch = Watch()
        watch.start()
        callbacks = Callbacks()
        if not _is_uvloop():
            callbacks.install()
        gc_pauses = GcPauses()
        gc.callbacks.append(gc_pauses)
        try:
            for case in cases:
                extra: dict[str, Any] = {}
                if case == "metrics at bound":
                    extra["series_bound"] = saturate_labels(server.app[STATE])
                    body, _ = server.app[STATE].metrics.render()
                    extra["series_rendered"] = sum(
                        1 for line in body.splitlines() if line and not line.startswith(b"#")
                    )
                if case == "ordinary":  # warm up: first requests import and compile lazily
                    await _wrk_chat(procs.workdir, base, seconds=1)
                gc.collect()  # the bench's own garbage (label saturation) is not the case's
                # End this task step and let the probe tick once more before its samples are
                # cleared: the setup above (label saturation, a render, a collection) is not
                # the case's. With `sleep(0)` alone the probe's first tick ran after `take()`
                # and charged the setup's ~100 ms to the scrape case.
                await asyncio.sleep(0.005)
                watch.take()
                callbacks.take()
                gc_pauses.take()
                started = time.monotonic()
                if case == "ordinary":
                    from bench import wrk

                    exe = wrk.wrk_binary()
                    if exe is None:
                        raise SystemExit("needs wrk (apt-get install wrk)")
                    script = wrk.lua_script(procs.workdir, "chat")
                    argv = [exe, "-t1", "-c50", "-d2s", "-s", str(script),
                            base + "/v1/chat/completions"]  # fmt: skip
                else:
                    argv = [sys.executable, "-m", "bench.looplag", "--client", case, base,
                            str(repeat)]  # fmt: skip
                proc = await asyncio.create_subprocess_exec(
                    *argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                )
                _, err = await asyncio.wait_for(proc.communicate(), 600)
                samples = watch.take()
                slow = callbacks.take()
                full_gcs = gc_pauses.take()
                lags = sorted(samples, reverse=True)
                worst_cpu = max((cpu for _, cpu in samples), default=0.0)
                results[case] = {
                    "seconds": round(time.monotonic() - started, 2),
                    "ticks": len(samples),
                    "max_lag_ms": lags[0][0] * 1000 if lags else None,
                    "max_lag_cpu_ms": lags[0][1] * 1000 if lags else None,
                    "max_cpu_backed_lag_ms": worst_cpu * 1000,
                    "ticks_over_10ms": sum(1 for lag, _ in samples if lag > 0.010),
                    "cpu_backed_ticks_over_10ms": sum(1 for _, c in samples if c > 0.010),
                    "callbacks_timed": callbacks.installed,
                    "max_callback_ms": slow[0][0] * 1000 if slow else 0.0,
                    "max_callback_cpu_ms": max((c for _, c, _ in slow), default=0.0) * 1000,
                    "callbacks_over_10ms": sum(1 for w, _, _ in slow if w > 0.010),
                    "slowest_callbacks": [
                        (round(w * 1000, 2), round(c * 1000, 2), what) for w, c, what in slow[:5]
                    ],
                    "full_gc_pauses_ms": [round(p * 1000, 1) for p in full_gcs],
                    "client_rc": proc.returncode,
                    "client_error": err.decode(errors="replace")[-500:] if proc.returncode else "",
                    **extra,
                }
                r = results[case]
                print(
                    f"{case:18} longest callback {r['max_callback_ms']:7.1f} ms"
                    f" (CPU {r['max_callback_cpu_ms']:6.1f} ms), {r['callbacks_over_10ms']} over"
                    f" 10 ms; full GCs {r['full_gc_pauses_ms']} ms;"
                    f" max lag {r['max_lag_ms']:7.1f} ms"
                    f" (CPU-backed {r['max_cpu_backed_lag_ms']:6.1f} ms),"
                    f" ticks > 10 ms: {r['ticks_over_10ms']} ({r['cpu_backed_ticks_over_10ms']}"
                    " CPU-backed)",
                    flush=True,
                )
        finally:
            gc.callbacks.remove(gc_pauses)
            callbacks.uninstall()
            watch.stop()
            await server.stop_now()
            logging_shutdown()
    return results


def _is_uvloop() -> bool:
    return type(asyncio.get_running_loop()).__module__.startswith("uvloop")


def logging_shutdown() -> None:
    import logging

    for handler in logging.getLogger().handlers:
        handler.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeat", type=int, default=3, help="requests per large-input case")
    p.add_argument("--client", nargs=3, help=argparse.SUPPRESS)
    p.add_argument(
        "--cases", default=",".join(CASES), help="comma-separated, of: " + ", ".join(CASES)
    )
    p.add_argument(
        "--loop",
        choices=["asyncio", "uvloop"],
        default="asyncio",
        help="asyncio (default): every callback is timed; uvloop: only the lag probe",
    )
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.client:
        client(args.client[0], args.client[1], int(args.client[2]))
        return 0
    from proxy.__main__ import loop_factory

    with (
        tempfile.TemporaryFile("w+") as log_file,
        asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner,
    ):
        results = runner.run(run(args.repeat, log_file, args.cases.split(",")))
    failures = [
        f"{case}: client failed: {r['client_error']}"
        for case, r in results.items()
        if r["client_rc"]
    ]
    rows = [
        [
            case,
            r["max_callback_ms"] if r["callbacks_timed"] else "-",
            r["max_callback_cpu_ms"] if r["callbacks_timed"] else "-",
            r["callbacks_over_10ms"] if r["callbacks_timed"] else "-",
            r["max_lag_ms"],
            r["max_cpu_backed_lag_ms"],
            r["slowest_callbacks"][0][2] if r["slowest_callbacks"] else "-",
        ]
        for case, r in results.items()
    ]
    for case, r in results.items():
        for wall, cpu, what in r["slowest_callbacks"]:
            print(f"{case:18} {wall:8.1f} ms (CPU {cpu:6.1f} ms)  {what}")
    print()
    print(
        table(
            [
                "case",
                "longest callback ms",
                "its CPU ms",
                "callbacks > 10 ms",
                "max lag ms",
                "max CPU-backed lag ms",
                "longest was",
            ],
            rows,
        )
    )
    return report("looplag", {"args": vars(args), "results": results}, args.out, failures)


if __name__ == "__main__":
    sys.exit(main())
