//! The evaluation harness: reconstruction metrics of a tokenizer or a continuous VAE over a list
//! of images, with the protocol recorded next to every number (`coda eval` and the Python
//! package share it).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use serde_json::{json, Value};

use super::inception::FidInception;
use super::report::Sample;
use super::{frechet_distance, psnr_ssim, CodebookStats, GaussianStats, Protocol};
use crate::data;
use crate::error::{Error, Result};
use crate::tokenizer::{Posterior, Tokenizer};
use crate::vae::AutoencoderKl;

/// What gets evaluated.
pub enum EvalModel<'a> {
    Tokenizer(&'a Tokenizer),
    /// A continuous VAE and the name it is reported under.
    Vae(&'a AutoencoderKl, String),
}

/// How images are prepared and which metrics are computed.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// Square evaluation size in pixels.
    pub size: u32,
    /// Shorter side before the centre crop (None: `size`, the whole picture).
    pub resize: Option<u32>,
    /// The reference's crop: shorter side to 1.125·size, random crop (image r seeded seed + r).
    pub random_crop: bool,
    /// Images per model call.
    pub batch: usize,
    /// Sample the posterior (image r with seed + r) instead of taking its mean.
    pub sample: bool,
    pub seed: u64,
    /// pytorch-fid Inception weights: enables rFID.
    pub inception: Option<PathBuf>,
    /// LPIPS (VGG) weights: enables LPIPS.
    pub lpips: Option<PathBuf>,
    /// Reference statistics for rFID instead of the originals' features.
    pub ref_stats: Option<PathBuf>,
    /// Save the originals' statistics here.
    pub save_ref_stats: Option<PathBuf>,
    /// Keep this many (original, reconstruction) pairs for a report.
    pub samples: usize,
    /// Also reconstruct solid patches of 30 colours.
    pub colours: bool,
    /// The paths as the user gave them, recorded in the results.
    pub data: Vec<PathBuf>,
    /// The arithmetic the model runs in, recorded in the results.
    pub precision: crate::Precision,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            size: 256,
            resize: None,
            random_crop: false,
            batch: 8,
            sample: false,
            seed: 0,
            inception: None,
            lpips: None,
            ref_stats: None,
            save_ref_stats: None,
            samples: 0,
            colours: false,
            data: Vec::new(),
            precision: crate::Precision::F32,
        }
    }
}

/// What the harness tells its caller as it goes.
pub enum EvalEvent<'a> {
    /// `n` more images processed (read or skipped).
    Progress(usize),
    /// A note for the user (an unreadable image, a biased rFID).
    Warning(&'a str),
}

/// The results: the JSON record (metrics, protocol, data, model) and the kept samples.
pub struct EvalResult {
    pub json: Value,
    pub samples: Vec<Sample>,
}

/// Features of [-1, 1] images as rFID sees them: clamp((x + 1) / 2, 0, 1), floats.
fn inception_features(net: &mut FidInception, x: &Tensor) -> Result<Vec<f32>> {
    let x01 = ((x + 1.0)? / 2.0)?.clamp(0f32, 1f32)?;
    Ok(net.features(&x01)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Write rFID reference statistics (mu, sigma) as safetensors.
pub fn save_stats(path: &Path, s: &GaussianStats) -> Result<()> {
    let d = s.mean.len();
    let mu = Tensor::from_vec(
        s.mean.iter().copied().collect::<Vec<f64>>(),
        d,
        &Device::Cpu,
    )?;
    let sigma = Tensor::from_vec(
        s.cov.transpose().iter().copied().collect::<Vec<f64>>(),
        (d, d),
        &Device::Cpu,
    )?;
    crate::io::write_safetensors(path, &[("mu".into(), mu), ("sigma".into(), sigma)], None)
}

/// Read rFID reference statistics written by [`save_stats`] (or pytorch-fid's, converted).
pub fn load_stats(path: &Path) -> Result<GaussianStats> {
    let bad = |reason: String| Error::Checkpoint {
        path: path.into(),
        reason,
    };
    // Read as stored (f64): the checkpoint reader would round to f32 and move the rFID.
    if !path.exists() {
        return Err(Error::NotFound { path: path.into() });
    }
    let t = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| bad(format!("not a statistics file ({e})")))?;
    let mu = t
        .get("mu")
        .ok_or_else(|| bad("no 'mu'".into()))?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    let sigma = t
        .get("sigma")
        .ok_or_else(|| bad("no 'sigma'".into()))?
        .to_dtype(DType::F64)?;
    let d = mu.len();
    if sigma.dims() != [d, d] {
        return Err(bad(format!(
            "sigma has shape {:?}, mu has {d} values",
            sigma.dims()
        )));
    }
    Ok(GaussianStats {
        mean: nalgebra::DVector::from_vec(mu),
        cov: nalgebra::DMatrix::from_row_slice(d, d, &sigma.flatten_all()?.to_vec1::<f64>()?),
        count: 0,
    })
}

/// Side by side, left to right (coarse-to-fine strips).
pub fn strip(images: &[RgbImage]) -> RgbImage {
    let (w, h) = images.first().map(|i| i.dimensions()).unwrap_or((0, 0));
    let mut out = RgbImage::new(w * images.len() as u32, h);
    for (i, img) in images.iter().enumerate() {
        image::imageops::replace(&mut out, img, (i as u32 * w) as i64, 0);
    }
    out
}

impl EvalModel<'_> {
    fn posterior(opts: &EvalOptions, row: usize) -> Posterior {
        if opts.sample {
            Posterior::Sample(opts.seed.wrapping_add(row as u64))
        } else {
            Posterior::Mean
        }
    }

    fn reconstruct(&self, x: &Tensor, posterior: Posterior) -> Result<Tensor> {
        match self {
            EvalModel::Tokenizer(t) => t.decode_latent(&t.encode_with(x, posterior)?.latent_hat),
            EvalModel::Vae(vae, _) => vae.decode(&posterior.latent(&vae.encode(x)?)?),
        }
    }

    /// Evaluate on `paths` (unreadable images are skipped and listed), reporting progress.
    pub fn evaluate(
        &self,
        paths: &[PathBuf],
        opts: &EvalOptions,
        events: &mut dyn FnMut(EvalEvent),
    ) -> Result<EvalResult> {
        crate::with_precision(opts.precision, || self.evaluate_now(paths, opts, events))
    }

    fn evaluate_now(
        &self,
        paths: &[PathBuf],
        opts: &EvalOptions,
        events: &mut dyn FnMut(EvalEvent),
    ) -> Result<EvalResult> {
        if paths.is_empty() {
            return Err(Error::Invalid(format!("no image files in {:?}", opts.data)));
        }
        let device = match self {
            EvalModel::Tokenizer(t) => t.device().clone(),
            EvalModel::Vae(v, _) => v.device().clone(),
        };
        let mut inception = match &opts.inception {
            Some(p) => {
                let w = crate::io::read_tensors(p, &device)?;
                let hash = crate::tokenizer::weights_hash(&w)?;
                Some((FidInception::new(&w, p)?, hash))
            }
            None => None,
        };
        let (mut feats_ref, mut feats_rec) = (Vec::<f32>::new(), Vec::<f32>::new());
        let lpips = match &opts.lpips {
            Some(p) => {
                let w = crate::io::read_tensors(p, &device)?;
                Some((
                    super::lpips::Lpips::new(&w, p)?,
                    crate::tokenizer::weights_hash(&w)?,
                ))
            }
            None => None,
        };
        let mut lpips_sum = 0f64;
        let mut samples: Vec<Sample> = Vec::new();
        let mut codebook = match self {
            EvalModel::Tokenizer(t) => Some(CodebookStats::new(t.codebook_size())),
            EvalModel::Vae(..) => None,
        };
        let protocols = [Protocol::Uint8Truncated, Protocol::Float];
        let mut sums = [[0f64; 2]; 2]; // [protocol][psnr, ssim]
        let (mut count, mut skipped, mut tokens_per_image) = (0usize, Vec::new(), 0usize);
        let batch = opts.batch.max(1);
        let t0 = Instant::now();
        for (bi, chunk) in paths.chunks(batch).enumerate() {
            let first = bi * batch;
            let mut images = Vec::new();
            let mut rows = Vec::new();
            for (j, r) in data::load_prepared(chunk, None).into_iter().enumerate() {
                match r {
                    Ok(img) => {
                        let seed = opts.seed.wrapping_add((first + j) as u64);
                        images.push(if opts.random_crop {
                            data::prepare_random_crop(img, opts.size, seed)
                        } else {
                            match opts.resize {
                                Some(side) => data::center_crop(
                                    &data::loader::resize_shorter(&img, side.max(opts.size)),
                                    opts.size,
                                ),
                                None => data::prepare(img, Some(opts.size))?,
                            }
                        });
                        rows.push(first + j);
                    }
                    Err(e) => {
                        events(EvalEvent::Warning(&format!("skipped: {e}")));
                        skipped.push(chunk[j].display().to_string());
                    }
                }
            }
            events(EvalEvent::Progress(chunk.len()));
            if images.is_empty() {
                continue;
            }
            let x = data::images_to_tensor(&images, &device)?;
            // Image r samples with seed + r: a skipped image must not shift the seeds of the
            // images after it, so a batch is encoded in runs of consecutive rows.
            let mut recon_parts = Vec::new();
            let mut start = 0;
            while start < rows.len() {
                let mut end = start + 1;
                while opts.sample && end < rows.len() && rows[end] == rows[end - 1] + 1 {
                    end += 1;
                }
                if !opts.sample {
                    end = rows.len();
                }
                let xs = x.narrow(0, start, end - start)?;
                let posterior = Self::posterior(opts, rows[start]);
                recon_parts.push(match self {
                    EvalModel::Tokenizer(t) => {
                        let enc = t.encode_with(&xs, posterior)?;
                        tokens_per_image = enc.tokens.len_per_image();
                        if let Some(c) = codebook.as_mut() {
                            c.add(&enc.tokens)?;
                        }
                        t.decode_latent(&enc.latent_hat)?
                    }
                    EvalModel::Vae(..) => self.reconstruct(&xs, posterior)?,
                });
                start = end;
            }
            let recon = Tensor::cat(&recon_parts, 0)?;
            if let Some((net, _)) = &lpips {
                lpips_sum += net
                    .distance(&x, &recon.clamp(-1f32, 1f32)?)?
                    .to_dtype(DType::F64)?
                    .sum_all()?
                    .to_scalar::<f64>()?;
            }
            if let Some((net, _)) = inception.as_mut() {
                if opts.ref_stats.is_none() {
                    feats_ref.extend(inception_features(net, &x)?);
                }
                feats_rec.extend(inception_features(net, &recon)?);
            }
            if samples.len() < opts.samples {
                let recon_imgs = data::tensor_to_images(&recon)?;
                for (j, (orig, rec)) in images.iter().zip(recon_imgs).enumerate() {
                    if samples.len() >= opts.samples {
                        break;
                    }
                    // Coarse-to-fine strips for the first few images (K decodes each).
                    let progressive = match self {
                        EvalModel::Tokenizer(t) if samples.len() < 4 => {
                            let posterior = Self::posterior(opts, rows[j]);
                            let tokens = t.encode_with(&x.narrow(0, j, 1)?, posterior)?.tokens;
                            let steps = (1..=tokens.scales.len())
                                .map(|k| {
                                    Ok(data::tensor_to_images(&t.decode_prefix(&tokens, k)?)?
                                        .remove(0))
                                })
                                .collect::<Result<Vec<_>>>()?;
                            Some(strip(&steps))
                        }
                        _ => None,
                    };
                    let name = paths[rows[j]]
                        .file_name()
                        .map(|n| n.to_string_lossy().to_string())
                        .unwrap_or_default();
                    samples.push(Sample {
                        name,
                        original: orig.clone(),
                        reconstruction: rec,
                        progressive,
                    });
                }
            }
            let (c, h, w) = (3, opts.size as usize, opts.size as usize);
            let xs = x.flatten_all()?.to_vec1::<f32>()?;
            let rs = recon.flatten_all()?.to_vec1::<f32>()?;
            for i in 0..images.len() {
                let n = c * h * w;
                let (a, b) = (&xs[i * n..(i + 1) * n], &rs[i * n..(i + 1) * n]);
                for (pi, p) in protocols.iter().enumerate() {
                    let (psnr, ssim) = psnr_ssim(a, b, (c, h, w), *p);
                    sums[pi][0] += psnr;
                    sums[pi][1] += ssim;
                }
                count += 1;
            }
        }
        if count == 0 {
            return Err(Error::Invalid(format!(
                "none of the {} images could be read",
                paths.len()
            )));
        }
        let secs = t0.elapsed().as_secs_f64();
        let mean = |pi: usize, m: usize| sums[pi][m] / count as f64;

        let rfid = match &inception {
            None => Value::Null,
            Some((_, hash)) => {
                let rec = GaussianStats::fit(&feats_rec, 2048)?;
                let reference = match &opts.ref_stats {
                    Some(p) => load_stats(p)?,
                    None => GaussianStats::fit(&feats_ref, 2048)?,
                };
                if let Some(p) = &opts.save_ref_stats {
                    save_stats(p, &reference)?;
                }
                if count < 2048 {
                    events(EvalEvent::Warning(&format!("rFID from {count} images (< 2048 feature dimensions): the covariance is singular and the number is biased upwards")));
                }
                let fid = frechet_distance(&reference, &rec);
                json!({"value": fid, "images": count, "reference": match &opts.ref_stats {
                    Some(p) => format!("statistics from {}", p.display()), None => "the originals, paired".into() },
                    "inception_weights_hash": hash})
            }
        };
        let colours = if opts.colours {
            let posterior = Self::posterior(opts, 0);
            let r = super::colour_probe(opts.size, &device, |x| self.reconstruct(x, posterior))?;
            let mean_mae = r.iter().map(|c| c.mae).sum::<f64>() / r.len() as f64;
            let worst = r
                .iter()
                .max_by(|a, b| a.mae.total_cmp(&b.mae))
                .expect("30 colours");
            json!({"size": opts.size, "mean_mae": mean_mae, "worst_mae": worst.mae,
                   "worst_rgb": worst.rgb, "worst_reconstructed": worst.reconstructed, "patches": r})
        } else {
            Value::Null
        };
        let (model_json, codebook_json) = match self {
            EvalModel::Tokenizer(t) => (
                json!({"kind": "tokenizer", "weights_hash": t.hash(),
                       "codebook_size": t.codebook_size(), "tokens_per_image": tokens_per_image,
                       "bits_per_image": t.bits_per_image(tokens_per_image)}),
                json!(codebook.as_ref().map(|c| c.report())),
            ),
            EvalModel::Vae(_, path) => (json!({"kind": "vae", "path": path}), Value::Null),
        };
        let size = opts.size;
        let json = json!({
            "software": {"name": "coda-rs", "version": env!("CARGO_PKG_VERSION")},
            "model": model_json,
            "data": {
                "paths": opts.data, "images": count, "skipped": skipped,
                "resize": if opts.random_crop { format!("shorter side to {} (Lanczos3), random crop {size}, seed {}", (1.125 * size as f64).round(), opts.seed) }
                          else { format!("shorter side to {} (Lanczos3), centre crop {size}", opts.resize.unwrap_or(size).max(size)) },
            },
            "posterior": if opts.sample { format!("sample, seed {} + image index", opts.seed) } else { "mean".into() },
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
                "rfid": "pytorch-fid InceptionV3 (TF-FID graph), pool3 2048-d, bilinear resize to 299 (align_corners=False), inputs clamp((x+1)/2,0,1) as floats, unbiased covariance, Frechet distance in f64 via eigendecompositions; null without inception weights",
                "lpips": "VGG16 v0.1 (lpips package / taming vgg_lpips), inputs in [-1,1], unclamped reconstructions clamped to [-1,1] first, mean over images; null without LPIPS weights",
                "colours": "solid size x size patches of the 27 colours {0,128,255}^3 and (40,160,60), (150,120,200), (20,120,110); mean absolute error per channel of the 8-bit reconstruction (0-255); null unless asked",
            },
            "images_per_second": count as f64 / secs,
            // The convolution arithmetic: bf16 modes give slightly different numbers.
            "precision": opts.precision.name(),
        });
        Ok(EvalResult { json, samples })
    }
}

/// The report's metrics table, formatted from the results JSON (so the two always agree).
pub fn report_rows(r: &Value) -> Vec<(String, String)> {
    let m = &r["metrics"];
    let f = |v: &Value, digits: usize| format!("{:.*}", digits, v.as_f64().unwrap_or(f64::NAN));
    let mut rows = vec![
        ("images".to_string(), r["data"]["images"].to_string()),
        (
            "PSNR (uint8, truncated) dB".into(),
            f(&m["psnr"]["uint8_truncated"], 4),
        ),
        ("PSNR (float) dB".into(), f(&m["psnr"]["float"], 4)),
        ("SSIM (uint8)".into(), f(&m["ssim"]["uint8_truncated"], 4)),
        ("SSIM (float)".into(), f(&m["ssim"]["float"], 4)),
    ];
    if m["lpips"]["value"].is_number() {
        rows.push(("LPIPS (VGG)".into(), f(&m["lpips"]["value"], 4)));
    }
    if m["rfid"]["value"].is_number() {
        rows.push(("rFID".into(), f(&m["rfid"]["value"], 4)));
    }
    if m["codebook"]["usage_all"].is_number() {
        rows.push((
            "codebook usage, all scales %".into(),
            f(&m["codebook"]["usage_all"], 2),
        ));
        rows.push((
            "perplexity, all scales".into(),
            f(&m["codebook"]["perplexity_all"], 2),
        ));
        rows.push((
            "tokens per image".into(),
            r["model"]["tokens_per_image"].to_string(),
        ));
        rows.push(("bits per image".into(), f(&r["model"]["bits_per_image"], 0)));
    }
    rows.push(("images / s".into(), f(&r["images_per_second"], 2)));
    rows
}
