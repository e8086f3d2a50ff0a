#!/usr/bin/env bash
# Tells sandbox-operator's CI webhook that an image is ready, then waits for the rollout and
# fails when it fails. Needs bash, openssl, curl and jq (all on GitHub's ubuntu runners).
#
# Environment:
#   DEPLOY_WEBHOOK_URL     the webhook, https://<host>/api/v1/webhooks/ghosthands/deploy
#   DEPLOY_WEBHOOK_SECRET  the shared HMAC secret (the operator's webhook.secretRef)
#   DEPLOY_ENVIRONMENT     sent as X-GH-Environment (empty: the operator's defaultEnvironment)
#   IMAGE_TAG              the tag to deploy (required); IMAGE: the full image reference
#   COMMIT_SHA COMMIT_MESSAGE BRANCH REPOSITORY RUN_ID RUN_URL   optional, shown on the deploy
#   DEPLOY_WAIT            "false": do not wait for the rollout (default true)
#   DEPLOY_WAIT_TIMEOUT    seconds to wait for the rollout (default 1800)
#   DEPLOY_POLL_INTERVAL   seconds between status polls (default 10)
#
# Exit status: 0 when the rollout Succeeded (or, with DEPLOY_WAIT=false, was accepted); 1 when
# the webhook refused the delivery, the rollout ended Failed, Aborted or Superseded, or the wait
# timed out.
#
# The secret never reaches a command line (where other processes could read it): `openssl dgst
# -hmac KEY` would put it there, so the HMAC is built here from its definition (RFC 2104) with
# `openssl dgst -sha256` hashing stdin, the key padded and XORed in the shell.
set -euo pipefail

: "${DEPLOY_WEBHOOK_URL:?set DEPLOY_WEBHOOK_URL}"
: "${DEPLOY_WEBHOOK_SECRET:?set DEPLOY_WEBHOOK_SECRET}"
: "${IMAGE_TAG:?set IMAGE_TAG}"
wait_timeout=${DEPLOY_WAIT_TIMEOUT:-1800}
poll=${DEPLOY_POLL_INTERVAL:-10}

hex() { od -An -v -tx1 | tr -d ' \n'; }

# hmac_sha256: the hex HMAC-SHA256 of stdin under DEPLOY_WEBHOOK_SECRET.
hmac_sha256() {
    local key i b ipad="" opad="" inner inner_bytes=""
    key=$(printf '%s' "$DEPLOY_WEBHOOK_SECRET" | hex)
    if ((${#key} > 128)); then
        key=$(printf '%s' "$DEPLOY_WEBHOOK_SECRET" | openssl dgst -sha256 -binary | hex)
    fi
    while ((${#key} < 128)); do key+=00; done
    for ((i = 0; i < 128; i += 2)); do
        b=$((16#${key:i:2}))
        ipad+=$(printf '\\x%02x' $((b ^ 0x36)))
        opad+=$(printf '\\x%02x' $((b ^ 0x5c)))
    done
    inner=$({ printf "$ipad"; cat; } | openssl dgst -sha256 -binary | hex)
    for ((i = 0; i < 64; i += 2)); do inner_bytes+="\\x${inner:i:2}"; done
    { printf "$opad"; printf "$inner_bytes"; } | openssl dgst -sha256 -binary | hex
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

jq -cn \
    --arg image "${IMAGE:-}" --arg tag "$IMAGE_TAG" --arg sha "${COMMIT_SHA:-}" \
    --arg msg "${COMMIT_MESSAGE:-}" --arg branch "${BRANCH:-}" --arg repo "${REPOSITORY:-}" \
    --arg run "${RUN_ID:-}" --arg url "${RUN_URL:-}" --arg env "${DEPLOY_ENVIRONMENT:-}" \
    --arg ts "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    '{event: "ghosthands.deploy_ready", image: $image, image_tag: $tag, commit_sha: $sha,
      commit_message: $msg, branch: $branch, repository: $repo, run_id: $run, run_url: $url,
      environment: $env, timestamp: $ts}
     | with_entries(select(.value != ""))' >"$work/body.json"

signature=$(hmac_sha256 <"$work/body.json")
headers=(-H "Content-Type: application/json" -H "X-GH-Event: deploy_ready"
    -H "X-GH-Webhook-Signature: sha256=$signature")
if [[ -n "${DEPLOY_ENVIRONMENT:-}" ]]; then
    headers+=(-H "X-GH-Environment: $DEPLOY_ENVIRONMENT")
fi
code=$(curl -sS --retry 3 --retry-all-errors -o "$work/answer.json" -w '%{http_code}' \
    -X POST "${headers[@]}" --data-binary @"$work/body.json" "$DEPLOY_WEBHOOK_URL")
echo "webhook answered $code: $(cat "$work/answer.json")"
if [[ "$code" != 202 && "$code" != 200 ]]; then
    echo "::error::the deploy webhook refused the delivery ($code): $(jq -r '.error // .' "$work/answer.json")"
    exit 1
fi
name=$(jq -r .name "$work/answer.json")
status_path=$(jq -r .status_path "$work/answer.json")
echo "SandboxDeploy: $name ($(jq -r .namespace "$work/answer.json"))"
if [[ "${DEPLOY_WAIT:-true}" == false ]]; then
    exit 0
fi

# The status URL: the webhook's scheme and host, the path from the answer.
base=${DEPLOY_WEBHOOK_URL%%/api/v1/webhooks/*}
status_signature=$(printf '%s' "$status_path" | hmac_sha256)
deadline=$((SECONDS + wait_timeout))
last=""
while :; do
    code=$(curl -sS -o "$work/status.json" -w '%{http_code}' \
        -H "X-GH-Webhook-Signature: sha256=$status_signature" "$base$status_path") || code=000
    if [[ "$code" == 200 ]]; then
        phase=$(jq -r .phase "$work/status.json")
        line=$(jq -r '"\(.phase): \(.updated)/\(.total) updated, \(.failed) failed\(if (.skipped // 0) > 0 then ", \(.skipped) skipped as not healthy" else "" end)\(if .message then " - " + .message else "" end)"' "$work/status.json")
        [[ "$line" != "$last" ]] && echo "$name $line"
        last=$line
        case "$phase" in
        Succeeded) exit 0 ;;
        Failed | Aborted | Superseded)
            echo "::error::rollout $name ended $phase: $line"
            exit 1
            ;;
        esac
    elif [[ "$code" == 401 || "$code" == 404 ]]; then
        echo "::error::the deploy status answered $code: $(cat "$work/status.json")"
        exit 1
    else
        echo "status not available ($code), retrying"
    fi
    if ((SECONDS >= deadline)); then
        echo "::error::rollout $name not finished after ${wait_timeout}s (last: ${last:-none})"
        exit 1
    fi
    sleep "$poll"
done
