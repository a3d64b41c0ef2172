#!/usr/bin/env bash
# Build kube-score (the static checks of tests/chart/test_kube_score.py) from the
# Go module proxy, pinned by tools/kube-score/go.mod and go.sum.
#
# Usage: tests/cluster/build-kube-score.sh     # prints the binary's path as the last line
# Env:   GO=/path/to/go   BUILD_JOBS=N   XDG_CACHE_HOME=...
#
# Cached like build.sh's control-plane binaries: the output dir is keyed by the
# pinned version, the Go version, a build-flag revision and a hash of the pins,
# so a warm run only checks that the binary exists. Its own script and key (not
# a step of build.sh) so that pinning or bumping kube-score never invalidates
# the half-hour control-plane build.
set -euo pipefail

main() {
  here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  tools="$here/tools/kube-score"

  go_bin="${GO:-}"
  if [[ -z "$go_bin" ]]; then
    if command -v go >/dev/null 2>&1; then
      go_bin="$(command -v go)"
    elif [[ -x /usr/local/go/bin/go ]]; then
      go_bin=/usr/local/go/bin/go
    else
      echo "build-kube-score.sh: no Go toolchain found (install Go >= 1.26 or set GO=/path/to/go)" >&2
      exit 1
    fi
  fi

  version="$(awk '$1 == "github.com/zegl/kube-score" || ($1 == "require" && $2 == "github.com/zegl/kube-score") {print $NF; exit}' "$tools/go.mod")"
  if ! go_version="$("$go_bin" env GOVERSION 2>/dev/null)" || [[ -z "$go_version" ]]; then
    echo "build-kube-score.sh: $go_bin does not work as a Go toolchain (set GO=/path/to/go)" >&2
    exit 1
  fi
  # Bump when the flags below change.
  build_rev=1
  pin_hash="$(cat "$tools/go.mod" "$tools/go.sum" | sha256sum | cut -c1-12)"
  key="kube-score-${version}_${go_version}_r${build_rev}_${pin_hash}"

  cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/unlearning-operator"
  bin_dir="$cache_root/bin/$key"
  log_dir="$cache_root/logs"
  log="$log_dir/build-$key.log"

  if [[ -f "$bin_dir/.complete" && -x "$bin_dir/kube-score" ]]; then
    touch "$bin_dir/.complete"
    echo "$bin_dir/kube-score"
    exit 0
  fi

  mkdir -p "$cache_root/bin" "$log_dir"
  # Its own lock: waiting behind a control-plane build would cost half an hour.
  exec 9>"$cache_root/bin/.lock-kube-score"
  if command -v flock >/dev/null 2>&1; then
    flock 9
  fi
  if [[ -f "$bin_dir/.complete" && -x "$bin_dir/kube-score" ]]; then
    echo "$bin_dir/kube-score"
    exit 0
  fi

  staging="$(mktemp -d "$cache_root/bin/.build-XXXXXX")"
  trap 'rm -rf "$staging"' EXIT
  : >"$log"

  export CGO_ENABLED=0
  export GOFLAGS="-mod=readonly -buildvcs=false"
  jobs="${BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}"
  start=$SECONDS
  echo "build-kube-score.sh: building kube-score $version ..." >&2
  # kube-score prints its version from these (goreleaser sets them in releases).
  ldflags="-s -w -X main.version=$version -X main.commit= -X main.date="
  if ! (cd "$tools" && "$go_bin" build -p "$jobs" -trimpath -ldflags "$ldflags" -o "$staging/kube-score" \
    github.com/zegl/kube-score/cmd/kube-score) >>"$log" 2>&1; then
    echo "build-kube-score.sh: building kube-score failed; see $log" >&2
    tail -n 20 "$log" >&2
    exit 1
  fi
  echo "build-kube-score.sh: built kube-score in $((SECONDS - start))s" >>"$log"
  touch "$staging/.complete"
  rm -rf "$bin_dir"
  mv "$staging" "$bin_dir"
  trap - EXIT
  echo "$bin_dir/kube-score"
}

main "$@"
