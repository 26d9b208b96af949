//! One module per subcommand, plus the options they share.

pub mod bench;
pub mod decode;
pub mod encode;
pub mod eval;
pub mod import;
pub mod info;
pub mod reconstruct;
pub mod tokenize;
pub mod tokenizer;
pub mod train;

use std::path::PathBuf;

use coda::vae::{LoadOptions, Preset};

/// Arithmetic of the convolutions (shared by the inference commands).
#[derive(clap::Args, Debug, Clone)]
pub struct PrecisionArgs {
    /// Convolution arithmetic: f32 (default, exact to the parity tests), bf16x3 (three bf16
    /// products per f32 one, ~16-bit mantissa: same tokens as f32 in our measurements) or bf16
    /// (fastest, 8-bit mantissa: fine for decoding, but it changes many token ids when
    /// encoding). bf16x3 needs an Intel CPU with AMX (Sapphire Rapids or later); bf16 runs on
    /// AMX or AVX512_BF16 (also AMD Zen 4 or later).
    #[arg(long, default_value = "f32")]
    pub precision: coda::Precision,
}

impl PrecisionArgs {
    /// The chosen precision, refused here when this CPU cannot run it.
    pub fn checked(&self) -> anyhow::Result<coda::Precision> {
        Ok(self.precision.check_supported()?)
    }
}

/// How to read a VAE checkpoint (shared by every command that takes `--vae`).
#[derive(clap::Args, Debug, Clone)]
pub struct VaeArgs {
    /// A diffusers folder (config.json + weights), or a single .safetensors / .pth / .ckpt file.
    #[arg(long)]
    pub vae: Option<PathBuf>,
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
    pub fn path(&self) -> anyhow::Result<&std::path::Path> {
        self.vae
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("--vae PATH is required"))
    }

    pub fn options(&self) -> LoadOptions {
        LoadOptions {
            preset: self.preset,
            scaling_factor: self.scale,
            shift_factor: self.shift,
            norm_groups: self.norm_groups,
        }
    }
}

/// `--tokenizer DIR`, or the embedded default tokenizer without one; with its name for reports.
pub fn tokenizer_or_default(
    dir: Option<&std::path::Path>,
    device: &candle_core::Device,
) -> anyhow::Result<(coda::tokenizer::Tokenizer, String)> {
    match dir {
        Some(d) => Ok((
            coda::tokenizer::Tokenizer::from_dir(d, device)?,
            d.display().to_string(),
        )),
        None => Ok((
            coda::tokenizer::Tokenizer::default_tokenizer(device)?,
            "the embedded default (assets/tokenizer)".into(),
        )),
    }
}

static DEVICE_SPEC: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// The `--device` flag (or `CODA_DEVICE`), set once at start.
pub fn set_device_spec(spec: Option<String>) {
    let spec = spec.or_else(|| std::env::var("CODA_DEVICE").ok().filter(|s| !s.is_empty()));
    DEVICE_SPEC.set(spec).expect("set once, at start");
}

/// The device commands run on: the one asked for, else the first CUDA GPU in a `cuda` build
/// where one is usable, else the CPU.
/// Made once per process: a CUDA device is a context, streams and loaded kernels, and tensors
/// of two device handles cannot be mixed.
pub fn device() -> anyhow::Result<candle_core::Device> {
    static DEVICE: std::sync::OnceLock<candle_core::Device> = std::sync::OnceLock::new();
    if let Some(d) = DEVICE.get() {
        return Ok(d.clone());
    }
    let device = match DEVICE_SPEC.get().cloned().flatten() {
        Some(spec) => coda::device::parse(&spec)?,
        None => coda::device::default_device(),
    };
    tracing::info!("device: {}", coda::device::name(&device));
    Ok(DEVICE.get_or_init(|| device).clone())
}

/// A progress bar on stderr for `n` items (hidden when stderr is not a terminal).
pub fn progress(n: usize, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(n as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} ({per_sec}, eta {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}
