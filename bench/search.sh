#!/usr/bin/env bash
# The catalogue at a million products, as issue 9 states it: search (`q`), a category sorted by
# price, and deep pages (keyset cursors from the middle of the order) must each stay within
# 10 ms p99, on SQLite and on PostgreSQL. For each backend: `shopmesh up` once (it creates and
# migrates the databases), a million products written straight into the catalog's database
# (SQL, seconds instead of a million API calls; the search index fills from its triggers),
# `up` again, then `shopmesh-bench` against the catalog service's own port (the gateway's
# cache would answer repeats, and it is the database path that is measured here), four
# connections per query, the queries taking turns. Needs the sqlite3 shell with FTS5 and
# SQLite >= 3.34 (Debian's), as its load fires the search index's triggers. Run by hand;
# never in CI.
#
#   bench/search.sh                      # both backends, 1,000,000 products
#   PRODUCTS=200000 BACKENDS=sqlite bench/search.sh
set -euo pipefail
cd "$(dirname "$0")/.."

products=${PRODUCTS:-1000000}
backends=${BACKENDS:-sqlite postgres}
seconds=${SECONDS_PER_QUERY:-5}
connections=${CONNECTIONS:-4}
port=${PORT:-18483}
pg_url=${PG_URL:-postgres://postgres@127.0.0.1:5432}
target_dir=${CARGO_TARGET_DIR:-target}
bin="$target_dir/release/shopmesh"

cargo build --release --quiet -p shopmesh -p shopmesh-bench
echo "machine: $(nproc) cores, $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty'), $products products"

work=$(mktemp -d)
launcher=
stop_shop() {
    [ -n "$launcher" ] && kill -TERM "$launcher" 2>/dev/null && wait "$launcher" 2>/dev/null
    launcher=
    return 0
}
pg_run=
drop_pg_databases() {
    [ -n "$pg_run" ] || return 0
    for db in $(psql "$pg_url/postgres" -Atc "SELECT datname FROM pg_database WHERE starts_with(datname, '${pg_run}_')"); do
        psql "$pg_url/postgres" -qc "DROP DATABASE \"$db\" WITH (FORCE)"
    done
    pg_run=
}
trap 'stop_shop; drop_pg_databases; rm -rf "$work"' EXIT

start_shop() {
    env "$@" SHOPMESH_GATEWAY__RATE_LIMIT__PER_IP_PER_SECOND=0 \
        "$bin" up --port "$port" --data-dir "$work/data" > "$work/up.log" 2>&1 &
    launcher=$!
    for _ in $(seq 1 240); do
        grep -q '^ready: ' "$work/up.log" && return 0
        kill -0 "$launcher" 2>/dev/null || break
        sleep 0.5
    done
    tail -20 "$work/up.log"
    echo "the shop did not start" >&2
    return 1
}

# Word lists: a product is "<adjective> <material> <noun> <number>", so a search can be made as
# rare or as common as wanted (one material: 1 in 25 products; material and noun: 1 in 1,250;
# all three: 1 in 50,000; the number: one product).
words_sql() {
    local adjectives="Ancient Bold Calm Dusty Early Fancy Gentle Hardy Icy Jolly Keen Lively Mellow
        Noble Odd Plain Quiet Rustic Silent Tidy Urban Vivid Warm Young Zesty Amber Brisk Cosy
        Dainty Eager Faded Grand Humble Ideal Jaunty Kind Lush Misty Neat Ornate"
    local materials="Walnut Oak Pine Birch Maple Cedar Ash Elm Teak Bamboo Steel Brass Copper Iron
        Glass Linen Wool Cotton Velvet Leather Marble Granite Clay Rattan Cork"
    local nouns="Lamp Chair Table Stool Shelf Desk Bench Clock Mirror Vase Bowl Tray Basket Crate
        Frame Rug Cushion Blanket Kettle Teapot Mug Plate Jug Candle Lantern Hook Rack Cabinet
        Drawer Trunk Box Bottle Jar Pot Planter Easel Screen Stand Cart Ladder Sofa Bed Wardrobe
        Dresser Sideboard Bookcase Ottoman Pouf Hammock Swing"
    local categories="home garden kitchen office decor lighting storage textiles tableware outdoor
        bath kids pets tools gifts seasonal vintage workshop studio travel"
    local table i w
    for table in adjectives materials nouns categories; do
        echo "CREATE TEMP TABLE bench_$table (i INTEGER PRIMARY KEY, w TEXT NOT NULL);"
        i=0
        for w in ${!table}; do
            echo "INSERT INTO bench_$table VALUES ($i, '$w');"
            i=$((i + 1))
        done
    done
}

# The products, from numbers 1..N: the same rows on both backends.
products_sql() {
    local numbers=$1 uuid=$2 now=$3
    cat <<EOF
INSERT INTO products (id, sku, name, description, price, currency, category, image_url,
                      active, created_at, updated_at, deleted_at)
SELECT $uuid, 'BENCH-' || x,
       a.w || ' ' || m.w || ' ' || o.w || ' ' || x,
       'A ' || lower(o.w) || ' in ' || lower(m.w) || ', finished by hand. Catalogue number ' || x || '.',
       100 + (x * 7919) % 99900, 'EUR', c.w, NULL, 1, $now, $now, NULL
FROM $numbers
JOIN bench_adjectives a ON a.i = x % 40
JOIN bench_materials m ON m.i = (x / 40) % 25
JOIN bench_nouns o ON o.i = (x / 1000) % 50
JOIN bench_categories c ON c.i = (x / 7) % 20;
EOF
}

# Runs SQL on the catalog database of the current backend.
catalog_sql() {
    case $backend in
        sqlite) sqlite3 -bail "$work/data/catalog.db" ;;
        postgres) psql -q -v ON_ERROR_STOP=1 "$catalog_url" ;;
    esac
}

cursor() { # sort name price id -> a `cursor` the API accepts
    python3 -c 'import base64, json, sys
s, n, p, i = sys.argv[1:]
c = {"s": s, "id": i}
if n: c["n"] = n
if p: c["p"] = int(p)
print(base64.urlsafe_b64encode(json.dumps(c).encode()).decode().rstrip("="))' "$@"
}

for backend in $backends; do
    echo
    echo "== $backend, $products products =="
    rm -rf "$work/data"
    env_args=()
    if [ "$backend" = postgres ]; then
        pg_run="bench_search_$(date +%s)"
        env_args=(SHOPMESH_LAUNCHER__DATABASE_URL_TEMPLATE="$pg_url/${pg_run}_{service}")
        catalog_url="$pg_url/${pg_run}_catalog"
    fi
    start_shop ${env_args[@]+"${env_args[@]}"}
    stop_shop
    started=$(date +%s)
    now=$(($(date +%s) * 1000000))
    case $backend in
        sqlite)
            { words_sql
              echo "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < $products)"
              products_sql n "printf('%08x-0000-4000-8000-%012x', x, x)" "$now"
            } | catalog_sql ;;
        postgres)
            { words_sql
              products_sql "generate_series(1::bigint, $products) AS x" \
                  "lpad(to_hex(x), 8, '0') || '-0000-4000-8000-' || lpad(to_hex(x), 12, '0')" "$now"
              echo "ANALYZE products;"
            } | catalog_sql ;;
    esac
    echo "loaded in $(($(date +%s) - started)) s"
    start_shop ${env_args[@]+"${env_args[@]}"}
    catalog=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["processes"]["catalog"]["addr"])' "$work/data/up.json")
    base="http://$catalog/api/v1/products"

    # Cursors from the middle of each order, as a reader paging that far would hold them.
    query_one() {
        case $backend in
            sqlite) sqlite3 -separator ' ' "$work/data/catalog.db" "$1" ;;
            postgres) psql -At -F ' ' "$catalog_url" -c "$1" ;;
        esac
    }
    read -r deep_id deep_name_value <<< "$(query_one "SELECT id, name FROM products WHERE deleted_at IS NULL AND active = 1 ORDER BY name, id LIMIT 1 OFFSET $((products / 2))")"
    read -r cat_id cat_price <<< "$(query_one "SELECT id, price FROM products WHERE deleted_at IS NULL AND active = 1 AND category = 'garden' ORDER BY price, id LIMIT 1 OFFSET $((products / 40))")"
    deep_name=$(cursor name "$deep_name_value" "" "$deep_id")
    deep_price=$(cursor price "" "$cat_price" "$cat_id")

    echo "query: what it is (hits in $products products)"
    cat <<EOF
  one:      q=123457, a catalogue number (1)
  few:      q=ancient walnut lamp (1 in 50,000)
  some:     q=walnut lamp (1 in 1,250)
  edge:     q=999 (a few thousand: where SQLite switches plans)
  common:   q=walnut (1 in 25)
  none:     q=zzzz (0)
  category: category=garden&sort=price, first page (1 in 20)
  deep:     sort=name, a page from the middle (cursor)
  deep-cat: category=garden&sort=price, a page from the middle (cursor)
EOF
    "$target_dir/release/shopmesh-bench" --connections "$connections" --seconds "$seconds" --warmup 1 \
        --target "one=$base?q=123457" \
        --target "few=$base?q=ancient%20walnut%20lamp" \
        --target "some=$base?q=walnut%20lamp" \
        --target "edge=$base?q=999" \
        --target "common=$base?q=walnut" \
        --target "none=$base?q=zzzz" \
        --target "category=$base?category=garden&sort=price" \
        --target "deep=$base?sort=name&cursor=$deep_name" \
        --target "deep-cat=$base?category=garden&sort=price&cursor=$deep_price" \
        | sed 's/   ratio to .*//'
    stop_shop
    drop_pg_databases
done
