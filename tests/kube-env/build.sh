#!/usr/bin/env bash
# Builds the Kubernetes test control plane (etcd, kube-apiserver, kube-controller-manager) from the
# Go modules pinned in this folder's go.mod/go.sum, once, into
#   ${TASKPODS_CACHE:-$HOME/.cache/taskpods}/kube-<version>/bin
# and prints that directory on stdout. A later run whose stamp matches go.mod+go.sum reuses the
# binaries without invoking the Go toolchain at all, so CI pays for the build only on a fresh machine.
#
# Only the Go module proxy is contacted (through `go`), never a release download.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

log() { echo "kube-env: $*" >&2; }

command -v go >/dev/null || { log "go toolchain not found (needs Go >= $(awk '/^go /{print $2}' go.mod))"; exit 1; }

version="$(awk '$1 == "k8s.io/kubernetes" {print $2; exit}' go.mod)"
etcd_version="$(awk '$1 == "go.etcd.io/etcd/server/v3" {print $2; exit}' go.mod)"
[[ -n "$version" && -n "$etcd_version" ]] || { log "cannot read pinned versions from go.mod"; exit 1; }

cache_root="${TASKPODS_CACHE:-$HOME/.cache/taskpods}"
dest="$cache_root/kube-$version"
bin="$dest/bin"
# The stamp ties the cached binaries to the exact dependency set, so editing go.mod/go.sum rebuilds.
stamp="$(cat go.mod go.sum | sha256sum | cut -d' ' -f1)"

if [[ -f "$dest/stamp" && "$(cat "$dest/stamp")" == "$stamp" ]] &&
    [[ -x "$bin/etcd" && -x "$bin/kube-apiserver" && -x "$bin/kube-controller-manager" ]]; then
    log "reusing $bin"
    echo "$bin"
    exit 0
fi

log "building Kubernetes $version and etcd $etcd_version into $bin (first run takes a while)"
mkdir -p "$cache_root"
# Build into a scratch directory next to the destination and rename at the end, so an interrupted
# build never leaves a half-filled cache that a later run would trust.
work="$(mktemp -d "$cache_root/.kube-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
mkdir -p "$work/bin"

# -mod=readonly: build exactly the versions in go.mod, verified against the hashes in go.sum (so no
# checksum-database lookup is needed); fail rather than silently re-resolve if they disagree.
# -buildvcs=false: no git stamping (a CI clone may belong to another user). GOTOOLCHAIN=local: use the
# installed Go, never fetch another toolchain. CGO off: static binaries, no C toolchain needed.
# -trimpath and -s -w: smaller, reproducible output.
export GOFLAGS="-mod=readonly -buildvcs=false"
export GOTOOLCHAIN=local
export CGO_ENABLED=0
# The version the API server reports at /version; without it, it would claim v0.0.0-master.
minor="$(echo "$version" | cut -d. -f2)"
ldflags="-s -w \
 -X k8s.io/component-base/version.gitVersion=$version \
 -X k8s.io/component-base/version.gitMajor=1 \
 -X k8s.io/component-base/version.gitMinor=$minor \
 -X k8s.io/component-base/version.gitTreeState=clean \
 -X k8s.io/client-go/pkg/version.gitVersion=$version"

start=$(date +%s)
# nice: the build competes with whatever else runs on a small machine; let interactive work win.
# One `go build` for all three shares the common packages' compilation.
nice -n 10 go build -trimpath -ldflags="$ldflags" -o "$work/bin/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    go.etcd.io/etcd/server/v3
# Go names a binary after its package path, skipping a major-version suffix: .../etcd/server/v3 -> server.
mv "$work/bin/server" "$work/bin/etcd"
echo "$stamp" >"$work/stamp"
log "built in $(($(date +%s) - start))s"

rm -rf "$dest"
mv "$work" "$dest"
trap - EXIT
echo "$bin"
