//! `coda reconstruct`: image -> tokens -> image with a tokenizer, or the continuous round trip
//! with a VAE; prints PSNR (and token count and bits per image for a tokenizer).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::Tensor;
use coda::data;
use coda::tokenizer::Posterior;
use coda::vae::VaeWeights;
use image::RgbImage;

use super::VaeArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub precision: super::PrecisionArgs,
    /// A tokenizer folder (config.json + model.safetensors). Without it and without --vae, the
    /// embedded default tokenizer.
    #[arg(long, conflicts_with = "vae")]
    pub tokenizer: Option<PathBuf>,
    #[command(flatten)]
    pub vae: VaeArgs,
    /// Resize the shorter side to N (Lanczos) and centre-crop N x N. Without it the image is used
    /// at its own size, which must be a multiple of the model's downsampling factor.
    #[arg(long)]
    pub size: Option<u32>,
    /// Output PNG (default: <image stem>_recon.png in the current folder).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Also write float32 tensors: `image` [1,3,H,W] (decoder output, unclamped, [-1,1]),
    /// `latent` [1,C,h,w] (the normalised latent) and, with a tokenizer, `latent_hat` (quantized).
    #[arg(long)]
    pub raw: Option<PathBuf>,
    /// With a tokenizer: also write <output stem>_progressive.png, decoded from 1, 2, ..., K scales.
    #[arg(long)]
    pub progressive: bool,
    /// Sample the posterior instead of taking its mean.
    #[arg(long)]
    pub sample: bool,
    /// Seed for --sample.
    #[arg(long, default_value_t = 0, requires = "sample")]
    pub seed: u64,
    pub image: PathBuf,
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    path.with_file_name(format!("{stem}{suffix}.png"))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // The precision of this call's convolutions (tokenizer and bare VAE alike).
    let precision = args.precision.checked()?;
    coda::with_precision(precision, || run_in_precision(args))
}

fn run_in_precision(args: Args) -> anyhow::Result<()> {
    let device = super::device()?;
    let img = data::prepare(data::load_image(&args.image)?, args.size)?;
    // The f32 tensor is made once the model is known, after its memory check: a huge picture
    // is refused before 12 bytes per pixel are allocated for it.
    let (iw, ih) = (img.width() as usize, img.height() as usize);
    let to_tensor = || data::images_to_tensor(std::slice::from_ref(&img), &device);
    let output = args.output.clone().unwrap_or_else(|| {
        let stem = args
            .image
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or("image".into());
        PathBuf::from(format!("{stem}_recon.png"))
    });
    let posterior = if args.sample {
        Posterior::Sample(args.seed)
    } else {
        Posterior::Mean
    };
    let mut raw: Vec<(String, Tensor)> = Vec::new();
    let mut lines: Vec<String> = Vec::new();
    let mut extra_outputs: Vec<(PathBuf, RgbImage)> = Vec::new();

    let t0 = Instant::now();
    let recon = if args.vae.vae.is_none() {
        let (tok, name) = super::tokenizer_or_default(args.tokenizer.as_deref(), &device)?;
        let tok = tok.with_precision(args.precision.precision)?;
        tok.check_memory(1, ih, iw)?;
        let x = to_tensor()?;
        let enc = tok.encode_with(&x, posterior)?;
        let recon = tok.decode_latent(&enc.latent_hat)?;
        let n = enc.tokens.len_per_image();
        lines.push(format!("tokenizer  {name} (hash {})", tok.hash()));
        lines.push(format!(
            "tokens     {n} over {} scales ({}), codebook {}",
            enc.tokens.scales.len(),
            enc.tokens
                .scales
                .iter()
                .map(|&(h, w)| if h == w {
                    format!("{h}")
                } else {
                    format!("{h}x{w}")
                })
                .collect::<Vec<_>>()
                .join(","),
            tok.codebook_size()
        ));
        lines.push(format!("bits       {:.0} per image", tok.bits_per_image(n)));
        if args.progressive {
            let steps = (1..=enc.tokens.scales.len())
                .map(|k| Ok(data::tensor_to_images(&tok.decode_prefix(&enc.tokens, k)?)?.remove(0)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            extra_outputs.push((
                sibling(&output, "_progressive"),
                coda::evaluation::evaluator::strip(&steps),
            ));
        }
        raw.push(("latent".into(), enc.latent));
        raw.push(("latent_hat".into(), enc.latent_hat));
        recon
    } else {
        anyhow::ensure!(
            !args.progressive,
            "--progressive needs a tokenizer, not --vae"
        );
        let path = args.vae.path()?;
        let weights = VaeWeights::load(path, &args.vae.options(), &device)?;
        let vae = weights.build()?;
        coda::limits::check(
            &format!("encoding 1 image(s) of {iw}x{ih}"),
            coda::limits::inference_bytes(vae.config(), 1, ih, iw),
        )?;
        let x = to_tensor()?;
        let post = vae.encode(&x)?;
        let z = posterior.latent(&post)?;
        let latent = vae.normalize(&z)?;
        lines.push(format!(
            "vae        {} ({} layout, architecture: {})",
            weights.weights_path.display(),
            weights.layout,
            weights.origin
        ));
        lines.push(format!("latent     {:?}", latent.dims()));
        let recon = vae.decode(&vae.denormalize(&latent)?)?;
        raw.push(("latent".into(), latent));
        recon
    };
    let elapsed = t0.elapsed();

    let out_img = data::tensor_to_images(&recon)?.remove(0);
    let psnr = coda::evaluation::psnr_u8(&img, &out_img);
    if let Some(raw_path) = &args.raw {
        raw.insert(0, ("image".into(), recon.clone()));
        coda::io::write_safetensors(raw_path, &raw, None)
            .with_context(|| format!("writing {}", raw_path.display()))?;
    }
    data::save_png(&output, &out_img)?;
    for (p, img) in &extra_outputs {
        data::save_png(p, img)?;
    }

    let (w, h) = img.dimensions();
    println!("image      {} ({w}x{h})", args.image.display());
    for l in lines {
        println!("{l}");
    }
    println!(
        "posterior  {}",
        if args.sample {
            format!("sample (seed {})", args.seed)
        } else {
            "mean".into()
        }
    );
    println!("time       {:.2} s", elapsed.as_secs_f64());
    println!("PSNR       {psnr:.2} dB (8-bit RGB, output rounded)");
    println!("wrote      {}", output.display());
    for (p, _) in &extra_outputs {
        println!("wrote      {}", p.display());
    }
    if let Some(raw) = &args.raw {
        println!("wrote      {}", raw.display());
    }
    Ok(())
}
