#!/usr/bin/env bash
# Installs what the tests, the demo and the bench need, into caches outside the repository,
# skipping whatever is cached already. Prints nothing but progress on stderr.
#
#   kube-apiserver  built from tests/tools/kube-apiserver (k8s.io/kubernetes + pinned staging modules)
#   etcd            built from tests/tools/etcd (go.etcd.io/etcd/server/v3)
#   helm            built from tests/tools/helm (helm.sh/helm/v3/cmd/helm), for the chart's lint/template
#   python venv     moto[server] and friends for the EC2 endpoint (tests/tools/ec2/requirements.txt)
#   postgresql      Debian's packages, for the ledger's PostgreSQL tests (`debs`)
#
# usage: hack/install-tools.sh [all|go|helm|venv|debs]...
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${SANDBOX_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sandbox-operator}
BIN="$CACHE/bin"
mkdir -p "$BIN"
log() { printf '[install-tools] %s\n' "$*" >&2; }

build_go_tool() { # name dir package [extra ldflags]
  local name=$1 dir=$2 pkg=$3 ldflags=${4:-} version out
  version=$(cat "$dir/VERSION")
  out="$BIN/$name-$version"
  if [ -x "$out" ]; then log "$name $version cached at $out"; return; fi
  log "building $name $version from $dir (CGO_ENABLED=0, GOTOOLCHAIN=local); this takes minutes the first time"
  local start=$SECONDS
  (cd "$dir" && CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=mod go build -trimpath -ldflags="-s -w ${ldflags//@VERSION@/$version}" -o "$out.tmp" "$pkg")
  mv "$out.tmp" "$out"
  log "built $name $version in $((SECONDS - start)) s, $(du -h "$out" | cut -f1)"
}

install_go() {
  local kv minor
  kv=$(cat tests/tools/kube-apiserver/VERSION); minor=${kv#v1.}; minor=${minor%%.*}
  build_go_tool kube-apiserver tests/tools/kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver \
    "-X k8s.io/component-base/version.gitVersion=@VERSION@ -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
  build_go_tool etcd tests/tools/etcd go.etcd.io/etcd/server/v3
}

install_helm() {
  build_go_tool helm tests/tools/helm helm.sh/helm/v3/cmd/helm \
    "-X helm.sh/helm/v3/internal/version.version=@VERSION@ -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
}

install_venv() {
  local req=tests/tools/ec2/requirements.txt venv="$CACHE/venv" stamp
  stamp="$venv/.requirements-$(sha256sum "$req" | cut -c1-16)"
  if [ -f "$stamp" ]; then log "python venv cached at $venv"; return; fi
  log "creating python venv at $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
  touch "$stamp"
}

install_debs() {
  # The ledger's PostgreSQL tests start their own server (initdb, postgres, pg_isready) on a free
  # loopback port: only the binaries are needed.
  local bin
  for bin in /usr/lib/postgresql/*/bin; do
    if [ -x "$bin/initdb" ] && [ -x "$bin/postgres" ] && [ -x "$bin/pg_isready" ]; then
      log "postgresql server present in $bin"; return
    fi
  done
  log "installing postgresql from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { log "need root or sudo to apt-get install postgresql"; return 1; }
    sudo=sudo
  fi
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends postgresql >/dev/null
}

what=${*:-all}
for w in $what; do
  case $w in
    all) install_go; install_helm; install_venv; install_debs ;;
    helm) install_helm ;;
    go) install_go ;;
    venv) install_venv ;;
    debs) install_debs ;;
    *) echo "unknown: $w" >&2; exit 2 ;;
  esac
done
