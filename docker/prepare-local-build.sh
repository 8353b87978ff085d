#!/usr/bin/env bash
# Settings for building the images on a machine that cannot pull images and reaches the package
# index only through the host's network and CA bundle (such as this project's CI machine).
# Prints `export` lines:   eval "$(docker/prepare-local-build.sh)"
# A normal machine needs none of this: `docker compose build` works with the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p docker/build/wheels
docker/build-base-image.sh weightrelay/base:bookworm >&2
echo "export WEIGHTRELAY_BASE_IMAGE=weightrelay/base:bookworm"
echo "export WEIGHTRELAY_BUILD_NETWORK=host"
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  cp /etc/ssl/certs/ca-certificates.crt docker/build/ca.crt
  echo "export WEIGHTRELAY_PIP_CA_BUNDLE=ca.crt"
fi
# A CPU-only torch wheel on local disk keeps the torch image small (no CUDA libraries).
wheel="$(ls /opt/wheels/torch-*+cpu-cp311-*.whl 2>/dev/null | sort -V | tail -n 1 || true)"
if [ -n "$wheel" ]; then
  cp -u "$wheel" docker/build/wheels/
  version="$(basename "$wheel" | cut -d- -f2)"
  echo "export WEIGHTRELAY_TORCH_REQUIREMENT=torch==$version"
fi
