//! The CODA tokenizer: VAE (with LoRA) + multi-scale attention quantizer, stored as a folder
//! with `config.json` and `model.safetensors`; images to token ids and back.

pub mod config;
pub mod create;
#[cfg(feature = "default-tokenizer")]
mod embedded;
#[cfg(feature = "default-tokenizer")]
pub use embedded::DEFAULT_TOKENIZER_NAME;
mod images;
pub mod import;
pub mod store;
pub mod token_file;
pub mod tokens;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sha2::Digest;

pub use config::{TokenizerConfig, FORMAT_VERSION};
pub use images::{EncodeOptions, DEFAULT_BATCH};
pub use tokens::Tokens;

use crate::error::{Error, Result};
use crate::kernels::Precision;
use crate::quantizer::{CodaQuantizer, CodeTables};
use crate::vae::AutoencoderKl;

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// How to turn the posterior into the latent that gets quantized.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Posterior {
    /// The mean: deterministic tokens (the default).
    #[default]
    Mean,
    /// A seeded sample, as the reference does in training and evaluation.
    Sample(u64),
}

impl Posterior {
    /// The latent this choice takes from an encoder's posterior.
    pub fn latent(self, post: &crate::vae::Posterior) -> Result<Tensor> {
        match self {
            Posterior::Mean => Ok(post.mean.clone()),
            Posterior::Sample(seed) => post.sample(seed),
        }
    }
}

/// Everything one encode pass produces.
#[derive(Clone, Debug)]
pub struct Encoded {
    pub tokens: Tokens,
    /// The normalised continuous latent f.
    pub latent: Tensor,
    /// The quantized normalised latent f̂.
    pub latent_hat: Tensor,
}

/// A loaded tokenizer. It is `Send + Sync`: one instance can serve several threads at once.
/// Its precision and thread pool belong to the instance (and a call may override the
/// precision), never to the process.
pub struct Tokenizer {
    config: TokenizerConfig,
    vae: AutoencoderKl,
    quantizer: CodaQuantizer,
    tables: CodeTables,
    hash: String,
    precision: Precision,
    pool: Option<std::sync::Arc<rayon::ThreadPool>>,
}

/// A short content hash of the weights (sha256 over names, shapes and f32 values in name order),
/// recorded in token files so that tokens are never decoded with the wrong tokenizer unnoticed.
pub fn weights_hash(tensors: &HashMap<String, Tensor>) -> Result<String> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut h = sha2::Sha256::new();
    for n in names {
        let t = tensors[n]
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_device(&Device::Cpu)?;
        h.update(n.as_bytes());
        h.update(format!("{:?}", tensors[n].dims()).as_bytes());
        for v in t.to_vec1::<f32>()? {
            h.update(v.to_le_bytes());
        }
    }
    Ok(h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn parse_config(text: &str, origin: &Path) -> Result<TokenizerConfig> {
    let config: TokenizerConfig = serde_json::from_str(text).map_err(|e| Error::Config {
        path: origin.into(),
        reason: e.to_string(),
    })?;
    if config.format_version != FORMAT_VERSION {
        return Err(Error::Config {
            path: origin.into(),
            reason: format!(
                "format_version {} (this build reads {FORMAT_VERSION})",
                config.format_version
            ),
        });
    }
    config.validate(origin)?;
    Ok(config)
}

impl Tokenizer {
    /// Load a tokenizer folder. LoRA adapters are fused into the convs (exact) for speed.
    pub fn from_dir(dir: &Path, device: &Device) -> Result<Self> {
        if !dir.exists() {
            return Err(Error::NotFound { path: dir.into() });
        }
        let cfg_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let config = parse_config(&text, &cfg_path)?;
        let weights = dir.join(WEIGHTS_FILE);
        let tensors = crate::io::read_tensors(&weights, device)?;
        Self::from_tensors(config, tensors, &weights, true)
    }

    /// Load a tokenizer from the contents of its two files (e.g. embedded in a binary); `origin`
    /// names it in errors.
    pub fn from_bytes(
        config_json: &str,
        safetensors: &[u8],
        origin: &Path,
        device: &Device,
    ) -> Result<Self> {
        let config = parse_config(config_json, origin)?;
        let tensors = candle_core::safetensors::load_buffer(safetensors, device).map_err(|e| {
            Error::Checkpoint {
                path: origin.into(),
                reason: format!("not a valid safetensors buffer ({e})"),
            }
        })?;
        let tensors = tensors
            .into_iter()
            .map(|(k, t)| {
                let t = t.to_dtype(DType::F32)?;
                crate::io::check_finite(&k, &t, origin)?;
                Ok((k, t))
            })
            .collect::<Result<HashMap<_, _>>>()?;
        Self::from_tensors(config, tensors, origin, true)
    }

    /// Build from a config and weights (canonical VAE names, LoRA, `quantizer.*`), checking every
    /// tensor first. `origin` names the source in errors.
    pub fn from_tensors(
        config: TokenizerConfig,
        mut tensors: HashMap<String, Tensor>,
        origin: &Path,
        fuse_lora: bool,
    ) -> Result<Self> {
        config.vae.validate(origin)?;
        if config.quantizer.dim != config.vae.latent_channels {
            return Err(Error::Config {
                path: origin.into(),
                reason: format!(
                    "quantizer dim {} != VAE latent channels {}",
                    config.quantizer.dim, config.vae.latent_channels
                ),
            });
        }
        crate::io::check_tensor_shapes(&config.parameter_shapes(), &tensors, origin)?;
        let mut hash = weights_hash(&tensors)?;
        if config.quantizer.assign != crate::quantizer::AssignRule::Attention {
            // Another rule writes other tokens from the same weights: a store or token file
            // made with one must not be resumed or checked against the other.
            use sha2::Digest;
            let h = sha2::Sha256::digest(format!("{hash} assign={:?}", config.quantizer.assign));
            hash = h.iter().take(8).map(|b| format!("{b:02x}")).collect();
        }
        if fuse_lora {
            crate::vae::lora::fuse(&mut tensors)?;
        }
        let device = tensors
            .values()
            .next()
            .map(|t| t.device().clone())
            .unwrap_or(Device::Cpu);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        let vae = AutoencoderKl::new(config.vae.clone(), vb.clone())?;
        let quantizer = CodaQuantizer::new(config.quantizer.clone(), vb.pp("quantizer"))?;
        let tables = quantizer.tables()?;
        Ok(Self {
            config,
            vae,
            quantizer,
            tables,
            hash,
            precision: Precision::F32,
            pool: None,
        })
    }

    /// The arithmetic of this tokenizer's inference convolutions (f32 by default). The bf16
    /// modes need AMX and are refused elsewhere.
    pub fn with_precision(mut self, precision: Precision) -> Result<Self> {
        self.precision = precision.check_supported()?;
        Ok(self)
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Run this tokenizer's work on its own pool of `threads` threads instead of rayon's global
    /// pool (0: rayon's default count). Tokens do not depend on the thread count.
    pub fn with_threads(mut self, threads: usize) -> Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("coda-{i}"))
            .build()
            .map_err(|e| Error::Invalid(format!("cannot start {threads} threads: {e}")))?;
        self.pool = Some(std::sync::Arc::new(pool));
        Ok(self)
    }

    /// Run model work in this tokenizer's pool and precision (or `precision` for this call).
    fn run<T: Send>(&self, precision: Option<Precision>, f: impl FnOnce() -> T + Send) -> T {
        let p = precision.unwrap_or(self.precision);
        match &self.pool {
            Some(pool) => pool.install(|| crate::kernels::with_precision(p, f)),
            None => crate::kernels::with_precision(p, f),
        }
    }

    /// Write a tokenizer folder (config.json + model.safetensors) atomically as a folder: a
    /// crash leaves the previous folder or the new one. An existing tokenizer folder is
    /// replaced whole; any other non-empty folder is refused.
    pub fn save(
        dir: &Path,
        config: &TokenizerConfig,
        tensors: &HashMap<String, Tensor>,
    ) -> Result<()> {
        crate::io::check_tensor_shapes(&config.parameter_shapes(), tensors, dir)?;
        let mut named: Vec<(String, Tensor)> = tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let json = serde_json::to_string_pretty(config).expect("config serialises");
        crate::io::write_dir_atomic(dir, CONFIG_FILE, |tmp| {
            crate::io::write_safetensors(&tmp.join(WEIGHTS_FILE), &named, None)?;
            crate::io::write_atomic(&tmp.join(CONFIG_FILE), json.as_bytes())
        })
    }

    pub fn config(&self) -> &TokenizerConfig {
        &self.config
    }

    pub fn vae(&self) -> &AutoencoderKl {
        &self.vae
    }

    pub fn quantizer(&self) -> &CodaQuantizer {
        &self.quantizer
    }

    pub fn hash(&self) -> &str {
        &self.hash
    }

    pub fn device(&self) -> &Device {
        self.vae.device()
    }

    pub fn codebook_size(&self) -> usize {
        self.config.quantizer.codebook_size
    }

    /// Bits per image: tokens x log2(V).
    pub fn bits_per_image(&self, tokens_per_image: usize) -> f64 {
        tokens_per_image as f64 * (self.codebook_size() as f64).log2()
    }

    /// The scales for an image of H x W pixels.
    pub fn scales_for_image(&self, h: usize, w: usize) -> Result<Vec<(usize, usize)>> {
        let f = self.config.vae.downsample_factor();
        if h == 0 || w == 0 || !h.is_multiple_of(f) || !w.is_multiple_of(f) {
            return Err(Error::Invalid(format!(
                "image size {w}x{h} is not a multiple of the tokenizer's downsampling factor {f}"
            )));
        }
        Ok(self.config.scales.for_latent(h / f, w / f))
    }

    /// Images in [-1, 1], (B, 3, H, W) -> token ids (posterior mean).
    pub fn encode(&self, images: &Tensor) -> Result<Tokens> {
        Ok(self.encode_with(images, Posterior::Mean)?.tokens)
    }

    pub fn encode_with(&self, images: &Tensor, posterior: Posterior) -> Result<Encoded> {
        self.encode_in(images, posterior, None)
    }

    /// As [`encode_with`](Self::encode_with), in `precision` for this call (None: the
    /// tokenizer's).
    pub fn encode_in(
        &self,
        images: &Tensor,
        posterior: Posterior,
        precision: Option<Precision>,
    ) -> Result<Encoded> {
        self.run(precision, || self.encode_now(images, posterior))
    }

    fn encode_now(&self, images: &Tensor, posterior: Posterior) -> Result<Encoded> {
        let (_, _, h, w) = images.dims4()?;
        let scales = self.scales_for_image(h, w)?;
        let post = self.vae.encode(images)?;
        let z = posterior.latent(&post)?;
        let latent = self.vae.normalize(&z)?;
        let (ids, latent_hat) = self.quantizer.encode(&self.tables, &latent, &scales)?;
        Ok(Encoded {
            tokens: Tokens { scales, ids },
            latent,
            latent_hat,
        })
    }

    /// Check tokens against this tokenizer: the schedule for their latent size, shapes, id range.
    pub fn validate(&self, tokens: &Tokens) -> Result<()> {
        let (h, w) = tokens.latent_size();
        let expected = self.config.scales.for_latent(h, w);
        if tokens.scales != expected {
            return Err(Error::Invalid(format!(
                "token scales {:?} do not match the tokenizer's schedule {:?} for a {h}x{w} latent",
                tokens.scales, expected
            )));
        }
        let b = tokens.batch();
        let v = self.codebook_size() as u32;
        for (k, (ids, &(sh, sw))) in tokens.ids.iter().zip(&tokens.scales).enumerate() {
            if ids.dims() != [b, sh, sw] {
                return Err(Error::Invalid(format!(
                    "scale_{k} has shape {:?}, expected [{b}, {sh}, {sw}]",
                    ids.dims()
                )));
            }
            let max = ids
                .to_dtype(DType::U32)?
                .flatten_all()?
                .max(0)?
                .to_scalar::<u32>()?;
            if max >= v {
                return Err(Error::Invalid(format!(
                    "scale_{k} holds id {max}, but the codebook has {v} codes"
                )));
            }
        }
        Ok(())
    }

    /// The quantized normalised latent f̂ from the first `k` scales.
    pub fn latent_from_tokens(&self, tokens: &Tokens, k: usize) -> Result<Tensor> {
        self.validate(tokens)?;
        if k == 0 || k > tokens.scales.len() {
            return Err(Error::Invalid(format!(
                "cannot decode from {k} of {} scales",
                tokens.scales.len()
            )));
        }
        Ok(self
            .quantizer
            .decode(&self.tables, &tokens.ids[..k], tokens.latent_size())?)
    }

    /// f̂ -> images (unclamped, [-1, 1] scale).
    pub fn decode_latent(&self, latent_hat: &Tensor) -> Result<Tensor> {
        self.run(None, || self.vae.decode(&self.vae.denormalize(latent_hat)?))
    }

    /// As [`decode_prefix`](Self::decode_prefix), in `precision` for this call (None: the
    /// tokenizer's).
    pub fn decode_in(
        &self,
        tokens: &Tokens,
        k: usize,
        precision: Option<Precision>,
    ) -> Result<Tensor> {
        self.run(precision, || {
            let latent_hat = self.latent_from_tokens(tokens, k)?;
            self.vae.decode(&self.vae.denormalize(&latent_hat)?)
        })
    }

    pub fn decode(&self, tokens: &Tokens) -> Result<Tensor> {
        self.decode_prefix(tokens, tokens.scales.len())
    }

    /// Coarse-to-fine: decode from the first `k` scales only.
    pub fn decode_prefix(&self, tokens: &Tokens, k: usize) -> Result<Tensor> {
        self.decode_in(tokens, k, None)
    }
}

/// The file names recorded as a token file's sources.
pub fn source_names(paths: &[PathBuf]) -> Vec<String> {
    paths.iter().map(|p| p.display().to_string()).collect()
}
