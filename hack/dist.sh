#!/usr/bin/env bash
# `make dist`: the release artifact for the sandbox instances, one tarball
#
#   target/dist/sandbox-agent-<version>-linux-<arch>.tar.gz        (and .tar.gz.sha256)
#     sandbox-agent-<version>-linux-<arch>/
#       sandbox-agent            the agent (release build without the test environment, stripped)
#       sandbox-agent.service    its systemd unit
#       agent.yaml               the example configuration (kept on the instance if one exists)
#       install.sh               installs binary, unit, /etc/sandbox-agent (token 0600), enables it
#       SHA256SUMS               the files above
#
#   hack/dist.sh [--binary PATH] [--out DIR]
#     --binary PATH   package this binary instead of building one (tests use the debug build)
#     --out DIR       where the tarball goes [target/dist]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

binary=""
out="${CARGO_TARGET_DIR:-target}/dist"
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "dist.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
arch="$(uname -m)"
name="sandbox-agent-$version-linux-$arch"

if [ -z "$binary" ]; then
  # The test environment (a non-default feature) is not in what ships.
  ${CARGO:-cargo} build --release --no-default-features --bin sandbox-agent
  binary="${CARGO_TARGET_DIR:-target}/release/sandbox-agent"
fi
[ -x "$binary" ] || { echo "dist.sh: $binary is not an executable" >&2; exit 1; }

mkdir -p "$out"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
dir="$stage/$name"
mkdir "$dir"
install -m 0755 "$binary" "$dir/sandbox-agent"
strip --strip-all "$dir/sandbox-agent"
install -m 0644 examples/agent/sandbox-agent.service "$dir/sandbox-agent.service"
install -m 0644 examples/agent/agent.yaml "$dir/agent.yaml"
install -m 0755 examples/agent/install.sh "$dir/install.sh"
(cd "$dir" && sha256sum sandbox-agent sandbox-agent.service agent.yaml install.sh > SHA256SUMS)

# Reproducible: fixed owner, order and times.
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 \
  -C "$stage" -czf "$out/$name.tar.gz" "$name"
(cd "$out" && sha256sum "$name.tar.gz" > "$name.tar.gz.sha256")
echo "$out/$name.tar.gz"
