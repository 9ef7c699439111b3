#!/usr/bin/env bash
# Commit-to-delivery latency of the embedded event transport at a nominal load: places orders
# at a steady rate through the gateway (each one commits an `order.placed` event), then reads
# the notifications service's `event_delivery_seconds` histogram (from the producer's commit
# to the consumer's commit of the handled event, the e-mail written). Starts its own
# `shopmesh up` (release build) in a temp directory. Run by hand; never in CI.
#
#   bench/events.sh                    # 20 orders/s for 15 s, embedded transport
#   RATE=50 SECONDS_TOTAL=20 bench/events.sh
#   RABBITMQ=amqp://guest:guest@127.0.0.1:5672/%2f bench/events.sh   # through RabbitMQ
set -euo pipefail
cd "$(dirname "$0")/.."

rate=${RATE:-20}
seconds=${SECONDS_TOTAL:-15}
port=${PORT:-18481}
target_dir=${CARGO_TARGET_DIR:-target}

cargo build --release --quiet -p shopmesh
work=$(mktemp -d)
transport=embedded
if [ -n "${RABBITMQ:-}" ]; then
    transport="RabbitMQ"
    run="bench-$(date +%s)"
    export SHOPMESH_EVENTS__RABBITMQ_URL="$RABBITMQ" SHOPMESH_EVENTS__EXCHANGE="shopmesh.$run" \
        SHOPMESH_EVENTS__QUEUE_PREFIX="$run."
fi
SHOPMESH_GATEWAY__RATE_LIMIT__PER_IP_PER_SECOND=0 SHOPMESH_GATEWAY__RATE_LIMIT__PER_USER_PER_SECOND=0 \
SHOPMESH_LOG__LEVEL=warn "$target_dir/release/shopmesh" up --port "$port" --data-dir "$work/data" \
    > "$work/up.log" 2>&1 &
launcher=$!
cleanup() {
    kill -TERM $launcher 2>/dev/null; wait $launcher 2>/dev/null; rm -rf "$work"
    if [ "$transport" = RabbitMQ ]; then
        for q in notifications notifications.dead catalog catalog.dead; do
            rabbitmqctl delete_queue "$run.$q" > /dev/null 2>&1 || true
        done
    fi
}
trap cleanup EXIT
for _ in $(seq 1 120); do
    grep -q '^ready: ' "$work/up.log" && break
    sleep 0.5
done
grep -q '^ready: ' "$work/up.log" || { cat "$work/up.log"; echo "shop did not start" >&2; exit 1; }

gateway="http://127.0.0.1:$port"
"$target_dir/release/shopmesh" admin create-admin --data-dir "$work/data" \
    --email boss@example.com --password 'an admin passphrase' > /dev/null
login() {
    curl -sf -X POST "$gateway/api/v1/login" -H 'content-type: application/json' \
        -d "{\"email\":\"$1\",\"password\":\"$2\"}" | sed 's/.*"access_token":"\([^"]*\)".*/\1/'
}
curl -sf -X POST "$gateway/api/v1/register" -H 'content-type: application/json' \
    -d '{"email":"bench@example.com","name":"Bench","password":"correct horse battery"}' > /dev/null
token=$(login bench@example.com 'correct horse battery')
product=$(curl -sf "$gateway/api/v1/products?limit=1" | sed 's/.*"items":\[{"id":"\([^"]*\)".*/\1/')
admin=$(login boss@example.com 'an admin passphrase')
curl -sf -X POST "$gateway/api/v1/inventory/$product" -H "authorization: Bearer $admin" \
    -H 'content-type: application/json' -d '{"quantity":100000}' > /dev/null

total=$((rate * seconds))
echo "machine: $(nproc) cores; $total orders at $rate/s through the gateway; transport: $transport"
interval=$(python3 -c "print(1/$rate)")
orders=()
for i in $(seq 1 "$total"); do
    curl -s -o /dev/null -X POST "$gateway/api/v1/orders" -H "authorization: Bearer $token" \
        -H "idempotency-key: bench-$i" -H 'content-type: application/json' \
        -d "{\"items\":[{\"product_id\":\"$product\",\"quantity\":1}]}" &
    orders+=($!)
    sleep "$interval"
done
wait "${orders[@]}"   # not the launcher
sleep 2

notifications=$(python3 -c "import json; print(json.load(open('$work/data/up.json'))['processes']['notifications']['addr'])")
# Every source: "orders" (and "users") pulled by the embedded transport, "rabbitmq" through the
# broker; the handful of registrations barely moves the figures.
curl -sf "http://$notifications/metrics" | python3 -c '
import sys, re, collections
per_le, count = collections.Counter(), 0
for line in sys.stdin:
    m = re.match(r"event_delivery_seconds_bucket\{.*le=\"([^\"]+)\"\} (\d+)", line)
    if m:
        per_le[float("inf") if m.group(1) == "+Inf" else float(m.group(1))] += int(m.group(2))
    m = re.match(r"event_delivery_seconds_count\{.*\} (\d+)", line)
    if m:
        count += int(m.group(1))
buckets = sorted(per_le.items())
def quantile(q):
    for le, c in buckets:
        if c >= q * count:
            return le
print(f"events delivered: {count}")
for q in (0.5, 0.9, 0.99, 1.0):
    print(f"  p{int(q*100)} <= {quantile(q)} s (histogram bucket bound)")
'
