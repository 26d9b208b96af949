#!/usr/bin/env bash
# Issue #17's checks on a machine with an NVIDIA GPU (a few minutes on an H200 once built):
#   1. parity on the GPU: the VAE, quantizer and tokenizer parity tests with
#      CODA_TEST_DEVICE=cuda (ids against the PyTorch fixtures, values within the CPU's
#      tolerances), and ids of real photos: identical run to run, and against the CPU's;
#   2. encode/decode against PyTorch eager on the same GPU, FLUX size, batch 1 and 32
#      (scripts/bench.py --device cuda; needs torch with CUDA and diffusers, else said and skipped);
#   3. `coda adapt` updates at batch 8 with V = 65536 (FLUX size, 256 px), with the peak GPU
#      memory sampled from nvidia-smi.
#
#   bash scripts/gpu_check.sh            # build what is missing, then run 1-3 (output: target/gpu/)
#   bash scripts/gpu_check.sh --build    # only build target/gpu/bin (on a machine with the CUDA
#                                        # toolchain or PyPI: scripts/cuda_toolchain.sh), to carry
#                                        # to a GPU machine without network
#
# The binaries are built for sm_${CUDA_COMPUTE_CAP:-90} with CUDA 13.0 (driver >= 580) unless a
# local CUDA toolkit (nvcc on PATH) is found, which is then used as it is.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=target/gpu
BIN=$OUT/bin
mkdir -p "$BIN"
t0=$(date +%s)
say() { echo "== $*"; }

build() {
  if ! command -v nvcc >/dev/null; then
    # shellcheck source=scripts/cuda_toolchain.sh
    source scripts/cuda_toolchain.sh || { echo "no nvcc and no PyPI: cannot build" >&2; exit 2; }
  fi
  export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
  cargo build --release --features cuda -p coda-cli || exit 2
  cp target/release/coda "$BIN/coda" && strip "$BIN/coda"
  # The test binaries, found from cargo's JSON messages.
  cargo test --release --no-run --features coda-tokenizer/cuda,coda-cli/cuda \
    -p coda-tokenizer -p coda-cli --test vae_parity --test quantizer_parity \
    --test tokenizer_parity --test device_cli --message-format=json 2>/dev/null |
    python3 -c '
import json, shutil, subprocess, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        dst = sys.argv[1] + "/" + m["target"]["name"]
        shutil.copy(m["executable"], dst)
        subprocess.run(["strip", dst], check=True)
        print("built", dst)
' "$BIN" || exit 2
  ls -la "$BIN"
}

if [ "${1:-}" = "--build" ]; then
  build
  exit 0
fi

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "SKIP: no NVIDIA GPU here (nvidia-smi missing or lists none); nothing checked" >&2
  exit 2
fi
say "GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
[ -x "$BIN/coda" ] && [ -x "$BIN/device_cli" ] || build
export CODA_REPO=$ROOT CODA_BIN=$ROOT/$BIN/coda CODA_TEST_DEVICE=cuda RUST_BACKTRACE=0
fail=0

say "1. parity on the GPU (tests compiled with the cuda feature, CODA_TEST_DEVICE=cuda)"
for t in vae_parity quantizer_parity tokenizer_parity; do
  "$BIN/$t" --nocapture --test-threads 1 2>&1 | grep -vE '^\s*$|^running' | tee "$OUT/$t.log"
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "FAIL: $t" >&2; fail=1; }
done
"$BIN/device_cli" --nocapture --test-threads 1 gpu_tokens 2>&1 | tee "$OUT/tokens.log"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "FAIL: GPU tokens" >&2; fail=1; }

say "2. encode/decode vs PyTorch eager on the GPU (FLUX size, batch 1 and 32)"
if python3 -c 'import torch, diffusers; assert torch.cuda.is_available()' 2>/dev/null; then
  CODA=$ROOT/$BIN/coda timeout 300 python3 scripts/bench.py --device cuda --arch flux --batch 1,32 \
    --iters 5 --threads 8 --no-build --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "FAIL: benchmark" >&2; fail=1; }
else
  echo "SKIP benchmark: PyTorch with CUDA (and diffusers) is not installed here" | tee "$OUT/bench.log"
fi

say "3. adapt at batch 8, V = 65536 (FLUX size, 256 px), peak GPU memory"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$OUT/gpu_mem.csv" &
smi=$!
"$BIN/device_cli" --nocapture --test-threads 1 gpu_flux_65536_adapt 2>&1 | tee "$OUT/adapt.log"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "FAIL: adapt on the GPU" >&2; fail=1; }
kill "$smi" 2>/dev/null
sort -n "$OUT/gpu_mem.csv" | tail -1 | awk '{print "peak GPU memory used during adapt: " $1 " MiB (nvidia-smi, every 200 ms)"}' |
  tee -a "$OUT/adapt.log"

say "done in $(($(date +%s) - t0)) s; logs in $OUT/"
exit $fail
