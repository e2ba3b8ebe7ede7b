"""The Dockerfile and the deploy examples, checked without a Docker engine or a cluster.

`test_dockerfile_build_and_start_steps` reads the Dockerfile and runs its build stage's COPY
and RUN steps exactly as written, in a fresh directory standing in for the image's filesystem
(container paths under /opt, /src and /etc/hangup are mapped into it; `python` is this
machine's Python 3.11), from a build context filtered by .dockerignore. Then it starts the
runtime stage's ENTRYPOINT + CMD with the runtime stage's ENV, as uid 10001 when possible, and
runs the HEALTHCHECK command against it. Not verified here: the base image itself, the
`groupadd`/`useradd` RUN step, and anything the Docker engine does (layers, USER, EXPOSE).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from proxy.auth import Auth
from proxy.config_file import parse_config
from tests.cli_support import ROOT

DOCKERFILE = ROOT / "Dockerfile"
# Container paths the build writes to, mapped into the stand-in filesystem.
MAPPED = ("/opt/", "/src", "/etc/hangup/")
# RUN steps that need a real image (root, /etc/passwd); listed so a new one is not skipped
# silently.
NOT_RUN = ("groupadd ",)
IMAGE_UID = 10001


@dataclass
class Step:
    keyword: str
    args: str


@dataclass
class Stage:
    name: str | None
    steps: list[Step] = field(default_factory=list)

    def all(self, keyword: str) -> list[Step]:
        return [s for s in self.steps if s.keyword == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions per stage (line continuations joined, comments dropped)."""
    logical: list[str] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    stages: list[Stage] = []
    for instruction in logical:
        keyword, _, args = instruction.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            alias = re.search(r"\bAS\s+(\S+)", args, re.IGNORECASE)
            stages.append(Stage(alias.group(1) if alias else None))
        elif stages:
            stages[-1].steps.append(Step(keyword, args.strip()))
    return stages


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for step in stage.all("ENV"):
        for pair in shlex.split(step.args):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def map_paths(text: str, root: Path) -> str:
    for prefix in MAPPED:
        text = re.sub(rf"(?<![\w./-]){re.escape(prefix)}", str(root) + prefix, text)
    return text


def unmapped_paths(text: str) -> list[str]:
    paths = re.findall(r"(?<![\w./-])(/[\w.-]+)", text)
    return [p for p in paths if not any((p + "/").startswith(m) or p == m for m in MAPPED)]


def dockerignore_context(dest: Path) -> Path:
    """A copy of the build context as Docker would send it (the .dockerignore rules, last
    match wins, a pattern matching a parent directory covering what is inside)."""
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((not negate, re.compile(regex + r"\Z")))

    def excluded(rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        verdict = False
        for exclude, regex in rules:
            if any(regex.match(p) for p in prefixes):
                verdict = exclude
        return verdict

    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT).as_posix()
        if path.is_file() and not rel.startswith(".git/") and not excluded(rel):
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def image_root() -> Iterator[Path]:
    """The stand-in filesystem: world-traversable (not a 0700 pytest tmp dir), so the server can
    run as the image's unprivileged uid and find that it may write nowhere in it."""
    root = Path(tempfile.mkdtemp(prefix="hangup-image-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_dockerfile_build_and_start_steps(image_root: Path, tmp_path: Path) -> None:
    build, runtime = parse_dockerfile(DOCKERFILE.read_text())
    assert build.name == "build" and runtime.name is None
    context = dockerignore_context(tmp_path / "context")
    assert not (context / "tests").exists() and not (context / ".venv").exists()

    python_dir = image_root / "usr-local-bin"
    python_dir.mkdir()
    (python_dir / "python").symlink_to(getattr(sys, "_base_executable", sys.executable))
    build_env = {
        **os.environ,
        **env_of(build),
        "PATH": f"{python_dir}:/usr/bin:/bin",
    }
    build_env.pop("PYTHONPATH", None)

    workdir = image_root
    started = time.monotonic()
    for step in build.steps:
        if step.keyword in ("ENV", "ARG"):
            continue
        assert not unmapped_paths(step.args), f"unmapped container path in {step}"
        if step.keyword == "WORKDIR":
            workdir = Path(map_paths(step.args, image_root))
            workdir.mkdir(parents=True, exist_ok=True)
        elif step.keyword == "COPY":
            *sources, dest = shlex.split(step.args)
            target = (
                workdir / dest if not dest.startswith("/") else Path(map_paths(dest, image_root))
            )
            for source in sources:
                src = context / source
                if src.is_dir():
                    shutil.copytree(src, target / src.name if dest.endswith("/") else target)
                else:
                    shutil.copy2(src, target / src.name if dest.endswith("/") else target)
        elif step.keyword == "RUN":
            done = subprocess.run(
                ["/bin/sh", "-c", map_paths(step.args, image_root)],
                cwd=workdir,
                env=build_env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert done.returncode == 0, f"{step.args}\n{done.stdout}\n{done.stderr}"
        else:
            raise AssertionError(f"the build stage has a step this test does not run: {step}")
    build_s = time.monotonic() - started

    venv = image_root / "opt" / "hangup"
    assert not (venv / "bin" / "pip").exists(), "pip ships in the image"
    runtime_env = {k: map_paths(v, image_root) for k, v in env_of(runtime).items()}
    runtime_env["PATH"] = runtime_env["PATH"].replace("$PATH", "/usr/bin:/bin")
    runtime_env["HOME"] = "/nonexistent"
    for step in runtime.all("COPY"):
        args = shlex.split(step.args)
        if args[0].startswith("--from="):
            assert args[1] == args[2], "COPY --from must keep the path (mapped in place)"
            continue
        source, dest = args
        target = Path(map_paths(dest, image_root))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(context / source, target)
    for step in runtime.all("RUN"):
        assert step.args.startswith(NOT_RUN), f"a runtime RUN step this test does not run: {step}"

    # The installed distributions are exactly the lock's, plus hangup.
    listing = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.metadata as m, proxy; print(proxy.__file__)\n"
            "for d in m.distributions():\n"
            "    print(d.metadata['Name'].lower().replace('_', '-'), d.version)",
        ],
        cwd="/",
        env=runtime_env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split("\n")
    assert listing[0].startswith(str(venv)), listing[0]
    installed = dict(line.split(" ") for line in listing[1:] if line)
    assert installed == {**lock_pins(), "hangup": installed.get("hangup", "missing")}
    assert installed["hangup"] != "missing"

    user = runtime.all("USER")[0].args.split(":")[0]
    assert int(user) == IMAGE_UID
    for path in [image_root, *image_root.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    as_image_user: list[str] = []
    if os.geteuid() == 0 and shutil.which("setpriv"):
        as_image_user = [
            "setpriv",
            f"--reuid={IMAGE_UID}",
            f"--regid={IMAGE_UID}",
            "--clear-groups",
        ]

    entrypoint = yaml.safe_load(runtime.all("ENTRYPOINT")[0].args)
    cmd = yaml.safe_load(runtime.all("CMD")[0].args)
    port = free_port()
    # Exactly ENTRYPOINT + CMD, but for the port (8080 may be taken on this machine).
    argv = [
        *as_image_user,
        shutil.which(entrypoint[0], path=runtime_env["PATH"]) or "",
        *entrypoint[1:],
        *cmd,
        "--port",
        str(port),
    ]
    server = subprocess.Popen(
        argv, cwd="/", env=runtime_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        healthcheck = yaml.safe_load(runtime.all("HEALTHCHECK")[0].args.split("CMD", 1)[1])
        probe = [a.replace("127.0.0.1:8080", f"127.0.0.1:{port}") for a in healthcheck]
        probe[0] = shutil.which(probe[0], path=runtime_env["PATH"]) or probe[0]
        assert probe[0].startswith(str(venv))
        deadline = time.monotonic() + 20
        while True:
            check = subprocess.run(
                [*as_image_user, *probe], cwd="/", env=runtime_env, capture_output=True, timeout=10
            )
            if check.returncode == 0:
                break
            assert server.poll() is None, server.stdout.read() if server.stdout else ""
            assert time.monotonic() < deadline, check.stderr
            time.sleep(0.1)
        started_s = time.monotonic() - started - build_s
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=10) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)
    output = server.stdout.read().decode() if server.stdout else ""
    if server.stdout:
        server.stdout.close()
    assert f'"url":"http://0.0.0.0:{port}"' in output
    size_mb = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file()) / 2**20
    print(
        f"\nDockerfile steps: build {build_s:.1f} s, healthy {started_s:.2f} s after, "
        f"as uid {IMAGE_UID if as_image_user else os.geteuid()}; /opt/hangup {size_mb:.1f} MiB"
    )


def lock_pins(name: str = "requirements.txt") -> dict[str, str]:
    text = (ROOT / "deploy" / "docker" / name).read_text()
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r"^([\w.-]+)==(\S+)", text, re.M)}


def test_the_locks_cover_pyproject() -> None:
    """Every dependency (and the build backend) is pinned, at a version pyproject allows:
    after changing pyproject.toml, run deploy/docker/relock.sh."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for lock, requirements in (
        ("requirements.txt", project["project"]["dependencies"]),
        ("build-requirements.txt", project["build-system"]["requires"]),
    ):
        pins = lock_pins(lock)
        for text in requirements:
            req = Requirement(text)
            name = req.name.lower().replace("_", "-")
            assert name in pins, f"{name} is not in deploy/docker/{lock}: run relock.sh"
            assert req.specifier.contains(Version(pins[name])), (name, pins[name], text)
        assert "--hash=sha256:" in (ROOT / "deploy" / "docker" / lock).read_text()


# --- deploy/ examples ---------------------------------------------------------------------

K8S = ROOT / "deploy" / "kubernetes"
COMPOSE = ROOT / "deploy" / "compose"
APP_DRAIN_S = 20  # what the manifests budget for the app's own drain (see their comments)
ENV_FOR_CONFIG = {"OPENAI_API_KEY": "sk-x", "HANGUP_CLIENT_KEY": "k" * 32}


def manifests(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def k8s_config() -> Any:
    (config_map,) = [d for d in manifests("sidecar.yaml") if d["kind"] == "ConfigMap"]
    return parse_config(config_map["data"]["hangup.yaml"], source="configmap", env=ENV_FOR_CONFIG)


@pytest.mark.parametrize("name", ["sidecar.yaml", "sidecar-classic.yaml"])
def test_kubernetes_sidecar_is_consistent(name: str) -> None:
    config = k8s_config()
    assert Auth.startup_problem(config, config.listen.host) is None
    (deployment,) = [d for d in manifests(name) if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    containers = spec["containers"] + spec.get("initContainers", [])
    (hangup,) = [c for c in containers if c["name"] == "hangup"]
    native = hangup in spec.get("initContainers", [])
    if native:
        assert hangup["restartPolicy"] == "Always"

    port = hangup["ports"][0]
    assert port["containerPort"] == config.listen.port
    assert hangup["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert hangup["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    notes = pod["metadata"]["annotations"]
    assert notes["prometheus.io/port"] == str(config.listen.port)
    assert notes["prometheus.io/path"] == config.metrics.path

    # Every ${VAR} the config reads is in the container's environment.
    provided = {e["name"] for e in hangup["env"]}
    assert set(ENV_FOR_CONFIG) <= provided
    security = hangup["securityContext"]
    assert security["runAsUser"] == IMAGE_UID and security["readOnlyRootFilesystem"]
    assert any(m["mountPath"] == "/tmp" for m in hangup["volumeMounts"])
    assert any(m["mountPath"] == "/etc/hangup" for m in hangup["volumeMounts"])

    # The grace period covers everything that happens inside it.
    pre_stop = 0
    hook = hangup.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    if hook:
        assert hook[0] == "sleep"
        pre_stop = int(hook[1])
        assert pre_stop >= APP_DRAIN_S
    needed = config.shutdown.grace_s + 5 + (APP_DRAIN_S if native else pre_stop)
    assert spec["terminationGracePeriodSeconds"] >= needed


def test_compose_is_consistent() -> None:
    compose = yaml.safe_load((COMPOSE / "docker-compose.yaml").read_text())
    services = compose["services"]
    config = parse_config((COMPOSE / "hangup.yaml").read_text(), source="compose", env={})
    hangup = services["hangup"]
    for service in services.values():
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            assert (COMPOSE / host).exists(), f"mounted {host} does not exist"
        for dependency in service.get("depends_on", []):
            assert dependency in services
    assert hangup["stop_grace_period"] == f"{config.shutdown.grace_s + 5:g}s"
    assert hangup["ports"] == [f"127.0.0.1:{config.listen.port}:{config.listen.port}"]
    assert "/tmp" in hangup["tmpfs"] and hangup["read_only"]
    scrape = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    assert job["job_name"] == "hangup"
    assert job["static_configs"][0]["targets"] == [f"hangup:{config.listen.port}"]
    assert job["metrics_path"] == config.metrics.path
    upstream = next(iter(config.upstreams.values())).base_url
    assert upstream.startswith("http://provider:")
    assert "--port" in services["provider"]["entrypoint"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_compose_prometheus_config_loads(tmp_path: Path) -> None:
    shutil.copy(COMPOSE / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(ROOT / "deploy" / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    done = subprocess.run(
        ["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


async def test_compose_app_talks_through_hangup(proxy: Any, sim: Any) -> None:
    """The demo app (standard library only) streams through hangup and hangs up part way."""
    import asyncio
    import importlib.util
    import random

    spec = importlib.util.spec_from_file_location("compose_app", COMPOSE / "app.py")
    assert spec is not None and spec.loader is not None
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    server, sink = proxy
    random.seed(3)
    reads = [await asyncio.to_thread(app.one_request, server.base_url + "/v1") for _ in range(6)]
    assert all(n > 0 for n in reads)
    outcomes = {r.outcome.value for r in sink.records if r.outcome}
    assert outcomes <= {"completed", "client_cancelled"}
