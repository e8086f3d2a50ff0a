#!/usr/bin/env bash
# `make demo`: the operator on this machine, end to end, with nothing to set up.
#
# Builds what it needs (hack/install-tools.sh, cargo build), then starts:
#   - a local control plane (kube-apiserver + etcd) and EC2 endpoint (moto): sandbox-testenv
#   - three real sandbox-agents, each with the fake `docker` (tests/tools/fake-docker) and a tiny
#     worker stand-in (python3 http.server), on loopback ports
#   - sandbox-operator run, watching namespace `demo`
# applies examples/ (the launched sandbox three times, the stopped one, the SecretBundle with its
# Fly.io target going to the fake flyctl), shows the fleet converging, then a rollout
# (examples/sandboxdeploy.yaml, approved with the kubectl plugin) and a secret rotation, and prints
# how to point kubectl at it. Ctrl-C stops everything; nothing is left running, even if this
# script is killed (sandbox-testenv exits when its stdin, held by this script, closes).
#
#   DEMO_AGENTS=3      how many agents (and launched sandboxes)
#   DEMO_EXIT=1        exit after the tour instead of waiting for Ctrl-C (for timing it)
#   DEMO_BIN=DIR       use the binaries in DIR instead of building them (tests)
#   DEMO_THEN=FILE     after the tour, run the shell script FILE with the exports printed at the
#                      end (KUBECONFIG, PATH, SANDBOX_OPERATOR_URL, SANDBOX_OPERATOR_LEDGER) and exit
#                      with its status: how the README's five-minute tour is tested
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
agents=${DEMO_AGENTS:-3}
ns=demo
start=$SECONDS
say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
elapsed() { echo "$((SECONDS - start))s"; }

say "installing tools (cached after the first run) and building"
hack/install-tools.sh go venv
if [ -n "${DEMO_BIN:-}" ]; then
  bin=$DEMO_BIN
else
  cargo build --quiet --features testenv --bins
  target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
  bin="$target_dir/debug"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/sandbox-demo.XXXXXX")
pids=()
cleanup() {
  trap - EXIT INT TERM
  echo
  say "stopping"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  exec 9>&-
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
  echo "stopped; nothing left running"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "starting the local control plane and EC2 endpoint ($(elapsed))"
mkfifo "$work/keep"
"$bin/sandbox-testenv" --exit-on-stdin-eof --kubeconfig "$work/kubeconfig" --transitions 2s \
  <"$work/keep" >"$work/testenv.json" 2>"$work/testenv.log" &
pids+=($!)
exec 9>"$work/keep"   # held open by this script only (children get 9>&-): at its end, EOF
for _ in $(seq 1 600); do [ -s "$work/testenv.json" ] && break; sleep 0.1; done
[ -s "$work/testenv.json" ] || { cat "$work/testenv.log"; echo "sandbox-testenv did not start" >&2; exit 1; }
json() { python3 -c "import json,sys; print(json.load(open('$work/testenv.json'))['$1'])"; }
ec2=$(json ec2Endpoint)
export KUBECONFIG="$work/kubeconfig"
echo "control plane $(json server), EC2 endpoint $ec2 (control plane up in $(json controlPlaneStartupMs) ms)"
defaults=$(curl -s "$ec2/_endpoint/defaults")
dflt() { python3 -c "import json,sys; print(json.loads(sys.argv[1])['$1'])" "$defaults"; }
ami=$(dflt ami); subnet=$(dflt subnet); sg=$(dflt security_group)

say "starting $agents agents with the fake docker and a worker stand-in"
cat >"$work/worker.py" <<'EOF'
# A stand-in for the GhostHands worker: status, drain and health, on one port.
import http.server, json, os, sys
port, docker = int(sys.argv[1]), sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def reply(self, code, body):
        b = json.dumps(body).encode()
        self.send_response(code); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(b))); self.end_headers(); self.wfile.write(b)
    def do_GET(self):
        if self.path == "/worker/status": self.reply(200, {"activeWorkers": 0, "deploy_safe": True})
        elif self.path == "/health": self.reply(200, {"status": "ok"})
        else: self.reply(404, {})
    def do_POST(self):
        self.reply(200, {"draining": True})
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
EOF
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
for i in $(seq 1 "$agents"); do
  d="$work/agent-$i"; mkdir -p "$d/docker" "$d/state"
  echo "v1" >"$d/docker/running-tag"
  echo "GH_IMAGE_TAG=v1" >"$d/gh.env"; echo "NODE_ENV=production" >"$d/valet.env"
  echo "services: {}" >"$d/docker-compose.yml"
  head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$d/token"; chmod 600 "$d/token"
  wp=$(free_port)
  python3 "$work/worker.py" "$wp" "$d/docker" 9>&- &
  pids+=($!)
  cat >"$d/agent.yaml" <<EOF
listen: 127.0.0.1:0
tokenFile: $d/token
stateFile: $d/state/state.json
envFile: $d/valet.env
refreshInterval: 500ms
docker: {binary: $repo/tests/tools/fake-docker, composeFiles: [$d/docker-compose.yml], projectDirectory: $d}
worker: {statusUrl: "http://127.0.0.1:$wp/worker/status", drainUrl: "http://127.0.0.1:$wp/worker/drain", healthUrl: "http://127.0.0.1:$wp/health"}
deploy: {envFile: $d/gh.env, drainTimeout: 5s, drainPollInterval: 200ms, stopGrace: 1s, healthCheckTries: 5, healthCheckInterval: 300ms}
services: {worker: {composeService: worker}}
EOF
  FAKE_DOCKER_DIR="$d/docker" "$bin/sandbox-agent" --config "$d/agent.yaml" --addr-file "$d/addr" >"$d/agent.log" 2>&1 9>&- &
  pids+=($!)
done
for i in $(seq 1 "$agents"); do
  for _ in $(seq 1 100); do [ -s "$work/agent-$i/addr" ] && break; sleep 0.1; done
  echo "agent $i at http://$(cat "$work/agent-$i/addr")"
done

say "starting sandbox-operator ($(elapsed))"
mkdir -p "$work/flyctl"
op_port=$(free_port)
AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo AWS_EC2_METADATA_DISABLED=true \
FAKE_FLYCTL_DIR="$work/flyctl" SANDBOX_OPERATOR_LOG=info \
  "$bin/sandbox-operator" run --namespace "$ns" --ec2-endpoint "$ec2" --region us-east-1 \
  --http-addr "127.0.0.1:$op_port" --ec2-refresh 1s --poll 500ms --resync 30s \
  --fly-method flyctl --flyctl "$repo/tests/tools/fake-flyctl" --flyctl-env "FAKE_FLYCTL_DIR=$work/flyctl" \
  --ledger "sqlite://$work/ledger.db" \
  >"$work/operator.log" 2>&1 9>&- &
pids+=($!)

say "applying examples/ to namespace $ns ($(elapsed))"
kubectl create namespace "$ns" >/dev/null
for i in $(seq 1 "$agents"); do
  # The example as written, but for this machine: the endpoint's AMI, subnet and security group,
  # the agent's token and loopback URL (no key pair or instance profile in this account).
  sed -e "s/ami-0123456789abcdef0/$ami/; s/subnet-0123456789abcdef0/$subnet/; s/sg-0123456789abcdef0/$sg/" \
      -e "/keyName:/d; /iamInstanceProfile:/d" \
      -e "s/worker-1/worker-$i/g" \
      -e "s|replace-with-the-agent-token|$(cat "$work/agent-$i/token")|" \
      -e "s|urlTemplate: \"http://{privateIp}:{port}\"|url: \"http://$(cat "$work/agent-$i/addr")\"|" \
      -e "s/probeInterval: 30s/probeInterval: 2s/; s/timeout: 5s/timeout: 1s/" \
      examples/sandbox-launched.yaml | kubectl apply -n "$ns" --server-side -f - >/dev/null
done
sed -e "s/ami-0123456789abcdef0/$ami/" examples/sandbox-stopped.yaml | kubectl apply -n "$ns" --server-side -f - >/dev/null
kubectl apply -n "$ns" --server-side -f examples/secretbundle.yaml >/dev/null
kubectl get -n "$ns" fleet

say "the fleet converging (kubectl get fleet -n $ns)"
converged() {
  local ready total
  total=$(kubectl get sbx -n "$ns" -o name | wc -l)
  ready=$(kubectl get sbx -n "$ns" -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c True || true)
  [ "$ready" = "$total" ] && [ "$(kubectl get secbundle -n "$ns" worker-env -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}
for _ in $(seq 1 90); do
  clear 2>/dev/null || true
  echo "t=$(elapsed)  (Ctrl-C stops the demo)"; echo
  kubectl get -n "$ns" sandboxes; echo; kubectl get -n "$ns" secretbundles
  converged && break
  sleep 1
done
converged || {
  echo "did not converge; see $work/operator.log" >&2
  kubectl get -n "$ns" secbundle worker-env -o jsonpath='{range .status.targets[*]}{.kind}/{.name}: {.state} {.message}{"\n"}{end}' >&2
  grep -E "WARN|ERROR" "$work/operator.log" | tail -5 >&2
  exit 1
}
converged_at=$((SECONDS - start))
say "converged: $agents launched sandboxes Ready, one stopped, secrets synced, ${converged_at}s after make demo started"
echo "CONVERGED_SECONDS=$converged_at"

say "a rollout: examples/sandboxdeploy.yaml (paused: awaiting approval)"
kubectl apply -n "$ns" --server-side -f examples/sandboxdeploy.yaml >/dev/null
sleep 2
kubectl get -n "$ns" sandboxdeploys
echo "approving with the kubectl plugin: kubectl sandbox approve deploy-2f1c9e7"
if [ -x "$bin/kubectl-sandbox" ]; then
  "$bin/kubectl-sandbox" -n "$ns" approve deploy-2f1c9e7
else
  kubectl patch -n "$ns" sandboxdeploy deploy-2f1c9e7 --type=merge -p '{"spec":{"paused":false}}'
fi
for _ in $(seq 1 180); do
  phase=$(kubectl get -n "$ns" sbxdeploy deploy-2f1c9e7 -o jsonpath='{.status.phase}')
  echo "t=$(elapsed) deploy phase: ${phase:-Pending}"
  case $phase in Succeeded|Failed|Aborted) break ;; esac
  sleep 1
done
kubectl get -n "$ns" sandboxdeploys,sandboxes

say "a secret rotation: a new DATABASE_URL in Secret worker-secrets"
old=$(kubectl get -n "$ns" secbundle worker-env -o jsonpath='{.status.contentHash}')
kubectl patch -n "$ns" secret worker-secrets --type=merge -p '{"stringData":{"DATABASE_URL":"postgres://worker:rotated@db.internal:5432/valet"}}' >/dev/null
for _ in $(seq 1 60); do
  new=$(kubectl get -n "$ns" secbundle worker-env -o jsonpath='{.status.contentHash}')
  ready=$(kubectl get -n "$ns" secbundle worker-env -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')
  [ "$new" != "$old" ] && [ "$ready" = True ] && break
  sleep 1
done
echo "content hash ${old:0:12} -> ${new:0:12}; every target synced:"
kubectl get -n "$ns" secbundle worker-env -o jsonpath='{range .status.targets[*]}  {.kind}/{.name}: {.state} {.syncedHash}{"\n"}{end}' | cut -c1-80
if [ -x "$bin/kubectl-sandbox" ]; then say "the fleet tree (kubectl sandbox tree)"; "$bin/kubectl-sandbox" -n "$ns" tree; fi

say "point kubectl at it (in another terminal; the README's five-minute tour starts here)"
exports="export KUBECONFIG=$work/kubeconfig
export PATH=$bin:\$PATH
export SANDBOX_OPERATOR_URL=http://127.0.0.1:$op_port
export SANDBOX_OPERATOR_LEDGER=sqlite://$work/ledger.db"
cat <<EOF
$exports
  # kubectl-sandbox is in PATH (as \`kubectl sandbox\`), sandbox-operator too
  kubectl get fleet -n $ns
  kubectl sandbox -n $ns tree
  curl -s \$SANDBOX_OPERATOR_URL/metrics | grep ^sandbox_
  operator log: $work/operator.log
EOF
if [ -n "${DEMO_THEN:-}" ]; then
  say "running $DEMO_THEN"
  status=0
  (eval "$exports"; cd "$repo"; bash -euo pipefail "$DEMO_THEN") 9>&- || status=$?
  exit "$status"
fi
if [ "${DEMO_EXIT:-0}" = 1 ]; then exit 0; fi
say "running; Ctrl-C stops everything"
while :; do sleep 3600 9>&- & wait $!; done
