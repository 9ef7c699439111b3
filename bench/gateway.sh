#!/usr/bin/env bash
# Gateway overhead, measured side by side in one run: the same authenticated GET /api/v1/me sent
# straight to the users service and through the gateway. Starts its own `shopmesh up` (release
# build) in a temp directory and stops it afterwards. Run by hand; never in CI.
#
#   bench/gateway.sh                      # 64 connections, 10 s per target
#   CONNECTIONS=128 SECONDS_PER_TARGET=20 bench/gateway.sh
set -euo pipefail
cd "$(dirname "$0")/.."

connections=${CONNECTIONS:-64}
seconds=${SECONDS_PER_TARGET:-10}
port=${PORT:-18480}
target_dir=${CARGO_TARGET_DIR:-target}

cargo build --release --quiet -p shopmesh -p shopmesh-bench
work=$(mktemp -d)
# One client address sends everything: the per-address and per-user limits would measure
# themselves, not the gateway.
SHOPMESH_GATEWAY__RATE_LIMIT__PER_IP_PER_SECOND=0 SHOPMESH_GATEWAY__RATE_LIMIT__PER_USER_PER_SECOND=0 \
SHOPMESH_LOG__LEVEL=warn "$target_dir/release/shopmesh" up --port "$port" --data-dir "$work/data" \
    > "$work/up.log" 2>&1 &
launcher=$!
trap 'kill -TERM $launcher 2>/dev/null; wait $launcher 2>/dev/null; rm -rf "$work"' EXIT

for _ in $(seq 1 120); do
    grep -q '^ready: ' "$work/up.log" && break
    sleep 0.5
done
grep -q '^ready: ' "$work/up.log" || { cat "$work/up.log"; echo "shop did not start" >&2; exit 1; }

gateway="http://127.0.0.1:$port"
curl -sf -X POST "$gateway/api/v1/register" -H 'content-type: application/json' \
    -d '{"email":"bench@example.com","name":"Bench","password":"correct horse battery"}' > /dev/null
token=$(curl -sf -X POST "$gateway/api/v1/login" -H 'content-type: application/json' \
    -d '{"email":"bench@example.com","password":"correct horse battery"}' \
    | sed 's/.*"access_token":"\([^"]*\)".*/\1/')
users=$(tr -d ' \n' < "$work/data/up.json" | sed 's/.*"users":{[^}]*"addr":"\([^"]*\)".*/\1/')

echo "machine: $(nproc) cores; $connections connections; ${seconds}s per target in alternating rounds"
echo "request: GET /api/v1/me with a bearer token (JWT verify + one SQLite read in users)"
"$target_dir/release/shopmesh-bench" \
    --target "direct=http://$users/api/v1/me" \
    --target "gateway=$gateway/api/v1/me" \
    --header "authorization: Bearer $token" \
    --connections "$connections" --seconds "$seconds"
