#!/usr/bin/env bash
# Installs the host packages the real node and the image build need, from Debian's archive,
# when they are missing: runc (the OCI runtime containerd drives), buildah (builds the images,
# no daemon), debootstrap (the base image: no public registry is assumed reachable), iptables
# and conntrack (kube-proxy), iproute2 (the node's network namespace).
# Everything else (containerd, kubelet, CNI plugins, CoreDNS, registry) is built from source by
# hack/build-binaries.sh. Needs root (the real node runs as root, like any kubelet).
set -euo pipefail

die() { echo "error: $*" >&2; exit 1; }

declare -A want=([runc]=runc [buildah]=buildah [debootstrap]=debootstrap [iptables]=iptables [conntrack]=conntrack [ip]=iproute2 [nsenter]=util-linux)
missing=()
for cmd in "${!want[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${want[$cmd]}")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

[[ $(id -u) -eq 0 ]] || die "missing host packages: ${missing[*]}. The real test node and the image build need root: run as root, or install them with: sudo apt-get install -y ${missing[*]}"
command -v apt-get >/dev/null 2>&1 || die "missing host packages: ${missing[*]}, and this is not a Debian/Ubuntu host (no apt-get). Install the equivalent packages of your distribution."
echo ">> installing host packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null || die "apt-get update failed: the Debian package archive must be reachable."
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed (see above)."
