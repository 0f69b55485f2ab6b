#!/usr/bin/env bash
# publish.sh: build carbond's image for linux/amd64 and linux/arm64 as one manifest list with podman, and push it.
#
#   usage: deploy/image/publish.sh [IMAGE]     default IMAGE: localhost/carbond:<version from pyproject.toml>
#
# The image is pure Python (a noarch wheel; nvidia-ml-py and bcrypt have wheels for both), so each architecture is
# the same Dockerfile built on that architecture's base image. Building the foreign one needs either a native
# builder or QEMU user emulation registered with binfmt_misc (Debian: apt install qemu-user-static; or
# `podman run --privileged --rm docker.io/tonistiigi/binfmt --install arm64`). Pushing needs `podman login
# <registry>` first. Without a registry (IMAGE under localhost/) it builds and stops: load the image into your
# nodes yourself (podman save | k3s ctr images import -, kind load image-archive).
# Then set the same IMAGE in deploy/kubernetes/image/image.yaml (or your kustomization's `images:`).
set -euo pipefail
cd "$(dirname "$0")/../.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
image=${1:-localhost/carbond:$version}
platforms=${PLATFORMS:-linux/amd64,linux/arm64}
podman manifest rm "$image" >/dev/null 2>&1 || true
podman build --platform "$platforms" --manifest "$image" --format docker .
podman manifest inspect "$image"
case "$image" in
  localhost/*) echo "built $image for $platforms (not pushed: no registry)" ;;
  *) podman manifest push --all "$image" "docker://$image" && echo "pushed $image for $platforms" ;;
esac
