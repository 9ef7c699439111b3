#!/usr/bin/env bash
# The gateway hop against nginx, as issue 9 states it: a trivial upstream (bench-upstream, one
# thread), with the shopmesh gateway in front of it and nginx (one worker, keep-alive to the
# upstream) in front of the same upstream, and `bench-bare-proxy` (hyper's server and the pooled
# client the gateway is built on, nothing else: the floor of its stack). The upstream and the
# proxies are pinned to core 0, the load generator to core 1; the targets take turns in rounds
# in one run. Needs nginx
# (apt-get install nginx-light). Run by hand; never in CI.
#
#   bench/hop.sh                          # 64 connections, 10 s per target
#   CONNECTIONS=32 SECONDS_PER_TARGET=20 bench/hop.sh
#   GATEWAY_BIN=/tmp/other/shopmesh bench/hop.sh   # another build of the gateway
set -euo pipefail
cd "$(dirname "$0")/.."

connections=${CONNECTIONS:-64}
seconds=${SECONDS_PER_TARGET:-10}
target_dir=${CARGO_TARGET_DIR:-target}
upstream_port=18600
gateway_port=18601
nginx_port=18602
bare_port=18603

command -v nginx > /dev/null || { echo "nginx is needed: apt-get install nginx-light" >&2; exit 1; }
cargo build --release --quiet -p shopmesh -p shopmesh-bench
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

taskset -c 0 "$target_dir/release/bench-upstream" "127.0.0.1:$upstream_port" 2> "$work/upstream.log" &
pids+=($!)

upstream="http://127.0.0.1:$upstream_port"
# As `shopmesh up` runs it on two cores: confined to one core (`--cpus`), so on tokio's
# current-thread scheduler.
SHOPMESH_SERVER__PORT=$gateway_port \
SHOPMESH_GATEWAY__UPSTREAMS__USERS="$upstream" \
SHOPMESH_GATEWAY__UPSTREAMS__INVENTORY="$upstream" \
SHOPMESH_GATEWAY__RATE_LIMIT__PER_IP_PER_SECOND=0 \
SHOPMESH_GATEWAY__RATE_LIMIT__PER_USER_PER_SECOND=0 \
    "${GATEWAY_BIN:-$target_dir/release/shopmesh}" serve gateway --cpus 0 > "$work/gateway.log" 2>&1 &
pids+=($!)

cat > "$work/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 4096; }
http {
    access_log off;
    upstream app { server 127.0.0.1:$upstream_port; keepalive 64; }
    server {
        listen 127.0.0.1:$nginx_port;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
taskset -c 0 "$target_dir/release/bench-bare-proxy" "127.0.0.1:$bare_port" "127.0.0.1:$upstream_port" \
    2> "$work/bare.log" &
pids+=($!)

taskset -c 0 nginx -c "$work/nginx.conf" -p "$work" &
pids+=($!)

for _ in $(seq 1 60); do
    curl -sf "http://127.0.0.1:$gateway_port/readyz" > /dev/null \
        && curl -sf "http://127.0.0.1:$nginx_port/x" > /dev/null \
        && curl -sf "http://127.0.0.1:$bare_port/x" > /dev/null && break
    sleep 0.5
done
curl -sf "http://127.0.0.1:$gateway_port/api/v1/inventory/x" > /dev/null \
    || { cat "$work/gateway.log"; echo "the gateway is not ready" >&2; exit 1; }
curl -sf "http://127.0.0.1:$nginx_port/x" > /dev/null \
    || { cat "$work/nginx-error.log"; echo "nginx is not ready" >&2; exit 1; }
curl -sf "http://127.0.0.1:$bare_port/x" > /dev/null \
    || { cat "$work/bare.log"; echo "the bare proxy is not ready" >&2; exit 1; }

echo "machine: $(nproc) cores; upstream and proxies on core 0, load on core 1; $connections connections"
echo "request: GET /api/v1/inventory/x (a public route; the upstream answers 22 bytes)"
path=/api/v1/inventory/x
taskset -c 1 "$target_dir/release/shopmesh-bench" \
    --target "upstream=http://127.0.0.1:$upstream_port$path" \
    --target "nginx=http://127.0.0.1:$nginx_port$path" \
    --target "bare-hyper=http://127.0.0.1:$bare_port$path" \
    --target "gateway=http://127.0.0.1:$gateway_port$path" \
    --connections "$connections" --seconds "$seconds"
