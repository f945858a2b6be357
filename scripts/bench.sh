#!/usr/bin/env bash
# Runs the scenarios of docs/performance.md against a fresh release chimed, on SQLite and on a
# throwaway PostgreSQL, and prints one chime-load JSON summary per run (tagged with the store and
# the scenario). Loopback only; everything it starts is stopped at exit.
#
#   scripts/bench.sh [sqlite|postgres|both] [quick]
#
# "quick" shortens every window to 5 s (for a smoke run). CHIME_BENCH_BIN=DIR runs the chimed and
# chime-load found in DIR instead of building this tree (to measure an older build side by side;
# its chime-load must speak its chimed's protocol version). CHIME_BENCH_ONLY=REGEX runs only the
# scenarios whose names match.
set -euo pipefail
cd "$(dirname "$0")/.."
stores=${1:-both}
dur=20
[ "${2:-}" = quick ] && dur=5
ulimit -n 20000

bin=${CHIME_BENCH_BIN:-}
if [ -z "$bin" ]; then
    cargo build --release --workspace -q
    bin=target/release
fi
L=$bin/chime-load
work=$(mktemp -d /tmp/chime-bench.XXXXXX)
chimed_pid=""
pg_bin=""

as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

cleanup() {
    [ -n "$chimed_pid" ] && kill "$chimed_pid" 2>/dev/null && wait "$chimed_pid" 2>/dev/null || true
    if [ -n "$pg_bin" ] && [ -d "$work/pg/data" ]; then as_pg "$pg_bin/pg_ctl" -D "$work/pg/data" -m immediate stop >/dev/null 2>&1 || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

start_pg() {
    # Debian keeps the server binaries off PATH, under /usr/lib/postgresql/VERSION/bin.
    pg_bin=$(dirname "$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1)")
    [ -x "$pg_bin/initdb" ] || pg_bin=$(dirname "$(readlink -f "$(command -v initdb)")")
    mkdir -p "$work/pg"
    if [ "$(id -u)" = 0 ]; then id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres; chown postgres "$work/pg"; chmod 755 "$work"; fi
    as_pg "$pg_bin/initdb" -D "$work/pg/data" -U postgres --auth=trust -E UTF8 >/dev/null
    as_pg "$pg_bin/pg_ctl" -D "$work/pg/data" -l "$work/pg/log" -w \
        -o "-p 55439 -k $work/pg -c listen_addresses=127.0.0.1 -c max_connections=100 -c fsync=on" start >/dev/null
}

db_n=0
start_chimed() { # $1 = store
    [ -n "$chimed_pid" ] && kill "$chimed_pid" && wait "$chimed_pid" 2>/dev/null || true
    rm -rf "$work/data"
    local db=()
    if [ "$1" = postgres ]; then
        db_n=$((db_n + 1))
        "$pg_bin/psql" -q -h 127.0.0.1 -p 55439 -U postgres -c "CREATE DATABASE bench$db_n" >/dev/null
        db=(--database "postgres://postgres@127.0.0.1:55439/bench$db_n")
    fi
    RUST_LOG=warn "$bin/chimed" serve --data-dir "$work/data" "${db[@]}" \
        --listen 127.0.0.1:7978 --plaintext-listen 127.0.0.1:7979 \
        --login-rate 1000 --accept-rate 5000 --max-connections 19000 \
        --max-connections-per-ip 19000 --resume-rate-per-ip 100000 2>"$work/chimed.log" &
    chimed_pid=$!
    for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/7979) 2>/dev/null && return; sleep 0.1; done
    echo "chimed did not start" >&2; cat "$work/chimed.log" >&2; exit 1
}

run() { # $1 = store, $2 = scenario name, rest = chime-load flags
    local store=$1 name=$2; shift 2
    [[ "$name" =~ ${CHIME_BENCH_ONLY:-.} ]] || return 0
    start_chimed "$store"
    local out
    out=$($L --server 127.0.0.1:7979 --json --daemon-pid "$chimed_pid" "$@")
    echo "{\"store\":\"$store\",\"scenario\":\"$name\",\"result\":$out}"
}

for store in sqlite postgres; do
    [ "$stores" = both ] || [ "$stores" = "$store" ] || continue
    [ "$store" = postgres ] && start_pg
    for rate in 100 1000 10000; do
        run "$store" "room1000-rate$rate" --connections 1000 --rooms 1 --users-per-room 10 --senders 1 --rate "$rate" --duration "$dur"
    done
    run "$store" room1000-closed10 --connections 1000 --rooms 1 --users-per-room 10 --senders 10 --rate 0 --duration "$dur"
    run "$store" rooms500x10 --connections 5000 --rooms 500 --users-per-room 2 --senders 5000 --rate 0.5 --duration "$dur" --warmup 5
    run "$store" idle10000 --connections 10000 --rooms 100 --idle --duration 10
done
