#!/usr/bin/env bash
# The system tools the images need, from Debian: install the missing ones (root), else say which.
#
#   mmdebstrap      the Debian base layer (images/build.py)
#   zstd            compresses the layers (build.py) and unpacks them (the node agent, via GNU tar)
#   skopeo          pushes an OCI layout to a registry (build.py --push; the tests' registry, a release)
#   docker-registry the tests' local registry (tests/cluster/registry.py)
#   runc            the fake GPU node runs containers from the images (tests/cluster/nodeagent.py)
#
# GNU tar, unshare and chroot are already in every Debian/Ubuntu base. Idempotent: a machine
# that has them all returns at once (CI's warm path).
set -euo pipefail

declare -A tool_of=([mmdebstrap]=mmdebstrap [zstd]=zstd [skopeo]=skopeo [docker-registry]=docker-registry [runc]=runc)
missing=()
for pkg in "${!tool_of[@]}"; do
  command -v "${tool_of[$pkg]}" >/dev/null 2>&1 || missing+=("$pkg")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  echo "images/tools.sh: missing ${missing[*]}; install them as root: apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "images/tools.sh: installing ${missing[*]} ..." >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
