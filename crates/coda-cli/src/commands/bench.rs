//! `coda bench`: VAE encode/decode timings on random input, printed and written as JSON lines.
//! scripts/bench_vae.py runs it beside the identical PyTorch model and prints the ratios.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Tensor};
use coda::tokenizer::Tokenizer;
use coda::vae::VaeWeights;
use serde_json::json;

use super::VaeArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub vae: VaeArgs,
    /// Measure a tokenizer folder instead: full encode (image -> ids), quantizer assignment
    /// alone, and full decode (ids -> image).
    #[arg(long, conflicts_with = "vae")]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub batch: Vec<usize>,
    /// Timed repetitions per stage (the median is reported), after one warm-up run.
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Write one JSON object per measurement to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

fn median_ms(mut f: impl FnMut() -> anyhow::Result<()>, iters: usize) -> anyhow::Result<f64> {
    f()?; // warm-up
    let mut t = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let s = Instant::now();
        f()?;
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

fn run_tokenizer(args: &Args, dir: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let device = super::device()?;
    let tok = Tokenizer::from_dir(dir, &device)?;
    let f = tok.config().vae.downsample_factor();
    let mut lines = Vec::new();
    for &b in &args.batch {
        let x = Tensor::rand(-1f32, 1f32, (b, 3, args.size, args.size), &device)?;
        let enc = tok.encode_with(&x, coda::tokenizer::Posterior::Mean)?;
        let tables = tok.quantizer().tables()?;
        let scales = enc.tokens.scales.clone();
        let encode = median_ms(
            || {
                tok.encode(&x)?;
                Ok(())
            },
            args.iters,
        )?;
        let assign = median_ms(
            || {
                tok.quantizer().encode(&tables, &enc.latent, &scales)?;
                Ok(())
            },
            args.iters,
        )?;
        let decode = median_ms(
            || {
                tok.decode(&enc.tokens)?;
                Ok(())
            },
            args.iters,
        )?;
        println!("batch {b}: tokenizer encode {encode:.1} ms (assignment {assign:.1} ms), decode {decode:.1} ms, peak RSS {:.0} MiB", peak_rss_mib());
        lines.push(json!({
            "impl": "coda-rs", "size": args.size, "batch": b, "latent": [tok.config().vae.latent_channels, args.size / f, args.size / f],
            "tok_encode_ms": encode, "assign_ms": assign, "tok_decode_ms": decode, "peak_rss_mib": peak_rss_mib(),
        }).to_string());
    }
    Ok(lines)
}

pub fn run(args: Args) -> anyhow::Result<()> {
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
            || {
                vae.encode(&x)?.mean.to_dtype(DType::F32)?;
                device.synchronize()?;
                Ok(())
            },
            args.iters,
        )?;
        let dec = median_ms(
            || {
                vae.decode(&z)?;
                device.synchronize()?;
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
