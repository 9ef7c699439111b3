#!/usr/bin/env bash
# The purchase path, measured the way issue 9 states its targets: `shopmesh up` with its
# defaults (rate limits off, so they do not measure themselves), `shopmesh load` on the same
# machine, then `shopmesh verify`. Three cases in one go, each on a fresh shop in a temp
# directory: closed loop (16 users, the journey), open loop (500 purchases/s), and the closed
# loop again on PostgreSQL (one database per service on the local server). Run by hand; never
# in CI.
#
#   bench/journey.sh                              # all three cases
#   CASES=closed bench/journey.sh                 # closed, open, postgres (space-separated)
#   USERS=32 DURATION=60s RATE=800 bench/journey.sh
#   PG_URL=postgres://postgres@127.0.0.1:5432 bench/journey.sh
#   BINS="/tmp/before/shopmesh /tmp/after/shopmesh" ROUNDS=2 bench/journey.sh
#                                                 # two builds side by side: each case runs
#                                                 # once per binary in turn, ROUNDS times
#
# Results (JSON and an HTML report per case) are kept in bench/results/ (not committed).
set -euo pipefail
cd "$(dirname "$0")/.."

cases=${CASES:-closed open postgres}
users=${USERS:-16}
duration=${DURATION:-30s}
open_duration=${OPEN_DURATION:-60s}
rate=${RATE:-500}
warmup=${WARMUP:-5s}
port=${PORT:-18482}
pg_url=${PG_URL:-postgres://postgres@127.0.0.1:5432}
target_dir=${CARGO_TARGET_DIR:-target}
rounds=${ROUNDS:-1}
results=bench/results
mkdir -p "$results"

if [ -n "${BINS:-}" ]; then
    read -r -a bins <<< "$BINS"
    echo "machine: $(nproc) cores; alternating ${bins[*]}, $rounds round(s)"
else
    cargo build --release --quiet -p shopmesh
    bins=("$target_dir/release/shopmesh")
    echo "machine: $(nproc) cores, $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty')"
fi
bin=${bins[0]}

admin_email=bench-admin@example.com
admin_password='bench admin password 1'

# Starts a shop in $work; extra environment as arguments (VAR=value ...).
start_shop() {
    work=$(mktemp -d)
    env "$@" \
        SHOPMESH_GATEWAY__RATE_LIMIT__PER_IP_PER_SECOND=0 \
        SHOPMESH_GATEWAY__RATE_LIMIT__PER_USER_PER_SECOND=0 \
        SHOPMESH_GATEWAY__RATE_LIMIT__LOGIN_PER_MINUTE_PER_IP=0 \
        SHOPMESH_GATEWAY__RATE_LIMIT__LOGIN_PER_MINUTE_PER_ACCOUNT=0 \
        SHOPMESH_USERS__BOOTSTRAP_ADMIN_EMAIL="$admin_email" \
        SHOPMESH_USERS__BOOTSTRAP_ADMIN_PASSWORD="$admin_password" \
        "$bin" up --port "$port" --data-dir "$work/data" > "$work/up.log" 2>&1 &
    launcher=$!
    for _ in $(seq 1 240); do
        grep -q '^ready: ' "$work/up.log" && return 0
        kill -0 $launcher 2>/dev/null || break
        sleep 0.5
    done
    tail -20 "$work/up.log"
    echo "the shop did not start" >&2
    return 1
}

stop_shop() {
    kill -TERM "$launcher" 2>/dev/null || true
    wait "$launcher" 2>/dev/null || true
    rm -rf "$work"
}
trap 'stop_shop 2>/dev/null || true' EXIT

# Runs `shopmesh load` with the arguments given, then `shopmesh verify`.
load() {
    local name=$1
    shift
    local stamp
    stamp=$(date +%Y%m%d-%H%M%S)
    "$bin" load --url "http://127.0.0.1:$port" --data-dir "$work/data" \
        --admin-email "$admin_email" --admin-password "$admin_password" \
        --warmup "$warmup" --quiet \
        --json "$results/$stamp-$name.json" --html "$results/$stamp-$name.html" "$@"
    # Orders still awaiting payment are fine; anything unbalanced is not.
    "$bin" verify --data-dir "$work/data" | tail -3
}

for case in $cases; do
for round in $(seq 1 "$rounds"); do
for bin in "${bins[@]}"; do
    echo
    [ "${#bins[@]}" -gt 1 ] || [ "$rounds" -gt 1 ] && echo "== $bin, round $round =="
    case $case in
        closed)
            echo "== closed loop, $users users, $duration, SQLite =="
            start_shop
            load closed --users "$users" --duration "$duration"
            stop_shop
            ;;
        open)
            echo "== open loop, $rate purchases/s, $open_duration, SQLite =="
            start_shop
            load open --rate "$rate" --duration "$open_duration"
            stop_shop
            ;;
        postgres)
            echo "== closed loop, $users users, $duration, PostgreSQL =="
            run="bench_$(date +%s)"
            start_shop SHOPMESH_LAUNCHER__DATABASE_URL_TEMPLATE="$pg_url/${run}_{service}"
            load postgres --users "$users" --duration "$duration"
            stop_shop
            for db in $(psql "$pg_url/postgres" -Atc "SELECT datname FROM pg_database WHERE datname LIKE '${run}_%'"); do
                psql "$pg_url/postgres" -qc "DROP DATABASE \"$db\" WITH (FORCE)"
            done
            ;;
        *)
            echo "unknown case $case (closed, open, postgres)" >&2
            exit 2
            ;;
    esac
done
done
done
