//! `coda decode`: a token file -> PNG images.

use std::collections::HashSet;
use std::path::PathBuf;

use coda::data;
use coda::tokenizer::token_file;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub precision: super::PrecisionArgs,
    /// A tokenizer folder (default: the embedded default tokenizer).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Output folder for the PNGs (created if missing).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Decode from the first K scales only (coarse to fine).
    #[arg(long)]
    pub scales: Option<usize>,
    /// Decode even if the token file was written by a different tokenizer.
    #[arg(long)]
    pub force: bool,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    pub tokens: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let precision = args.precision.checked()?;
    let device = super::device()?;
    let (tok, _) = super::tokenizer_or_default(args.tokenizer.as_deref(), &device)?;
    let tok = tok.with_precision(precision)?;
    let (tokens, meta) = token_file::read(&args.tokens, &device)?;
    let checked = tok.check_token_file(&meta, &args.tokens, args.force);
    if checked.is_err() && meta.tokenizer_hash != tok.hash() {
        checked.map_err(|e| anyhow::anyhow!("{e}; --force decodes anyway"))?;
    } else if let Some(warning) = checked? {
        eprintln!("warning: {warning}");
    }
    tok.validate(&tokens)?;
    let k = args.scales.unwrap_or(tokens.scales.len());
    anyhow::ensure!(
        (1..=tokens.scales.len()).contains(&k),
        "--scales {k}: the tokens have {} scales (1 to {0} can be decoded)",
        tokens.scales.len()
    );
    // Everything is checked before anything is written; on a later failure the files written so
    // far (and the folder, if this run created it) are removed.
    let created = !args.output.exists();
    std::fs::create_dir_all(&args.output)?;
    let mut written: Vec<PathBuf> = Vec::new();
    let result = write_all(&args, &tok, &tokens, &meta, k, &mut written);
    if result.is_err() {
        for f in &written {
            let _ = std::fs::remove_file(f);
        }
        if created {
            let _ = std::fs::remove_dir(&args.output);
        }
    }
    result
}

fn write_all(
    args: &Args,
    tok: &coda::Tokenizer,
    tokens: &coda::tokenizer::Tokens,
    meta: &token_file::TokenFileMeta,
    k: usize,
    written: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    // Output names from the source images' stems, made unique; else the row index.
    let mut used = HashSet::new();
    let names: Vec<String> = (0..tokens.batch())
        .map(|i| {
            let stem = meta.sources.get(i).and_then(|s| {
                PathBuf::from(s)
                    .file_stem()
                    .map(|s| s.to_string_lossy().to_string())
            });
            let mut name = stem.unwrap_or_else(|| format!("{i:06}"));
            if !used.insert(name.clone()) {
                name = format!("{name}_{i}");
                used.insert(name.clone());
            }
            name
        })
        .collect();
    let pb = super::progress(tokens.batch(), "decode");
    let mut start = 0;
    while start < tokens.batch() {
        let n = args.batch.max(1).min(tokens.batch() - start);
        let images = tok.decode_images(&tokens.slice(start, n)?, Some(k), None)?;
        for (j, img) in images.iter().enumerate() {
            let path = args.output.join(format!("{}.png", names[start + j]));
            data::save_png(&path, img)?;
            written.push(path);
        }
        start += n;
        pb.inc(n as u64);
    }
    pb.finish_and_clear();
    println!(
        "decoded {} images from {k} of {} scales into {}",
        tokens.batch(),
        tokens.scales.len(),
        args.output.display()
    );
    Ok(())
}
