#!/usr/bin/env bash
# Installs what the tests, the demo and the bench need, into caches outside the repository,
# skipping whatever is cached already. Prints nothing but progress on stderr.
#
#   kube-apiserver  built from tests/tools/kube-apiserver (k8s.io/kubernetes + pinned staging modules)
#   etcd            built from tests/tools/etcd (go.etcd.io/etcd/server/v3)
#   helm            built from tests/tools/helm (helm.sh/helm/v3/cmd/helm), for the chart's lint/template
#   python venv     moto[server] and friends for the EC2 endpoint (tests/tools/ec2/requirements.txt)
#   compose         built from tests/tools/compose (github.com/docker/compose/v2/cmd), installed as
#                   the `docker compose` CLI plugin of the test Docker engine
#   postgresql      Debian's packages, for the ledger's PostgreSQL tests (`debs`)
#   docker engine   Debian's docker.io (dockerd, containerd, runc; the chart test's node runs the
#                   same containerd and runc with a config of its own), docker-registry and
#                   apache2-utils (htpasswd), for the agent's tests on a real engine (`debs`); the
#                   worker image's program (tests/tools/worker) is built by the tests with Go
#
#   node            kubelet, kube-controller-manager, kube-scheduler from tests/tools/kube-apiserver's
#                   module (same k8s.io/kubernetes version), for the chart-on-a-node test (`node`)
#
# usage: hack/install-tools.sh [all|go|node|helm|compose|venv|debs]...
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

# The node of the chart's test (kubelet, kube-controller-manager, kube-scheduler): the same wrapper
# module and version as kube-apiserver, so the Go build cache is shared. Opt-in (`node`): only the
# chart-on-a-node test needs them (`all` includes them), and that test says so when they are missing.
install_node() {
  local kv minor ld cmd
  kv=$(cat tests/tools/kube-apiserver/VERSION); minor=${kv#v1.}; minor=${minor%%.*}
  ld="-X k8s.io/component-base/version.gitVersion=@VERSION@ -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
  for cmd in kubelet kube-controller-manager kube-scheduler; do
    build_go_tool "$cmd" tests/tools/kube-apiserver "k8s.io/kubernetes/cmd/$cmd" "$ld"
  done
}

install_helm() {
  build_go_tool helm tests/tools/helm helm.sh/helm/v3/cmd/helm \
    "-X helm.sh/helm/v3/internal/version.version=@VERSION@ -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
}

install_compose() {
  build_go_tool docker-compose tests/tools/compose github.com/docker/compose/v2/cmd \
    "-X github.com/docker/compose/v2/internal.Version=@VERSION@"
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
  # loopback port: only the binaries are needed. The agent's engine tests start their own dockerd
  # (own data root and socket) and registry: only the binaries are needed, no service is enabled.
  local want=() bin have_pg=""
  for bin in /usr/lib/postgresql/*/bin; do
    if [ -x "$bin/initdb" ] && [ -x "$bin/postgres" ] && [ -x "$bin/pg_isready" ]; then have_pg=$bin; fi
  done
  if [ -n "$have_pg" ]; then log "postgresql server present in $have_pg"; else want+=(postgresql); fi
  command -v dockerd >/dev/null && command -v docker >/dev/null || want+=(docker.io)
  # The chart test's node: containerd (with ctr) and runc, started with a config of its own.
  command -v containerd >/dev/null && command -v ctr >/dev/null || want+=(containerd)
  command -v runc >/dev/null || [ -x /usr/sbin/runc ] || want+=(runc)
  command -v docker-registry >/dev/null || want+=(docker-registry)
  command -v htpasswd >/dev/null || want+=(apache2-utils)
  if [ ${#want[@]} = 0 ]; then log "debian packages present"; return; fi
  log "installing from Debian's packages: ${want[*]}"
  export DEBIAN_FRONTEND=noninteractive
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { log "need root or sudo to apt-get install ${want[*]}"; return 1; }
    sudo=sudo
  fi
  $sudo apt-get update -qq
  # policy-rc.d keeps the packages' services from starting: the tests start their own.
  local rc=/usr/sbin/policy-rc.d made_rc=""
  if [ ! -e "$rc" ]; then printf '#!/bin/sh\nexit 101\n' | $sudo tee "$rc" >/dev/null; $sudo chmod +x "$rc"; made_rc=1; fi
  $sudo apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
  [ -n "$made_rc" ] && $sudo rm -f "$rc"
  return 0
}

what=${*:-all}
for w in $what; do
  case $w in
    all) install_go; install_node; install_helm; install_compose; install_venv; install_debs ;;
    helm) install_helm ;;
    compose) install_compose ;;
    go) install_go ;;
    node) install_node ;;
    venv) install_venv ;;
    debs) install_debs ;;
    *) echo "unknown: $w" >&2; exit 2 ;;
  esac
done
