//! `coda eval`: reconstruction metrics of a tokenizer or a continuous VAE over a folder of
//! images, with the protocol recorded next to every number.

use std::path::PathBuf;

use coda::evaluation::evaluator::{report_rows, EvalEvent, EvalModel, EvalOptions};
use coda::vae::VaeWeights;

use super::VaeArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub precision: super::PrecisionArgs,
    /// A tokenizer folder (default: the embedded default tokenizer, unless --vae is given).
    #[arg(long, conflicts_with = "vae")]
    pub tokenizer: Option<PathBuf>,
    #[command(flatten)]
    pub vae: VaeArgs,
    /// Images: a folder (searched recursively, sorted; ImageNet layout works) or files.
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    #[arg(long, default_value_t = 256)]
    pub size: u32,
    /// Resize the shorter side to this before the centre crop (default: --size, the whole
    /// picture); e.g. the training resize, to evaluate on crops like the training ones.
    #[arg(long, conflicts_with = "random_crop")]
    pub resize: Option<u32>,
    /// Use the first N images only.
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// The reference's crop instead of the centre crop: shorter side to 1.125·size, then a random
    /// crop (image r seeded with --seed + r).
    #[arg(long)]
    pub random_crop: bool,
    /// Sample the posterior (image r with seed --seed + r) instead of taking its mean.
    #[arg(long)]
    pub sample: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// pytorch-fid's Inception weights (`pt_inception-2015-12-05`, converted with
    /// scripts/convert_weights.py, or the .pth itself if it is in zip format): enables rFID.
    #[arg(long)]
    pub inception: Option<PathBuf>,
    /// LPIPS (VGG) weights written by scripts/convert_lpips.py: enables LPIPS.
    #[arg(long)]
    pub lpips: Option<PathBuf>,
    /// Reference statistics (mu, sigma) to compare against instead of the originals' features.
    #[arg(long, requires = "inception")]
    pub ref_stats: Option<PathBuf>,
    /// Save the originals' statistics here, for --ref-stats later.
    #[arg(long, requires = "inception")]
    pub save_ref_stats: Option<PathBuf>,
    /// Also write a self-contained HTML report (metrics, picture grid, coarse-to-fine strips,
    /// codebook-usage plot) as DIR/index.html.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Images shown in the report.
    #[arg(long, default_value_t = 6)]
    pub report_images: usize,
    /// Also reconstruct solid --size x --size patches of 30 colours (the 3x3x3 grid of the RGB
    /// cube, then green, purple and teal) and record the colour that comes back and its mean
    /// absolute error per channel (0-255).
    #[arg(long)]
    pub colours: bool,
    /// Where to write the results (JSON, atomically).
    #[arg(long)]
    pub json: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let precision = args.precision.checked()?;
    let device = super::device()?;
    let (tokenizer, vae, model_path) = match &args.vae.vae {
        None => {
            let (tok, name) = super::tokenizer_or_default(args.tokenizer.as_deref(), &device)?;
            (Some(tok.with_precision(precision)?), None, name)
        }
        Some(path) => {
            let w = VaeWeights::load(path, &args.vae.options(), &device)?;
            (None, Some(w.build()?), path.display().to_string())
        }
    };
    let model = match (&tokenizer, &vae) {
        (Some(t), _) => EvalModel::Tokenizer(t),
        (None, Some(v)) => EvalModel::Vae(v, model_path.clone()),
        (None, None) => unreachable!("one of the two is loaded"),
    };
    let mut paths = coda::data::collect_images(&args.data)?;
    if let Some(n) = args.limit {
        paths.truncate(n);
    }
    anyhow::ensure!(!paths.is_empty(), "no image files in {:?}", args.data);
    let opts = EvalOptions {
        size: args.size,
        resize: args.resize,
        random_crop: args.random_crop,
        batch: args.batch,
        sample: args.sample,
        seed: args.seed,
        inception: args.inception.clone(),
        lpips: args.lpips.clone(),
        ref_stats: args.ref_stats.clone(),
        save_ref_stats: args.save_ref_stats.clone(),
        samples: if args.report.is_some() {
            args.report_images
        } else {
            0
        },
        colours: args.colours,
        data: args.data.clone(),
        precision,
    };
    let pb = super::progress(paths.len(), "eval");
    let result = model.evaluate(&paths, &opts, &mut |e| match e {
        EvalEvent::Progress(n) => pb.inc(n as u64),
        EvalEvent::Warning(w) => pb.suspend(|| eprintln!("warning: {w}")),
    })?;
    pb.finish_and_clear();
    let mut json = result.json;
    json["model"]["path"] = serde_json::json!(model_path);
    coda::io::write_atomic(&args.json, serde_json::to_string_pretty(&json)?.as_bytes())?;
    if let Some(dir) = &args.report {
        let rows = report_rows(&json);
        let usage: Option<Vec<f64>> = json["metrics"]["codebook"]["usage_per_scale"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_f64()).collect());
        let title = format!("coda eval: {model_path}");
        coda::evaluation::report::write(dir, &title, &rows, &result.samples, usage.as_deref())?;
        println!("wrote {}", dir.join("index.html").display());
    }
    print_summary(&json);
    println!("wrote {}", args.json.display());
    Ok(())
}

/// The console summary, from the results JSON.
fn print_summary(r: &serde_json::Value) {
    let m = &r["metrics"];
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    if m["rfid"]["value"].is_number() {
        println!(
            "rFID  {:.4} ({} images)",
            num(&m["rfid"]["value"]),
            m["rfid"]["images"]
        );
    }
    if m["colours"]["mean_mae"].is_number() {
        let c = &m["colours"];
        println!(
            "colours: mean abs error {:.2}/255 over 30 solid {}x{} patches, worst {:.2} at {} -> {}",
            num(&c["mean_mae"]),
            c["size"],
            c["size"],
            num(&c["worst_mae"]),
            c["worst_rgb"],
            c["worst_reconstructed"]
        );
    }
    let skipped = r["data"]["skipped"].as_array().map_or(0, |a| a.len());
    println!(
        "{} images ({skipped} skipped), {:.2} images/s",
        r["data"]["images"],
        num(&r["images_per_second"])
    );
    println!(
        "PSNR  {:.2} dB (uint8, truncated)  {:.2} dB (float)",
        num(&m["psnr"]["uint8_truncated"]),
        num(&m["psnr"]["float"])
    );
    println!(
        "SSIM  {:.4} (uint8)  {:.4} (float)",
        num(&m["ssim"]["uint8_truncated"]),
        num(&m["ssim"]["float"])
    );
    if m["lpips"]["value"].is_number() {
        println!("LPIPS {:.4}", num(&m["lpips"]["value"]));
    }
    if m["codebook"]["usage_all"].is_number() {
        println!(
            "codebook usage {:.2}% over all scales, perplexity {:.1}; {} tokens, {:.0} bits per image",
            num(&m["codebook"]["usage_all"]),
            num(&m["codebook"]["perplexity_all"]),
            r["model"]["tokens_per_image"],
            num(&r["model"]["bits_per_image"])
        );
    }
}
