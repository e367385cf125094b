#!/usr/bin/env bash
# Build the OpenTelemetry Collector that llmlb's tracing tests receive spans with (OTLP receiver +
# file exporter, see scripts/otelcol/builder.yaml), with the OpenTelemetry Collector Builder (ocb)
# from the Go module proxy alone, once, into a cache directory that later runs reuse.
#
#   bash scripts/build-otel-collector.sh      (or: make otel-bin)
#
# Where: ${LLMLB_CACHE:-$HOME/.cache/llmlb}/otelcol-v0.161.0/otelcol-llmlb (tests/support/otel.py
# reads the same). Idempotent: a binary that is there and answers its version is kept and nothing
# is done. Cold (empty Go module and build caches) on 2 cores it took 93 s and left ~1.2 GB of Go
# caches; with warm Go caches ~30 s.
set -euo pipefail

OTELCOL_VERSION=v0.161.0
HERE=$(cd "$(dirname "$0")" && pwd)
MANIFEST=$HERE/otelcol/builder.yaml
CACHE=${LLMLB_CACHE:-$HOME/.cache/llmlb}
BIN_DIR=$CACHE/otelcol-$OTELCOL_VERSION
NAME=otelcol-llmlb
# Bound for the whole build (seconds): module download and compile.
BUILD_TIMEOUT=${LLMLB_OTEL_BUILD_TIMEOUT:-1800}

export GOTOOLCHAIN=local
export GOFLAGS="-buildvcs=false"
export CGO_ENABLED=0

log() { printf '[otel-bin %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Does the cached binary exist and answer its version? (bounded: a broken binary must not hang us)
binary_ok() {
    local out
    [[ -x $BIN_DIR/$NAME ]] || return 1
    out=$(timeout 20 "$BIN_DIR/$NAME" --version 2>&1) || return 1
    [[ $out == *"${OTELCOL_VERSION#v}"* ]]
}

if binary_ok; then
    log "$NAME: cached and working in $BIN_DIR: nothing to do"
    echo "$BIN_DIR/$NAME"
    exit 0
fi

command -v go >/dev/null || die "go is not installed (need Go >= 1.24 for the collector ${OTELCOL_VERSION})"
command -v timeout >/dev/null || die "timeout (coreutils) is not installed"
[[ -f $MANIFEST ]] || die "no builder manifest at $MANIFEST"
log "to build: $NAME (collector ${OTELCOL_VERSION}) into $BIN_DIR; $(go version)"

mkdir -p "$BIN_DIR"
# ocb writes the generated sources and the binary to output_path; build in a throwaway directory
# and move only a whole, working binary into the cache.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/llmlb-otelcol-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
start=$SECONDS
log "go run go.opentelemetry.io/collector/cmd/builder@${OTELCOL_VERSION} (bounded to ${BUILD_TIMEOUT}s)"
# The manifest with dist::output_path pointing into the throwaway directory.
awk -v out="$WORK/out" '{ print } /^dist:/ { print "  output_path: " out }' "$MANIFEST" >"$WORK/builder.yaml"
timeout "$BUILD_TIMEOUT" go run "go.opentelemetry.io/collector/cmd/builder@${OTELCOL_VERSION}" \
    --config "$WORK/builder.yaml" ||
    die "the collector builder failed or timed out"
[[ -x $WORK/out/$NAME ]] || die "the builder finished but wrote no $WORK/out/$NAME"
mv -f "$WORK/out/$NAME" "$BIN_DIR/$NAME"
binary_ok || die "$NAME: built but does not answer its version"
log "$NAME: built in $((SECONDS - start))s ($(du -h "$BIN_DIR/$NAME" | cut -f1)) in $BIN_DIR"
echo "$BIN_DIR/$NAME"
