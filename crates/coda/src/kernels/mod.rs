//! Our own CPU kernels, for ops candle lacks or runs slowly. Each has a plain composite
//! version beside it that the tests compare against.
// Crate-internal unless the `internals` feature makes the module public for tests and benchmarks;
// the composite references are then unused by the library itself.
#![cfg_attr(not(feature = "internals"), allow(dead_code, unused_imports))]

pub mod amx;
#[cfg(any(test, feature = "internals"))]
mod amx_emulator;
pub mod assign;
pub mod conv2d;
pub mod direct;
pub mod dpbf16;
pub mod group_norm;
pub mod optimizer;
pub mod recompute;
pub mod sgemm;
pub mod simd;
pub mod subpixel;
pub mod tile_gemm;
pub mod weight_grad;
pub mod winograd;
pub mod winograd4;

pub use conv2d::{conv2d, conv2d_composite, conv2d_residual, ConvGeometry};
pub use group_norm::{group_norm, group_norm_composite};

static GENERIC_OPS: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(UNSET);
const UNSET: u8 = 2;

/// Whether our CPU kernels run for tensors on `device`: on the CPU, unless the device-generic
/// path was asked for ([`set_generic_ops`] or `CODA_GENERIC_OPS=1`). Elsewhere (CUDA) every op is
/// a composite of candle ops; forcing that path on the CPU is how the GPU's code path is tested
/// on machines without a GPU.
pub fn custom_ops(device: &candle_core::Device) -> bool {
    device.is_cpu() && !generic_ops()
}

/// Whether the device-generic (candle-ops) path is forced on the CPU.
pub fn generic_ops() -> bool {
    use std::sync::atomic::Ordering;
    match GENERIC_OPS.load(Ordering::Relaxed) {
        UNSET => {
            let on = std::env::var("CODA_GENERIC_OPS").is_ok_and(|v| v == "1");
            GENERIC_OPS.store(on as u8, Ordering::Relaxed);
            on
        }
        v => v == 1,
    }
}

/// Force (or stop forcing) the device-generic path on the CPU, process-wide: the ops CUDA runs,
/// for tests and memory measurements on machines without a GPU.
pub fn set_generic_ops(on: bool) {
    GENERIC_OPS.store(on as u8, std::sync::atomic::Ordering::Relaxed);
}

/// The f32 data of a contiguous CPU tensor as a slice, for custom ops.
pub(crate) fn f32_slice<'a>(
    op: &str,
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
) -> candle_core::Result<&'a [f32]> {
    let candle_core::CpuStorage::F32(d) = s else {
        candle_core::bail!("{op}: f32 only")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&d[a..b]),
        None => candle_core::bail!("{op}: non-contiguous input"),
    }
}

/// The f32 data of a contiguous tensor's storage, if it lives on the CPU: backward passes read
/// their inputs in place instead of copying them out.
pub(crate) fn cpu_f32<'a>(
    op: &str,
    s: &'a candle_core::Storage,
    l: &candle_core::Layout,
) -> candle_core::Result<&'a [f32]> {
    match s {
        candle_core::Storage::Cpu(c) => f32_slice(op, c, l),
        _ => candle_core::bail!("{op}: backward runs on the CPU only"),
    }
}

/// Spin iterations candle's elementwise worker threads keep polling after each op before they
/// sleep, unless `CANDLE_BARRIER_POOL_SPIN_LIMIT` says otherwise. candle's default (25 000)
/// keeps a worker spinning for about half a millisecond after every elementwise op, on a core
/// our own kernels' threads then share: 12% of a tiny-cpu training update's CPU samples were
/// that spin on 2 cores, and the update ran 10% faster with the spin cut.
const CANDLE_SPIN_LIMIT: &str = "2000";

/// Make candle's elementwise thread pool stop spinning soon after each op (see
/// [`CANDLE_SPIN_LIMIT`]), unless the user set `CANDLE_BARRIER_POOL_SPIN_LIMIT`. For the owner
/// of the process (the `coda` binary, the Python module's init) to call before the first
/// tensor op and before other threads exist: candle reads the variable once, when its pool
/// starts, and setting environment variables races with threads that read them.
pub fn quiet_candle_pool() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, CANDLE_SPIN_LIMIT);
    }
}

/// Make glibc's malloc serve every thread from one arena, unless `MALLOC_ARENA_MAX` says
/// otherwise. A training update runs on a rayon worker (`training::trainer`), so its tensors
/// are allocated and freed across threads; with glibc's default of one arena per thread each
/// arena kept its own freed buffers: a tiny-cpu run's peak RSS went from ~300 to 520-560 MB,
/// and back to 290 MB with one arena, at the same speed. For the owner of the process to call
/// first, before other threads exist. No-op elsewhere than glibc.
pub fn single_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called before threads start.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

/// Arithmetic of the inference convolutions. Training always runs in f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// f32 products and sums (the default; what the parity tests check).
    #[default]
    F32,
    /// Each f32 operand split into two bf16 parts, three bf16 products per f32 one, f32 sums, on
    /// AMX: ~16 mantissa bits per product instead of 24.
    Bf16x3,
    /// bf16 operands (8 mantissa bits), f32 sums, on AMX or with AVX512_BF16's `vdpbf16ps`.
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16x3 => "bf16x3",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16x3" => Ok(Precision::Bf16x3),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(crate::Error::Invalid(format!(
                "unknown precision {s:?}: expected f32, bf16x3 or bf16"
            ))),
        }
    }
}

impl Precision {
    /// Refuse a mode this CPU cannot run, rather than emulate it slowly: bf16x3 needs AMX
    /// (Intel Sapphire Rapids or later), bf16 AMX or AVX512_BF16 (also AMD Zen 4 and later).
    pub fn check_supported(self) -> Result<Self, crate::Error> {
        let refuse = |needs: &str| {
            Err(crate::Error::Invalid(format!(
                "precision {} needs a CPU with {needs}",
                self.name()
            )))
        };
        match self {
            Precision::Bf16x3 if !amx::available() => {
                refuse("AMX bf16 (Intel Sapphire Rapids or later)")
            }
            Precision::Bf16 if !amx::available() && !dpbf16::available() => refuse(
                "AMX bf16 or AVX512_BF16 (Intel Sapphire Rapids or Cooper Lake, AMD Zen 4 or later)",
            ),
            _ => Ok(self),
        }
    }
}

thread_local! {
    // The arithmetic of the inference convolutions running on this thread. Per thread and
    // scoped (never process-wide), so that tokenizers at different precisions can run
    // concurrently and training, which never enters a scope, always runs in f32.
    static PRECISION: std::cell::Cell<Precision> = const { std::cell::Cell::new(Precision::F32) };
}

/// Run `f` with the inference convolutions it calls on this thread in precision `p`; the
/// previous precision is restored afterwards, also when `f` panics. The convolutions read the
/// precision on the calling thread before they fan out to worker threads.
pub fn with_precision<T>(p: Precision, f: impl FnOnce() -> T) -> T {
    scoped(&PRECISION, p, f)
}

/// Run `f` with this thread's `key` set to `value`, restoring the previous value afterwards,
/// also when `f` panics.
pub(crate) fn scoped<V: Copy + 'static, T>(
    key: &'static std::thread::LocalKey<std::cell::Cell<V>>,
    value: V,
    f: impl FnOnce() -> T,
) -> T {
    struct Restore<V: Copy + 'static>(&'static std::thread::LocalKey<std::cell::Cell<V>>, V);
    impl<V: Copy + 'static> Drop for Restore<V> {
        fn drop(&mut self) {
            self.0.with(|c| c.set(self.1));
        }
    }
    let _restore = Restore(key, key.with(|c| c.replace(value)));
    f()
}

/// The arithmetic of the inference convolutions on this thread (f32 outside a scope).
pub fn precision() -> Precision {
    PRECISION.with(|c| c.get())
}

/// The kernel that runs an inference convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConvBackend {
    F32,
    /// AMX tiles; `true`: three passes (bf16x3).
    Amx(bool),
    /// AVX512_BF16 dot products (bf16).
    DotBf16,
}

/// What the convolutions run: this thread's precision on the best kernel the CPU (and the
/// `CODA_CPU_ISA` cap) allows, or f32 where it has none for that precision (a bf16 scope there
/// computes in f32 rather than executing instructions the CPU lacks; the public entry points
/// refuse such a precision before it gets here).
pub(crate) fn conv_backend() -> ConvBackend {
    match precision() {
        Precision::Bf16x3 if amx::available() => ConvBackend::Amx(true),
        Precision::Bf16 if amx::available() => ConvBackend::Amx(false),
        Precision::Bf16 if dpbf16::available() => ConvBackend::DotBf16,
        _ => ConvBackend::F32,
    }
}
