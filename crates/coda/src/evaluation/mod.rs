//! Reconstruction metrics.

pub mod psnr;

pub use psnr::psnr_u8;
