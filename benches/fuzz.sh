#!/usr/bin/env bash
# Long, coverage-guided fuzzing of every parser that sees network or user input.
#
#   bash benches/fuzz.sh [--runs N] [--jobs J] [TARGET...]
#
# Targets (tests/fuzz/targets.rs): wg_datagram neighbor netstack uapi wgquick
# relay_toml api_body; all of them when none is named. Each runs N inputs (default
# 1000000) under libFuzzer, starting from the real seeds in tests/fuzz/seeds.rs plus
# the corpus earlier runs kept in target/fuzz/corpus/TARGET. J targets run at once
# (default 1). A summary per target follows: inputs, executions per second,
# coverage (edges, features), crashes. A crashing input is saved under
# target/fuzz/artifacts/TARGET/; copy it into tests/fuzz/regressions/TARGET/ so
# `cargo test --test fuzz` replays it for ever after, then fix the parser.
#
# How: stable Rust, no nightly and no cargo-fuzz. libfuzzer-sys (from crates.io)
# builds libFuzzer with the C++ compiler; the targets are compiled with LLVM's
# SanitizerCoverage through stable flags (-C passes=sancov-module and
# -C llvm-args=-sanitizer-coverage-*): 8-bit edge counters, the PC table and
# comparison tracing, which is what libFuzzer's guidance feeds on. Missing pieces
# install themselves: g++ from Debian when there is no C++ compiler, the crates
# through cargo. Builds go to target/fuzz (release, debug assertions and overflow
# checks on), apart from the normal build, so instrumented code never mixes in.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=1000000
jobs=1
targets=()
all=(wg_datagram neighbor netstack uapi wgquick relay_toml api_body)
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) runs="$2"; shift 2 ;;
        --jobs) jobs="$2"; shift 2 ;;
        -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done
[ "${#targets[@]}" -gt 0 ] || targets=("${all[@]}")
for t in "${targets[@]}"; do
    [[ " ${all[*]} " == *" $t "* ]] || { echo "unknown target $t; targets: ${all[*]}" >&2; exit 2; }
done

if ! command -v c++ >/dev/null 2>&1; then
    echo "installing g++ (libFuzzer is C++)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends g++ >/dev/null
fi

host=$(rustc -vV | sed -n 's/^host: //p')
out=target/fuzz
# An explicit --target keeps these flags away from build scripts and proc macros.
export RUSTFLAGS="-C passes=sancov-module \
 -C llvm-args=-sanitizer-coverage-level=4 \
 -C llvm-args=-sanitizer-coverage-inline-8bit-counters \
 -C llvm-args=-sanitizer-coverage-pc-table \
 -C llvm-args=-sanitizer-coverage-trace-compares \
 -C debug-assertions -C overflow-checks --cfg fuzzing"
cargo build --release --locked --manifest-path tests/fuzz/Cargo.toml \
    --target "$host" --target-dir "$out" --bins
bin="$out/$host/release"

for t in "${targets[@]}"; do
    rm -rf "$out/seeds/$t"
    SIDECAR_FUZZ_WRITE_SEEDS="$out/seeds/$t" "$bin/$t"
done

run_one() {
    local t="$1" log="$out/logs/$1.log"
    mkdir -p "$out/corpus/$t" "$out/artifacts/$t" "$out/logs"
    # The regressions join the seeds: a fixed crash must stay fixed.
    local extra=()
    [ -d "tests/fuzz/regressions/$t" ] && extra+=("tests/fuzz/regressions/$t")
    local start
    start=$(date +%s.%N)
    set +e
    "$bin/$t" -runs="$runs" -max_len=8192 -timeout=10 -print_final_stats=1 \
        -artifact_prefix="$out/artifacts/$t/" \
        "$out/corpus/$t" "$out/seeds/$t" "${extra[@]}" >"$log" 2>&1
    echo $? >"$out/logs/$t.rc"
    set -e
    echo "$start $(date +%s.%N)" >"$out/logs/$t.time"
}

summary() {
    local t="$1" log="$out/logs/$1.log"
    local rc execs eps cov ft
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rc=$(cat "$out/logs/$t.rc")
    # libFuzzer's own figure is whole executions per whole second; measure instead.
    eps=$(awk -v n="${execs:-0}" '{ d = $2 - $1; if (d > 0) printf "%d", n / d }' "$out/logs/$t.time")
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
    ft=$(grep -o 'ft: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
    local verdict="ok"
    [ "$rc" -eq 0 ] || verdict="CRASH (exit $rc): $(ls "$out/artifacts/$t" | head -3 | tr '\n' ' ')see $log"
    printf '%-12s %10s inputs %8s exec/s  edges %6s  features %7s  %s\n' \
        "$t" "${execs:-?}" "${eps:-?}" "${cov:-?}" "${ft:-?}" "$verdict"
    [ "$rc" -eq 0 ]
}

pending=("${targets[@]}")
while [ "${#pending[@]}" -gt 0 ]; do
    batch=("${pending[@]:0:$jobs}")
    pending=("${pending[@]:$jobs}")
    for t in "${batch[@]}"; do
        echo "fuzzing $t: $runs inputs"
        run_one "$t" &
    done
    wait
done

failed=0
for t in "${targets[@]}"; do
    summary "$t" || failed=1
done
exit "$failed"
