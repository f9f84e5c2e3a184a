#!/usr/bin/env bash
# Run every fuzz target for SECONDS each (default 30), one after the other, each
# from its corpus in fuzz/corpus/TARGET (kept between runs, ignored by git) and the
# hand-written starting inputs in fuzz/seeds/TARGET.
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`); cargo-fuzz passes nightly
# flags, which RUSTC_BOOTSTRAP=1 lets the stable toolchain take. Built optimised but
# with debug assertions (-a), so arithmetic overflow is a crash too.
# A crash stops the run with a non-zero status; the input is in fuzz/artifacts/TARGET/:
# turn it into a #[test] in the crate, then fix the crash.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
seconds="${1:-30}"
export RUSTC_BOOTSTRAP=1
targets=$(cargo fuzz list)
# Build all first, so each target's time is spent fuzzing.
cargo fuzz build -O -a
mkdir -p logs
for target in $targets; do
    mkdir -p "corpus/$target"
    log="logs/$target.log"
    status=0
    cargo fuzz run -O -a "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    echo "fuzz $target: ${runs:-?} executions in ${seconds}s, corpus $(ls "corpus/$target" | wc -l) inputs"
    if [[ $status -ne 0 ]]; then
        echo "fuzz/run-all.sh: $target failed (status $status); the end of its log:" >&2
        tail -40 "$log" >&2
        exit 1
    fi
done
echo "fuzz: every target ran ${seconds}s without a failure"
