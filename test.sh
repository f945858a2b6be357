#!/usr/bin/env bash
# Runs Chime's whole test suite on a Debian/Ubuntu machine with Rust.
#
# Installs what the tests need when it is missing (the PostgreSQL server binaries: the tests start
# their own throwaway server with initdb + pg_ctl in a temp dir; OpenSSH's server and client: the
# storage-node tests start their own sshd on loopback and reach it with ssh), builds every binary
# the integration tests drive, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")"

have_postgres() {
    command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}

have_openssh() {
    { command -v sshd >/dev/null 2>&1 || test -x /usr/sbin/sshd; } &&
        command -v ssh >/dev/null 2>&1 && command -v ssh-keygen >/dev/null 2>&1
}

packages=()
if ! have_postgres || ! command -v runuser >/dev/null 2>&1; then
    packages+=(postgresql util-linux)
fi
if ! have_openssh; then
    packages+=(openssh-server openssh-client)
fi
if [ "${#packages[@]}" -gt 0 ]; then
    echo "test.sh: installing ${packages[*]}" >&2
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -q
    # Only the binaries are used: the tests start their own throwaway servers, never the services.
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${packages[@]}"
fi

# The e2e tests start target/debug/chimed and target/debug/chime (the node tests run chimed as the
# storage agent), so build them first.
cargo build --workspace --bins
cargo test --workspace --no-fail-fast "$@"
