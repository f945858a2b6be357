#!/usr/bin/env bash
# The CI fuzz step (called by .ci/run; see docs/fuzzing.md): builds every fuzz target once and runs
# each for a bounded time from the committed corpus. New inputs go to a scratch directory, so the
# corpus in fuzz/corpus/ is only read; a crash fails the step and leaves its input in
# fuzz/artifacts/<target>/.
#
# Without a nightly toolchain the targets cannot be built with libFuzzer: the step says so loudly
# and only checks that the crate compiles (on stable).
set -euo pipefail
cd "$(dirname "$0")"

# Seconds per target: the decoder sees every byte a client sends, so it gets the most.
budget=(decoder:60 client_bodies:25 server_bodies:25 sync:30 node_frames:20)

cargo fmt -- --check

if ! cargo +nightly --version >/dev/null 2>&1; then
    cat >&2 <<'EOF'
########################################################################################
# WARNING: no nightly toolchain (`cargo +nightly --version` failed).                   #
# The fuzz targets were NOT RUN; only `cargo check` of the fuzz crate on stable.       #
# Install one with `rustup toolchain install nightly` to run them.                     #
########################################################################################
EOF
    cargo check --all-targets
    exit 0
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

cargo +nightly fuzz build
for entry in "${budget[@]}"; do
    target=${entry%%:*}
    secs=${entry##*:}
    mkdir -p "$scratch/$target"
    log="$scratch/$target.log"
    echo "fuzz: $target for ${secs}s"
    if ! cargo +nightly fuzz run "$target" "$scratch/$target" "corpus/$target" -- \
        -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1; then
        tail -n 80 "$log" >&2
        echo "fuzz: $target FAILED; the input is in fuzz/artifacts/$target/ (docs/fuzzing.md: reproducing)" >&2
        exit 1
    fi
    grep -E '^(Done|stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb))' "$log"
done
