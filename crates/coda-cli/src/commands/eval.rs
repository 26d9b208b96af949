//! `coda eval`: reconstruction metrics of a tokenizer or a continuous VAE over a folder of
//! images, with the protocol recorded next to every number.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use coda::data;
use coda::evaluation::inception::FidInception;
use coda::evaluation::{frechet_distance, psnr_ssim, CodebookStats, GaussianStats, Protocol};
use coda::tokenizer::{Posterior, Tokenizer};
use coda::vae::{AutoencoderKl, VaeWeights};
use serde_json::json;

use super::VaeArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub precision: super::PrecisionArgs,
    /// A tokenizer folder.
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

/// Features of [-1, 1] images as rFID sees them: clamp((x + 1) / 2, 0, 1), floats.
fn inception_features(net: &mut FidInception, x: &candle_core::Tensor) -> anyhow::Result<Vec<f32>> {
    let x01 = ((x + 1.0)? / 2.0)?.clamp(0f32, 1f32)?;
    Ok(net.features(&x01)?.flatten_all()?.to_vec1::<f32>()?)
}

fn save_stats(path: &std::path::Path, s: &GaussianStats) -> anyhow::Result<()> {
    let d = s.mean.len();
    let mu = candle_core::Tensor::from_vec(
        s.mean.iter().copied().collect::<Vec<f64>>(),
        d,
        &candle_core::Device::Cpu,
    )?;
    let sigma = candle_core::Tensor::from_vec(
        s.cov.transpose().iter().copied().collect::<Vec<f64>>(),
        (d, d),
        &candle_core::Device::Cpu,
    )?;
    coda::io::write_safetensors(path, &[("mu".into(), mu), ("sigma".into(), sigma)], None)?;
    Ok(())
}

fn load_stats(path: &std::path::Path) -> anyhow::Result<GaussianStats> {
    let t = candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))?;
    let mu = t
        .get("mu")
        .with_context(|| format!("{}: no 'mu'", path.display()))?
        .to_dtype(candle_core::DType::F64)?
        .to_vec1::<f64>()?;
    let sigma = t
        .get("sigma")
        .with_context(|| format!("{}: no 'sigma'", path.display()))?
        .to_dtype(candle_core::DType::F64)?;
    let d = mu.len();
    anyhow::ensure!(
        sigma.dims() == [d, d],
        "{}: sigma has shape {:?}, mu has {d} values",
        path.display(),
        sigma.dims()
    );
    Ok(GaussianStats {
        mean: nalgebra::DVector::from_vec(mu),
        cov: nalgebra::DMatrix::from_row_slice(d, d, &sigma.flatten_all()?.to_vec1::<f64>()?),
        count: 0,
    })
}

enum Model {
    Tokenizer(Box<Tokenizer>),
    Vae(Box<AutoencoderKl>, String),
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // The precision of this call's convolutions (tokenizer and bare VAE alike).
    let precision = args.precision.checked()?;
    coda::with_precision(precision, || run_in_precision(args))
}

fn run_in_precision(args: Args) -> anyhow::Result<()> {
    let device = super::device()?;
    let model = match &args.tokenizer {
        Some(dir) => Model::Tokenizer(Box::new(
            Tokenizer::from_dir(dir, &device)?.with_precision(args.precision.precision)?,
        )),
        None => {
            let path = args
                .vae
                .path()
                .context("give --tokenizer DIR or --vae PATH")?;
            let w = VaeWeights::load(path, &args.vae.options(), &device)?;
            Model::Vae(Box::new(w.build()?), path.display().to_string())
        }
    };
    let mut inception = match &args.inception {
        Some(p) => {
            let w = coda::io::read_tensors(p, &device)?;
            let hash = coda::tokenizer::weights_hash(&w)?;
            Some((FidInception::new(&w, p)?, hash))
        }
        None => None,
    };
    let (mut feats_ref, mut feats_rec) = (Vec::<f32>::new(), Vec::<f32>::new());
    let lpips = match &args.lpips {
        Some(p) => {
            let w = coda::io::read_tensors(p, &device)?;
            Some((
                coda::evaluation::lpips::Lpips::new(&w, p)?,
                coda::tokenizer::weights_hash(&w)?,
            ))
        }
        None => None,
    };
    let mut lpips_sum = 0f64;
    let mut samples: Vec<coda::evaluation::report::Sample> = Vec::new();
    let mut paths = data::collect_images(&args.data)?;
    if let Some(n) = args.limit {
        paths.truncate(n);
    }
    anyhow::ensure!(!paths.is_empty(), "no image files in {:?}", args.data);

    let mut codebook = match &model {
        Model::Tokenizer(t) => Some(CodebookStats::new(t.codebook_size())),
        Model::Vae(..) => None,
    };
    let protocols = [Protocol::Uint8Truncated, Protocol::Float];
    let mut sums = [[0f64; 2]; 2]; // [protocol][psnr, ssim]
    let (mut count, mut skipped, mut tokens_per_image) = (0usize, Vec::new(), 0usize);
    let pb = super::progress(paths.len(), "eval");
    let t0 = Instant::now();
    for (bi, chunk) in paths.chunks(args.batch.max(1)).enumerate() {
        let first = bi * args.batch.max(1);
        let loaded = data::load_prepared(chunk, None);
        let mut images = Vec::new();
        let mut rows = Vec::new();
        for (j, r) in loaded.into_iter().enumerate() {
            match r {
                Ok(img) => {
                    let seed = args.seed.wrapping_add((first + j) as u64);
                    images.push(if args.random_crop {
                        data::prepare_random_crop(img, args.size, seed)
                    } else {
                        match args.resize {
                            Some(side) => data::center_crop(
                                &data::loader::resize_shorter(&img, side.max(args.size)),
                                args.size,
                            ),
                            None => data::prepare(img, Some(args.size)),
                        }
                    });
                    rows.push(first + j);
                }
                Err(e) => {
                    pb.suspend(|| eprintln!("warning: skipped: {e}"));
                    skipped.push(chunk[j].display().to_string());
                }
            }
        }
        pb.inc(chunk.len() as u64);
        if images.is_empty() {
            continue;
        }
        let x = data::images_to_tensor(&images, &device)?;
        let posterior = if args.sample {
            Posterior::Sample(args.seed.wrapping_add(rows[0] as u64))
        } else {
            Posterior::Mean
        };
        let recon = match &model {
            Model::Tokenizer(t) => {
                let enc = t.encode_with(&x, posterior)?;
                tokens_per_image = enc.tokens.len_per_image();
                if let Some(c) = codebook.as_mut() {
                    c.add(&enc.tokens)?;
                }
                t.decode_latent(&enc.latent_hat)?
            }
            Model::Vae(vae, _) => {
                let post = vae.encode(&x)?;
                let z = posterior.latent(&post)?;
                vae.decode(&z)?
            }
        };
        if let Some((net, _)) = &lpips {
            lpips_sum += net
                .distance(&x, &recon.clamp(-1f32, 1f32)?)?
                .to_dtype(candle_core::DType::F64)?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
        if let Some((net, _)) = inception.as_mut() {
            if args.ref_stats.is_none() {
                feats_ref.extend(inception_features(net, &x)?);
            }
            feats_rec.extend(inception_features(net, &recon)?);
        }
        if args.report.is_some() && samples.len() < args.report_images {
            let recon_imgs = data::tensor_to_images(&recon)?;
            for (j, (orig, rec)) in images.iter().zip(recon_imgs).enumerate() {
                if samples.len() >= args.report_images {
                    break;
                }
                // Coarse-to-fine strips for the first few images (K decodes each).
                let progressive = match &model {
                    Model::Tokenizer(t) if samples.len() < 4 => {
                        let one = x.narrow(0, j, 1)?;
                        let tokens = t.encode_with(&one, posterior)?.tokens;
                        let steps =
                            (1..=tokens.scales.len())
                                .map(|k| {
                                    Ok(data::tensor_to_images(&t.decode_prefix(&tokens, k)?)?
                                        .remove(0))
                                })
                                .collect::<anyhow::Result<Vec<_>>>()?;
                        Some(super::reconstruct::strip(&steps))
                    }
                    _ => None,
                };
                let name = paths[rows[j]]
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default();
                samples.push(coda::evaluation::report::Sample {
                    name,
                    original: orig.clone(),
                    reconstruction: rec,
                    progressive,
                });
            }
        }
        let (c, h, w) = (3, args.size as usize, args.size as usize);
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let rs = recon.flatten_all()?.to_vec1::<f32>()?;
        for i in 0..images.len() {
            let (a, b) = (
                &xs[i * c * h * w..(i + 1) * c * h * w],
                &rs[i * c * h * w..(i + 1) * c * h * w],
            );
            for (pi, p) in protocols.iter().enumerate() {
                let (psnr, ssim) = psnr_ssim(a, b, (c, h, w), *p);
                sums[pi][0] += psnr;
                sums[pi][1] += ssim;
            }
            count += 1;
        }
    }
    pb.finish_and_clear();
    anyhow::ensure!(
        count > 0,
        "none of the {} images could be read",
        paths.len()
    );
    let secs = t0.elapsed().as_secs_f64();
    let mean = |pi: usize, m: usize| sums[pi][m] / count as f64;

    let rfid = match &inception {
        None => serde_json::Value::Null,
        Some((_, hash)) => {
            let rec = GaussianStats::fit(&feats_rec, 2048)?;
            let reference = match &args.ref_stats {
                Some(p) => load_stats(p)?,
                None => GaussianStats::fit(&feats_ref, 2048)?,
            };
            if let Some(p) = &args.save_ref_stats {
                save_stats(p, &reference)?;
            }
            if count < 2048 {
                eprintln!("warning: rFID from {count} images (< 2048 feature dimensions): the covariance is singular and the number is biased upwards");
            }
            let fid = frechet_distance(&reference, &rec);
            println!("rFID  {fid:.4} ({count} images)");
            json!({"value": fid, "images": count, "reference": match &args.ref_stats {
                Some(p) => format!("statistics from {}", p.display()), None => "the originals, paired".into() },
                "inception_weights_hash": hash})
        }
    };
    let colours = if args.colours {
        let posterior = if args.sample {
            Posterior::Sample(args.seed)
        } else {
            Posterior::Mean
        };
        let r = coda::evaluation::colour_probe(args.size, &device, |x| match &model {
            Model::Tokenizer(t) => t.decode_latent(&t.encode_with(x, posterior)?.latent_hat),
            Model::Vae(vae, _) => vae.decode(&posterior.latent(&vae.encode(x)?)?),
        })?;
        let mean_mae = r.iter().map(|c| c.mae).sum::<f64>() / r.len() as f64;
        let worst = r
            .iter()
            .max_by(|a, b| a.mae.total_cmp(&b.mae))
            .expect("30 colours");
        println!(
            "colours: mean abs error {mean_mae:.2}/255 over {} solid {}x{} patches, worst {:.2} at {:?} -> {:?}",
            r.len(),
            args.size,
            args.size,
            worst.mae,
            worst.rgb,
            worst.reconstructed.map(|v| v.round() as u8)
        );
        json!({"size": args.size, "mean_mae": mean_mae, "worst_mae": worst.mae, "patches": r})
    } else {
        serde_json::Value::Null
    };
    let (model_json, codebook_json) = match &model {
        Model::Tokenizer(t) => {
            let r = codebook.as_ref().map(|c| c.report());
            (
                json!({"kind": "tokenizer", "path": args.tokenizer, "weights_hash": t.hash(),
                       "codebook_size": t.codebook_size(), "tokens_per_image": tokens_per_image,
                       "bits_per_image": t.bits_per_image(tokens_per_image)}),
                json!(r),
            )
        }
        Model::Vae(_, path) => (
            json!({"kind": "vae", "path": path}),
            serde_json::Value::Null,
        ),
    };
    let result = json!({
        "software": {"name": "coda-rs", "version": env!("CARGO_PKG_VERSION")},
        "model": model_json,
        "data": {
            "paths": args.data, "images": count, "skipped": skipped,
            "resize": if args.random_crop { format!("shorter side to {} (Lanczos3), random crop {}, seed {}", (1.125 * args.size as f64).round(), args.size, args.seed) }
                      else { format!("shorter side to {} (Lanczos3), centre crop {}", args.resize.unwrap_or(args.size).max(args.size), args.size) },
        },
        "posterior": if args.sample { format!("sample, seed {} + image index", args.seed) } else { "mean".into() },
        "metrics": {
            "psnr": {"uint8_truncated": mean(0, 0), "float": mean(1, 0)},
            "ssim": {"uint8_truncated": mean(0, 1), "float": mean(1, 1)},
            "codebook": codebook_json,
            "rfid": rfid,
            "lpips": lpips.as_ref().map(|(_, hash)| json!({"value": lpips_sum / count as f64, "weights_hash": hash})),
            "colours": colours,
        },
        "protocol": {
            "psnr": "per image, 20 log10(R / sqrt(MSE)) over all pixels and channels, then the mean over images",
            "ssim": "Gaussian 11x11, sigma 1.5, valid region, per channel then mean (skimage/MATLAB style)",
            "uint8_truncated": "clamp((x+1)/2, 0, 1) * 255 truncated to uint8, R = 255 (the reference's)",
            "float": "clamp((x+1)/2, 0, 1) as float, R = 1",
            "rfid": "pytorch-fid InceptionV3 (TF-FID graph), pool3 2048-d, bilinear resize to 299 (align_corners=False), inputs clamp((x+1)/2,0,1) as floats, unbiased covariance, Frechet distance in f64 via eigendecompositions; null without --inception",
            "lpips": "VGG16 v0.1 (lpips package / taming vgg_lpips), inputs in [-1,1], unclamped reconstructions clamped to [-1,1] first, mean over images; null without --lpips",
            "colours": "solid size x size patches of the 27 colours {0,128,255}^3 and (40,160,60), (150,120,200), (20,120,110); mean absolute error per channel of the 8-bit reconstruction (0-255); null without --colours",
        },
        "images_per_second": count as f64 / secs,
        // The convolution arithmetic (--precision): bf16 modes give slightly different numbers.
        "precision": args.precision.precision.name(),
    });
    coda::io::write_atomic(
        &args.json,
        serde_json::to_string_pretty(&result)?.as_bytes(),
    )?;
    if let Some(dir) = &args.report {
        let rows = report_rows(&result);
        let usage: Option<Vec<f64>> = result["metrics"]["codebook"]["usage_per_scale"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_f64()).collect());
        let title = format!(
            "coda eval: {}",
            result["model"]["path"].as_str().unwrap_or("model")
        );
        coda::evaluation::report::write(dir, &title, &rows, &samples, usage.as_deref())?;
        println!("wrote {}", dir.join("index.html").display());
    }
    println!(
        "{count} images ({} skipped), {:.2} images/s",
        skipped.len(),
        count as f64 / secs
    );
    println!(
        "PSNR  {:.2} dB (uint8, truncated)  {:.2} dB (float)",
        mean(0, 0),
        mean(1, 0)
    );
    println!("SSIM  {:.4} (uint8)  {:.4} (float)", mean(0, 1), mean(1, 1));
    if lpips.is_some() {
        println!("LPIPS {:.4}", lpips_sum / count as f64);
    }
    if let Some(r) = codebook.map(|c| c.report()) {
        println!("codebook usage {:.2}% over all scales, perplexity {:.1}; {} tokens, {:.0} bits per image",
            r.usage_all, r.perplexity_all, tokens_per_image, match &model { Model::Tokenizer(t) => t.bits_per_image(tokens_per_image), _ => 0.0 });
    }
    println!("wrote {}", args.json.display());
    Ok(())
}

/// The report's metrics table, formatted from the JSON (so the two always agree).
pub fn report_rows(r: &serde_json::Value) -> Vec<(String, String)> {
    let m = &r["metrics"];
    let mut rows = vec![
        ("images".to_string(), r["data"]["images"].to_string()),
        (
            "PSNR (uint8, truncated) dB".to_string(),
            format!(
                "{:.4}",
                m["psnr"]["uint8_truncated"].as_f64().unwrap_or(f64::NAN)
            ),
        ),
        (
            "PSNR (float) dB".to_string(),
            format!("{:.4}", m["psnr"]["float"].as_f64().unwrap_or(f64::NAN)),
        ),
        (
            "SSIM (uint8)".to_string(),
            format!(
                "{:.4}",
                m["ssim"]["uint8_truncated"].as_f64().unwrap_or(f64::NAN)
            ),
        ),
        (
            "SSIM (float)".to_string(),
            format!("{:.4}", m["ssim"]["float"].as_f64().unwrap_or(f64::NAN)),
        ),
    ];
    if let Some(v) = m["lpips"]["value"].as_f64() {
        rows.push(("LPIPS (VGG)".into(), format!("{v:.4}")));
    }
    if let Some(v) = m["rfid"]["value"].as_f64() {
        rows.push(("rFID".into(), format!("{v:.4}")));
    }
    if let Some(v) = m["codebook"]["usage_all"].as_f64() {
        rows.push(("codebook usage, all scales %".into(), format!("{v:.2}")));
        rows.push((
            "perplexity, all scales".into(),
            format!(
                "{:.2}",
                m["codebook"]["perplexity_all"].as_f64().unwrap_or(f64::NAN)
            ),
        ));
        rows.push((
            "tokens per image".into(),
            r["model"]["tokens_per_image"].to_string(),
        ));
        rows.push((
            "bits per image".into(),
            format!(
                "{:.0}",
                r["model"]["bits_per_image"].as_f64().unwrap_or(f64::NAN)
            ),
        ));
    }
    rows.push((
        "images / s".into(),
        format!("{:.2}", r["images_per_second"].as_f64().unwrap_or(f64::NAN)),
    ));
    rows
}
