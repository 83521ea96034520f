#!/usr/bin/env bash
# Builds the test ground's binaries through the Go module proxy and caches them
# outside the repository (keyed by version), so a second run does nothing.
#   control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok, helm
#   the real node:  kubelet, kube-proxy, containerd + containerd-shim-runc-v2, crictl, CNI
#                   plugins (bridge, host-local, loopback, portmap), CoreDNS
#   images:         registry (distribution), the loopback registry the cluster pulls from
# Usage: hack/build-binaries.sh [--print-dir]
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.36.3}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.8}"
KWOK_VERSION="${KWOK_VERSION:-v0.7.0}"
HELM_VERSION="${HELM_VERSION:-v3.19.0}"
CONTAINERD_VERSION="${CONTAINERD_VERSION:-v2.4.2}"
CRICTL_VERSION="${CRICTL_VERSION:-v1.37.0}"
CNI_PLUGINS_VERSION="${CNI_PLUGINS_VERSION:-v1.9.1}"
COREDNS_VERSION="${COREDNS_VERSION:-v1.14.7}"
REGISTRY_VERSION="${REGISTRY_VERSION:-v3.1.2}"
# Bump when how a binary is built changes (flags), so caches from the old recipe are not reused.
RECIPE=2

CACHE="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
KEY=$(echo "$RECIPE $K8S_VERSION $ETCD_VERSION $KWOK_VERSION $HELM_VERSION $CONTAINERD_VERSION $CRICTL_VERSION $CNI_PLUGINS_VERSION $COREDNS_VERSION $REGISTRY_VERSION" | sha256sum | cut -c1-10)
BIN="$CACHE/bin/k8s-$K8S_VERSION-$KEY"

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
  if have kube-apiserver && have kube-controller-manager && have kube-scheduler && have kubelet && have kube-proxy; then return; fi
  echo ">> building kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy $K8S_VERSION (first time only; ~10-20 min on 2 cores)" >&2
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
  (cd "$d" && go get "k8s.io/kubernetes/cmd/kube-apiserver@$K8S_VERSION" "k8s.io/kubernetes/cmd/kube-controller-manager@$K8S_VERSION" "k8s.io/kubernetes/cmd/kube-scheduler@$K8S_VERSION" "k8s.io/kubernetes/cmd/kubelet@$K8S_VERSION" "k8s.io/kubernetes/cmd/kube-proxy@$K8S_VERSION") \
    || die "resolving Kubernetes $K8S_VERSION modules failed (see above)."
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local ld="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"
  (cd "$d" && go build -trimpath -ldflags "$ld" -o "$BIN/" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy) \
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
  # helm's Makefile stamps the Kubernetes version its client libraries know (client-go v0.X ->
  # 1.X); without it `helm template` assumes v1.20 and skips charts with a newer kubeVersion.
  local gomod kmin
  gomod=$(go mod download -json "helm.sh/helm/v3@$HELM_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p') || die "could not download helm $HELM_VERSION from the Go module proxy."
  kmin=$(awk '$1 == "k8s.io/client-go" { split($2, v, "."); print v[2] }' "$gomod")
  [[ -n "$kmin" ]] || die "could not read helm $HELM_VERSION's client-go version from $gomod."
  local pkg=helm.sh/helm/v3/pkg
  GOBIN="$BIN" go install -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X $pkg/chartutil.k8sVersionMajor=1 -X $pkg/chartutil.k8sVersionMinor=$kmin -X $pkg/lint/rules.k8sVersionMajor=1 -X $pkg/lint/rules.k8sVersionMinor=$kmin" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" || die "building helm $HELM_VERSION failed (see above)."
}

build_containerd() {
  have containerd && have containerd-shim-runc-v2 && return
  echo ">> building containerd $CONTAINERD_VERSION" >&2
  local m=github.com/containerd/containerd/v2
  GOBIN="$BIN" go install -trimpath -tags "no_btrfs no_devmapper no_zfs" \
    -ldflags "-s -w -X $m/version.Version=$CONTAINERD_VERSION -X $m/version.Package=$m" \
    "$m/cmd/containerd@$CONTAINERD_VERSION" "$m/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION" \
    || die "building containerd $CONTAINERD_VERSION failed (see above)."
}

build_crictl() {
  have crictl && return
  echo ">> building crictl $CRICTL_VERSION" >&2
  GOBIN="$BIN" go install -trimpath -ldflags "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION" "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION" \
    || die "building crictl $CRICTL_VERSION failed (see above)."
}

build_cni() {
  have cni/bridge && have cni/host-local && have cni/loopback && have cni/portmap && return
  echo ">> building CNI plugins $CNI_PLUGINS_VERSION (bridge, host-local, loopback, portmap)" >&2
  local m=github.com/containernetworking/plugins/plugins
  mkdir -p "$BIN/cni"
  GOBIN="$BIN/cni" go install -trimpath -ldflags "-s -w" "$m/main/bridge@$CNI_PLUGINS_VERSION" "$m/ipam/host-local@$CNI_PLUGINS_VERSION" \
    "$m/main/loopback@$CNI_PLUGINS_VERSION" "$m/meta/portmap@$CNI_PLUGINS_VERSION" \
    || die "building the CNI plugins $CNI_PLUGINS_VERSION failed (see above)."
}

build_coredns() {
  have coredns && return
  echo ">> building CoreDNS $COREDNS_VERSION (kubernetes, cache, errors, health, ready, log plugins)" >&2
  local d="$WORK/coredns-$COREDNS_VERSION"; rm -rf "$d"; mkdir -p "$d"
  # Only the plugins the node's Corefile uses: the full plugin set drags in every cloud SDK.
  cat > "$d/main.go" <<'GO'
package main

import (
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func main() { coremain.Run() }
GO
  printf 'module kubetune.local/coredns\ngo 1.26\n' > "$d/go.mod"
  (cd "$d" && go get "github.com/coredns/coredns@$COREDNS_VERSION" && go mod tidy && go build -trimpath -ldflags "-s -w" -o "$BIN/coredns" .) \
    || die "building CoreDNS $COREDNS_VERSION failed (see above)."
}

build_registry() {
  have registry && return
  echo ">> building the container registry (distribution) $REGISTRY_VERSION" >&2
  GOBIN="$BIN" go install -trimpath -ldflags "-s -w" "github.com/distribution/distribution/v3/cmd/registry@$REGISTRY_VERSION" \
    || die "building registry $REGISTRY_VERSION failed (see above)."
}

build_etcd
build_kwok
build_helm
build_k8s
build_containerd
build_crictl
build_cni
build_coredns
build_registry
echo "$BIN"
