"""The `hangup` command.

hangup [run] [--config PATH] [--host H] [--port P] [--upstream URL] [--workers N]
hangup check-config [PATH]
hangup demo [--port P] [--exit]
hangup simulate [--host H] [--port P] [--tokens-per-s N]
hangup stats [URL] [--token T] [--watch N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from proxy import __version__
from proxy.auth import Auth
from proxy.config import ConfigError, HangupConfig
from proxy.config_file import config_for_upstream, load_config
from proxy.logs import configure_logging

DEFAULT_CONFIG = "config/hangup.yaml"
LOOPS = ("auto", "uvloop", "asyncio")
COMMANDS = ("run", "check-config", "demo", "simulate", "stats")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hangup",
        description="Reverse proxy for OpenAI-compatible APIs that hangs up on the upstream "
        "the moment the client does. "
        "Other commands: hangup check-config | demo | simulate | stats.",
    )
    p.add_argument(
        "--config",
        help=f"YAML config (default: $HANGUP_CONFIG, else {DEFAULT_CONFIG})",
    )
    p.add_argument("--host", help="listen address (overrides listen.host)")
    p.add_argument("--port", type=int, help="listen port (overrides listen.port)")
    p.add_argument(
        "--upstream",
        metavar="URL",
        help="shortcut: one catch-all route to this OpenAI-compatible base URL, "
        "e.g. http://127.0.0.1:8000/v1",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="worker processes sharing the port (default 1); see docs/production.md",
    )
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument(
        "--loop",
        choices=LOOPS,
        help="event loop: asyncio (default), uvloop (pip install 'hangup[uvloop]'), or auto "
        "(uvloop when installed)",
    )
    p.add_argument("--version", action="version", version=f"hangup {__version__}")
    # Set by the --workers supervisor for its workers only.
    p.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--supervisor-fd", type=int, help=argparse.SUPPRESS)
    return p


def resolve_config(path: str | None, upstream: str | None) -> HangupConfig:
    """The config file, or (with --upstream and no file) the built-in defaults."""
    explicit = path or os.environ.get("HANGUP_CONFIG")
    chosen = explicit or DEFAULT_CONFIG
    base: HangupConfig | None = None
    if explicit or Path(chosen).exists():
        base = load_config(chosen)
    elif upstream is None:
        raise ConfigError(
            chosen,
            "",
            "no config file here: pass --config PATH, set HANGUP_CONFIG, or give --upstream URL",
        )
    if upstream is not None:
        return config_for_upstream(upstream, base=base)
    assert base is not None
    return base


def cmd_run(argv: Sequence[str]) -> int:
    args = _run_parser().parse_args(argv)
    try:
        config = resolve_config(args.config, args.upstream)
    except ConfigError as exc:
        print(f"hangup: config error: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.log_level or config.logging.level, fmt=config.logging.format)
    host = args.host or config.listen.host
    port = config.listen.port if args.port is None else args.port
    problem = Auth.startup_problem(config, host) or _tracing_problem(config)
    if problem is not None:
        print(f"hangup: config error: {config.source}: {problem}", file=sys.stderr)
        return 2
    if args.workers > 1:
        from proxy.supervisor import supervise

        return supervise(config, host=host, port=port, workers=args.workers, args=args)
    sock = None
    if args.listen_fd is not None:
        sock = socket.socket(fileno=args.listen_fd)
    from proxy.looplag import freeze_startup_heap
    from proxy.server import serve

    freeze_startup_heap()
    try:
        factory = loop_factory(args.loop or "asyncio")
    except ImportError:
        print("hangup: --loop uvloop, but uvloop is not installed", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(serve(config, host, port, sock=sock, supervisor_fd=args.supervisor_fd))


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop to run on: None is asyncio's own. "auto" takes uvloop when installed;
    "uvloop" insists on it (ImportError otherwise)."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    return uvloop.new_event_loop


def cmd_check_config(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="hangup check-config", description="Validate a config file without starting."
    )
    p.add_argument("path", nargs="?", default=os.environ.get("HANGUP_CONFIG", DEFAULT_CONFIG))
    args = p.parse_args(argv)
    try:
        config = load_config(args.path)
    except ConfigError as exc:
        print(f"hangup: config error: {exc}", file=sys.stderr)
        return 2
    problem = Auth.startup_problem(config, config.listen.host) or _tracing_problem(config)
    if problem is not None:
        print(f"hangup: config error: {config.source}: {problem}", file=sys.stderr)
        return 2
    routes = ", ".join(r.name for r in config.routes)
    n = len(config.upstreams)
    print(f"{args.path}: OK ({n} upstream{'' if n == 1 else 's'}, routes: {routes})")
    return 0


def _tracing_problem(config: HangupConfig) -> str | None:
    from proxy.tracing import startup_problem

    return startup_problem(config)


def cmd_demo(argv: Sequence[str]) -> int:
    from proxy.demo import main as demo_main

    return demo_main(argv)


def cmd_simulate(argv: Sequence[str]) -> int:
    from proxy.sim.__main__ import main as sim_main

    return sim_main(argv)


def cmd_stats(argv: Sequence[str]) -> int:
    from proxy.stats import main as stats_main

    return stats_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args and args[0] in COMMANDS else "run"
    if args and args[0] in COMMANDS:
        args = args[1:]
    handler = {
        "run": cmd_run,
        "check-config": cmd_check_config,
        "demo": cmd_demo,
        "simulate": cmd_simulate,
        "stats": cmd_stats,
    }[command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
