#!/usr/bin/env bash
# CI's CUDA check on a machine without a GPU (issue #17): the workspace builds and links with
# `--features cuda` (nvcc and libraries from PyPI, scripts/cuda_toolchain.sh, kernels for sm_90),
# and the CUDA binary starts: without a GPU it falls back to the CPU by default and refuses
# `--device cuda` with the reason. The tests themselves run on the CPU (scripts/test.sh).
#
#   bash scripts/cuda_build_check.sh      # ~15 min from scratch on 2 cores, most of it nvcc
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
source scripts/cuda_toolchain.sh
target=target/cuda-check
cargo build --workspace --features coda-cli/cuda,coda-tokenizer/cuda --profile cuda-check \
  --target-dir "$target"
bin="$target/cuda-check/coda"
ldd "$bin" | grep -E 'libcuda|libcublas' >&2
# Run it against the stub driver: no GPU, so the CPU path, and a clear refusal of cuda.
export LD_LIBRARY_PATH="$CUDA_ROOT/lib/stubs:$LD_LIBRARY_PATH"
out=$(mktemp -d)
"$bin" reconstruct assets/samples/lake.png -o "$out/r.png" --size 64 | tee "$out/log"
grep -q "PSNR" "$out/log"
if "$bin" --device cuda reconstruct assets/samples/lake.png -o "$out/r2.png" --size 64 2>"$out/err"; then
  echo "FAIL: --device cuda ran without a GPU" >&2
  exit 1
fi
grep "no usable GPU" "$out/err" >&2
[ ! -e "$out/r2.png" ]
rm -rf "$out"
echo "cuda build check passed in $(($(date +%s) - t0)) s" >&2
