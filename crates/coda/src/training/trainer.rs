//! The training loop shared by `adapt`, `train-vae` and `train-vq`: gradient accumulation,
//! the adaptive GAN weight, AdamW + cosine schedule + clipping for generator and discriminator,
//! EMA, a NaN/inf guard, periodic evaluation with a reconstruction grid, JSON-lines metrics,
//! atomic checkpoints that resume exactly, and the export of the final model.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::config::{Discriminator, GanRamp, TrainConfig};
use super::dino::{random_vit, DinoConfig, DinoDisc};
use super::ema::Ema;
use super::losses;
use super::model::{Role, TrainModel};
use super::optim::{clip_factor, cosine_factor, AdamW, Group, Param};
use super::patchgan::PatchGan;
use crate::data::loader::{prefetch, resize_shorter, Augment, Batch, Sampler};
use crate::error::{Error, Result};
use crate::evaluation::lpips::Lpips;
use crate::evaluation::{CodebookStats, Protocol};
use crate::quantizer::{attention::init_parameters, QuantizerConfig, ScaleSpec};
use crate::tokenizer::{Tokenizer, TokenizerConfig, Tokens, FORMAT_VERSION};
use crate::vae::VaeConfig;

/// Consecutive non-finite updates that stop a run.
pub const MAX_BAD_STREAK: u32 = 3;

/// What one optimizer update did (means over its micro-batches).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StepLog {
    pub step: u64,
    pub total: u64,
    pub loss: f64,
    pub l1: f64,
    pub mse: f64,
    pub lpips: Option<f64>,
    pub vq: Option<f64>,
    pub entropy: Option<f64>,
    pub kl: Option<f64>,
    pub g_adv: Option<f64>,
    pub d_loss: Option<f64>,
    /// w_gan · λ: the weight the adversarial term had.
    pub gan_weight: Option<f64>,
    /// Codes moved by the dead-code restart at this update (`restart_dead_codes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarted_codes: Option<usize>,
    pub grad_norm: f64,
    pub lr: f64,
    pub seconds: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalReport {
    pub step: u64,
    pub images: usize,
    pub psnr: f64,
    pub ssim: f64,
    pub usage_per_scale: Vec<f64>,
    pub usage_all: Option<f64>,
    pub perplexity_per_scale: Vec<f64>,
    pub perplexity_all: Option<f64>,
    pub grid: PathBuf,
}

pub enum Event<'a> {
    Start {
        step: u64,
        total: u64,
        images: usize,
        trainable: usize,
        lpips: bool,
    },
    Step(&'a StepLog),
    Skipped {
        step: u64,
        reason: String,
    },
    Eval(&'a EvalReport),
    Checkpoint {
        step: u64,
        path: &'a Path,
    },
    Exported {
        path: &'a Path,
    },
}

enum DiscNet {
    PatchGan(PatchGan),
    Dino(DinoDisc),
}

impl DiscNet {
    /// Logits of a batch. The DINO discriminator's crop-or-resize coin (and crop position, shared
    /// by the batch) is drawn from `call_seed`, so that a resumed run draws the same.
    fn forward(
        &self,
        params: &HashMap<String, Tensor>,
        x: &Tensor,
        call_seed: u64,
    ) -> Result<Tensor> {
        use rand::{Rng, SeedableRng};
        Ok(match self {
            DiscNet::PatchGan(n) => n.forward(params, x)?,
            DiscNet::Dino(d) => {
                let (_, _, h, w) = x.dims4()?;
                let s = d.image_size();
                let mut rng = rand::rngs::StdRng::seed_from_u64(call_seed);
                let crop = (d.can_crop(h, w) && rng.gen::<f64>() <= 0.5)
                    .then(|| (rng.gen_range(0..=h - s), rng.gen_range(0..=w - s)));
                d.forward(params, x, crop)?
            }
        })
    }

    /// Non-trained state (DINO's spectral-norm vectors).
    fn state(&self) -> Vec<(String, Tensor)> {
        match self {
            DiscNet::PatchGan(_) => Vec::new(),
            DiscNet::Dino(d) => d.spectral_state(),
        }
    }

    fn load_state(&self, get: &dyn Fn(&str) -> Option<Tensor>) -> std::result::Result<(), String> {
        match self {
            DiscNet::PatchGan(_) => Ok(()),
            DiscNet::Dino(d) => d.load_spectral_state(get),
        }
    }
}

struct Disc {
    net: DiscNet,
    opt: AdamW,
}

impl Disc {
    fn params(&self, detached: bool) -> HashMap<String, Tensor> {
        self.opt
            .params
            .iter()
            .map(|p| {
                let t = p.var.as_tensor();
                (
                    p.name.clone(),
                    if detached { t.detach() } else { t.clone() },
                )
            })
            .collect()
    }
}

pub struct Trainer {
    cfg: TrainConfig,
    role: Role,
    arch: TokenizerConfig,
    frozen: HashMap<String, Tensor>,
    opt: AdamW,
    ema: Option<Ema>,
    disc: Option<Disc>,
    lpips: Option<Lpips>,
    sampler: Arc<Sampler>,
    val: Vec<RgbImage>,
    out: PathBuf,
    step: u64,
    total: u64,
    bad_streak: u32,
    adaptive: Option<usize>,
    device: Device,
    /// What the result depends on besides the checkpointed tensors (saved with every
    /// checkpoint, compared on resume).
    identity: RunIdentity,
    /// What changed since the resumed checkpoint (only with `allow_changes`).
    changes: Vec<String>,
}

/// How a run starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// A new run: the folder must not hold checkpoints.
    Fresh,
    /// Continue from the latest checkpoint. A change of settings, data or starting model since
    /// the checkpoint is refused with the list of changes, unless `allow_changes`.
    Resume { allow_changes: bool },
}

/// The settings, data and starting model a run's result depends on besides its checkpointed
/// tensors. Paths are not part of it (a moved data folder with the same files is the same run);
/// the cadence of logs, evaluations and checkpoints is not either.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunIdentity {
    pub total_updates: u64,
    pub images: usize,
    /// sha256 over the sorted relative paths and byte sizes of the training images.
    pub data: String,
    /// The starting tokenizer's weights hash (adapt); empty for runs from scratch (their seed
    /// is in the config).
    pub start: String,
    pub config: serde_json::Map<String, serde_json::Value>,
}

/// Keys left out of the comparison: paths, and what a run logs or keeps rather than computes.
const CADENCE_KEYS: &[&str] = &[
    "out",
    "data",
    "val",
    "tokenizer",
    "init_vae",
    "eval_every",
    "eval_images",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "prefetch",
    "cache_mb",
];

impl RunIdentity {
    fn new(
        cfg: &TrainConfig,
        total: u64,
        data_root: &Path,
        paths: &[PathBuf],
        start: String,
    ) -> Self {
        use sha2::Digest;
        let mut rel: Vec<(String, u64)> = paths
            .iter()
            .map(|p| {
                let len = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
                let r = p.strip_prefix(data_root).unwrap_or(p);
                (r.to_string_lossy().into_owned(), len)
            })
            .collect();
        rel.sort();
        let mut h = sha2::Sha256::new();
        for (r, len) in &rel {
            h.update(r.as_bytes());
            h.update([0]);
            h.update(len.to_le_bytes());
        }
        let mut config = match serde_json::to_value(cfg).expect("the config serialises") {
            serde_json::Value::Object(m) => m,
            _ => unreachable!("a struct serialises to an object"),
        };
        for k in CADENCE_KEYS {
            config.remove(*k);
        }
        Self {
            total_updates: total,
            images: paths.len(),
            data: format!("{:x}", h.finalize())[..16].to_string(),
            start,
            config,
        }
    }

    /// One line per difference, `what: saved -> now`.
    pub fn differences(&self, now: &RunIdentity) -> Vec<String> {
        let mut out = Vec::new();
        if self.total_updates != now.total_updates {
            out.push(format!(
                "total updates: {} -> {}",
                self.total_updates, now.total_updates
            ));
        }
        if self.images != now.images || self.data != now.data {
            out.push(format!(
                "training images: {} (fingerprint {}) -> {} (fingerprint {})",
                self.images, self.data, now.images, now.data
            ));
        }
        if self.start != now.start {
            out.push(format!(
                "starting tokenizer weights: hash {} -> {}",
                self.start, now.start
            ));
        }
        let mut keys: Vec<&String> = self.config.keys().chain(now.config.keys()).collect();
        keys.sort();
        keys.dedup();
        // A key newer than the saved run, at its default, changes nothing (old runs resume).
        let defaults = match serde_json::to_value(TrainConfig::default()) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => Default::default(),
        };
        for k in keys {
            let (a, b) = (self.config.get(k), now.config.get(k));
            if a.is_none() && b.is_some() && b == defaults.get(k) {
                continue;
            }
            if a != b {
                let show = |v: Option<&serde_json::Value>| {
                    v.map_or("(unset)".to_string(), |v| v.to_string())
                };
                out.push(format!("{k}: {} -> {}", show(a), show(b)));
            }
        }
        out
    }
}

/// The architecture and starting weights of a run.
pub fn initial_model(
    role: Role,
    cfg: &TrainConfig,
) -> Result<(TokenizerConfig, HashMap<String, Tensor>)> {
    match role {
        Role::Adapt => {
            let dir = cfg.tokenizer.as_ref().ok_or_else(|| {
                Error::Invalid("adapt needs a starting tokenizer (--tokenizer DIR, made by `coda tokenizer new`)".into())
            })?;
            let (config, tensors) = crate::tokenizer::create::read_folder(dir)?;
            Ok((config, tensors))
        }
        Role::Vae if cfg.init_vae.is_some() => {
            let path = cfg.init_vae.as_ref().expect("checked by the match guard");
            let vae = crate::vae::VaeWeights::load(
                path,
                &crate::vae::LoadOptions::default(),
                &Device::Cpu,
            )?;
            let quantizer =
                QuantizerConfig::new(cfg.model.codebook_size, vae.config.latent_channels);
            Ok((
                TokenizerConfig {
                    format_version: FORMAT_VERSION,
                    vae: vae.config,
                    quantizer,
                    scales: ScaleSpec::Derived { num_scales: 1 },
                    lora: None,
                    resolution: Some(cfg.size as usize),
                },
                vae.tensors,
            ))
        }
        Role::Vae | Role::Vq => {
            let m = &cfg.model;
            let mut vae = VaeConfig::ldm(m.channels.clone(), m.latent_channels);
            vae.num_res_blocks = m.res_blocks;
            vae.mid_attention = m.mid_attention;
            vae.norm_groups = m.norm_groups;
            vae.norm_eps = m.norm_eps;
            vae.validate(Path::new("[model]"))?;
            crate::limits::check(
                "the [model] section's weights",
                (vae.parameter_count() as u64).saturating_mul(4 * 4),
            )?;
            let mut quantizer = QuantizerConfig::new(m.codebook_size, m.latent_channels);
            quantizer.kind = m.quantizer;
            quantizer.beta = m.beta;
            let mut tensors = crate::vae::export::init_parameters(&vae, cfg.seed)?;
            if role == Role::Vq {
                if quantizer.kind == crate::quantizer::QuantizerKind::Attention {
                    return Err(Error::Invalid("train-vq trains nearest-neighbour quantizers: model.quantizer = \"nearest\" or \"nearest_l2\"".into()));
                }
                for (k, t) in init_parameters(&quantizer, cfg.seed.wrapping_add(7), &Device::Cpu)? {
                    tensors.insert(format!("quantizer.{k}"), t);
                }
            }
            Ok((
                TokenizerConfig {
                    format_version: FORMAT_VERSION,
                    vae,
                    quantizer,
                    scales: ScaleSpec::Derived {
                        num_scales: m.scales.max(1),
                    },
                    lora: None,
                    resolution: Some(cfg.size as usize),
                },
                tensors,
            ))
        }
    }
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

impl Trainer {
    /// Set up a run in `cfg.out`: a fresh one, or with `resume` the latest checkpoint there,
    /// refusing any change of settings, data or starting model (see [`Trainer::start`]).
    pub fn new(role: Role, cfg: TrainConfig, resume: bool) -> Result<Self> {
        let start = if resume {
            Start::Resume {
                allow_changes: false,
            }
        } else {
            Start::Fresh
        };
        Self::start(role, cfg, start)
    }

    /// Build the trainer of a run. On resume the checkpoint's [`RunIdentity`] is compared with
    /// the current one; a difference is an error that lists it, or a warning (returned by
    /// [`Trainer::changes`]) when changes are allowed.
    pub fn start(role: Role, cfg: TrainConfig, start: Start) -> Result<Self> {
        Self::start_on(role, cfg, start, &Device::Cpu)
    }

    /// [`Trainer::start`] on `device` (a GPU: every op runs as candle ops there, the quantizer's
    /// (N, V) terms recomputed chunk by chunk as on the CPU). The device is not part of the run's
    /// identity: a run may be resumed on another device.
    pub fn start_on(role: Role, cfg: TrainConfig, start: Start, device: &Device) -> Result<Self> {
        let resume = start != Start::Fresh;
        let out = cfg
            .out
            .clone()
            .ok_or_else(|| Error::Invalid("give the run folder (--out DIR)".into()))?;
        let data = cfg
            .data
            .clone()
            .ok_or_else(|| Error::Invalid("give the training images (--data DIR)".into()))?;
        let device = device.clone();
        let (arch, tensors) = initial_model(role, &cfg)?;
        if role != Role::Adapt && cfg.restart_dead_codes > 0 {
            return Err(Error::Invalid(
                "restart_dead_codes is an adapt setting (the attention quantizer)".into(),
            ));
        }
        if role != Role::Vae
            && (cfg.init_vae.is_some() || cfg.freeze_encoder || cfg.latent_noise > 0.0)
        {
            return Err(Error::Invalid(
                "init_vae, freeze_encoder and latent_noise are train-vae settings".into(),
            ));
        }
        if cfg.freeze_encoder && cfg.init_vae.is_none() {
            return Err(Error::Invalid(
                "freeze_encoder keeps a trained encoder: give it with --set init_vae=DIR".into(),
            ));
        }
        let start_hash = match role {
            Role::Adapt => crate::tokenizer::weights_hash(&tensors)?,
            Role::Vae if cfg.init_vae.is_some() => crate::tokenizer::weights_hash(&tensors)?,
            Role::Vae | Role::Vq => String::new(),
        };
        crate::limits::check(
            &format!(
                "a training update of {} x {} crops of {}x{} (batch x accum)",
                cfg.batch, cfg.accum, cfg.size, cfg.size
            ),
            crate::limits::training_bytes(
                &arch,
                cfg.batch,
                cfg.accum,
                cfg.size as usize,
                cfg.lpips.is_some() && cfg.lpips_weight > 0.0,
            ),
        )?;
        let paths = crate::data::collect_images(std::slice::from_ref(&data))?;
        let aug = Augment {
            size: cfg.size,
            resize: cfg.resize_side(),
            random_crop: true,
            flip: cfg.flip,
            resize_max: cfg.resize_max,
            colour: cfg.colour_aug,
        };
        let sampler = Arc::new(Sampler::new(paths.clone(), aug, cfg.seed, cfg.cache_mb)?);
        let total = cfg.total_steps(sampler.len());
        let identity = RunIdentity::new(&cfg, total, &data, &paths, start_hash);

        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        let mut params = Vec::new();
        let mut frozen = HashMap::new();
        for n in names {
            let t = tensors[n].to_dtype(DType::F32)?.to_device(&device)?;
            if role.is_trainable(n, cfg.freeze_encoder) {
                params.push(Param {
                    name: n.clone(),
                    var: Var::from_tensor(&t)?,
                    group: role.group(n),
                });
            } else {
                frozen.insert(n.clone(), t);
            }
        }
        if params.is_empty() {
            return Err(Error::Invalid("nothing to train: the model has no trainable weights (a tokenizer without LoRA and quantizer?)".into()));
        }
        let group = Group {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
        };
        let betas = (cfg.betas[0], cfg.betas[1]);
        let adaptive_name = cfg.adaptive_layer.clone().unwrap_or_else(|| match role {
            Role::Adapt => params
                .iter()
                .filter(|p| {
                    p.name.starts_with("decoder.up.0.")
                        && p.name.ends_with("conv2.lora_layer.up.weight")
                })
                .map(|p| p.name.clone())
                .max()
                .unwrap_or_default(),
            _ => "decoder.conv_out.weight".into(),
        });
        let adaptive = params.iter().position(|p| p.name == adaptive_name);
        if cfg.disc != Discriminator::None && adaptive.is_none() {
            return Err(Error::Invalid(format!(
                "adaptive GAN weight: '{adaptive_name}' is not a trained parameter (set adaptive_layer)"
            )));
        }
        let ema = if cfg.ema {
            Some(Ema::new(&params)?)
        } else {
            None
        };
        let opt = AdamW::new(params, vec![group, group], betas, cfg.eps)?;
        let disc = match cfg.disc {
            Discriminator::None => None,
            kind => {
                let (net, init) = match kind {
                    Discriminator::Dino => {
                        let dcfg = DinoConfig::vit_s16();
                        let (vit, origin) = match cfg.dino.as_deref() {
                            Some(p) if p == Path::new("random") => (random_vit(&dcfg, cfg.seed.wrapping_add(13))?, p.to_path_buf()),
                            Some(p) => (crate::io::read_tensors(p, &device)?, p.to_path_buf()),
                            None => {
                                return Err(Error::Invalid(
                                    "disc = \"dino\" needs the DINO ViT-S/16 weights: --set dino=PATH/dino_deitsmall16_pretrain.pth".into(),
                                ))
                            }
                        };
                        let d = DinoDisc::new(dcfg, &vit, &origin, cfg.seed.wrapping_add(17))?;
                        let init = d.init_heads(cfg.seed.wrapping_add(11))?;
                        (DiscNet::Dino(d), init)
                    }
                    _ => {
                        let n = PatchGan::new(cfg.patchgan);
                        let init = n.init(cfg.seed.wrapping_add(11), &device)?;
                        (DiscNet::PatchGan(n), init)
                    }
                };
                let dparams = init
                    .into_iter()
                    .map(|(name, t)| {
                        Ok(Param {
                            name,
                            var: Var::from_tensor(&t)?,
                            group: 0,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let g = Group {
                    lr: cfg.lr_disc,
                    weight_decay: cfg.weight_decay_disc,
                };
                Some(Disc {
                    net,
                    opt: AdamW::new(dparams, vec![g], betas, cfg.eps)?,
                })
            }
        };
        let lpips = match (&cfg.lpips, cfg.lpips_weight > 0.0) {
            (Some(p), true) => Some(Lpips::new(&crate::io::read_tensors(p, &device)?, p)?),
            _ => None,
        };
        // Refusals come before anything is written (issue #15: a refused run left its folder
        // and config.toml behind): a crop size the VAE cannot take, and a data folder in which
        // no image decodes (one decode, cached for the first batch).
        let f = arch.vae.downsample_factor();
        if cfg.size < f as u32 || !(cfg.size as usize).is_multiple_of(f) {
            return Err(Error::Invalid(format!(
                "size {}: the crops must be a positive multiple of the VAE's downsampling factor {f}",
                cfg.size
            )));
        }
        sampler.sample(0)?;
        let val = load_val(&cfg, &paths)?;
        std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        let mut t = Self {
            cfg,
            role,
            arch,
            frozen,
            opt,
            ema,
            disc,
            lpips,
            sampler,
            val,
            out,
            step: 0,
            total,
            bad_streak: 0,
            adaptive,
            device,
            identity,
            changes: Vec::new(),
        };
        if !resume {
            if let Some(c) = t.latest_checkpoint()? {
                return Err(Error::Invalid(format!(
                    "{} already holds a run (checkpoint {}): continue it with --resume, or choose another --out",
                    t.out.display(),
                    c.display()
                )));
            }
        }
        if resume {
            match t.latest_checkpoint()? {
                Some(dir) => {
                    t.load_checkpoint(&dir)?;
                    let allow = matches!(
                        start,
                        Start::Resume {
                            allow_changes: true
                        }
                    );
                    if !t.changes.is_empty() && !allow {
                        return Err(Error::Invalid(format!(
                            "--resume: the run in {} was checkpointed with other settings, data or starting model:\n  {}\nResume with the saved settings (drop the flags that change them), or pass --allow-changes to continue with the changes.",
                            t.out.display(),
                            t.changes.join("\n  ")
                        )));
                    }
                }
                None => {
                    return Err(Error::Invalid(format!(
                        "--resume: no checkpoint in {}",
                        t.out.join("checkpoints").display()
                    )))
                }
            }
        }
        crate::io::remove_temp_siblings(&t.out)?;
        crate::io::remove_temp_siblings(&t.checkpoints_dir())?;
        crate::io::write_atomic(&t.out.join("config.toml"), t.cfg.to_toml().as_bytes())?;
        t.truncate_metrics()?;
        Ok(t)
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    /// The changes since the resumed checkpoint, one line each (empty for a fresh run or an
    /// unchanged one; non-empty only when changes were allowed).
    pub fn changes(&self) -> &[String] {
        &self.changes
    }

    pub fn log_every(&self) -> u64 {
        self.cfg.log_every.max(1)
    }

    pub fn total_steps(&self) -> u64 {
        self.total
    }

    pub fn out_dir(&self) -> &Path {
        &self.out
    }

    /// Corrupt training images met so far.
    pub fn bad_images(&self) -> Vec<PathBuf> {
        self.sampler.bad_images()
    }

    /// Current (not EMA) weights of a trained parameter; the tensor shares the trainer's storage.
    pub fn param(&self, name: &str) -> Option<Tensor> {
        self.opt
            .params
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.var.as_tensor().clone())
    }

    /// EMA weights of a trained parameter (None without EMA). Like [`param`](Self::param) the
    /// tensor shares the trainer's storage, which the next update overwrites in place: `copy()`
    /// it to keep a snapshot.
    pub fn ema_param(&self, name: &str) -> Option<Tensor> {
        let e = self.ema.as_ref()?;
        e.weights
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.clone())
    }

    pub fn param_names(&self) -> Vec<String> {
        self.opt.params.iter().map(|p| p.name.clone()).collect()
    }

    /// A non-finite weight (trained or EMA) never reaches a checkpoint or an export: the save is
    /// refused, naming the tensor, and the last good checkpoint stays the latest.
    fn ensure_finite(&self) -> Result<()> {
        let trained = self.opt.params.iter().map(|p| (&p.name, p.var.as_tensor()));
        let ema = self
            .ema
            .iter()
            .flat_map(|e| e.weights.iter().map(|(n, t)| (n, t)));
        for (name, t) in trained.chain(ema) {
            let sum = t
                .abs()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            if !sum.is_finite() {
                return Err(Error::Invalid(format!(
                    "update {}: weight {name} is not finite (NaN or infinite): nothing saved; \
                     resume from the last checkpoint with a lower lr",
                    self.step
                )));
            }
        }
        Ok(())
    }

    /// Test hook of the non-finite guard: make one trained weight NaN.
    #[cfg(feature = "internals")]
    pub fn poison_weight(&self, name: &str) -> Result<()> {
        let p = self
            .opt
            .params
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| Error::Invalid(format!("no trained weight {name}")))?;
        let nan = (p.var.as_tensor() * f64::NAN)?;
        Ok(p.var.set(&nan)?)
    }

    fn model_tensors(&self, use_ema: bool) -> HashMap<String, Tensor> {
        let mut m = self.frozen.clone();
        match (&self.ema, use_ema) {
            (Some(e), true) => {
                for (n, t) in &e.weights {
                    m.insert(n.clone(), t.clone());
                }
            }
            _ => {
                for p in &self.opt.params {
                    m.insert(p.name.clone(), p.var.as_tensor().clone());
                }
            }
        }
        m
    }

    /// Train until `until` updates are done (at most the run's total), with periodic
    /// evaluation and checkpoints. The final update also evaluates, checkpoints and exports.
    /// Training runs in f32 whatever precision scope the caller is in.
    pub fn run(&mut self, until: Option<u64>, on: &mut dyn FnMut(Event)) -> Result<()> {
        crate::with_precision(crate::Precision::F32, || self.run_f32(until, on))
    }

    fn run_f32(&mut self, until: Option<u64>, on: &mut dyn FnMut(Event)) -> Result<()> {
        let until = until.unwrap_or(self.total).min(self.total);
        on(Event::Start {
            step: self.step,
            total: self.total,
            images: self.sampler.len(),
            trainable: self.opt.params.iter().map(|p| p.var.elem_count()).sum(),
            lpips: self.lpips.is_some(),
        });
        let accum = self.cfg.accum as u64;
        let rx = prefetch(
            self.sampler.clone(),
            self.step * accum,
            self.cfg.batch,
            self.cfg.prefetch,
        );
        let mut exported = false;
        while self.step < until {
            let mut batches = Vec::with_capacity(self.cfg.accum);
            for _ in 0..accum {
                let b = rx
                    .recv()
                    .map_err(|_| Error::Invalid("the data loader stopped".into()))??;
                batches.push(b);
            }
            let started = Instant::now();
            // On a worker thread of the rayon pool: every parallel kernel the update calls
            // then starts on its own thread and lets the other workers steal, instead of the
            // calling thread handing each one to the pool and sleeping until it is done. A
            // tiny-cpu update on 2 cores made ~10x fewer context switches (106-132 K -> 9-10 K
            // in 14 updates) and used 8% less CPU.
            let outcome = rayon::scope(|_| self.update(&batches))?;
            crate::io::failpoint("update", self.step);
            match outcome {
                Ok(mut log) => {
                    log.seconds = started.elapsed().as_secs_f64();
                    let s = self.step;
                    if s.is_multiple_of(self.cfg.log_every.max(1)) || s == until || s == 1 {
                        self.append_metrics(&serde_json::json!({"step": s, "train": &log}))?;
                    }
                    on(Event::Step(&log));
                }
                Err(reason) => {
                    self.append_metrics(
                        &serde_json::json!({"step": self.step, "skipped": &reason}),
                    )?;
                    on(Event::Skipped {
                        step: self.step,
                        reason: reason.clone(),
                    });
                    if self.bad_streak >= MAX_BAD_STREAK {
                        return Err(Error::Invalid(format!(
                            "training stopped: {MAX_BAD_STREAK} updates in a row had non-finite loss or gradients (last at update {}: {reason}); the weights were not changed by them and the last checkpoint is intact. Lower the learning rate or check the data.",
                            self.step
                        )));
                    }
                }
            }
            let s = self.step;
            let last = s == self.total;
            if (self.cfg.eval_every > 0 && s.is_multiple_of(self.cfg.eval_every)) || last {
                let r = self.evaluate()?;
                self.append_metrics(&serde_json::json!({"step": s, "eval": &r}))?;
                on(Event::Eval(&r));
            }
            if (self.cfg.checkpoint_every > 0 && s.is_multiple_of(self.cfg.checkpoint_every))
                || last
                || s == until
            {
                let p = self.save_checkpoint()?;
                on(Event::Checkpoint { step: s, path: &p });
            }
            if last {
                let p = self.export()?;
                on(Event::Exported { path: &p });
                exported = true;
            }
        }
        // A run resumed at its end (killed after its final checkpoint, or during the export)
        // exports again: the export is a function of the checkpoint, so the files are the same.
        if !exported && self.step == self.total {
            let p = self.export()?;
            on(Event::Exported { path: &p });
        }
        let bad = self.sampler.bad_images();
        if !bad.is_empty() {
            self.append_metrics(&serde_json::json!({"step": self.step, "corrupt_images": bad}))?;
        }
        Ok(())
    }

    /// One optimizer update over the micro-batches. Ok(Err(reason)) when the update was skipped
    /// because the loss or the gradients were not finite (the weights are left untouched).
    fn update(&mut self, batches: &[Batch]) -> Result<std::result::Result<StepLog, String>> {
        let step = self.step; // updates done before this one
        let k = batches.len() as f64;
        let model = TrainModel::build(self.role, &self.arch, &self.model_tensors(false))?;
        let gan_on = self.disc.is_some() && step >= self.cfg.gan_start;
        let ramp = match self.cfg.gan_ramp {
            GanRamp::Linear => (step as f64 / self.total.max(1) as f64).min(1.0),
            GanRamp::None => 1.0,
        };
        let n = self.opt.params.len();
        // Summed over the micro-batches; a parameter no loss reached gets zeros at the end.
        let mut grads: Vec<Option<Tensor>> = vec![None; n];
        let mut dgrads: Vec<Option<Tensor>> =
            vec![None; self.disc.as_ref().map_or(0, |d| d.opt.params.len())];
        // g · scale added to a slot: the first gradient is kept as it is when scale is 1 (the
        // usual single micro-batch), instead of zeros + g / 1.
        let accumulate = |slot: &mut Option<Tensor>, g: &Tensor, scale: f64| -> Result<()> {
            let g = if scale == 1.0 {
                g.clone()
            } else {
                (g * scale)?
            };
            *slot = Some(match slot.take() {
                None => g,
                Some(acc) => (acc + g)?,
            });
            Ok(())
        };
        let mut log = StepLog {
            step: step + 1,
            total: self.total,
            ..Default::default()
        };
        let add = |slot: &mut Option<f64>, v: f64| *slot = Some(slot.unwrap_or(0.0) + v / k);
        let restart_due = self.cfg.restart_dead_codes > 0
            && (step + 1).is_multiple_of(self.cfg.restart_dead_codes);
        let mut seen: (Vec<Tensor>, Vec<Tensor>) = Default::default();
        for b in batches {
            let x = Tensor::from_slice(&b.data, (b.batch, 3, b.size, b.size), &self.device)?;
            let seed = self.cfg.seed ^ (b.index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let fwd = model.forward(&x, self.cfg.sample_posterior, self.cfg.latent_noise, seed)?;
            let l1 = losses::l1(&x, &fwd.recon)?;
            let mse = losses::mse(&x, &fwd.recon)?;
            let mut nll = ((&l1 * self.cfg.l1_weight)? + (&mse * self.cfg.mse_weight)?)?;
            if self.cfg.chroma_weight > 0.0 {
                let c = losses::chroma_mse(&x, &fwd.recon)?;
                nll = (nll + (c * self.cfg.chroma_weight)?)?;
            }
            log.l1 += scalar(&l1)? / k;
            log.mse += scalar(&mse)? / k;
            if let Some(lp) = &self.lpips {
                let d = lp.distance(&x, &fwd.recon)?.mean_all()?;
                add(&mut log.lpips, scalar(&d)?);
                nll = (nll + (d * self.cfg.lpips_weight)?)?;
            }
            if self.cfg.inject_nan.contains(&(step + 1)) {
                nll = (nll * f64::NAN)?;
            }
            let mut other = nll.zeros_like()?;
            if let Some(q) = &fwd.quant {
                if restart_due {
                    seen.0.extend(q.ids.iter().cloned());
                    seen.1.extend(q.residuals.iter().cloned());
                }
                add(&mut log.vq, scalar(&q.loss_q)?);
                other = (other + (&q.loss_q * self.cfg.vq_weight)?)?;
                if self.role == Role::Adapt {
                    add(&mut log.entropy, scalar(&q.loss_entropy)?);
                    // Weight 0 leaves the term out of the graph: 0 x a non-finite gradient
                    // would still poison the update.
                    if self.cfg.entropy_weight > 0.0 {
                        other = (other + (&q.loss_entropy * self.cfg.entropy_weight)?)?;
                    }
                }
            }
            if self.role == Role::Vae {
                let kl = losses::kl(&fwd.mean, &fwd.logvar, 3 * b.size * b.size)?;
                add(&mut log.kl, scalar(&kl)?);
                other = (other + (kl * self.cfg.kl_weight)?)?;
            }
            let main = (&nll + &other)?;
            log.loss += scalar(&main)? / k;
            let g_main = main.backward()?;
            let mut gan_scale = 0.0;
            let mut g_adv_store = None;
            if gan_on {
                let d = self.disc.as_ref().expect("gan_on");
                let logits = d.net.forward(&d.params(true), &fwd.recon, seed ^ 1)?;
                let g_adv = losses::hinge_g(&logits)?;
                add(&mut log.g_adv, scalar(&g_adv)?);
                let store = g_adv.backward()?;
                let w = &self.opt.params[self.adaptive.expect("checked at setup")];
                let zero = w.var.as_tensor().zeros_like()?;
                let lambda = losses::adaptive_weight(
                    g_main.get(w.var.as_tensor()).unwrap_or(&zero),
                    store.get(w.var.as_tensor()).unwrap_or(&zero),
                    self.cfg.disc_weight,
                )?;
                gan_scale = ramp * lambda;
                add(&mut log.gan_weight, gan_scale);
                g_adv_store = Some(store);
            }
            for (i, p) in self.opt.params.iter().enumerate() {
                let t = p.var.as_tensor();
                if let Some(g) = g_main.get(t) {
                    accumulate(&mut grads[i], g, 1.0 / k)?;
                }
                if let Some(s) = &g_adv_store {
                    if let Some(g) = s.get(t) {
                        accumulate(&mut grads[i], g, gan_scale / k)?;
                    }
                }
            }
            if gan_on {
                // The "clean" variant of coda-method.md §13.13: D's update sees only L_D (the
                // generator's adversarial gradient never reaches the D heads).
                let d = self.disc.as_ref().expect("gan_on");
                let params = d.params(false);
                let real = d.net.forward(&params, &x, seed ^ 2)?;
                let fake = d.net.forward(&params, &fwd.recon.detach(), seed ^ 3)?;
                let ld = losses::hinge_d(&real, &fake)?;
                add(&mut log.d_loss, scalar(&ld)?);
                let store = ld.backward()?;
                for (i, p) in d.opt.params.iter().enumerate() {
                    if let Some(g) = store.get(p.var.as_tensor()) {
                        accumulate(&mut dgrads[i], g, 1.0 / k)?;
                    }
                }
            }
        }
        let fill = |slots: Vec<Option<Tensor>>, params: &[Param]| -> Result<Vec<Tensor>> {
            slots
                .into_iter()
                .zip(params)
                .map(|(g, p)| match g {
                    Some(g) => Ok(g),
                    None => Ok(p.var.as_tensor().zeros_like()?),
                })
                .collect()
        };
        let grads = fill(grads, &self.opt.params)?;
        let dgrads = match &self.disc {
            Some(d) => fill(dgrads, &d.opt.params)?,
            None => Vec::new(),
        };
        let (norm, clip) = clip_factor(&grads, self.cfg.clip)?;
        self.step += 1;
        if !log.loss.is_finite() || !norm.is_finite() {
            self.bad_streak += 1;
            return Ok(Err(format!("loss {} grad norm {norm}", log.loss)));
        }
        let (dnorm, dclip) = if gan_on {
            clip_factor(&dgrads, self.cfg.clip_disc)?
        } else {
            (0.0, 1.0)
        };
        if !dnorm.is_finite() {
            self.bad_streak += 1;
            return Ok(Err(format!("discriminator grad norm {dnorm}")));
        }
        self.bad_streak = 0;
        let factor = cosine_factor(step, self.cfg.warmup, self.total);
        self.opt.step(&grads, factor, clip)?;
        if let Some(e) = &mut self.ema {
            let copy = (step as f64) < self.cfg.ema_start * self.total as f64;
            // The official rule counts the updates before this one (`global_step` is
            // incremented after the EMA call); `opt.t` already includes this update.
            e.update(&self.opt.params, self.opt.t - 1, copy)?;
        }
        if restart_due {
            let n = super::restart::restart_dead_codes(
                &mut self.opt,
                self.ema.as_mut(),
                &seen.0,
                &seen.1,
                self.cfg.seed ^ (step + 1).wrapping_mul(0xA24B_AED4_963E_E407),
                self.cfg.restart_sample == super::config::RestartSample::Error,
            )?;
            log.restarted_codes = Some(n);
        }
        if gan_on {
            self.disc
                .as_mut()
                .expect("gan_on")
                .opt
                .step(&dgrads, factor, dclip)?;
        }
        debug_assert_eq!(grads.len(), n);
        log.grad_norm = norm;
        log.lr = self.cfg.lr * factor;
        Ok(Ok(log))
    }

    /// PSNR / SSIM (uint8 truncation) and codebook usage of the EMA model on the validation
    /// images; writes a grid of originals (top) and reconstructions (bottom).
    pub fn evaluate(&self) -> Result<EvalReport> {
        crate::with_precision(crate::Precision::F32, || self.evaluate_f32())
    }

    fn evaluate_f32(&self) -> Result<EvalReport> {
        let model = TrainModel::build(self.role, &self.arch, &self.model_tensors(true))?;
        let mut stats = CodebookStats::new(self.arch.quantizer.codebook_size);
        let (mut psnr, mut ssim) = (0f64, 0f64);
        let mut grid_pairs: Vec<(RgbImage, RgbImage)> = Vec::new();
        let mut has_tokens = false;
        for chunk in self.val.chunks(self.cfg.batch.max(1)) {
            let x = crate::data::images_to_tensor(chunk, &self.device)?;
            let (recon, ids, scales) = model.reconstruct(&x)?;
            let (c, h, w) = (3, x.dim(2)?, x.dim(3)?);
            let xs = x.flatten_all()?.to_vec1::<f32>()?;
            let rs = recon.flatten_all()?.to_vec1::<f32>()?;
            let per = c * h * w;
            for i in 0..chunk.len() {
                let (p, s) = crate::evaluation::protocol::psnr_ssim(
                    &xs[i * per..(i + 1) * per],
                    &rs[i * per..(i + 1) * per],
                    (c, h, w),
                    Protocol::Uint8Truncated,
                );
                psnr += p;
                ssim += s;
            }
            if !ids.is_empty() {
                stats.add(&Tokens { scales, ids })?;
                has_tokens = true;
            }
            let recon_imgs = crate::data::tensor_to_images(&recon)?;
            for (o, r) in chunk.iter().zip(recon_imgs) {
                if grid_pairs.len() < 8 {
                    grid_pairs.push((o.clone(), r));
                }
            }
        }
        let n = self.val.len().max(1) as f64;
        let grid = self
            .out
            .join("eval")
            .join(format!("step-{:08}.png", self.step));
        if let Some(parent) = grid.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        if let Some((first, _)) = grid_pairs.first() {
            let (w, h) = first.dimensions();
            let mut img = RgbImage::new(w * grid_pairs.len() as u32, h * 2);
            for (i, (o, r)) in grid_pairs.iter().enumerate() {
                image::imageops::replace(&mut img, o, (i as u32 * w) as i64, 0);
                image::imageops::replace(&mut img, r, (i as u32 * w) as i64, h as i64);
            }
            crate::data::save_png(&grid, &img)?;
        }
        let report = has_tokens.then(|| stats.report());
        Ok(EvalReport {
            step: self.step,
            images: self.val.len(),
            psnr: psnr / n,
            ssim: ssim / n,
            usage_per_scale: report
                .as_ref()
                .map(|r| r.usage_per_scale.clone())
                .unwrap_or_default(),
            usage_all: report.as_ref().map(|r| r.usage_all),
            perplexity_per_scale: report
                .as_ref()
                .map(|r| r.perplexity_per_scale.clone())
                .unwrap_or_default(),
            perplexity_all: report.as_ref().map(|r| r.perplexity_all),
            grid,
        })
    }

    fn checkpoints_dir(&self) -> PathBuf {
        self.out.join("checkpoints")
    }

    /// Complete checkpoints, oldest first (a crash mid-save leaves only a `.tmp-` folder).
    fn checkpoints(&self) -> Result<Vec<PathBuf>> {
        let dir = self.checkpoints_dir();
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(&dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .map(|n| n.starts_with("step-"))
                    .unwrap_or(false)
                    && p.join("state.json").exists()
            })
            .collect();
        v.sort();
        Ok(v)
    }

    pub fn latest_checkpoint(&self) -> Result<Option<PathBuf>> {
        Ok(self.checkpoints()?.pop())
    }

    /// Weights, EMA, optimizer moments (G and D), discriminator and counters, written to a
    /// temporary folder that is renamed into place; older checkpoints beyond the limit go.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        self.ensure_finite()?;
        let dir = self.checkpoints_dir();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let name = format!("step-{:08}", self.step);
        let tmp = dir.join(format!(".coda-tmp-{name}"));
        let fin = dir.join(&name);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut t: Vec<(String, Tensor)> = Vec::new();
        for p in &self.opt.params {
            t.push((format!("param/{}", p.name), p.var.as_tensor().clone()));
        }
        if let Some(e) = &self.ema {
            for (n, w) in &e.weights {
                t.push((format!("ema/{n}"), w.clone()));
            }
        }
        for (k, v) in self.opt.state() {
            t.push((format!("opt/{k}"), v));
        }
        if let Some(d) = &self.disc {
            for p in &d.opt.params {
                t.push((format!("disc/{}", p.name), p.var.as_tensor().clone()));
            }
            for (k, v) in d.opt.state() {
                t.push((format!("disc_opt/{k}"), v));
            }
            for (k, v) in d.net.state() {
                t.push((format!("disc_state/{k}"), v));
            }
        }
        crate::io::write_safetensors(&tmp.join("state.safetensors"), &t, None)?;
        crate::io::failpoint("checkpoint-half-written", self.step);
        let state = serde_json::json!({
            "step": self.step,
            "total": self.total,
            "opt_t": self.opt.t,
            "disc_opt_t": self.disc.as_ref().map(|d| d.opt.t),
            "bad_streak": self.bad_streak,
            "run": &self.identity,
        });
        crate::io::write_atomic(
            &tmp.join("state.json"),
            serde_json::to_string_pretty(&state)
                .expect("json")
                .as_bytes(),
        )?;
        if fin.exists() {
            std::fs::remove_dir_all(&fin).map_err(|e| Error::io(&fin, e))?;
        }
        std::fs::rename(&tmp, &fin).map_err(|e| Error::io(&fin, e))?;
        crate::io::failpoint("checkpoint-written", self.step);
        let all = self.checkpoints()?;
        let keep = self.cfg.keep_checkpoints.max(1);
        if all.len() > keep {
            for old in &all[..all.len() - keep] {
                std::fs::remove_dir_all(old).map_err(|e| Error::io(old, e))?;
            }
        }
        Ok(fin)
    }

    fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let sp = dir.join("state.json");
        let text = std::fs::read_to_string(&sp).map_err(|e| Error::io(&sp, e))?;
        let state: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
                path: sp.clone(),
                reason: e.to_string(),
            })?;
        let wp = dir.join("state.safetensors");
        let t = crate::io::read_tensors(&wp, &self.device)?;
        let bad = |reason: String| Error::Checkpoint {
            path: wp.clone(),
            reason,
        };
        let get = |k: &str| -> Option<Tensor> { t.get(k).cloned() };
        for p in &self.opt.params {
            let key = format!("param/{}", p.name);
            let v = get(&key).ok_or_else(|| bad(format!("missing {key}")))?;
            if v.dims() != p.var.dims() {
                return Err(bad(format!(
                    "{key}: shape {:?}, the model has {:?}",
                    v.dims(),
                    p.var.dims()
                )));
            }
            p.var.set(&v)?;
        }
        if let Some(e) = &mut self.ema {
            for (n, w) in e.weights.iter_mut() {
                *w = get(&format!("ema/{n}")).ok_or_else(|| bad(format!("missing ema/{n}")))?;
            }
        }
        let u = |k: &str| state.get(k).and_then(|v| v.as_u64());
        self.opt
            .load_state(&|k| get(&format!("opt/{k}")), u("opt_t").unwrap_or(0))
            .map_err(bad)?;
        if let Some(d) = &mut self.disc {
            for p in &d.opt.params {
                let key = format!("disc/{}", p.name);
                p.var.set(&get(&key).ok_or_else(|| {
                    bad(format!(
                        "missing {key} (was the run started with another discriminator?)"
                    ))
                })?)?;
            }
            d.opt
                .load_state(
                    &|k| get(&format!("disc_opt/{k}")),
                    u("disc_opt_t").unwrap_or(0),
                )
                .map_err(bad)?;
            d.net
                .load_state(&|k| get(&format!("disc_state/{k}")))
                .map_err(bad)?;
        }
        self.step = u("step").ok_or_else(|| bad("state.json has no step".into()))?;
        self.changes = match state.get("run") {
            Some(v) => {
                let saved: RunIdentity =
                    serde_json::from_value(v.clone()).map_err(|e| Error::Checkpoint {
                        path: sp.clone(),
                        reason: format!("run: {e}"),
                    })?;
                saved.differences(&self.identity)
            }
            None => {
                tracing::warn!(
                    "{}: a checkpoint from before run identities; settings not compared",
                    sp.display()
                );
                Vec::new()
            }
        };
        self.bad_streak = u("bad_streak").unwrap_or(0) as u32;
        Ok(())
    }

    fn append_metrics(&self, v: &serde_json::Value) -> Result<()> {
        let p = self.out.join("metrics.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map_err(|e| Error::io(&p, e))?;
        writeln!(f, "{v}").map_err(|e| Error::io(&p, e))
    }

    /// On resume, drop log lines written after the checkpoint (they will be written again).
    fn truncate_metrics(&self) -> Result<()> {
        let p = self.out.join("metrics.jsonl");
        if !p.exists() {
            return Ok(());
        }
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                    .map(|s| s <= self.step)
                    .unwrap_or(false)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        crate::io::write_atomic(&p, kept.as_bytes())
    }

    /// Write the trained model (EMA weights): a tokenizer folder (adapt, train-vq) or a
    /// diffusers VAE folder whose scaling and shift factors are measured on training crops
    /// (train-vae).
    pub fn export(&self) -> Result<PathBuf> {
        self.ensure_finite()?;
        let mut tensors = self.model_tensors(true);
        match self.role {
            Role::Vae => {
                let dir = self.out.join("vae");
                let mut vae = self.arch.vae.clone();
                // A frozen encoder keeps its latent, so the starting VAE's normalisation stays
                // (a tokenizer made on it keeps working on the new decoder).
                if !self.cfg.freeze_encoder {
                    let (shift, scale) = self.latent_statistics(&tensors)?;
                    vae.shift_factor = shift;
                    vae.scaling_factor = scale;
                }
                let only_vae: HashMap<String, Tensor> = tensors
                    .into_iter()
                    .filter(|(k, _)| !k.starts_with("quantizer."))
                    .collect();
                crate::vae::export::write_diffusers(&dir, &vae, &only_vae, self.cfg.size as usize)?;
                Ok(dir)
            }
            Role::Adapt | Role::Vq => {
                let dir = self.out.join("tokenizer");
                let mut config = self.arch.clone();
                config.resolution = Some(self.cfg.size as usize);
                if self.cfg.fuse_lora && config.lora.is_some() {
                    crate::vae::lora::fuse(&mut tensors)?;
                    config.lora = None;
                }
                Tokenizer::save(&dir, &config, &tensors)?;
                Ok(dir)
            }
        }
    }

    /// Mean and 1/std of the posterior means over up to 64 training crops: the latent
    /// normalisation a downstream quantizer or generator expects (as SD's scaling factor).
    fn latent_statistics(&self, tensors: &HashMap<String, Tensor>) -> Result<(f64, f64)> {
        let model = TrainModel::build(Role::Vae, &self.arch, tensors)?;
        let n = 64usize.min(self.sampler.len().max(8));
        let b = self.sampler.batch(u64::MAX / 1024, n)?;
        let x = Tensor::from_slice(&b.data, (b.batch, 3, b.size, b.size), &self.device)?;
        let z = model
            .vae
            .encode(&x)?
            .mean
            .flatten_all()?
            .to_dtype(DType::F64)?;
        let mean = z.mean_all()?.to_scalar::<f64>()?;
        let var = z
            .broadcast_sub(&Tensor::new(mean, &self.device)?)?
            .sqr()?
            .mean_all()?
            .to_scalar::<f64>()?;
        Ok((mean, 1.0 / var.sqrt().max(1e-8)))
    }
}

/// Validation images, centre-cropped after the training resize; without a validation folder,
/// the first training images (the log says so).
fn load_val(cfg: &TrainConfig, train: &[PathBuf]) -> Result<Vec<RgbImage>> {
    let paths = match &cfg.val {
        Some(v) => crate::data::collect_images(std::slice::from_ref(v))?,
        None => {
            tracing::warn!("no --val folder: evaluating on training images");
            train.to_vec()
        }
    };
    let s = cfg.size;
    let mut out = Vec::new();
    for p in paths {
        if out.len() >= cfg.eval_images {
            break;
        }
        match crate::data::load_image(&p) {
            Ok(img) => {
                out.push(crate::data::center_crop(
                    &resize_shorter(&img, cfg.resize_side()),
                    s,
                ));
            }
            Err(e) => tracing::warn!("skipping validation image: {e}"),
        }
    }
    Ok(out)
}
