//! `coda tokenize`: a whole dataset into a sharded, resumable token store (see
//! `coda::tokenizer::store` for the layout), and `coda tokenize merge` to join the stores of
//! `--shard I/N` processes.

use std::path::PathBuf;
use std::time::Instant;

use coda::tokenizer::store::{self, StoreEvent, TokenizeOptions};

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    pub merge: Option<Merge>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(clap::Subcommand, Debug)]
pub enum Merge {
    /// Join the stores of `--shard I/N` runs into STORE (shards are moved, not copied) and
    /// write its manifest.
    Merge {
        /// The store to complete (it may be one of the parts, or a new folder).
        store: PathBuf,
        /// The other parts' store folders.
        parts: Vec<PathBuf>,
    },
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub precision: super::PrecisionArgs,
    /// The dataset: an ImageFolder tree (class subfolders = labels), a folder of images, or a
    /// list file (.txt: one path per line; .csv / .jsonl with `path` and optional `label`).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// The store folder (created; an interrupted run continues where it stopped).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// A tokenizer folder (default: the embedded default tokenizer).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Square image size: shorter side resized to it, centre crop (default: the tokenizer's
    /// resolution).
    #[arg(long)]
    pub size: Option<u32>,
    /// Also store the tokens of each image's horizontal flip (a second view).
    #[arg(long)]
    pub flip: bool,
    /// Samples per shard.
    #[arg(long, default_value_t = 10_000)]
    pub shard_size: usize,
    /// Images per model call.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Process only the shards with index ≡ I (mod N), e.g. `--shard 3/8` in a job array;
    /// `coda tokenize merge` joins the parts.
    #[arg(long, value_parser = parse_part)]
    pub shard: Option<(usize, usize)>,
    /// Only the first N samples of the dataset.
    #[arg(long)]
    pub limit: Option<usize>,
}

fn parse_part(s: &str) -> Result<(usize, usize), String> {
    let (i, n) = s
        .split_once('/')
        .ok_or_else(|| format!("expected I/N, got {s:?}"))?;
    let (i, n): (usize, usize) = (
        i.trim().parse().map_err(|e| format!("{i:?}: {e}"))?,
        n.trim().parse().map_err(|e| format!("{n:?}: {e}"))?,
    );
    if n == 0 || i >= n {
        return Err(format!("{s}: expected 0 <= I < N"));
    }
    Ok((i, n))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match (args.merge, args.run) {
        (Some(Merge::Merge { store, parts }), _) => {
            match store::merge(&store, &parts)? {
                Some(m) => println!(
                    "{}: {} samples in {} shards ({} skipped); wrote {}",
                    store.display(),
                    m.stored_samples,
                    m.shards.len(),
                    m.skipped.len(),
                    store.join(store::MANIFEST_FILE).display()
                ),
                None => anyhow::bail!(
                    "{}: some shards are still missing after the merge (a part not finished?)",
                    store.display()
                ),
            }
            Ok(())
        }
        (None, a) => run_tokenize(a),
    }
}

fn run_tokenize(a: RunArgs) -> anyhow::Result<()> {
    let precision = a.precision.checked()?;
    let (Some(data), Some(out)) = (a.data, a.output) else {
        anyhow::bail!("give --data SRC -o STORE (or `coda tokenize merge STORE PARTS...`)");
    };
    let device = super::device()?;
    let (tok, name) = super::tokenizer_or_default(a.tokenizer.as_deref(), &device)?;
    let tok = tok.with_precision(precision)?;
    let size = a
        .size
        .or(tok.default_image_size())
        .ok_or_else(|| anyhow::anyhow!("the tokenizer has no resolution: give --size"))?;
    let dataset = coda::data::dataset::open_dataset(&data)?;
    let opts = TokenizeOptions {
        size,
        flip: a.flip,
        shard_size: a.shard_size,
        batch: a.batch,
        part: a.shard,
        limit: a.limit,
        source: data.display().to_string(),
    };
    let total = a.limit.map_or(dataset.len(), |l| l.min(dataset.len()));
    eprintln!(
        "tokenizing {total} images of {} ({}) at {size} px with {name}{}",
        data.display(),
        dataset.kind,
        if a.flip { ", with flips" } else { "" }
    );
    let pb = super::progress(0, "tokenize");
    let t0 = Instant::now();
    let mut images = 0usize;
    let manifest = store::tokenize(&tok, &dataset, &out, &opts, &mut |e| match e {
        StoreEvent::Resumed {
            done,
            todo,
            samples_todo,
        } => {
            if done > 0 {
                pb.suspend(|| eprintln!("resuming: {done} shards done, {todo} to go"));
            }
            pb.set_length(samples_todo as u64);
        }
        StoreEvent::Images(n) => {
            images += n;
            pb.inc(n as u64)
        }
        StoreEvent::Skipped { key, reason } => {
            pb.suspend(|| eprintln!("warning: skipped {key}: {reason}"))
        }
        StoreEvent::ShardDone(i) => {
            if pb.is_hidden() {
                eprintln!(
                    "shard {i} done ({images} images, {:.1} images/s)",
                    images as f64 / t0.elapsed().as_secs_f64()
                );
            }
        }
    })?;
    pb.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{images} images in {secs:.1} s ({:.2} images/s)",
        images as f64 / secs.max(1e-9)
    );
    match manifest {
        Some(m) => println!(
            "{}: {} samples in {} shards, {} skipped; wrote {}",
            out.display(),
            m.stored_samples,
            m.shards.len(),
            m.skipped.len(),
            out.join(store::MANIFEST_FILE).display()
        ),
        None => println!(
            "{}: this part is done; `coda tokenize merge` writes the manifest once all parts are",
            out.display()
        ),
    }
    Ok(())
}
