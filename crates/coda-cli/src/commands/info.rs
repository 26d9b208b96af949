//! `coda info`: what a checkpoint holds.

use coda::vae::VaeWeights;

use super::VaeArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub vae: VaeArgs,
    /// Image size for which to print the latent shape.
    #[arg(long, default_value_t = 256)]
    pub size: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let w = VaeWeights::load(
        args.vae.path()?,
        &args.vae.options(),
        &candle_core::Device::Cpu,
    )?;
    let c = &w.config;
    let f = c.downsample_factor();
    let levels = |flags: &[bool]| -> String {
        let l: Vec<String> = flags
            .iter()
            .enumerate()
            .filter(|(_, &a)| a)
            .map(|(i, _)| i.to_string())
            .collect();
        if l.is_empty() {
            "none".into()
        } else {
            format!("levels {}", l.join(","))
        }
    };
    println!(
        "checkpoint       {} ({} layout)",
        w.weights_path.display(),
        w.layout
    );
    println!("architecture     {}", w.origin);
    println!("type             KL-VAE, f{f}");
    println!("block channels   {:?}", c.block_channels);
    println!(
        "res-blocks       {} per encoder level, {} per decoder level",
        c.num_res_blocks,
        c.num_res_blocks + 1
    );
    println!(
        "attention        encoder {}, decoder {}, mid {}",
        levels(&c.encoder_attention),
        levels(&c.decoder_attention),
        if c.mid_attention { "yes" } else { "no" }
    );
    println!(
        "latent channels  {} (z {}), quant_conv {}, post_quant_conv {}",
        c.latent_channels, c.z_channels, c.quant_conv, c.post_quant_conv
    );
    println!(
        "group norm       {} groups, eps {:e}",
        c.norm_groups, c.norm_eps
    );
    println!(
        "normalisation    f = (z - {}) * {}",
        c.shift_factor, c.scaling_factor
    );
    println!(
        "parameters       {} ({:.2} M)",
        c.parameter_count(),
        c.parameter_count() as f64 / 1e6
    );
    if args.size.is_multiple_of(f) {
        println!(
            "latent at {}     [{}, {}, {}]",
            args.size,
            c.latent_channels,
            args.size / f,
            args.size / f
        );
    } else {
        println!(
            "latent at {}     not accepted: {} is not a multiple of {f}",
            args.size, args.size
        );
    }
    if !w.ignored_keys.is_empty() {
        println!(
            "ignored          {} training-only tensors (e.g. {})",
            w.ignored_keys.len(),
            w.ignored_keys[0]
        );
    }
    Ok(())
}
