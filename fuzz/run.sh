#!/usr/bin/env bash
# Runs every fuzz target for SECONDS seconds (default 30) with cargo-fuzz (libFuzzer),
# each from a scratch copy of its committed seed corpus (fuzz/corpus/TARGET), so the
# repository is not changed. Installs cargo-fuzz if missing.
# A crash stops the script with the input libFuzzer saved (fuzz/artifacts/TARGET/);
# fix it and add that input to the target's corpus as a regression case.
#   bash fuzz/run.sh 30          # CI: about 30 s a target
#   bash fuzz/run.sh 3600        # a long run
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-30}
# The toolchain is the machine's own (stable): cargo-fuzz asks for nightly for its
# unstable compiler flags, and RUSTC_BOOTSTRAP=1 lets the stable compiler take them, so
# the fuzzing runs wherever the tests do instead of being skipped where no nightly can
# be installed. libFuzzer's coverage instrumentation is the same.
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz/run.sh: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked --quiet
fi
# No sanitizer: tickerd forbids unsafe code, and these targets check invariants, not
# memory errors; the build is much shorter without one.
flags=(--fuzz-dir fuzz --sanitizer none)
cargo fuzz build "${flags[@]}"
for target in $(cargo fuzz list --fuzz-dir fuzz); do
  work=$(mktemp -d)
  cp -r "fuzz/corpus/$target/." "$work/"
  echo "fuzz/run.sh: $target for ${seconds}s"
  status=0
  cargo fuzz run "${flags[@]}" "$target" "$work" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 > "$work.log" 2>&1 || status=$?
  grep -E "^(stat::number_of_executed_units|stat::new_units_added|==|SUMMARY|thread|Done)" "$work.log" || true
  rm -rf "$work" "$work.log"
  if [ "$status" -ne 0 ]; then
    echo "fuzz/run.sh: $target FAILED (input saved under fuzz/artifacts/$target/)" >&2
    exit 1
  fi
done
echo "fuzz/run.sh: every target ran ${seconds}s without a failure"
