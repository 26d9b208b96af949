//! `coda encode`: images (files or folders) -> one token file, in batches.

use std::path::PathBuf;
use std::time::Instant;

use coda::data;
use coda::tokenizer::{token_file, Tokens};
use coda::EncodeOptions;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub precision: super::PrecisionArgs,
    /// A tokenizer folder (default: the embedded default tokenizer).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// The token file to write (safetensors; written atomically).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Resize the shorter side to N and centre-crop (default: the tokenizer's resolution).
    #[arg(long)]
    pub size: Option<u32>,
    /// Keep every image at its own size (all must then share one size).
    #[arg(long, conflicts_with = "size")]
    pub no_resize: bool,
    /// Images per model call.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Sample the posterior instead of taking its mean (image number r uses seed + r).
    #[arg(long)]
    pub sample: bool,
    #[arg(long, default_value_t = 0, requires = "sample")]
    pub seed: u64,
    /// Image files or folders (searched recursively, in sorted order).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let precision = args.precision.checked()?;
    if precision == coda::Precision::Bf16 {
        // Measured: 55-61% of the default tokenizer's ids survive a bf16 encode (a changed
        // coarse id changes every finer scale's residual); bf16x3 kept 100%.
        eprintln!(
            "warning: --precision bf16 changes many token ids against f32; bf16x3 is fast and keeps them"
        );
    }
    let device = super::device()?;
    let (tok, _) = super::tokenizer_or_default(args.tokenizer.as_deref(), &device)?;
    let tok = tok.with_precision(precision)?;
    let paths = data::collect_images(&args.images)?;
    anyhow::ensure!(!paths.is_empty(), "no image files among {:?}", args.images);
    let size = if args.no_resize {
        None
    } else {
        args.size.or(tok.default_image_size())
    };
    let options = EncodeOptions {
        batch: args.batch.max(1),
        sample_seed: args.sample.then_some(args.seed),
        precision: None,
    };
    let pb = super::progress(paths.len(), "encode");
    let t0 = Instant::now();
    // Chunks of a few batches for the progress bar; the library numbers the rows of each call
    // from 0, so the seed moves with the chunk's first row.
    let chunk_len = options.batch * 4;
    let mut parts: Vec<Tokens> = Vec::new();
    for (i, chunk) in paths.chunks(chunk_len).enumerate() {
        let opts = EncodeOptions {
            sample_seed: options
                .sample_seed
                .map(|s| s.wrapping_add((i * chunk_len) as u64)),
            ..options
        };
        parts.push(tok.encode_paths(chunk, size, &opts)?);
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    let tokens = Tokens::cat(&parts)?;
    let meta = token_file::TokenFileMeta {
        codebook_size: tok.codebook_size(),
        tokenizer_hash: tok.hash().to_string(),
        sources: coda::tokenizer::source_names(&paths),
    };
    token_file::write(&args.output, &tokens, &meta)?;
    let secs = t0.elapsed().as_secs_f64();
    let n = tokens.len_per_image();
    println!(
        "encoded {} images: {n} tokens each over {} scales, {:.0} bits per image; {:.2} images/s",
        paths.len(),
        tokens.scales.len(),
        tok.bits_per_image(n),
        paths.len() as f64 / secs
    );
    println!("wrote   {}", args.output.display());
    Ok(())
}
