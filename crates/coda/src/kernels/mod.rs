//! Our own CPU kernels, for ops candle lacks or runs slowly. Each has a plain composite
//! version beside it that the tests compare against.

pub mod assign;
pub mod conv2d;
pub mod group_norm;
pub mod simd;
pub mod winograd;

pub use conv2d::{conv2d, conv2d_composite, conv2d_residual, ConvGeometry};
pub use group_norm::{group_norm, group_norm_composite};

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
