//! `coda import`: an official CODA checkpoint into a tokenizer folder.

use std::path::PathBuf;

use coda::quantizer::scales;
use coda::tokenizer::import::{import_official, OfficialPreset};
use coda::tokenizer::Tokenizer;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The paper configuration: mar (MAR KL-16, V=16384) or flux (FLUX VAE, V=65536).
    #[arg(long)]
    pub preset: OfficialPreset,
    /// The base VAE the checkpoint was trained from (kl16.safetensors, FLUX vae/ folder, ...).
    #[arg(long)]
    pub vae: PathBuf,
    /// The quantizer state dict (`quantizer_ema.pth` or .safetensors).
    #[arg(long)]
    pub quantizer: PathBuf,
    /// The VAE-with-LoRA state dict (`vae_ema.pth` or .safetensors).
    #[arg(long)]
    pub vae_weights: PathBuf,
    /// Override the preset's scale list, e.g. 1,2,3,4,5,6,8,10,13,16.
    #[arg(long)]
    pub scales: Option<String>,
    /// The tokenizer folder to write.
    #[arg(short, long)]
    pub output: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let sc = args
        .scales
        .as_deref()
        .map(scales::parse_list)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let (config, tensors) = import_official(
        args.preset,
        &args.vae,
        &args.quantizer,
        &args.vae_weights,
        sc,
        &candle_core::Device::Cpu,
    )?;
    Tokenizer::save(&args.output, &config, &tensors)?;
    let q = &config.quantizer;
    println!(
        "imported {:?}: V = {}, C = {}, d_a = {}, {:?} norm",
        args.preset, q.codebook_size, q.dim, q.attn_dim, q.norm
    );
    if let Some(l) = &config.lora {
        let n = coda::vae::lora::targets(&config.vae, l).len();
        println!(
            "LoRA rank {} on {n} convs ({})",
            l.rank,
            l.modules.join(",")
        );
    }
    println!("wrote {}", args.output.display());
    Ok(())
}
