//! One module per subcommand, plus the options they share.

pub mod bench;
pub mod info;
pub mod reconstruct;

use std::path::PathBuf;

use coda::vae::{LoadOptions, Preset};

/// How to read a VAE checkpoint (shared by every command that takes `--vae`).
#[derive(clap::Args, Debug, Clone)]
pub struct VaeArgs {
    /// A diffusers folder (config.json + weights), or a single .safetensors / .pth / .ckpt file.
    #[arg(long)]
    pub vae: PathBuf,
    /// Architecture preset: mar-kl16, flux or sd. Without it, a diffusers config.json is used,
    /// or the architecture is inferred from the tensors.
    #[arg(long)]
    pub preset: Option<Preset>,
    /// Latent scaling factor (overrides preset/config).
    #[arg(long)]
    pub scale: Option<f64>,
    /// Latent shift factor (overrides preset/config).
    #[arg(long)]
    pub shift: Option<f64>,
    /// GroupNorm groups, for a checkpoint without config whose model does not use 32.
    #[arg(long)]
    pub norm_groups: Option<usize>,
}

impl VaeArgs {
    pub fn options(&self) -> LoadOptions {
        LoadOptions {
            preset: self.preset,
            scaling_factor: self.scale,
            shift_factor: self.shift,
            norm_groups: self.norm_groups,
        }
    }
}

/// The device commands run on: the first CUDA GPU when built with `cuda` and one is present.
pub fn device() -> anyhow::Result<candle_core::Device> {
    #[cfg(feature = "cuda")]
    {
        if candle_core::utils::cuda_is_available() {
            return Ok(candle_core::Device::new_cuda(0)?);
        }
    }
    Ok(candle_core::Device::Cpu)
}
