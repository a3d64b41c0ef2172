#!/usr/bin/env bash
# Build the control-plane binaries the cluster tests run (kube-apiserver,
# kube-controller-manager, kube-scheduler, kubectl, etcd, helm) from the Go
# module proxy, pinned by the go.mod/go.sum files under tools/.
#
# Usage: tests/cluster/build.sh            # prints the bin dir as the last line
# Env:   GO=/path/to/go   BUILD_JOBS=N   XDG_CACHE_HOME=...
#
# The output dir is keyed by the pinned versions, the Go version, a revision
# number for the build flags and a hash of the go.mod/go.sum files, so a pin
# bump builds into a fresh dir and a warm run only checks that the binaries
# exist. Go's own build and module caches stay in
# their default user locations so that CI on the same machine stays warm.
set -euo pipefail

# Everything runs inside main, which bash parses in full before running it:
# editing this file while a long build runs then cannot derail that build.
main() {
  here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  tools="$here/tools"

  go_bin="${GO:-}"
  if [[ -z "$go_bin" ]]; then
    if command -v go >/dev/null 2>&1; then
      go_bin="$(command -v go)"
    elif [[ -x /usr/local/go/bin/go ]]; then
      go_bin=/usr/local/go/bin/go
    else
      echo "build.sh: no Go toolchain found (install Go >= 1.26 or set GO=/path/to/go)" >&2
      exit 1
    fi
  fi

  # The version a go.mod requires for one module; read from the file instead of
  # `go list` so that a warm run stays fast and never touches the network.
  required() { awk -v m="$2" '$1 == m || ($1 == "require" && $2 == m) {print $NF; exit}' "$1"; }

  k8s_version="$(required "$tools/kubernetes/go.mod" k8s.io/kubernetes)"
  etcd_version="$(required "$tools/etcd/go.mod" go.etcd.io/etcd/server/v3)"
  helm_version="$(required "$tools/helm/go.mod" helm.sh/helm/v3)"
  if ! go_version="$("$go_bin" env GOVERSION 2>/dev/null)" || [[ -z "$go_version" ]]; then
    echo "build.sh: $go_bin does not work as a Go toolchain (set GO=/path/to/go)" >&2
    exit 1
  fi
  # Bump when the flags below change, so that cached binaries are rebuilt;
  # editing comments here must not cost a relink of everything.
  build_rev=2
  # The three control-plane modules only: kube-score's pins (build-kube-score.sh)
  # must not send everyone into a relink of these.
  pinned=(etcd helm kubernetes)
  pin_hash="$(cd "$tools" && cat "${pinned[@]/%//go.mod}" "${pinned[@]/%//go.sum}" | sha256sum | cut -c1-12)"
  key="k8s-${k8s_version}_etcd-${etcd_version}_helm-${helm_version}_${go_version}_r${build_rev}_${pin_hash}"

  cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/unlearning-operator"
  bin_dir="$cache_root/bin/$key"
  log_dir="$cache_root/logs"
  log="$log_dir/build-$key.log"
  binaries=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd helm)

  complete() {
    [[ -f "$bin_dir/.complete" ]] || return 1
    local b
    for b in "${binaries[@]}"; do [[ -x "$bin_dir/$b" ]] || return 1; done
  }

  if complete; then
    # Marks it used, for the pruning below.
    touch "$bin_dir/.complete"
    echo "$bin_dir"
    exit 0
  fi

  mkdir -p "$cache_root/bin" "$log_dir"
  # Two concurrent callers (CI and a developer's pytest) would otherwise both
  # spend half an hour compiling; the second one waits and then finds the dir.
  exec 9>"$cache_root/bin/.lock"
  if command -v flock >/dev/null 2>&1; then
    flock 9
  fi
  if complete; then
    echo "$bin_dir"
    exit 0
  fi

  staging="$(mktemp -d "$cache_root/bin/.build-XXXXXX")"
  trap 'rm -rf "$staging"' EXIT
  : >"$log"

  export CGO_ENABLED=0
  # -mod=readonly: a build must never rewrite the committed pins.
  export GOFLAGS="-mod=readonly -buildvcs=false"
  jobs="${BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}"

  step() {
    local name="$1" dir="$2" out="$3" ldflags="$4"
    shift 4
    local start=$SECONDS
    echo "build.sh: building $name ..." >&2
    if ! (cd "$dir" && "$go_bin" build -p "$jobs" -trimpath -ldflags "-s -w $ldflags" -o "$out" "$@") >>"$log" 2>&1; then
      echo "build.sh: building $name failed; see $log" >&2
      tail -n 20 "$log" >&2
      exit 1
    fi
    echo "build.sh: built $name in $((SECONDS - start))s" >>"$log"
  }

  # The release time recorded by the module proxy, so the version info is
  # reproducible instead of carrying the time of this build.
  k8s_date="$(cd "$tools/kubernetes" && "$go_bin" list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes 2>>"$log" || echo 1970-01-01T00:00:00Z)"
  k8s_minor="$(echo "$k8s_version" | cut -d. -f2)"
  k8s_x=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    k8s_x+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$k8s_minor"
    # gitCommit: the proxy does not record it; empty beats "$Format:%H$".
    k8s_x+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$k8s_date -X $pkg.gitCommit="
  done
  step kubernetes "$tools/kubernetes" "$staging/" "$k8s_x" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubectl

  step etcd "$tools/etcd" "$staging/etcd" "-X go.etcd.io/etcd/api/v3/version.GitSHA=$etcd_version" \
    go.etcd.io/etcd/server/v3

  # Helm's Makefile derives its default Kubernetes version (used by `helm
  # template` and lint without a cluster) from the client-go it links.
  client_go="$(cd "$tools/helm" && "$go_bin" list -m -f '{{.Version}}' k8s.io/client-go 2>>"$log")"
  helm_k8s_minor="$(echo "$client_go" | cut -d. -f2)"
  helm_x="-X helm.sh/helm/v3/internal/version.version=$helm_version -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    helm_x+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$helm_k8s_minor"
  done
  step helm "$tools/helm" "$staging/" "$helm_x" helm.sh/helm/v3/cmd/helm

  for b in "${binaries[@]}"; do
    [[ -x "$staging/$b" ]] || { echo "build.sh: $b missing after build; see $log" >&2; exit 1; }
  done
  touch "$staging/.complete"
  rm -rf "$bin_dir"
  mv "$staging" "$bin_dir"
  trap - EXIT
  echo "build.sh: done in ${SECONDS}s" >>"$log"
  # Each pin or flag change leaves a ~450 MiB dir behind; drop those no run
  # has used for two weeks.
  find "$cache_root/bin" -mindepth 2 -maxdepth 2 -name .complete -mtime +14 -printf '%h\0' 2>/dev/null |
    xargs -0 -r rm -rf
  echo "$bin_dir"
}

main "$@"
