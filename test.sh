#!/usr/bin/env bash
# Runs Chime's whole test suite on a Debian/Ubuntu machine with Rust.
#
# Installs what the tests need when it is missing (the PostgreSQL server binaries: the tests start
# their own throwaway server with initdb + pg_ctl in a temp dir), builds every binary the
# integration tests drive, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")"

have_postgres() {
    command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}

if ! have_postgres || ! command -v runuser >/dev/null 2>&1; then
    echo "test.sh: installing the PostgreSQL server packages" >&2
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends postgresql util-linux
fi

# The e2e tests start target/debug/chimed and target/debug/chime, so build them first.
cargo build --workspace --bins
cargo test --workspace --no-fail-fast "$@"
