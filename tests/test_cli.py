"""The `hangup` command line: what an operator sees when starting it wrong."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import __version__
from tests.cli_support import ROOT, sim_config, write_config


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_taken_port_is_one_clear_line(workers: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "hangup.yaml", sim_config("http://127.0.0.1:9/v1"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        done = run("--config", str(config), "--port", port, "--workers", workers)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_workers_must_be_a_positive_number(value: str) -> None:
    done = run("--workers", value)
    assert done.returncode == 2
    assert "argument --workers" in done.stderr


def test_version() -> None:
    done = run("--version")
    assert done.returncode == 0
    assert done.stdout == f"hangup {__version__}\n"


def test_no_config_anywhere_says_what_to_do(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "proxy"],
        cwd=tmp_path,  # no config/hangup.yaml here
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "pass --config PATH, set HANGUP_CONFIG, or give --upstream URL" in done.stderr


@pytest.mark.parametrize("command", ["demo", "simulate"])
def test_demo_and_simulate_say_one_line_when_their_port_is_taken(command: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        done = run(command, "--port", port, *(["--exit"] if command == "demo" else []))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"hangup {command}: cannot listen on 127.0.0.1:{port}: Address already in use "
        "(pick another with --port, or --port 0 for any free one)"
    ]


def test_simulate_help_names_the_command_a_user_typed() -> None:
    done = run("simulate", "--help")
    assert done.returncode == 0
    assert done.stdout.startswith("usage: hangup simulate")
    assert "python -m proxy.sim" not in done.stdout


def test_tracing_that_cannot_run_is_a_config_error_before_start(tmp_path: Path) -> None:
    data = sim_config("http://127.0.0.1:9/v1", tracing={"enabled": True})
    config = write_config(tmp_path / "hangup.yaml", data)
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "--config", str(config)],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "OTLP protocol 'grpc': hangup exports OTLP over HTTP" in done.stderr
    assert "Traceback" not in done.stderr


def test_tracing_without_the_extra_says_how_to_install_it(tmp_path: Path) -> None:
    """As on an install without hangup[otel]: the opentelemetry package cannot be imported."""
    config = write_config(
        tmp_path / "hangup.yaml", sim_config("http://127.0.0.1:9/v1", tracing={"enabled": True})
    )
    code = (
        "import sys; sys.modules['opentelemetry'] = None; "
        "from proxy.__main__ import main; sys.exit(main(sys.argv[1:]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "check-config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "OpenTelemetry is not installed" in done.stderr
    assert "pip install 'hangup[otel]'" in done.stderr and "Traceback" not in done.stderr


def test_the_demo_is_never_traced_whatever_the_shell_sets() -> None:
    """A newcomer's OTEL_EXPORTER_OTLP_ENDPOINT must not make `hangup demo` need the extra."""
    from proxy.demo import demo_config
    from proxy.tracing import wanted

    config = demo_config("http://127.0.0.1:9/v1", 0)
    assert not wanted(config.tracing, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
