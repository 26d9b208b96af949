//! Our own CPU kernels, for ops candle lacks or runs slowly. Each has a plain composite
//! version beside it that the tests compare against.

pub mod assign;
pub mod conv2d;
pub mod group_norm;
pub mod simd;

pub use conv2d::{conv2d, conv2d_composite, ConvGeometry};
pub use group_norm::{group_norm, group_norm_composite};
