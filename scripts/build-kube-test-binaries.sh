#!/usr/bin/env bash
# Build the Kubernetes API server, kubectl and etcd that the Kubernetes tests run on 127.0.0.1,
# from the Go module proxy alone, once, into a cache directory that later runs reuse.
#
#   bash scripts/build-kube-test-binaries.sh      (or: make kube-bin)
#
# Where: ${LLMLB_KUBE_BIN:-$HOME/.cache/llmlb/kube-v1.37.2} (tests/support/kube.py reads the same).
# Idempotent: a binary that is there and answers its version is kept; with all three there it does
# nothing. Cold on 2 cores it takes ~6 min and ~5 GB of Go module and build cache
# (measured: kubectl ~1.5 min, kube-apiserver ~3.5 min, etcd ~25 s).
#
# k8s.io/kubernetes cannot be `go install`ed: its go.mod replaces ~30 k8s.io/* staging modules with
# ./staging/... paths that are not in the module zip. So a throwaway module requires it and points
# each replaced staging module at its published v0.X.Y tag; etcd's server module needs the same
# treatment for its ../api, ../client/... replaces.
set -euo pipefail

KUBE_VERSION=v1.37.2
STAGING_VERSION=v0.37.2
ETCD_VERSION=v3.7.4
BIN_DIR=${LLMLB_KUBE_BIN:-$HOME/.cache/llmlb/kube-${KUBE_VERSION}}
# Bounds for the go commands (seconds): module download/tidy, one binary's compile.
TIDY_TIMEOUT=${LLMLB_KUBE_TIDY_TIMEOUT:-1200}
BUILD_TIMEOUT=${LLMLB_KUBE_BUILD_TIMEOUT:-1800}

export GOTOOLCHAIN=local
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0

log() { printf '[kube-bin %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v go >/dev/null || die "go is not installed (need Go >= 1.26 for Kubernetes ${KUBE_VERSION})"
command -v timeout >/dev/null || die "timeout (coreutils) is not installed"

# Does the cached binary exist and answer its version? (bounded: a broken binary must not hang us)
binary_ok() {
    local name=$1 path=$BIN_DIR/$1 out
    [[ -x $path ]] || return 1
    case $name in
        kubectl) out=$(timeout 20 "$path" version --client 2>&1) || return 1 ;;
        *) out=$(timeout 20 "$path" --version 2>&1) || return 1 ;;
    esac
    case $name in
        kube-apiserver | kubectl) [[ $out == *"$KUBE_VERSION"* ]] || return 1 ;;
        etcd) [[ $out == *"${ETCD_VERSION#v}"* ]] || return 1 ;;
    esac
}

needed=()
for name in kube-apiserver kubectl etcd; do
    if binary_ok "$name"; then
        log "$name: cached and working"
    else
        needed+=("$name")
    fi
done
if ((${#needed[@]} == 0)); then
    log "all binaries present and working in $BIN_DIR: nothing to do"
    echo "$BIN_DIR"
    exit 0
fi
log "to build: ${needed[*]} (Kubernetes ${KUBE_VERSION}, etcd ${ETCD_VERSION}) into $BIN_DIR"
log "$(go version)"

mkdir -p "$BIN_DIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/llmlb-kube-build.XXXXXX")
cleanup() {
    rm -rf "$WORK"
    # Half-written binaries of an interrupted build (the cache itself only ever gets whole ones).
    rm -f "$BIN_DIR"/.*.tmp.$$
}
trap cleanup EXIT

# The go.mod of MODULE@VERSION, from the module cache (downloaded through the proxy if needed).
module_gomod() {
    local json gomod
    json=$(timeout "$TIDY_TIMEOUT" go mod download -json "$1@$2") || die "go mod download $1@$2 failed"
    gomod=$(sed -nE 's/^[[:space:]]*"GoMod": "(.*)",?$/\1/p' <<<"$json")
    [[ -f $gomod ]] || die "no go.mod for $1@$2 in: $json"
    echo "$gomod"
}

# Modules that MODULE's go.mod replaces with a local directory (./staging/..., ../api, ...).
local_replaces() {
    sed -nE 's#^[[:space:]]*(replace[[:space:]]+)?([^[:space:]]+)[[:space:]]+=>[[:space:]]+\.\.?/.*#\2#p' "$1"
}

# A throwaway module in DIR that requires MODULE@VERSION, replaces its local replaces with
# REPLACE_VERSION (minus the EXCLUDED ones) and imports the main packages to build.
# usage: make_build_module DIR MODULE VERSION REPLACE_VERSION "EXCLUDED..." PACKAGE...
make_build_module() {
    local dir=$1 module=$2 version=$3 replace_version=$4 excluded=$5
    shift 5
    local gomod m count=0
    mkdir -p "$dir"
    gomod=$(module_gomod "$module" "$version")
    (
        cd "$dir"
        go mod init "llmlb.test/build-$(basename "$dir")" >/dev/null 2>&1
        # The same Go language version as the module we build (its code may need it).
        go mod edit -go="$(sed -nE 's/^go[[:space:]]+([0-9.]+).*/\1/p' "$gomod")"
        go mod edit -require="$module@$version"
        for m in $(local_replaces "$gomod"); do
            [[ " $excluded " == *" $m "* ]] && continue
            go mod edit -replace="$m=$m@$replace_version"
            count=$((count + 1))
        done
        log "$(basename "$dir"): requires $module@$version, $count local replaces -> $replace_version"
        {
            echo '//go:build tools'
            echo
            echo '// Package tools only pins the commands this module builds.'
            echo 'package tools'
            echo
            echo 'import ('
            for p in "$@"; do echo "	_ \"$p\""; done
            echo ')'
        } >tools.go
        log "$(basename "$dir"): go mod tidy (downloads the dependencies on a cold module cache)"
        timeout "$TIDY_TIMEOUT" go mod tidy || die "go mod tidy for $module timed out or failed"
    )
}

# Build PACKAGE in DIR to BIN_DIR/NAME through a temporary name, then rename it into place.
build_binary() {
    local dir=$1 name=$2 package=$3 ldflags=$4 tmp start
    tmp="$BIN_DIR/.$name.tmp.$$"
    start=$SECONDS
    log "$name: go build $package (bounded to ${BUILD_TIMEOUT}s)"
    (cd "$dir" && timeout "$BUILD_TIMEOUT" go build -trimpath -ldflags "$ldflags" -o "$tmp" "$package") ||
        die "$name: go build failed or timed out"
    mv -f "$tmp" "$BIN_DIR/$name"
    binary_ok "$name" || die "$name: built but does not answer its version"
    log "$name: built in $((SECONDS - start))s ($(du -h "$BIN_DIR/$name" | cut -f1))"
}

needs() { [[ " ${needed[*]} " == *" $1 "* ]]; }
total_start=$SECONDS

if needs kube-apiserver || needs kubectl; then
    minor=${KUBE_VERSION#v1.}
    minor=${minor%%.*}
    vpkg=k8s.io/component-base/version
    kube_ldflags="-s -w -X $vpkg.gitVersion=$KUBE_VERSION -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=$minor"
    kube_ldflags+=" -X $vpkg.gitTreeState=clean"
    packages=()
    if needs kube-apiserver; then packages+=(k8s.io/kubernetes/cmd/kube-apiserver); fi
    if needs kubectl; then packages+=(k8s.io/kubernetes/cmd/kubectl); fi
    make_build_module "$WORK/kubernetes" k8s.io/kubernetes "$KUBE_VERSION" "$STAGING_VERSION" \
        "k8s.io/sample-cli-plugin k8s.io/sample-controller" "${packages[@]}"
    # kubectl first: it is quick, and proves the module works before the long apiserver compile.
    if needs kubectl; then
        build_binary "$WORK/kubernetes" kubectl k8s.io/kubernetes/cmd/kubectl "$kube_ldflags"
    fi
    if needs kube-apiserver; then
        build_binary "$WORK/kubernetes" kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$kube_ldflags"
    fi
fi

if needs etcd; then
    make_build_module "$WORK/etcd" go.etcd.io/etcd/server/v3 "$ETCD_VERSION" "$ETCD_VERSION" "" \
        go.etcd.io/etcd/server/v3
    build_binary "$WORK/etcd" etcd go.etcd.io/etcd/server/v3 "-s -w"
fi

log "done in $((SECONDS - total_start))s; $(du -sh "$BIN_DIR" | cut -f1) in $BIN_DIR"
echo "$BIN_DIR"
