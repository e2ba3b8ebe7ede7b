#!/usr/bin/env bash
# Regenerates the hash-pinned locks the Dockerfile installs from, after a dependency change in
# pyproject.toml (tests/test_docker_steps.py fails until the locks name every dependency).
# Needs network access to the package index; uses pip-tools in a throwaway venv.
set -euo pipefail
cd "$(dirname "$0")/../.."
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3.11 -m venv "$tools"
"$tools/bin/pip" install -q pip-tools
compile() {
  "$tools/bin/pip-compile" -q --generate-hashes --allow-unsafe --strip-extras \
    --no-emit-index-url --no-emit-find-links --output-file "$@"
}
# Runtime: exactly [project.dependencies] of pyproject.toml.
compile deploy/docker/requirements.txt pyproject.toml
# Build: the build backend named in [build-system].requires (copied into build-requirements.in).
compile deploy/docker/build-requirements.txt deploy/docker/build-requirements.in
