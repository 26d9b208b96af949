//! `coda reconstruct`: image -> VAE -> image, with PSNR.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::Tensor;
use coda::data;
use coda::vae::VaeWeights;

use super::VaeArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub vae: VaeArgs,
    /// Resize the shorter side to N (Lanczos) and centre-crop N x N. Without it the image is used
    /// at its own size, which must be a multiple of the VAE's downsampling factor.
    #[arg(long)]
    pub size: Option<u32>,
    /// Output PNG (default: <image stem>_recon.png in the current folder).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Also write float32 tensors: `image` [1,3,H,W] (decoder output, unclamped, [-1,1]) and
    /// `latent` [1,C,h,w] (the normalised latent).
    #[arg(long)]
    pub raw: Option<PathBuf>,
    /// Sample the posterior instead of taking its mean.
    #[arg(long)]
    pub sample: bool,
    /// Seed for --sample.
    #[arg(long, default_value_t = 0, requires = "sample")]
    pub seed: u64,
    pub image: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let device = super::device()?;
    let img = data::load_image(&args.image)?;
    let img = data::prepare(img, args.size);
    let weights = VaeWeights::load(&args.vae.vae, &args.vae.options(), &device)?;
    let vae = weights.build()?;
    let x = data::images_to_tensor(std::slice::from_ref(&img), &device)?;

    let t0 = Instant::now();
    let post = vae.encode(&x)?;
    let z = if args.sample {
        post.sample(args.seed)?
    } else {
        post.mode().clone()
    };
    let latent = vae.normalize(&z)?;
    let t_enc = t0.elapsed();
    let t1 = Instant::now();
    let recon = vae.decode(&vae.denormalize(&latent)?)?;
    let t_dec = t1.elapsed();

    let out_img = data::tensor_to_images(&recon)?.remove(0);
    let psnr = coda::evaluation::psnr_u8(&img, &out_img);
    let output = args.output.clone().unwrap_or_else(|| {
        let stem = args
            .image
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or("image".into());
        PathBuf::from(format!("{stem}_recon.png"))
    });
    if let Some(raw) = &args.raw {
        let tensors: Vec<(String, Tensor)> = vec![
            ("image".into(), recon.clone()),
            ("latent".into(), latent.clone()),
        ];
        coda::io::write_safetensors(raw, &tensors, None)
            .with_context(|| format!("writing {}", raw.display()))?;
    }
    data::save_png(&output, &out_img)?;

    let (w, h) = img.dimensions();
    println!("image      {} ({w}x{h})", args.image.display());
    println!(
        "vae        {} ({} layout, architecture: {})",
        weights.weights_path.display(),
        weights.layout,
        weights.origin
    );
    println!(
        "latent     {:?} ({})",
        latent.dims(),
        if args.sample {
            "posterior sample"
        } else {
            "posterior mean"
        }
    );
    println!(
        "time       encode {:.1} ms, decode {:.1} ms",
        t_enc.as_secs_f64() * 1e3,
        t_dec.as_secs_f64() * 1e3
    );
    println!("PSNR       {psnr:.2} dB (8-bit RGB, output rounded)");
    println!("wrote      {}", output.display());
    if let Some(raw) = &args.raw {
        println!("wrote      {}", raw.display());
    }
    Ok(())
}
