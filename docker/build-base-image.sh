#!/usr/bin/env bash
# Build a Debian bookworm image with Python 3.11 without pulling from any registry, for machines
# that cannot pull images: debootstrap a minimal root, then `docker import` it.
#   docker/build-base-image.sh [TAG]    (default weightrelay/base:bookworm; kept when it exists)
# Then build with WEIGHTRELAY_BASE_IMAGE=TAG (compose) or --build-arg BASE_IMAGE=TAG.
set -euo pipefail
tag="${1:-weightrelay/base:bookworm}"
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base image $tag exists"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 1; }
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$tag"
echo "built base image $tag"
