#!/usr/bin/env bash
# A CUDA 13.0 build toolchain from PyPI's NVIDIA wheels, for machines without a CUDA install
# (CI, laptops): nvcc + headers to compile candle's kernels, and the libraries the `cuda` build
# links against (cuBLAS, cuRAND, NVRTC, the runtime). Source it, then build:
#
#   source scripts/cuda_toolchain.sh            # installs into target/cuda-toolchain once
#   cargo build --release --features cuda -p coda-cli
#
# Where no NVIDIA driver is installed (a build machine), libcuda is replaced at link time by a
# stub with the driver API's symbols, generated from the cudarc crate's bindings, as the CUDA
# toolkit's own lib/stubs/libcuda.so is. On a GPU machine the real driver is used at run time.
# Only the cu12 wheels of nvcc lack the `nvcc` executable; the cu13 ones have it (13.0: the
# oldest CUDA 13, needs an NVIDIA driver >= 580 to run the kernels it compiles).
#
#   CODA_CUDA_TOOLCHAIN=DIR   where to install (default target/cuda-toolchain)
#   CUDA_COMPUTE_CAP=90       GPU architecture of the kernels (default 90: H100/H200)
# Sourced: no `set -e` here (it would leak into the caller); failures return instead.
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_tc="${CODA_CUDA_TOOLCHAIN:-$_root/target/cuda-toolchain}"
_ver="13.0.*"
if [ ! -x "$_tc/venv/bin/python" ]; then
  python3 -m venv "$_tc/venv" || return 1
fi
_site="$("$_tc/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
_cu="$_site/nvidia/cu13"
if [ ! -x "$_cu/bin/nvcc" ] || [ ! -e "$_cu/lib/libcublas.so.13" ]; then
  "$_tc/venv/bin/pip" install --quiet --disable-pip-version-check \
    "nvidia-cuda-nvcc==$_ver" "nvidia-cuda-runtime==$_ver" "nvidia-cuda-crt==$_ver" \
    "nvidia-nvvm==$_ver" "nvidia-cuda-cccl==$_ver" "nvidia-cuda-nvrtc==$_ver" \
    "nvidia-cublas==$_ver" "nvidia-curand==10.4.0.*" || return 1
fi
# The linker looks for unversioned names; the wheels ship only the versioned ones.
for _lib in cublas cublasLt cudart nvrtc curand; do
  _so="$(ls "$_cu/lib/lib$_lib.so."* 2>/dev/null | grep -E "lib$_lib\.so\.[0-9]+$" | head -1 || true)"
  [ -n "$_so" ] && ln -sf "$(basename "$_so")" "$_cu/lib/lib$_lib.so"
done
# libcuda: the driver's own library where one is installed, else a link-time stub.
mkdir -p "$_cu/lib/stubs"
if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 ' && [ ! -e "$_cu/lib/stubs/libcuda.so" ]; then
  (cd "$_root" && cargo fetch --quiet)
  _cudarc="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$(grep -A1 'name = "cudarc"' "$_root/Cargo.lock" | sed -n 's/version = "\(.*\)"/\1/p')" | head -1)"
  grep -ohE 'fn cu[A-Za-z0-9_]+\(' "$_cudarc/src/driver/sys/mod.rs" | sed 's/fn \(.*\)(/\1/' | sort -u |
    awk '{print "int " $1 "(void) { return 34; } /* CUDA_ERROR_STUB_LIBRARY */"}' > "$_cu/lib/stubs/libcuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$_cu/lib/stubs/libcuda.so" "$_cu/lib/stubs/libcuda_stub.c" || return 1
  ln -sf libcuda.so "$_cu/lib/stubs/libcuda.so.1"
fi
export PATH="$_cu/bin:$PATH"
export CUDA_ROOT="$_cu" CUDA_PATH="$_cu" CUDA_HOME="$_cu"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
export LD_LIBRARY_PATH="$_cu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "CUDA toolchain: $(nvcc --version | tail -2 | head -1) in $_cu, sm_$CUDA_COMPUTE_CAP" >&2
unset _root _tc _ver _site _cu _lib _so _cudarc
