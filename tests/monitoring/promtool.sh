#!/usr/bin/env bash
# Fetch promtool (Prometheus' own rule and query checker) from Debian's
# `prometheus` package: `apt-get download` + `dpkg-deb -x`, about 20 MB and a
# few seconds, instead of building it from the Go module proxy (12 minutes,
# 3 GB). Nothing is installed and no service is started.
#
# Usage: tests/monitoring/promtool.sh      # prints the promtool path as the last line
# Env:   XDG_CACHE_HOME=...   PROMTOOL=/path/to/promtool (use that one, fetch nothing)
#
# The binary is cached under ~/.cache/unlearning-operator/promtool/<debian
# version>/, beside the control-plane binaries of tests/cluster/build.sh; a
# warm run only checks that it is there and never touches the network. apt
# runs with private package lists and cache (-oDir::State::Lists,
# -oDir::Cache), so it needs no `apt-get update` of the machine's own lists
# and leaves them alone.
set -euo pipefail

# Everything runs inside main, which bash parses in full before running it.
main() {
  if [[ -n "${PROMTOOL:-}" ]]; then
    "$PROMTOOL" --version >/dev/null 2>&1 || { echo "promtool.sh: PROMTOOL=$PROMTOOL does not run" >&2; exit 1; }
    echo "$PROMTOOL"
    exit 0
  fi

  cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/unlearning-operator"
  dir="$cache_root/promtool"
  current="$dir/current/promtool"

  if [[ -x "$current" && -f "$dir/current/.complete" ]]; then
    echo "$current"
    exit 0
  fi

  for tool in apt-get dpkg-deb; do
    command -v "$tool" >/dev/null 2>&1 || {
      echo "promtool.sh: $tool not found: promtool comes from Debian's prometheus package (set PROMTOOL=/path/to/promtool elsewhere)" >&2
      exit 1
    }
  done

  mkdir -p "$dir"
  # A second caller (CI and a developer's pytest) waits and then finds the binary.
  exec 9>"$dir/.lock"
  if command -v flock >/dev/null 2>&1; then
    flock 9
  fi
  if [[ -x "$current" && -f "$dir/current/.complete" ]]; then
    echo "$current"
    exit 0
  fi

  staging="$(mktemp -d "$dir/.fetch-XXXXXX")"
  trap 'rm -rf "$staging"' EXIT
  mkdir -p "$staging/lists/partial" "$staging/cache/archives/partial" "$staging/deb"
  apt_opts=(
    -q
    "-oDir::State::Lists=$staging/lists"
    "-oDir::Cache=$staging/cache"
    -oAcquire::Retries=3
    # Root downloading into a directory that _apt cannot write warns and
    # falls back to root anyway; say so up front.
    -oAPT::Sandbox::User=root
  )
  local start=$SECONDS
  echo "promtool.sh: fetching Debian's prometheus package ..." >&2
  if ! apt-get "${apt_opts[@]}" update >"$staging/apt.log" 2>&1; then
    echo "promtool.sh: apt-get update failed; see below" >&2
    tail -n 20 "$staging/apt.log" >&2
    exit 1
  fi
  if ! (cd "$staging/deb" && apt-get "${apt_opts[@]}" download prometheus) >>"$staging/apt.log" 2>&1; then
    echo "promtool.sh: apt-get download prometheus failed; see below" >&2
    tail -n 20 "$staging/apt.log" >&2
    exit 1
  fi
  deb="$(ls "$staging"/deb/prometheus_*.deb)"
  version="$(dpkg-deb -f "$deb" Version)"
  dpkg-deb -x "$deb" "$staging/root"
  out="$dir/$version"
  rm -rf "$out"
  mkdir -p "$out"
  cp "$staging/root/usr/bin/promtool" "$out/promtool"
  "$out/promtool" --version >/dev/null 2>&1 || { echo "promtool.sh: the fetched promtool does not run" >&2; exit 1; }
  touch "$out/.complete"
  ln -sfn "$version" "$dir/current"
  echo "promtool.sh: promtool $version fetched in $((SECONDS - start))s ($(du -k "$deb" | cut -f1) KiB package)" >&2
  echo "$current"
}

main "$@"
