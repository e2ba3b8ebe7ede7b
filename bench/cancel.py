"""Cancel: how fast a client's hang-up reaches the upstream, in every window of a request.

For each window a raw-socket client (this process) sends one request through hangup (the real
CLI, its own process), waits until the request is in that window, closes its socket (FIN) and
notes `time.monotonic()`. The simulated provider (its own process) records `time.monotonic()`
when it sees the upstream connection close. Both read CLOCK_MONOTONIC, which Linux shares
across all processes of the machine, so the difference is the propagation latency: client
FIN -> hangup notices -> hangup closes its upstream socket -> the simulator's event loop runs
`connection_lost`. It includes the simulator's own scheduling delay (an upper bound).

Windows (the relay core's): connecting, sending the request body, waiting for response
headers, before the first token while the upstream sends keep-alive comments, mid-stream,
during a stall, non-streaming. The connect window has no upstream to ask: its upstream is a
blackhole (a listener whose accept queue is full, so hangup's SYN sits in SYN_SENT) and the
close is seen by polling /proc/net/tcp until that SYN_SENT socket is gone; the resolution is
one poll (its measured duration is reported).

Light load: nothing else runs. Heavy load: a closed-loop load generator (32 workers, small
chat completions) saturates the proxy during the measurement.

`python -m bench.cancel [--samples 40] [--short] [--out FILE]`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import HOST, PY, REPO, Procs, percentile, report, table

BIG_BODY_BYTES = 40 * 1024 * 1024  # beyond loopback socket buffers: hangup blocks sending it
LONG = 100_000  # tokens: a stream that will not end by itself during a sample


NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_SYN_SENT = 2
NO_COOKIE = b"\xff" * 8


def _diag_request(flags: int, states: int, sockid: bytes) -> bytes:
    """An inet_diag_req_v2 for IPv4 TCP in a netlink header."""
    req = struct.pack("=BBBBI", socket.AF_INET, socket.IPPROTO_TCP, 0, 0, states) + sockid
    return struct.pack("=IHHII", 16 + len(req), SOCK_DIAG_BY_FAMILY, flags, 1, 0) + req


class Blackhole:
    """A loopback port where TCP connects hang: a listener with backlog 0 whose accept queue
    is already full, so the kernel drops further SYNs (the connector sits in SYN_SENT).

    Watching the connector's socket: /proc/net/tcp walks the whole TCP hash table (7.5 ms a
    read on this machine), far too coarse. Instead, one netlink sock_diag dump finds the
    SYN_SENT socket while it waits, then exact 4-tuple lookups (about 10 us each, a hash
    lookup in the kernel) poll until it is gone. The resolution is one lookup.
    """

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind((HOST, 0))
        self.listener.listen(0)
        self.port = int(self.listener.getsockname()[1])
        self._fillers: list[socket.socket] = []
        for _ in range(2):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect((HOST, self.port))
            except BlockingIOError:
                pass
            self._fillers.append(s)
        self._diag = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
        time.sleep(0.05)
        self.fillers = set(self.syn_sent())

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    def syn_sent(self) -> list[bytes]:
        """The inet_diag socket ids of every SYN_SENT socket toward the blackhole."""
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
        try:
            s.send(_diag_request(NLM_F_REQUEST | NLM_F_DUMP, 1 << TCP_SYN_SENT, b"\0" * 48))
            found: list[bytes] = []
            while True:
                data = s.recv(1 << 16)
                off = 0
                while off < len(data):
                    length, kind = struct.unpack_from("=IH", data, off)
                    if kind == NLMSG_DONE:
                        return found
                    if kind == NLMSG_ERROR:
                        raise OSError("sock_diag dump failed")
                    sockid = data[off + 20 : off + 68]  # after nlmsghdr + 4 bytes of diag msg
                    if struct.unpack_from("!H", sockid, 2)[0] == self.port:
                        found.append(sockid)
                    off += (length + 3) & ~3
        finally:
            s.close()

    def new_syn_sent(self) -> list[bytes]:
        return [i for i in self.syn_sent() if i not in self.fillers]

    def exists(self, sockid: bytes) -> bool:
        """Is this socket still there? (exact lookup by 4-tuple)"""
        self._diag.send(_diag_request(NLM_F_REQUEST, 0xFFFFFFFF, sockid[:40] + NO_COOKIE))
        data = self._diag.recv(1 << 16)
        kind = struct.unpack_from("=IH", data, 0)[1]
        if kind == NLMSG_ERROR:
            errno = -struct.unpack_from("=i", data, 16)[0]
            if errno == 2:  # ENOENT: gone
                return False
            raise OSError(errno, "sock_diag lookup failed")
        return True

    def close(self) -> None:
        for s in self._fillers:
            s.close()
        self.listener.close()
        self._diag.close()


@dataclass(frozen=True)
class Window:
    name: str
    model: str
    stream: bool
    ready: str  # what the client waits for before hanging up
    big_body: bool = False


WINDOWS = (
    Window("connect", "blackhole", stream=True, ready="syn_sent"),
    Window("request body", "slow-body:rate=100000", stream=True, ready="sim_seen", big_body=True),
    Window("response headers", "slow-headers:delay=60", stream=True, ready="sim_seen"),
    Window(
        "first token (keep-alives)",
        "slow-first-token:delay=60,keepalive=0.01",
        stream=True,
        ready="keepalive",
    ),
    Window("mid-stream", f"steady:interval=0.002,tokens={LONG}", stream=True, ready="tokens"),
    Window("stall", "stall:after=3", stream=True, ready="stalled"),
    Window("non-streaming", f"normal:tokens={LONG},rate=1000", stream=False, ready="sim_seen"),
)


def proxy_config(path: Path, sim_url: str, blackhole_url: str) -> Path:
    config = {
        "listen": {"host": HOST, "port": 0, "backlog": 4096},
        "upstreams": {
            "sim": {"base_url": sim_url + "/v1"},
            "blackhole": {"base_url": blackhole_url},
        },
        "routes": [
            {"name": "blackhole", "match": {"model": "blackhole*"}, "upstream": "blackhole"},
            {"name": "default", "upstream": "sim"},
        ],
        "defaults": {"timeouts": {"connect_s": 30}},
    }
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.received = bytearray()

    async def read_until(self, done: Callable[[bytes], bool], timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                while not done(bytes(self.received)):
                    data = await self.reader.read(65536)
                    if not data:
                        return False
                    self.received += data
        except TimeoutError:
            return False
        return True


async def one_sample(
    w: Window, proxy_port: int, sim: aiohttp.ClientSession, sim_url: str, hole: Blackhole, n: int
) -> dict[str, Any]:
    request_id = f"cancel-{w.name.replace(' ', '_')}-{n}-{time.monotonic_ns()}"
    body: dict[str, Any] = {
        "model": w.model,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "stream": w.stream,
    }
    raw = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "x-request-id": request_id}
    if w.big_body:
        # slow-body is picked from this header: the simulator reads the body slowly only when it
        # knows before reading it. The padding makes the body larger than the socket buffers.
        headers["x-sim-behaviour"] = w.model
        pad = b" " * (BIG_BODY_BYTES - len(raw))
        raw = raw[:-1] + pad + b"}"
    reader, writer = await asyncio.open_connection(HOST, proxy_port)
    writer.transport.set_write_buffer_limits(high=BIG_BODY_BYTES * 2)
    c = Client(reader, writer)
    head = ["POST /v1/chat/completions HTTP/1.1", f"Host: {HOST}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    head.append(f"Content-Length: {len(raw)}")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + raw)
    ok = True
    rec_url = f"{sim_url}/_sim/requests/{request_id}"

    async def sim_record() -> dict[str, Any] | None:
        async with sim.get(rec_url) as r:
            return await r.json() if r.status == 200 else None

    async def until_sim_seen(timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await sim_record() is not None:
                return True
            await asyncio.sleep(0.005)
        return False

    syn: list[bytes] = []
    if w.ready == "syn_sent":
        deadline = time.monotonic() + 5
        while not syn and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
            syn = hole.new_syn_sent()
        ok = len(syn) == 1
    elif w.ready == "sim_seen":
        ok = await until_sim_seen()
        await asyncio.sleep(0.02)
    elif w.ready == "keepalive":
        ok = await c.read_until(lambda b: b.count(b": keep-alive") >= 2, 10)
    elif w.ready == "tokens":
        ok = await c.read_until(lambda b: b.count(b"data: ") >= 20, 10)
    elif w.ready == "stalled":
        ok = await c.read_until(lambda b: b.count(b'"content":"') >= 4, 10)
        await asyncio.sleep(0.02)
    if not ok:
        writer.close()
        await writer.wait_closed()
        return {"ok": False, "why": f"never reached window ({w.ready})"}
    state: dict[str, Any] = {}
    if w.ready != "syn_sent":
        rec = await sim_record()
        if rec is None:
            writer.close()
            return {"ok": False, "why": "simulator has no record"}
        state = {"status": rec["status"], "body_bytes": rec["body_bytes"]}
        state["content_tokens_sent"] = rec["content_tokens_sent"]
        if rec["end"] is not None or rec["connection_closed_at"] is not None:
            writer.close()
            return {"ok": False, "why": f"request already ended ({rec['end']})"}
    closed_at = time.monotonic()
    writer.close()
    await writer.wait_closed()  # the socket is closed (FIN sent) when this returns
    if w.ready == "syn_sent":
        polls, deadline = 0, closed_at + 5
        seen = None
        while (polled := time.monotonic()) < deadline:  # busy poll: a lookup is ~10 us
            polls += 1
            if not hole.exists(syn[0]):
                seen = time.monotonic()
                break
            if polls % 100 == 0:
                await asyncio.sleep(0)
        if seen is None:
            return {"ok": False, "why": "SYN_SENT socket still there after 5 s"}
        # Gone somewhere between the start of the last lookup and its answer: that is the
        # resolution of this sample.
        resolution_ms = (seen - polled) * 1000
        return {"ok": True, "latency_ms": (seen - closed_at) * 1000, "resolution_ms": resolution_ms}
    deadline = closed_at + 5
    # The simulator timestamps the close itself; asking it at once would make it serve our
    # query while it should be noticing the close, so give it 20 ms first.
    await asyncio.sleep(0.02)
    while time.monotonic() < deadline:
        rec = await sim_record()
        if rec is None:  # seen by the simulator before (`until_sim_seen`), gone from it since
            return {"ok": False, "why": "the simulator no longer has this request's record"}
        gone = rec["connection_closed_at"] or rec["peer_closed_at"]
        if gone is not None:
            return {"ok": True, "latency_ms": (gone - closed_at) * 1000, **state}
        await asyncio.sleep(0.005)
    return {"ok": False, "why": "upstream connection still open 5 s after the client left"}


async def measure(
    ports: dict[str, int], sim_url: str, hole: Blackhole, samples: int, label: str
) -> dict[str, Any]:
    """Every window, `samples` times; `ports` maps window names to the proxy port to use."""
    out: dict[str, Any] = {}
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as sim:
        for w in WINDOWS:
            lat: list[float] = []
            failures: list[str] = []
            states: list[dict[str, Any]] = []
            poll_ms: list[float] = []
            for n in range(samples):
                r = await one_sample(w, ports[w.name], sim, sim_url, hole, n)
                if r["ok"]:
                    lat.append(r["latency_ms"])
                    states.append({k: v for k, v in r.items() if k != "ok"})
                    if "resolution_ms" in r:
                        poll_ms.append(r["resolution_ms"])
                else:
                    failures.append(r["why"])
                    if len(failures) >= 3 and not lat and all("still" in f for f in failures):
                        break  # never propagates in this window: 3 tries say so; move on
                await asyncio.sleep(0.01)
            res = {
                "samples": len(lat),
                "p50_ms": percentile(lat, 50),
                "p99_ms": percentile(lat, 99),
                "max_ms": max(lat, default=float("nan")),
                "latencies_ms": [round(x, 3) for x in lat],
                "failures": failures,
                "resolution_ms_max": max(poll_ms) if poll_ms else None,
                "window_states": states[:3],
            }
            out[w.name] = res
            print(
                f"{label:16} {w.name:26} n={len(lat):3} p50 {res['p50_ms']:6.2f} ms"
                f"  p99 {res['p99_ms']:6.2f} ms  max {res['max_ms']:6.2f} ms"
                + (f"  FAILURES {len(failures)}: {failures[:2]}" if failures else ""),
                flush=True,
            )
    return out


LOADGEN_HEAVY = ("--kind", "chat", "--concurrency", "32", "--warmup", "0", "--duration", "600")


def with_load(url: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run `run` while a closed-loop load generator (32 workers, chat) saturates `url`."""
    gen = subprocess.Popen(
        [PY, "-m", "bench.loadgen", "--url", url, *LOADGEN_HEAVY],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert gen.stdout is not None
        gen.stdout.readline()  # "warm": the load is on
        time.sleep(0.5)
        return run()
    finally:
        gen.terminate()
        gen.wait(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, default=40, help="per window, target and load")
    p.add_argument("--short", action="store_true", help="CI: 6 samples, hangup only")
    p.add_argument("--uvloop", action="store_true", help="run hangup on uvloop")
    p.add_argument("--no-baseline", action="store_true", help="measure hangup only")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.short:
        args.samples, args.no_baseline = 6, True
    started = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    hole = Blackhole()
    with Procs() as procs:
        try:
            sim = procs.sim(tokens_per_s=0, default_tokens=16)
            config = proxy_config(procs.workdir / "cancel.yaml", sim.url, hole.url)
            proxy = procs.hangup(sim.url, config=config, uvloop=args.uvloop)
            targets = {
                "hangup": (proxy.url, dict.fromkeys([w.name for w in WINDOWS], _port(proxy.url)))
            }
            if not args.no_baseline:
                # The floor: the minimal relay, and a second one whose upstream is the blackhole.
                base = procs.baseline(sim.url)
                base_hole = procs.baseline(hole.url.removesuffix("/v1"), name="baseline-hole")
                ports = dict.fromkeys([w.name for w in WINDOWS], _port(base.url))
                ports["connect"] = _port(base_hole.url)
                targets["baseline"] = (base.url, ports)
            for target, (url, ports) in targets.items():
                for load in ("light", "heavy"):
                    label = f"{target} {load}"

                    def run(ports: dict[str, int] = ports, label: str = label) -> dict[str, Any]:
                        return asyncio.run(measure(ports, sim.url, hole, args.samples, label))

                    results[label] = run() if load == "light" else with_load(url, run)
        finally:
            hole.close()
    rows = []
    failures: list[str] = []
    notes: list[str] = []
    for w in WINDOWS:
        row: list[object] = [w.name]
        for label, res in results.items():
            r = res[w.name]
            row += [r["samples"], r["p50_ms"], r["p99_ms"], r["max_ms"]]
            never = [f for f in r["failures"] if "still" in f]
            # Only hangup's misses fail the run; the baseline's are findings, reported.
            sink = failures if label.startswith("hangup") else notes
            if never:
                sink.append(f"{label} {w.name}: cancel never propagated ({len(never)}x in 5 s)")
            elif r["samples"] == 0:
                sink.append(f"{label} {w.name}: no sample reached the window: {r['failures']}")
        rows.append(row)
    headers = ["window"]
    for label in results:
        headers += [f"{label} n", "p50", "p99", "max"]
    print()
    print("cancel: client FIN -> upstream connection closed, ms (light: idle; heavy: saturated)")
    print(table(headers, rows))
    poll = results["hangup light"]["connect"]["resolution_ms_max"]
    if poll is not None:
        print(f"connect window: sock_diag lookups, resolution <= {poll:.3f} ms (one lookup)")
    for note in notes:
        print(note)
    return report(
        "cancel",
        {
            "args": vars(args) | {"out": str(args.out) if args.out else None},
            "elapsed_s": time.monotonic() - started,
            "results": results,
            "failures": failures,
            "notes": notes,
        },
        args.out,
        failures,
    )


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


if __name__ == "__main__":
    sys.exit(main())
