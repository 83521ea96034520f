#!/usr/bin/env bash
# Builds the pod sandbox image localhost/kubetune/pause:<tag> with buildah: a static pause
# binary (pause.c) in an empty image. The real test node's containerd uses it as its sandbox
# image (registry.k8s.io is not reachable from the build machines). Skips when the image from
# the same source exists.
set -euo pipefail
cd "$(dirname "$0")"
TAG="${PAUSE_TAG:-3.10}"
IMAGE="localhost/kubetune/pause:$TAG"
SRC_HASH=$(cat pause.c build.sh | sha256sum | cut -c1-16)

if [[ "$(buildah inspect --type image --format '{{index .OCIv1.Config.Labels "io.kubetune.source-hash"}}' "$IMAGE" 2>/dev/null || true)" == "$SRC_HASH" ]]; then
  exit 0
fi
command -v gcc >/dev/null || { echo "error: gcc is needed to build the pause binary (apt-get install -y gcc libc6-dev)." >&2; exit 1; }
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
gcc -static -O2 -s -o "$out/pause" pause.c
ctr=$(buildah from scratch)
trap 'rm -rf "$out"; buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
buildah copy --chmod 0755 "$ctr" "$out/pause" /pause >/dev/null
buildah config --entrypoint '["/pause"]' --user 65535:65535 --label "io.kubetune.source-hash=$SRC_HASH" "$ctr"
buildah commit --quiet "$ctr" "$IMAGE" >/dev/null
echo ">> built $IMAGE" >&2
