"""The `hangup` command.

hangup [run] [--config PATH] [--host H] [--port P] [--upstream URL]
hangup check-config [PATH]
hangup demo [--port P] [--exit]
hangup simulate [--host H] [--port P] [--tokens-per-s N]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from proxy import __version__
from proxy.auth import Auth
from proxy.config import ConfigError, HangupConfig, config_for_upstream, load_config
from proxy.logs import configure_logging

log = logging.getLogger("hangup")

DEFAULT_CONFIG = "config/hangup.yaml"
COMMANDS = ("run", "check-config", "demo", "simulate")


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hangup",
        description="Reverse proxy for OpenAI-compatible APIs that hangs up on the upstream "
        "the moment the client does. Other commands: hangup check-config | demo | simulate.",
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
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--version", action="version", version=f"hangup {__version__}")
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


async def _serve(config: HangupConfig, host: str, port: int) -> int:
    from proxy.server import ProxyServer

    server = ProxyServer(config, host=host, port=port)
    await server.start()
    log.info(
        "hangup %s listening on %s (routes: %s)",
        __version__,
        server.base_url,
        ", ".join(r.name for r in config.routes),
    )
    loop = asyncio.get_running_loop()
    signals_seen = 0
    stopping: set[asyncio.Task[None]] = set()  # strong references until done

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info(
                "%s: draining for up to %gs (send again to stop now)",
                signal.Signals(signum).name,
                config.shutdown.grace_s,
            )
            task = loop.create_task(server.shutdown(), name="hangup-shutdown")
        else:
            log.info("%s again: stopping now", signal.Signals(signum).name)
            task = loop.create_task(server.stop_now(), name="hangup-stop-now")
        stopping.add(task)
        task.add_done_callback(stopping.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await server.wait_stopped()
    for task in list(stopping):
        task.cancel()
    log.info("hangup stopped")
    return 0


def cmd_run(argv: Sequence[str]) -> int:
    args = _run_parser().parse_args(argv)
    try:
        config = resolve_config(args.config, args.upstream)
    except ConfigError as exc:
        print(f"hangup: config error: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.log_level or config.logging.level)
    host = args.host or config.listen.host
    port = config.listen.port if args.port is None else args.port
    problem = Auth.startup_problem(config, host)
    if problem is not None:
        print(f"hangup: config error: {config.source}: {problem}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(config, host, port))


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
    problem = Auth.startup_problem(config, config.listen.host)
    if problem is not None:
        print(f"hangup: config error: {config.source}: {problem}", file=sys.stderr)
        return 2
    routes = ", ".join(r.name for r in config.routes)
    print(f"{args.path}: OK ({len(config.upstreams)} upstreams, routes: {routes})")
    return 0


def cmd_demo(argv: Sequence[str]) -> int:
    from proxy.demo import main as demo_main

    return demo_main(argv)


def cmd_simulate(argv: Sequence[str]) -> int:
    from proxy.sim.__main__ import main as sim_main

    return sim_main(argv)


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
    }[command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
