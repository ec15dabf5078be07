#!/usr/bin/env bash
# Build the production runner image from runner_images/Dockerfile (needs the base image
# from a registry and PyPI). The libraries are pinned to the versions of this server's
# environment (the runtime key), and the image is labelled and tagged with that key, so
# the Docker backend accepts it: sandbox-runner:<runtime key> and sandbox-runner:latest.
# The build context is a temporary directory holding only the Dockerfile and the SDK.
# Extra arguments go to `docker build` (e.g. --build-arg BASE=registry.example/python:3.11-slim).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${SANDBOX_PYTHON:-.venv/bin/python}
REPOSITORY=${SANDBOX_RUNNER_REPOSITORY:-sandbox-runner}

KEY=$("$PY" -c "from sandbox.runner.runtime import runtime_key; print(runtime_key())")
PACKAGES=$("$PY" -c "
import importlib.metadata as md
from sandbox.runner.runtime import ALLOWED_DISTRIBUTIONS
pins = []
for name in ALLOWED_DISTRIBUTIONS:
    try:
        pins.append(f'{name}=={md.version(name)}')
    except md.PackageNotFoundError:
        pass
print(' '.join(pins))")

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
mkdir -p "$context/sandbox/sdk"
cp sandbox/__init__.py "$context/sandbox/"
cp sandbox/sdk/*.py "$context/sandbox/sdk/"
cp runner_images/Dockerfile "$context/Dockerfile"

echo "build.sh: runtime $KEY: $PACKAGES" >&2
docker build --build-arg PACKAGES="$PACKAGES" --label "org.sandbox.runtime-key=$KEY" \
  -t "$REPOSITORY:$KEY" -t "$REPOSITORY:latest" "$@" "$context" >&2
docker image inspect --format '{{.Id}}' "$REPOSITORY:$KEY"
