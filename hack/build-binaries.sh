#!/usr/bin/env bash
# Builds the test ground's binaries through the Go module proxy and caches them
# outside the repository (keyed by version), so a second run does nothing.
#   etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok, helm
# Usage: hack/build-binaries.sh [--print-dir]
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.36.3}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.8}"
KWOK_VERSION="${KWOK_VERSION:-v0.7.0}"
HELM_VERSION="${HELM_VERSION:-v3.19.0}"

CACHE="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
BIN="$CACHE/bin/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION-helm-$HELM_VERSION"

if [[ "${1:-}" == "--print-dir" ]]; then echo "$BIN"; exit 0; fi

die() { echo "error: $*" >&2; exit 1; }

command -v go >/dev/null 2>&1 || die "no Go toolchain on PATH. The test control plane is built from source through the Go module proxy: install Go >= 1.26 (https://go.dev/dl/) and run again."
GO_MINOR=$(go env GOVERSION | sed -E 's/^go1\.([0-9]+).*/\1/')
[[ "$GO_MINOR" -ge 26 ]] || die "Go $(go env GOVERSION) is too old: Kubernetes $K8S_VERSION needs Go >= 1.26. Upgrade Go, or export GOTOOLCHAIN=go1.26.8 to let the go command fetch it."

export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:--buildvcs=false}"
# The checksum database is not always reachable from build machines; the proxy is.
export GONOSUMDB="${GONOSUMDB:-*}" GONOSUMCHECK=1 GOSUMDB="${GOSUMDB:-off}"

mkdir -p "$BIN"
WORK="$CACHE/build"
mkdir -p "$WORK"

have() { [[ -x "$BIN/$1" ]]; }

build_k8s() {
  if have kube-apiserver && have kube-controller-manager && have kube-scheduler; then return; fi
  echo ">> building kube-apiserver, kube-controller-manager, kube-scheduler $K8S_VERSION (first time only; ~10-20 min on 2 cores)" >&2
  local d="$WORK/k8s-$K8S_VERSION"; rm -rf "$d"; mkdir -p "$d"
  local modjson gomod staging_ver
  modjson=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION") || die "could not download k8s.io/kubernetes@$K8S_VERSION from the Go module proxy ($(go env GOPROXY))."
  gomod=$(printf '%s' "$modjson" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  staging_ver="v0.${K8S_VERSION#v1.}"
  {
    echo "module kubetune.local/k8s-binaries"
    echo "go 1.26"
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo "replace ("
    # Each staging module the real go.mod replaces with ./staging/... -> the matching published tag.
    grep -E '^\s+k8s\.io/[^ ]+ => \./staging/' "$gomod" | awk -v v="$staging_ver" '{print "\t" $1 " => " $1 " " v}'
    echo ")"
  } > "$d/go.mod"
  echo 'package main' > "$d/dummy.go"
  echo 'func main() {}' >> "$d/dummy.go"
  (cd "$d" && go get "k8s.io/kubernetes/cmd/kube-apiserver@$K8S_VERSION" "k8s.io/kubernetes/cmd/kube-controller-manager@$K8S_VERSION" "k8s.io/kubernetes/cmd/kube-scheduler@$K8S_VERSION") \
    || die "resolving Kubernetes $K8S_VERSION modules failed (see above)."
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local ld="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"
  (cd "$d" && go build -trimpath -ldflags "$ld" -o "$BIN/" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler) \
    || die "building Kubernetes $K8S_VERSION failed (see the compiler output above)."
}

build_etcd() {
  have etcd && return
  echo ">> building etcd $ETCD_VERSION" >&2
  local d="$WORK/etcd-$ETCD_VERSION"; rm -rf "$d"; mkdir -p "$d"
  cat > "$d/main.go" <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  printf 'module kubetune.local/etcd\ngo 1.26\n' > "$d/go.mod"
  (cd "$d" && go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" && go mod tidy && go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" .) \
    || die "building etcd $ETCD_VERSION failed (see above)."
}

build_kwok() {
  have kwok && return
  echo ">> building kwok $KWOK_VERSION" >&2
  GOBIN="$BIN" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" || die "building kwok $KWOK_VERSION failed (see above)."
}

build_helm() {
  have helm && return
  echo ">> building helm $HELM_VERSION" >&2
  GOBIN="$BIN" go install -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" || die "building helm $HELM_VERSION failed (see above)."
}

build_etcd
build_kwok
build_helm
build_k8s
echo "$BIN"
