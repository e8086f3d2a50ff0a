#!/bin/bash
# sandbox-operator bootstrap: installs and starts sandbox-agent on a freshly launched sandbox
# instance, with no human step. The operator renders this template (embedded in its binary) for a
# Sandbox with spec.agent.bootstrap and passes it as the instance's EC2 user data; cloud-init runs
# it once, as root, at first boot. Its output goes to /var/log/cloud-init-output.log.
#
# What it does:
#   1. downloads the agent's release tarball (`make dist`) and refuses it unless its sha256 is
#      the one in the spec (then checks the tarball's own SHA256SUMS);
#   2. installs it with the tarball's install.sh: binary, systemd unit, /etc/sandbox-agent with
#      the configuration (spec.agent.bootstrap.config, else the tarball's agent.yaml) and the
#      token the operator minted (mode 0600, owned by the agent; never on a command line);
#   3. gives the agent its listen port, token file and `requireAuthForHealth` through
#      /etc/sandbox-agent/bootstrap.env (a systemd drop-in reads it);
#   4. starts the agent (systemd when it runs; otherwise in the background, as the unit would)
#      and waits until it listens.
#
# Nothing else about the instance is changed. The operator then probes the agent with the same
# token; the Sandbox's AgentRegistered condition turns True once it reports healthy.
set -euo pipefail
umask 077

# ---- Filled in by the operator, each value one shell-quoted word. ----
download_url={{DOWNLOAD_URL}}
sha256={{SHA256}}
agent_port={{AGENT_PORT}}
agent_token={{AGENT_TOKEN}}
agent_config_b64={{AGENT_CONFIG_B64}}

# ---- Where things go. ----
# On an instance SANDBOX_BOOTSTRAP_ROOT is unset (cloud-init sets no such variable): everything
# goes to the real paths and systemd starts the agent. A test sets it to a scratch directory to
# run this very script as cloud-init would, unprivileged: install.sh --root puts the same files
# there, and the agent is started without systemd.
root="${SANDBOX_BOOTSTRAP_ROOT:-}"
root="${root%/}"
work="$root/var/lib/sandbox-agent-bootstrap"
etc="$root/etc/sandbox-agent"

say() { printf '[sandbox-bootstrap] %s\n' "$*" >&2; }
fail() { say "failed: $*"; exit 1; }

mkdir -p "$work"
chmod 0700 "$work"

# ---- 1. The tarball, verified. ----
tarball="$work/sandbox-agent.tar.gz"
rm -f "$tarball" "$tarball.part"
say "downloading $download_url"
if command -v curl >/dev/null 2>&1; then
  curl -fsSL --retry 10 --retry-delay 3 --retry-connrefused -o "$tarball.part" "$download_url" \
    || fail "downloading $download_url"
elif command -v wget >/dev/null 2>&1; then
  wget -q -t 10 -O "$tarball.part" "$download_url" || fail "downloading $download_url"
else
  fail "neither curl nor wget is installed"
fi
got="$(sha256sum "$tarball.part" | cut -d ' ' -f 1)"
if [ "$got" != "$sha256" ]; then
  rm -f "$tarball.part"
  fail "the download's sha256 is $got, not $sha256 (spec.agent.bootstrap.sha256): not installed"
fi
mv -f "$tarball.part" "$tarball"
unpacked="$work/unpacked"
rm -rf "$unpacked"
mkdir -p "$unpacked"
tar -xzf "$tarball" -C "$unpacked"
dir=""
for d in "$unpacked"/sandbox-agent-*; do
  if [ -d "$d" ]; then dir="$d"; break; fi
done
[ -n "$dir" ] || fail "the tarball holds no sandbox-agent-<version> directory"
(cd "$dir" && sha256sum -c --quiet SHA256SUMS) || fail "the tarball's SHA256SUMS do not hold"

# ---- 2. Install: binary, unit, configuration, token. ----
token_file="$work/token"
printf '%s\n' "$agent_token" > "$token_file"
chmod 0600 "$token_file"
config="$dir/agent.yaml"
if [ -n "$agent_config_b64" ]; then
  config="$work/agent.yaml"
  printf '%s' "$agent_config_b64" | base64 -d > "$config"
fi
args=(--binary "$dir/sandbox-agent" --config "$config" --token-file "$token_file" --no-start)
if [ -n "$root" ]; then args+=(--root "$root"); fi
"$dir/install.sh" "${args[@]}"
rm -f "$token_file"
if [ -n "$agent_config_b64" ]; then
  # The Sandbox's configuration, also over one the image carried (install.sh keeps an existing
  # one).
  install -m 0640 "$config" "$etc/agent.yaml"
  if [ -z "$root" ]; then chown root:sandbox-agent "$etc/agent.yaml"; fi
fi

# ---- 3. The agent's environment. ----
env_file="$etc/bootstrap.env"
{
  printf 'SANDBOX_AGENT_LISTEN=0.0.0.0:%s\n' "$agent_port"
  printf 'SANDBOX_AGENT_TOKEN_FILE=%s\n' "$etc/token"
  printf 'SANDBOX_AGENT_STATE_FILE=%s\n' "$root/var/lib/sandbox-agent/state.json"
  printf 'SANDBOX_AGENT_REQUIRE_AUTH_FOR_HEALTH=true\n'
} > "$env_file"
chmod 0644 "$env_file"
dropin="$root/etc/systemd/system/sandbox-agent.service.d"
mkdir -p "$dropin"
chmod 0755 "$dropin"
printf '[Service]\nEnvironmentFile=/etc/sandbox-agent/bootstrap.env\n' > "$dropin/10-bootstrap.conf"
chmod 0644 "$dropin/10-bootstrap.conf"

# ---- 4. Start. ----
if [ -z "$root" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable sandbox-agent.service
  systemctl restart sandbox-agent.service
else
  # No systemd (a container, or a test's scratch root): run the agent as the unit would, with
  # the same configuration and environment, in the background; its pid in run/sandbox-agent.pid.
  mkdir -p "$root/run" "$root/var/lib/sandbox-agent" "$root/var/log"
  (
    set -a
    # shellcheck disable=SC1090
    . "$env_file"
    set +a
    exec "$root/usr/local/bin/sandbox-agent" --config "$etc/agent.yaml"
  ) </dev/null >>"$root/var/log/sandbox-agent.log" 2>&1 &
  echo "$!" > "$root/run/sandbox-agent.pid"
fi
for _ in $(seq 1 120); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$agent_port") 2>/dev/null; then
    say "sandbox-agent is listening on port $agent_port"
    rm -rf "$unpacked"
    exit 0
  fi
  sleep 0.5
done
fail "sandbox-agent is not listening on port $agent_port after 60s (journalctl -u sandbox-agent)"
