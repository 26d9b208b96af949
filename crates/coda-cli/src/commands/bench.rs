//! `coda bench`: timings of a VAE (encode, decode) or a tokenizer (VAE encode, assignment, VAE
//! decode, full encode, full decode) on random input, printed and written as JSON lines; in a
//! reduced --precision also its effect against f32. scripts/bench.py runs it beside the
//! identical PyTorch model and prints the ratios.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Tensor};
use coda::data;
use coda::tokenizer::Tokenizer;
use coda::vae::VaeWeights;
use coda::Precision;
use serde_json::json;

use super::VaeArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub precision: super::PrecisionArgs,
    #[command(flatten)]
    pub vae: VaeArgs,
    /// Measure a tokenizer folder instead: full encode (image -> ids), quantizer assignment
    /// alone, and full decode (ids -> image).
    #[arg(long, conflicts_with = "vae")]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub batch: Vec<usize>,
    /// Timed repetitions per stage (the median is reported), after one warm-up run.
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Run the tokenizer stages on this picture (resized and centre-cropped to --size, repeated
    /// over the batch) instead of random pixels.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Write one JSON object per measurement to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Print the kernel path that would be measured (e.g. `avx512`) and exit.
    #[arg(long)]
    pub print_isa: bool,
}

fn median_ms<T>(
    device: &candle_core::Device,
    mut f: impl FnMut() -> anyhow::Result<T>,
    iters: usize,
) -> anyhow::Result<f64> {
    // A GPU runs asynchronously: each timed call ends when the device has finished.
    f()?; // warm-up
    device.synchronize()?;
    let mut t = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let s = Instant::now();
        f()?;
        device.synchronize()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok(t[t.len() / 2])
}

/// Peak resident memory of this process, from /proc (Linux); 0 elsewhere.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

/// PSNR in dB of two images on the [-1, 1] scale, after clamping, as [0, 1] images.
fn psnr(a: &Tensor, b: &Tensor) -> anyhow::Result<f64> {
    let a = ((a.clamp(-1f32, 1f32)? + 1.0)? * 0.5)?;
    let b = ((b.clamp(-1f32, 1f32)? + 1.0)? * 0.5)?;
    let mse = (a - b)?.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
    Ok(10.0 * (1.0 / mse.max(1e-20)).log10())
}

fn run_tokenizer(args: &Args, dir: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let device = super::device()?;
    let precision = args.precision.precision;
    let tok = Tokenizer::from_dir(dir, &device)?.with_precision(precision)?;
    let vae = tok.vae();
    let f = tok.config().vae.downsample_factor();
    let mut lines = Vec::new();
    for &b in &args.batch {
        let x = match &args.image {
            Some(p) => {
                let img = data::prepare(data::load_image(p)?, Some(args.size as u32))?;
                data::images_to_tensor(&vec![img; b], &device)?
            }
            None => Tensor::rand(-1f32, 1f32, (b, 3, args.size, args.size), &device)?,
        };
        // Reference tokens and images in f32; the stages below run in --precision.
        let f32 = Some(Precision::F32);
        let enc = tok.encode_in(&x, coda::tokenizer::Posterior::Mean, f32)?;
        let reference = tok.decode_in(&enc.tokens, enc.tokens.scales.len(), f32)?;
        let tables = tok.quantizer().tables()?;
        let scales = enc.tokens.scales.clone();
        let z = vae.denormalize(&enc.latent_hat)?;
        let vae_encode = median_ms(&device, || Ok(vae.encode(&x)?.mean), args.iters)?;
        let vae_decode = median_ms(&device, || Ok(vae.decode(&z)?), args.iters)?;
        let assign = median_ms(
            &device,
            || Ok(tok.quantizer().encode(&tables, &enc.latent, &scales)?),
            args.iters,
        )?;
        let encode = median_ms(&device, || Ok(tok.encode(&x)?), args.iters)?;
        let decode = median_ms(&device, || Ok(tok.decode(&enc.tokens)?), args.iters)?;
        let mut rec = json!({
            "impl": "coda-rs", "precision": precision.name(), "size": args.size, "batch": b,
            "latent": [tok.config().vae.latent_channels, args.size / f, args.size / f],
            "codebook": tok.codebook_size(), "scales": scales.len(),
            "vae_encode_ms": vae_encode, "assign_ms": assign, "vae_decode_ms": vae_decode,
            "tok_encode_ms": encode, "tok_decode_ms": decode, "peak_rss_mib": peak_rss_mib(),
        });
        let mut effect = String::new();
        if precision != Precision::F32 {
            // What the reduced precision does: tokens of the same images, and the image decoded
            // from the same (f32) tokens, against f32.
            let ids = tok.encode(&x)?.flat()?.flatten_all()?.to_vec1::<u32>()?;
            let ref_ids = enc.tokens.flat()?.flatten_all()?.to_vec1::<u32>()?;
            let same = ids.iter().zip(&ref_ids).filter(|(a, b)| a == b).count();
            let agreement = same as f64 / ref_ids.len() as f64;
            let img = tok.decode(&enc.tokens)?;
            let max_abs = (&img - &reference)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            let p = psnr(&img, &reference)?;
            rec["token_agreement"] = json!(agreement);
            rec["decode_max_abs_vs_f32"] = json!(max_abs);
            rec["decode_psnr_vs_f32_db"] = json!(p);
            effect = format!(
                "; vs f32: tokens {:.2}% identical, decoded image max |diff| {max_abs:.2e}, PSNR {p:.1} dB",
                100.0 * agreement
            );
        }
        println!(
            "batch {b} ({}): VAE encode {vae_encode:.1} ms, assignment {assign:.1} ms, VAE decode {vae_decode:.1} ms, tokenizer encode {encode:.1} ms, decode {decode:.1} ms, peak RSS {:.0} MiB{effect}",
            precision.name(),
            peak_rss_mib()
        );
        lines.push(rec.to_string());
    }
    Ok(lines)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let precision = args.precision.checked()?;
    coda::with_precision(precision, || run_in_precision(args))
}

fn run_in_precision(args: Args) -> anyhow::Result<()> {
    if args.print_isa {
        println!("{}", coda::kernel_isa().name());
        return Ok(());
    }
    // Every number is only meaningful with the path that made it.
    println!(
        "kernel path {} (this CPU's best: {}; CODA_CPU_ISA caps it; the convolutions' GEMM dispatches on its own)",
        coda::kernel_isa().name(),
        coda::detected_isa().name()
    );
    if let Some(dir) = args.tokenizer.clone() {
        let lines = run_tokenizer(&args, &dir)?;
        if let Some(p) = &args.json {
            coda::io::write_atomic(p, (lines.join("\n") + "\n").as_bytes())?;
        }
        return Ok(());
    }
    let device = super::device()?;
    let vae = VaeWeights::load(args.vae.path()?, &args.vae.options(), &device)?.build()?;
    let f = vae.config().downsample_factor();
    let mut lines = Vec::new();
    for &b in &args.batch {
        let x = Tensor::rand(-1f32, 1f32, (b, 3, args.size, args.size), &device)?;
        let z = vae.encode(&x)?.mean;
        let enc = median_ms(
            &device,
            || {
                vae.encode(&x)?.mean.to_dtype(DType::F32)?;
                Ok(())
            },
            args.iters,
        )?;
        let dec = median_ms(
            &device,
            || {
                vae.decode(&z)?;
                Ok(())
            },
            args.iters,
        )?;
        let rec = json!({
            "impl": "coda-rs", "size": args.size, "batch": b, "latent": [z.dim(1)?, args.size / f, args.size / f],
            "encode_ms": enc, "decode_ms": dec, "peak_rss_mib": peak_rss_mib(),
        });
        println!("batch {b}: encode {enc:.1} ms, decode {dec:.1} ms ({:.2} img/s round trip), peak RSS {:.0} MiB",
            b as f64 * 1e3 / (enc + dec), peak_rss_mib());
        lines.push(rec.to_string());
    }
    if let Some(p) = &args.json {
        coda::io::write_atomic(p, (lines.join("\n") + "\n").as_bytes())?;
    }
    Ok(())
}
