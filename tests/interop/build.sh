#!/usr/bin/env bash
# Build the interop peers the tests run against (docs/architecture.md, "Interop peers"):
#   - SPIRE (spire-server, spire-agent) at the pinned release below, from the Go module proxy;
#   - spiffeprobe, the small go-spiffe v2 program in this folder.
# Everything goes to a cache folder outside the repository and is reused between runs: SPIRE is
# keyed by its version, spiffeprobe by a hash of its sources (go.mod, go.sum, *.go) and of the Go
# version. Idempotent; on success prints one KEY=PATH line per binary (and nothing else on stdout);
# any failure exits non-zero with the tool's own error on stderr.
#   QHX_INTEROP_CACHE=DIR   the cache folder (default ${XDG_CACHE_HOME:-$HOME/.cache}/qhx-edge-interop)
#   QHX_INTEROP_SKIP_SPIRE=1  build only spiffeprobe
#   build.sh --check        build nothing: print what is built already, exit 3 if something is not
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
SPIRE_VERSION="v1.13.3"
cache="${QHX_INTEROP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/qhx-edge-interop}"

fail() { echo "interop build: $*" >&2; exit 1; }
log() { echo "interop build: $*" >&2; }

command -v go >/dev/null 2>&1 || fail "go is not installed (the interop peers are Go programs)"
case "$cache" in /*) ;; *) cache="$PWD/$cache" ;; esac
case "$cache/" in "$(cd "$here/../.." && pwd)"/*) fail "the cache folder $cache is inside the repository" ;; esac
mkdir -p "$cache"

check=0
[ "${1:-}" = "--check" ] && check=1
# One build of each peer at a time per cache folder: a second caller waits, then finds it built.
# SPIRE and spiffeprobe have a lock each, so a test that needs only spiffeprobe never waits for
# a first SPIRE build.
lock() { exec {fd}>"$cache/$1.lock"; if command -v flock >/dev/null 2>&1; then flock "$fd"; fi; }

build_spire() {
  local dir="$cache/spire-$SPIRE_VERSION" fd
  lock "spire-$SPIRE_VERSION"
  if [ -x "$dir/bin/spire-server" ] && [ -x "$dir/bin/spire-agent" ] && [ -f "$dir/bin/.complete" ]; then
    return 0
  fi
  [ "$check" = 1 ] && { log "SPIRE $SPIRE_VERSION is not built in $dir"; exit 3; }
  log "building SPIRE $SPIRE_VERSION in $dir (the first build takes many minutes)"
  local started=$SECONDS
  rm -rf "$dir/bin.tmp" && mkdir -p "$dir/bin.tmp"
  (
    cd "$dir"
    # A throwaway module: the proxy lists no SPIRE version, so `go install pkg@version` is refused;
    # `go get -tool` with the exact version pins it in this module's go.mod instead.
    [ -f go.mod ] || go mod init qhx-edge-interop/spire >/dev/null 2>&1
    go get -tool "github.com/spiffe/spire/cmd/spire-server@$SPIRE_VERSION"
    go get -tool "github.com/spiffe/spire/cmd/spire-agent@$SPIRE_VERSION"
    # spire-server's sqlite datastore needs cgo.
    CGO_ENABLED=1 go build -trimpath -buildvcs=false -o bin.tmp/ \
      github.com/spiffe/spire/cmd/spire-server github.com/spiffe/spire/cmd/spire-agent
  ) >&2 || fail "SPIRE $SPIRE_VERSION did not build (go's error is above)"
  # Built from the module, not SPIRE's release makefile, they call themselves 1.13.3-dev-unk.
  local bin
  for bin in spire-server spire-agent; do
    case "$("$dir/bin.tmp/$bin" --version 2>&1)" in
      "${SPIRE_VERSION#v}"*) ;;
      *) fail "the built $bin does not run, or is not $SPIRE_VERSION: $("$dir/bin.tmp/$bin" --version 2>&1)" ;;
    esac
  done
  echo "$SPIRE_VERSION" > "$dir/bin.tmp/.complete"
  rm -rf "$dir/bin" && mv "$dir/bin.tmp" "$dir/bin"
  log "SPIRE $SPIRE_VERSION built in $((SECONDS - started)) s"
}

build_probe() {
  local sum
  sum="$(
    cd "$here"
    { go version; find . -name '*.go' -o -name go.mod -o -name go.sum | LC_ALL=C sort | xargs sha256sum; } \
      | sha256sum | cut -c1-16
  )"
  local dir="$cache/spiffeprobe-$sum" fd
  lock spiffeprobe
  if [ -x "$dir/spiffeprobe" ]; then
    probe="$dir/spiffeprobe"
    return 0
  fi
  [ "$check" = 1 ] && { log "spiffeprobe ($sum) is not built in $dir"; exit 3; }
  log "building spiffeprobe ($sum) in $dir"
  mkdir -p "$dir"
  (cd "$here" && go build -trimpath -buildvcs=false -mod=readonly -o "$dir/spiffeprobe.tmp" ./spiffeprobe) >&2 \
    || fail "spiffeprobe did not build (go's error is above)"
  mv "$dir/spiffeprobe.tmp" "$dir/spiffeprobe"
  probe="$dir/spiffeprobe"
}

probe=""
if [ "${QHX_INTEROP_SKIP_SPIRE:-0}" != "1" ]; then
  build_spire
fi
build_probe
if [ "${QHX_INTEROP_SKIP_SPIRE:-0}" != "1" ]; then
  echo "SPIRE_SERVER=$cache/spire-$SPIRE_VERSION/bin/spire-server"
  echo "SPIRE_AGENT=$cache/spire-$SPIRE_VERSION/bin/spire-agent"
fi
echo "SPIFFEPROBE=$probe"
