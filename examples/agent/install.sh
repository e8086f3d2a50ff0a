#!/usr/bin/env bash
# Installs sandbox-agent on a sandbox instance (run as root, on the instance; idempotent).
#
#   install.sh [--binary PATH] [--config PATH] [--token-file PATH] [--env-file PATH]...
#              [--unit NAME]... [--no-start] [--dry-run] [--root DIR]
#
#   --binary PATH      the sandbox-agent binary            [./sandbox-agent, else beside this script]
#   --config PATH      configuration to install if none is [agent.yaml beside this script]
#   --token-file PATH  use this token (else $SANDBOX_AGENT_TOKEN, else keep the installed one,
#                      else generate 32 random bytes, hex)
#   --env-file PATH    an env file the agent manages (PUT /env, the deploy's image tag); repeat
#                      [/opt/valet/.env /opt/ghosthands/.env]
#   --unit NAME        a systemd unit the agent may restart (polkit rule); repeat
#                      [adspower valet-worker]
#   --no-start         install and enable, do not (re)start
#   --dry-run          print what would be done
#   --root DIR         install into DIR as the instance's root (an image being built, a test):
#                      the same files and modes, no user created, no ownership changed, no
#                      systemctl (enabling is the multi-user.target.wants link), no start
#
# What it does: creates the system user `sandbox-agent` (in the docker group), installs the
# binary to /usr/local/bin, the config to /etc/sandbox-agent/agent.yaml (kept if present), the
# token to /etc/sandbox-agent/token (mode 0600, owned by the agent; never printed), gives the
# agent the env files and write access to their directories (for atomic replace), allows it to
# restart the listed units (polkit), installs and enables the hardened systemd unit, and waits
# for GET /healthz.
#
# Then give the operator the token, e.g. (from a machine with kubectl):
#   ssh ubuntu@<instance> sudo cat /etc/sandbox-agent/token \
#     | kubectl create secret generic <sandbox>-agent-token --from-file=token=/dev/stdin
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
binary=""
config="$here/agent.yaml"
token_src=""
env_files=()
units=()
start=1
dry=0
root=""

usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --token-file) token_src="$2"; shift 2 ;;
    --env-file) env_files+=("$2"); shift 2 ;;
    --unit) units+=("$2"); shift 2 ;;
    --no-start) start=0; shift ;;
    --dry-run) dry=1; shift ;;
    --root) root="${2%/}"; start=0; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "install.sh: unknown argument $1" >&2; usage 2 ;;
  esac
done
[ ${#env_files[@]} -gt 0 ] || env_files=(/opt/valet/.env /opt/ghosthands/.env)
[ ${#units[@]} -gt 0 ] || units=(adspower valet-worker)
if [ -z "$binary" ]; then
  for b in ./sandbox-agent "$here/sandbox-agent" "$here/../../target/release/sandbox-agent"; do
    if [ -x "$b" ]; then binary="$b"; break; fi
  done
fi

USER_NAME=sandbox-agent
ETC=$root/etc/sandbox-agent
STATE=$root/var/lib/sandbox-agent
BIN=$root/usr/local/bin/sandbox-agent
UNIT=$root/etc/systemd/system/sandbox-agent.service
POLKIT=$root/etc/polkit-1/rules.d/60-sandbox-agent.rules
if [ -n "$root" ]; then
  # Into a root directory: same files and modes, but no users or ownership of this machine.
  [ -d "$root" ] || { echo "install.sh: --root $root is not a directory" >&2; exit 1; }
  for i in "${!env_files[@]}"; do env_files[$i]="$root${env_files[$i]}"; done
  OWN_ROOT_AGENT=()
  OWN_AGENT=()
else
  OWN_ROOT_AGENT=(-o root -g "$USER_NAME")
  OWN_AGENT=(-o "$USER_NAME" -g "$USER_NAME")
fi

log() { printf '[install-agent] %s\n' "$*" >&2; }
run() {
  if [ "$dry" = 1 ]; then printf '+ %s\n' "$*" >&2; else "$@"; fi
}
# Users, groups and ownership: this machine's, so not done with --root.
own() {
  if [ -n "$root" ]; then return 0; fi
  run "$@"
}

if [ "$dry" = 0 ] && [ -z "$root" ] && [ "$(id -u)" != 0 ]; then
  echo "install.sh: run as root (sudo $0 ...)" >&2
  exit 1
fi
[ -n "$binary" ] && [ -x "$binary" ] || { echo "install.sh: no sandbox-agent binary (use --binary)" >&2; exit 1; }
[ -f "$config" ] || { echo "install.sh: no config at $config (use --config)" >&2; exit 1; }
[ -f "$here/sandbox-agent.service" ] || { echo "install.sh: sandbox-agent.service must be beside this script" >&2; exit 1; }

# 1. The user.
if [ -n "$root" ]; then
  log "--root $root: the user $USER_NAME is created on the instance, not here"
elif ! id -u "$USER_NAME" >/dev/null 2>&1; then
  log "creating system user $USER_NAME"
  run useradd --system --home-dir "$STATE" --no-create-home --shell /usr/sbin/nologin "$USER_NAME"
fi
if [ -n "$root" ]; then
  :
elif getent group docker >/dev/null 2>&1; then
  run usermod -aG docker "$USER_NAME"
else
  log "warning: no docker group; the agent cannot run docker compose"
fi

# 2. The binary (checked first: it must run and parse the config).
log "installing $BIN"
run install -d -m 0755 "$(dirname "$BIN")"
run install -m 0755 "$binary" "$BIN.new"
run "$BIN.new" --config "$config" --print-config >/dev/null
run mv -f "$BIN.new" "$BIN"

# 3. Config directory and config (an existing config is kept).
run install -d -m 0750 "${OWN_ROOT_AGENT[@]}" "$ETC"
if [ -f "$ETC/agent.yaml" ]; then
  log "keeping $ETC/agent.yaml (new example left as $ETC/agent.yaml.example)"
  run install -m 0640 "${OWN_ROOT_AGENT[@]}" "$config" "$ETC/agent.yaml.example"
else
  run install -m 0640 "${OWN_ROOT_AGENT[@]}" "$config" "$ETC/agent.yaml"
fi
run install -d -m 0700 "${OWN_AGENT[@]}" "$STATE"

# 4. The token: mode 0600, owned by the agent, never echoed.
write_token() { # reads the token on stdin
  local tmp
  tmp="$(umask 077 && mktemp "$ETC/.token.XXXXXX")"
  head -n 1 > "$tmp"
  [ -n "$root" ] || chown "$USER_NAME:$USER_NAME" "$tmp"
  chmod 0600 "$tmp"
  mv -f "$tmp" "$ETC/token"
}
if [ -n "$token_src" ]; then
  log "installing the token from $token_src"
  [ "$dry" = 1 ] || write_token < "$token_src"
elif [ -n "${SANDBOX_AGENT_TOKEN:-}" ]; then
  log "installing the token from \$SANDBOX_AGENT_TOKEN"
  [ "$dry" = 1 ] || printf '%s\n' "$SANDBOX_AGENT_TOKEN" | write_token
elif [ -s "$ETC/token" ]; then
  log "keeping the installed token"
elif [ -n "$root" ]; then
  # An image shared by many instances must not carry one token for all of them.
  log "no token installed: write one to /etc/sandbox-agent/token (mode 0600) on each instance"
else
  log "generating a token in $ETC/token"
  [ "$dry" = 1 ] || od -An -tx1 -N32 /dev/urandom | tr -d ' \n' | { cat; echo; } | write_token
fi
if [ "$dry" = 1 ] || [ -e "$ETC/token" ]; then
  own chown "$USER_NAME:$USER_NAME" "$ETC/token"
  run chmod 0600 "$ETC/token"
fi

# 5. The env files: owned by the agent (it keeps owner and group when it replaces them), mode
#    0600, and their directories writable by it (the replace is a rename in the same directory).
for f in "${env_files[@]}"; do
  d="$(dirname "$f")"
  run install -d "$d"
  if [ -f "$f" ]; then
    own chown "$USER_NAME:$USER_NAME" "$f"
    run chmod 0600 "$f"
  fi
  if [ -n "$root" ]; then
    :
  elif command -v setfacl >/dev/null 2>&1; then
    run setfacl -m "u:$USER_NAME:rwx" "$d"
  else
    log "no setfacl: giving $d to group $USER_NAME (g+w)"
    run chgrp "$USER_NAME" "$d"
    run chmod g+w "$d"
  fi
done

# 6. Restarting the allow-listed units without root: a polkit rule for exactly these units.
if [ -d "$root/etc/polkit-1/rules.d" ]; then
  list=""
  for u in "${units[@]}"; do
    case "$u" in *.service) ;; *) u="$u.service" ;; esac
    list="$list\"$u\", "
  done
  log "allowing $USER_NAME to restart: ${units[*]}"
  rule="// Installed by sandbox-agent's install.sh: the agent may restart these units only.
polkit.addRule(function(action, subject) {
  if (action.id == \"org.freedesktop.systemd1.manage-units\" && subject.user == \"$USER_NAME\") {
    var units = [${list%, }];
    var verb = action.lookup(\"verb\");
    if (units.indexOf(action.lookup(\"unit\")) >= 0 && (verb == \"restart\" || verb == \"start\")) {
      return polkit.Result.YES;
    }
  }
});"
  if [ "$dry" = 1 ]; then printf '+ write %s:\n%s\n' "$POLKIT" "$rule" >&2; else printf '%s\n' "$rule" > "$POLKIT"; chmod 0644 "$POLKIT"; fi
else
  log "warning: no /etc/polkit-1/rules.d; restarting systemd units will need root"
fi

# 7. The unit.
log "installing $UNIT"
run install -d -m 0755 "$(dirname "$UNIT")"
run install -m 0644 "$here/sandbox-agent.service" "$UNIT"
if [ -n "$root" ]; then
  # What `systemctl enable` does for WantedBy=multi-user.target.
  run install -d -m 0755 "$root/etc/systemd/system/multi-user.target.wants"
  run ln -sfn /etc/systemd/system/sandbox-agent.service \
    "$root/etc/systemd/system/multi-user.target.wants/sandbox-agent.service"
  log "installed into $root (enabled; not started)"
  exit 0
fi
run systemctl daemon-reload
run systemctl enable sandbox-agent.service
if [ "$start" = 1 ]; then
  run systemctl restart sandbox-agent.service
  if [ "$dry" = 0 ]; then
    port="$("$BIN" --config "$ETC/agent.yaml" --print-config | sed -n 's/^listen: .*:\([0-9]*\)$/\1/p')"
    for _ in $(seq 1 50); do
      if (exec 3<>"/dev/tcp/127.0.0.1/${port:-8000}") 2>/dev/null; then
        log "sandbox-agent is listening on port ${port:-8000}"
        exit 0
      fi
      sleep 0.2
    done
    log "sandbox-agent did not start; see: journalctl -u sandbox-agent -n 50"
    exit 1
  fi
fi
