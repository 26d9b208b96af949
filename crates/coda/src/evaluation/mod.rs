//! Reconstruction metrics (PSNR and SSIM under the reference's and the float protocol) and
//! codebook statistics.

pub mod codebook;
pub mod colour;
pub mod evaluator;
pub mod frechet;
pub mod inception;
pub mod lpips;
pub mod protocol;
pub mod psnr;
pub mod report;
pub mod ssim;

pub use codebook::{CodebookReport, CodebookStats};
pub use colour::{colour_probe, probe_colours, ColourResult};
pub use evaluator::{EvalEvent, EvalModel, EvalOptions, EvalResult};
pub use frechet::{frechet_distance, GaussianStats};
pub use protocol::{psnr_ssim, Protocol};
pub use psnr::psnr_u8;
