#!/usr/bin/env bash
# Build the ModelWorks image of one variant, with what this host has when registries are out of reach.
#
#   docker/build-image.sh cpu|gpu [TAG]     (default tag modelworks:<variant>)
#
# - The base: $MODELWORKS_BASE_IMAGE if set; else debian:bookworm-slim if it is here or can be pulled;
#   else a local one made by docker/make-base-image.sh (debootstrap, no registry needed).
# - cpu: torch's CPU wheel goes into the build context (docker/wheels/) when pip can get it as a file
#   (a local wheel, or a mirror); otherwise the build downloads it from PyTorch's CPU index.
set -euo pipefail
cd "$(dirname "$0")/.."
variant="${1:?usage: docker/build-image.sh cpu|gpu [TAG]}"
tag="${2:-modelworks:$variant}"
torch_version=2.13.0
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3

base="${MODELWORKS_BASE_IMAGE:-}"
if [ -z "$base" ]; then
  if docker image inspect debian:bookworm-slim >/dev/null 2>&1 || docker pull -q debian:bookworm-slim >/dev/null 2>&1; then
    base=debian:bookworm-slim
  else
    echo "debian:bookworm-slim cannot be pulled; using a local base image"
    docker/make-base-image.sh modelworks-base:bookworm
    base=modelworks-base:bookworm
  fi
fi

if [ "$variant" = cpu ] && ! compgen -G "docker/wheels/torch-$torch_version+cpu-*.whl" >/dev/null; then
  "$python" -m pip download -q --no-deps "torch==$torch_version+cpu" -d docker/wheels 2>/dev/null \
    || echo "no torch $torch_version+cpu wheel at hand; the build downloads it from PyTorch's CPU index"
fi

echo "building $tag (variant $variant, base $base)"
docker build -f docker/Dockerfile --build-arg TORCH_VARIANT="$variant" --build-arg BASE_IMAGE="$base" -t "$tag" .
