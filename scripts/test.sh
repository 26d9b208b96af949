#!/usr/bin/env bash
# Every test of the project (README's test command; .ci/run calls it):
#   1. the Rust workspace (cargo test), with the kernel path of this CPU mandatory;
#   2. the parity tests again through the ops a GPU runs (CODA_GENERIC_OPS=1: candle's composite
#      ops and the device-generic recomputing ops instead of our CPU kernels), same tolerances;
#   3. the Python package, built from this checkout (pip install .) into a fresh virtual
#      environment, tested with pytest, including the comparison with the coda binary that step 1
#      built (mandatory here: CODA_REQUIRE_CLI=1).
set -euo pipefail
cd "$(dirname "$0")/.."
# Every kernel path the CPU has runs in tests/kernel_paths.rs; the best one is mandatory here.
if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
  export CODA_REQUIRE_ISA=avx512
elif grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
  export CODA_REQUIRE_ISA=avx2
fi
# The bf16 tests skip on CPUs without the instructions; where the CPU has them they are
# mandatory: bf16x3 needs AMX, bf16 AMX or AVX512_BF16.
if grep -qw amx_bf16 /proc/cpuinfo 2>/dev/null; then
  export CODA_REQUIRE_AMX=1
else
  echo "NOTE: this CPU has no AMX bf16: the AMX tests run on the software model of the tiles only (SKIP lines), and the CLI checks the refusal"
fi
if grep -qwE "avx512_bf16|amx_bf16" /proc/cpuinfo 2>/dev/null; then
  export CODA_REQUIRE_BF16=1
else
  echo "NOTE: this CPU has neither AVX512_BF16 nor AMX: the bf16 tests print SKIP"
fi
# Every cargo call below selects the whole workspace, so that features resolve the same way and
# the test binaries (and the `coda` binary the Python tests compare with) are built once: a
# `-p coda-tokenizer` selection resolves them differently and rebuilt candle and our crate
# (+7 min of CI on 2 cores).
cargo test --workspace
# The kernels' unit tests (forward and backward of every conv form, GroupNorm, assignment) once
# more on each lower kernel path this CPU can run (tests/kernel_paths.rs covers the whole VAE).
for isa in avx2 scalar; do
  if [ "$isa" = scalar ] || { [ "${CODA_REQUIRE_ISA:-}" = avx512 ] && [ "$isa" = avx2 ]; }; then
    echo "kernel unit tests on the forced $isa path"
    # (the bf16/AMX kernels are below the cap there: their tests skip, so not mandatory)
    env -u CODA_REQUIRE_BF16 -u CODA_REQUIRE_AMX CODA_CPU_ISA=$isa \
      cargo test --workspace --lib kernels::
  fi
done
CODA_GENERIC_OPS=1 cargo test --workspace --test vae_parity --test quantizer_parity \
  --test tokenizer_parity
# The binary `cargo test --workspace` built for the CLI's integration tests.
test -x target/debug/coda
VENV=${CODA_TEST_VENV:-target/py-test-venv}
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q ".[test,ray]"
CODA_CLI=target/debug/coda CODA_REQUIRE_CLI=1 CODA_REQUIRE_RAY=1 "$VENV/bin/python" -m pytest python/tests -q -rs
