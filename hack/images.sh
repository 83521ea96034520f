#!/usr/bin/env bash
# `make images`: builds the operator and trainer images with buildah (no daemon), and the test
# node's pause image (hack/pause/build.sh), and pushes them to the loopback registry the test
# cluster pulls from.
#
#   hack/images.sh          # base image (once), both images, push; prints what it did and timings
#   hack/images.sh base     # only the Debian base image; prints its name
#   hack/images.sh env      # prints the export line that shows buildah this storage
#                           #   (eval "$(hack/images.sh env)"; buildah images)
#
# Everything is cached under ${KUBETUNE_CACHE:-~/.cache/kubetune}, beside the test binaries:
#   containers/   buildah's image storage (layers, so a rebuild reuses them across sessions)
#   registry/     the registry's storage (what the cluster pulls)
# No public registry is assumed reachable: the images build FROM a Debian base made here with
# debootstrap (BASE_IMAGE build argument). The Dockerfiles keep their public bases for users.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

CACHE="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
# tests/testground/images.py computes the same paths (the image tests run buildah on this storage).
export CONTAINERS_STORAGE_CONF="$CACHE/containers/storage.conf"
UV_CACHE="${UV_CACHE_DIR:-$HOME/.cache/uv}"
PY="${PY:-$REPO/.venv/bin/python}"

die() { echo "error: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

write_storage_conf() {
  mkdir -p "$CACHE/containers/storage"
  local want
  want=$(printf '[storage]\ndriver = "overlay"\ngraphroot = "%s"\nrunroot = "%s"\n' \
    "$CACHE/containers/storage" "/run/kubetune-containers")
  [[ -f "$CONTAINERS_STORAGE_CONF" && "$(cat "$CONTAINERS_STORAGE_CONF")" == "$want" ]] || echo "$want" >"$CONTAINERS_STORAGE_CONF"
}

app_version() {
  sed -n 's/^appVersion:[[:space:]]*"\{0,1\}\([^"]*\)"\{0,1\}[[:space:]]*$/\1/p' charts/kubetune/Chart.yaml
}

# ---- the base image -------------------------------------------------------------------------
SUITE=bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# python3-venv: the images install into a venv at /opt/kubetune. ca-certificates: HTTPS (S3, hubs).
BASE_PACKAGES=(python3 python3-venv ca-certificates)
# The trainer's base adds, on top (one more layer, the Debian layer is shared with the operator):
# g++, python3-dev: DeepSpeed compiles its CPU ops (the shared-memory all-reduce) just in time;
# libgomp1: OpenMP for torch's CPU kernels.
TRAINER_BASE_PACKAGES=(g++ python3-dev libgomp1)

make_base_image() {
  local name=$1 work ctr mnt include
  [[ $(id -u) -eq 0 ]] || die "making the base image needs root (debootstrap)."
  command -v debootstrap >/dev/null || die "debootstrap is missing: run hack/host-packages.sh (or apt-get install debootstrap)."
  echo ">> making the base image $name: debootstrap $SUITE minbase + ${BASE_PACKAGES[*]} (first time only)" >&2
  work=$(mktemp -d "${TMPDIR:-/var/tmp}/kubetune-base.XXXXXX")
  include=$(IFS=,; echo "${BASE_PACKAGES[*]}")
  if ! debootstrap --variant=minbase --include="$include" "$SUITE" "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1; then
    tail -n 30 "$work/debootstrap.log" >&2
    rm -rf "$work"
    die "debootstrap $SUITE from $MIRROR failed (log above): Debian's archive must be reachable (or set DEBIAN_MIRROR)."
  fi
  local r="$work/rootfs"
  # What an image does not need: package lists and caches, logs, docs.
  rm -rf "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/* "$r"/var/log/* "$r"/usr/share/doc/* \
    "$r"/usr/share/man/* "$r"/usr/share/info/* "$r"/tmp/* "$r"/root/.cache
  # apt works in builds FROM it, against the same archive.
  echo "deb $MIRROR $SUITE main" >"$r/etc/apt/sources.list"
  ctr=$(buildah from scratch)
  mnt=$(buildah mount "$ctr")
  cp -a "$r/." "$mnt/"
  buildah umount "$ctr" >/dev/null
  rm -rf "$work"
  buildah config \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 \
    --cmd /bin/bash \
    --label "org.opencontainers.image.description=Debian $SUITE minbase + ${BASE_PACKAGES[*]} (kubetune hack/images.sh)" \
    "$ctr"
  buildah commit --quiet --rm "$ctr" "$name" >/dev/null
}

make_trainer_base_image() {
  local name=$1 from=$2 ctr
  echo ">> making the trainer base image $name: $from + ${TRAINER_BASE_PACKAGES[*]}" >&2
  ctr=$(buildah from --pull-never "$from")
  buildah run --network host "$ctr" -- sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends ${TRAINER_BASE_PACKAGES[*]} >/dev/null \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/* /usr/share/doc/* /usr/share/man/*" \
    || { buildah rm "$ctr" >/dev/null; die "installing ${TRAINER_BASE_PACKAGES[*]} in the trainer base failed (above): Debian's archive must be reachable."; }
  buildah commit --quiet --rm "$ctr" "$name" >/dev/null
}

# Keyed by the recipe (the functions above and the package lists): change one and a new base is made.
base_key() {
  { declare -f make_base_image make_trainer_base_image; echo "$SUITE $MIRROR ${BASE_PACKAGES[*]} / ${TRAINER_BASE_PACKAGES[*]}"; } \
    | sha256sum | cut -c1-12
}

# Makes both base images when missing; prints "<operator base> <trainer base>".
ensure_base_images() {
  local key base trainer_base t0
  key=$(base_key)
  base="localhost/kubetune/base:$SUITE-$key"
  trainer_base="localhost/kubetune/base:$SUITE-cxx-$key"
  if ! buildah inspect --type image "$base" >/dev/null 2>&1; then
    t0=$(now)
    make_base_image "$base"
    echo ">> base image $base made in $(since "$t0") s" >&2
  fi
  if ! buildah inspect --type image "$trainer_base" >/dev/null 2>&1; then
    t0=$(now)
    make_trainer_base_image "$trainer_base" "$base"
    echo ">> base image $trainer_base made in $(since "$t0") s" >&2
  fi
  echo "$base $trainer_base"
}

# ---- the images -----------------------------------------------------------------------------
check_host() {
  [[ $(id -u) -eq 0 ]] || die "make images runs buildah and debootstrap as root (like the test node); run it as root."
  hack/host-packages.sh || die "host packages missing (see above)."
  command -v buildah >/dev/null || die "buildah is missing: run hack/host-packages.sh (or apt-get install buildah)."
}

build() {
  local image=$1 dockerfile=$2 base=$3 t0
  t0=$(now)
  echo ">> building $image ($dockerfile, FROM $base)" >&2
  # --layers: every instruction's result is cached and reused while its inputs are unchanged.
  # --network host: RUN steps reach PyPI through the host's network, no CNI setup for builds.
  # --format docker: the Dockerfiles' SHELL (bash, pipefail) is a Docker-format field.
  # The uv cache is the host's (a volume of the build): wheels downloaded for .venv are reused.
  # The host's CA bundle is mounted over the base's during RUN steps (not committed), so a
  # TLS-intercepting proxy the host trusts is trusted by pip and uv in the build too.
  local ca=()
  [[ -f /etc/ssl/certs/ca-certificates.crt ]] && ca=(--volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
  buildah bud --format docker --layers --force-rm --network host --pull-never \
    --build-arg "BASE_IMAGE=$base" "${ca[@]}" \
    --volume "$UV_CACHE:/var/cache/kubetune-uv:rw" --build-arg UV_CACHE_DIR=/var/cache/kubetune-uv \
    -f "$dockerfile" -t "$image" . >"$LOGS/$(basename "$(dirname "$dockerfile")").log" 2>&1 \
    || { tail -n 40 "$LOGS/$(basename "$(dirname "$dockerfile")").log" >&2; die "building $image failed (log above; full log in $LOGS)."; }
  echo ">> built $image in $(since "$t0") s" >&2
  TIMINGS+=("build $image: $(since "$t0") s")
}

main() {
  local t0 version
  t0=$(now)
  check_host
  write_storage_conf
  [[ -x "$PY" ]] || die "$PY is missing: run \`make venv\`."
  version=$(app_version)
  [[ -n "$version" ]] || die "could not read appVersion from charts/kubetune/Chart.yaml."
  LOGS="$CACHE/containers/logs"
  mkdir -p "$LOGS" "$UV_CACHE"
  TIMINGS=()

  local tb bases
  tb=$(now)
  read -r -a bases <<<"$(ensure_base_images)"
  TIMINGS+=("base images ${bases[*]}: $(since "$tb") s")
  build "localhost/kubetune/operator:$version" operator/Dockerfile "${bases[0]}"
  build "localhost/kubetune/trainer:$version" trainer-image/Dockerfile "${bases[1]}"
  # The real test node's pod sandbox image (registry.k8s.io is not reachable either).
  local tpause pause="localhost/kubetune/pause:${PAUSE_TAG:-3.10}"
  tpause=$(now)
  hack/pause/build.sh || die "building the pause image failed (see above)."
  TIMINGS+=("build $pause: $(since "$tpause") s")

  # Layers of earlier builds that no image uses any more (the cache of a replaced dependency
  # layer is ~6 GB); the current images' layers stay, so the next build reuses them.
  buildah rmi --prune >/dev/null 2>&1 || true

  # Push to the loopback registry (started for the push, stopped after it).
  local tp
  tp=$(now)
  "$PY" -m tests.testground.images push "localhost/kubetune/operator:$version" "localhost/kubetune/trainer:$version" "$pause"
  TIMINGS+=("push: $(since "$tp") s")

  echo "images (buildah storage $CACHE/containers/storage):"
  buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' | awk -v v="$version" '$1 ~ "kubetune/(operator|trainer):" v "$" || $1 ~ "kubetune/pause:" { $1 = $1; print "  " $0 }'
  echo "registry storage $(du -sh "$CACHE/registry" | cut -f1) in $CACHE/registry"
  echo "timings:"
  printf '  %s\n' "${TIMINGS[@]}" "total: $(since "$t0") s"
}

case "${1:-}" in
  "") main ;;
  base) write_storage_conf; ensure_base_images ;;
  env) echo "export CONTAINERS_STORAGE_CONF=$CONTAINERS_STORAGE_CONF" ;;
  *) die "usage: hack/images.sh [base|env]" ;;
esac
