//! Training configuration: one flat table of keys, from a preset, a TOML file and
//! `--set key=value` overrides (applied in that order). The resolved table is saved in the run
//! folder, so that `--resume` continues with exactly the same settings.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::patchgan::PatchGanConfig;
use crate::error::{Error, Result};
use crate::quantizer::QuantizerKind;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Discriminator {
    None,
    /// taming's NLayer PatchGAN, trained from scratch.
    Patchgan,
    /// VAR / CODA's DINO ViT-S/16 feature discriminator (frozen ViT, trained heads).
    Dino,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GanRamp {
    /// CODA: the adversarial term is weighted by step / total steps.
    Linear,
    /// Full weight from `gan_start` on (taming's `disc_start`).
    None,
}

/// The architecture trained from scratch by `train-vae` and `train-vq` (adapt takes it from the
/// starting tokenizer).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSpec {
    /// Channels per resolution level; the downsampling factor is 2^(levels - 1).
    pub channels: Vec<usize>,
    pub res_blocks: usize,
    pub latent_channels: usize,
    pub mid_attention: bool,
    pub norm_groups: usize,
    /// GroupNorm epsilon (LDM / diffusers: 1e-6). A large value (e.g. 1) keeps the magnitude of
    /// low-variance features, such as the colour of a flat region, instead of rescaling it away.
    pub norm_eps: f64,
    /// Codebook size of `train-vq`.
    pub codebook_size: usize,
    /// `nearest` or `nearest_l2` (l2-normalised codes and features).
    pub quantizer: QuantizerKind,
    /// Commitment weight of `train-vq` (VQ-VAE's β).
    pub beta: f64,
    /// 1: a single-scale VQGAN bottleneck; more: VAR-style multi-scale residual quantization
    /// with scales derived from the latent size.
    pub scales: usize,
}

impl Default for ModelSpec {
    fn default() -> Self {
        Self {
            channels: vec![32, 64, 128, 128],
            res_blocks: 1,
            latent_channels: 8,
            mid_attention: false,
            norm_groups: 8,
            norm_eps: 1e-6,
            codebook_size: 1024,
            quantizer: QuantizerKind::Nearest,
            beta: 0.25,
            scales: 1,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartSample {
    Error,
    Uniform,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// The preset the run was resolved from (set by `resolve`, saved with the run).
    pub preset: Option<String>,
    /// `adapt`: the starting tokenizer folder (`coda tokenizer new`).
    pub tokenizer: Option<PathBuf>,
    /// Training images: a folder (searched recursively, ImageFolder or flat).
    pub data: Option<PathBuf>,
    /// Validation images for the periodic evaluation.
    pub val: Option<PathBuf>,
    /// The run folder: checkpoints, metrics.jsonl, eval grids, the exported model.
    pub out: Option<PathBuf>,

    /// Crop size.
    pub size: u32,
    /// Shorter side after resizing, before cropping; default round(1.125 · size) as the reference.
    pub resize: Option<u32>,
    pub flip: bool,
    /// Random scale: the shorter side drawn per sample, log-uniformly in [resize, resize_max]
    /// (the crop cut from the full picture); unset: every picture at the fixed `resize`.
    pub resize_max: Option<u32>,
    /// Colour augmentation (random channel permutation and saturation factor in [1/2, 2]).
    pub colour_aug: bool,
    /// Decoded, resized images kept in memory (MiB).
    pub cache_mb: usize,
    /// Batches decoded ahead of the model.
    pub prefetch: usize,

    /// Micro-batch size and gradient accumulation steps (the update batch is batch · accum).
    pub batch: usize,
    pub accum: usize,
    /// Optimizer updates; or `epochs` over the training folder (drop_last, as the reference).
    pub steps: Option<u64>,
    pub epochs: Option<f64>,
    pub lr: f64,
    pub lr_disc: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    pub weight_decay_disc: f64,
    pub warmup: u64,
    /// Clipping by global norm, generator and discriminator separately.
    pub clip: f64,
    pub clip_disc: f64,

    pub l1_weight: f64,
    pub mse_weight: f64,
    /// Extra weight on the chroma part of the squared error (`losses::chroma_mse`); 0 in the
    /// paper's recipe.
    pub chroma_weight: f64,
    /// LPIPS (VGG16) weight; used when `lpips` names converted weights
    /// (scripts/convert_lpips.py), otherwise the term is off and the log says so.
    pub lpips_weight: f64,
    pub lpips: Option<PathBuf>,
    pub vq_weight: f64,
    pub entropy_weight: f64,
    /// `train-vae`: KL weight, LDM-equivalent (see `losses::kl`).
    pub kl_weight: f64,
    /// Quantize a posterior sample (the reference) rather than the mean.
    pub sample_posterior: bool,
    /// `adapt`: every this many updates, move the codes no token of the batch used onto
    /// residuals their codes served worst (`training::restart`; 0 = off, the reference).
    pub restart_dead_codes: u64,
    /// Where restarted codes go: residuals sampled in proportion to their squared error
    /// ("error", k-means++ style) or uniformly ("uniform").
    pub restart_sample: RestartSample,
    /// `train-vae`: start from this VAE (a diffusers folder or a single file) instead of random
    /// weights; its architecture replaces `[model]`.
    pub init_vae: Option<PathBuf>,
    /// `train-vae`: train the decoder (and `post_quant_conv`) only; the encoder, and so the
    /// latent and its normalisation, stay as `init_vae` made them.
    pub freeze_encoder: bool,
    /// `train-vae`: Gaussian noise added to the normalised latent before decoding, its standard
    /// deviation drawn per image uniformly in [0, latent_noise]: a decoder that tolerates the
    /// small latent errors a quantizer makes (0 = off).
    pub latent_noise: f64,

    pub disc: Discriminator,
    pub patchgan: PatchGanConfig,
    /// `disc = "dino"`: DINO's `dino_deitsmall16_pretrain.pth` (or a safetensors conversion);
    /// "random" gives a random frozen ViT, for smoke tests only.
    pub dino: Option<PathBuf>,
    pub disc_weight: f64,
    pub gan_ramp: GanRamp,
    /// First update with the adversarial term (and discriminator training).
    pub gan_start: u64,
    /// The parameter whose gradient norms set the adaptive GAN weight; default: the last
    /// decoder LoRA-up (adapt) or `decoder.conv_out.weight`.
    pub adaptive_layer: Option<String>,

    pub ema: bool,
    /// EMA is a plain copy before this fraction of the run (the reference: epoch 4 of 10).
    pub ema_start: f64,

    pub seed: u64,
    pub eval_every: u64,
    pub eval_images: usize,
    pub checkpoint_every: u64,
    pub keep_checkpoints: usize,
    pub log_every: u64,
    /// Fuse LoRA into the convs in the exported tokenizer.
    pub fuse_lora: bool,

    pub model: ModelSpec,

    /// For tests of the NaN guard: updates whose loss is made NaN. Refused unless the library
    /// is built with the `internals` feature (a test hook, not a training option).
    pub inject_nan: Vec<u64>,
}

impl Default for TrainConfig {
    /// The paper's recipe (coda-method.md §6-10), without a discriminator and at 256 px.
    fn default() -> Self {
        Self {
            preset: None,
            tokenizer: None,
            data: None,
            val: None,
            out: None,
            size: 256,
            resize: None,
            flip: false,
            resize_max: None,
            colour_aug: false,
            cache_mb: 2048,
            prefetch: 2,
            batch: 16,
            accum: 1,
            steps: None,
            epochs: None,
            lr: 5e-4,
            lr_disc: 5e-4,
            betas: [0.5, 0.9],
            eps: 1e-8,
            weight_decay: 0.005,
            weight_decay_disc: 0.0005,
            warmup: 0,
            clip: 10.0,
            clip_disc: 10.0,
            l1_weight: 0.2,
            mse_weight: 1.0,
            chroma_weight: 0.0,
            lpips_weight: 1.0,
            lpips: None,
            vq_weight: 1.0,
            entropy_weight: 0.05,
            kl_weight: 1e-6,
            sample_posterior: true,
            restart_dead_codes: 0,
            restart_sample: RestartSample::Error,
            init_vae: None,
            freeze_encoder: false,
            latent_noise: 0.0,
            disc: Discriminator::None,
            patchgan: PatchGanConfig { ndf: 64, layers: 3 },
            dino: None,
            disc_weight: 1.0,
            gan_ramp: GanRamp::Linear,
            gan_start: 0,
            adaptive_layer: None,
            ema: true,
            ema_start: 0.4,
            seed: 42,
            eval_every: 1000,
            eval_images: 16,
            checkpoint_every: 1000,
            keep_checkpoints: 3,
            log_every: 10,
            fuse_lora: false,
            model: ModelSpec::default(),
            inject_nan: Vec::new(),
        }
    }
}

/// The names of the training presets (see [`crate::presets`]).
pub fn preset_names() -> Vec<&'static str> {
    crate::presets::PRESETS
        .iter()
        .filter(|p| p.train.is_some())
        .map(|p| p.name)
        .collect()
}

/// A training preset as TOML keys over the defaults.
pub fn preset(name: &str) -> Result<toml::Table> {
    let text = crate::presets::find_part(name, "training recipe", |p| p.train)?;
    Ok(text.parse::<toml::Table>().expect("presets are valid TOML"))
}

/// Merge `over` into `base`, recursing into tables.
pub fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Parse `key=value` (dotted keys reach into tables); the value is read as TOML, or as a
/// string when it is not valid TOML (paths, names).
pub fn parse_set(s: &str) -> Result<toml::Table> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| Error::Invalid(format!("--set {s}: expected key=value")))?;
    let value = value.trim();
    let parsed: toml::Value = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let mut table = toml::Table::new();
    let parts: Vec<&str> = key.trim().split('.').collect();
    let mut cur = &mut table;
    for p in &parts[..parts.len() - 1] {
        cur = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .expect("just inserted a table");
    }
    cur.insert(parts[parts.len() - 1].to_string(), parsed);
    Ok(table)
}

impl TrainConfig {
    /// Defaults, then the preset, then the file, then each override, in that order.
    pub fn resolve(
        preset_name: Option<&str>,
        file: Option<&Path>,
        sets: &[String],
    ) -> Result<Self> {
        let mut table = toml::Table::try_from(TrainConfig::default())
            .map_err(|e| Error::Invalid(format!("cannot represent the defaults: {e}")))?;
        if let Some(p) = preset_name {
            merge(&mut table, preset(p)?);
            table.insert("preset".into(), toml::Value::String(p.into()));
        }
        if let Some(f) = file {
            let text = std::fs::read_to_string(f).map_err(|e| Error::io(f, e))?;
            let t: toml::Table = text.parse().map_err(|e: toml::de::Error| Error::Config {
                path: f.into(),
                reason: e.to_string(),
            })?;
            merge(&mut table, t);
        }
        for s in sets {
            merge(&mut table, parse_set(s)?);
        }
        Self::from_table(table, file.unwrap_or(Path::new("--set")))
    }

    /// A config from a TOML table, checked (each bad value named with its allowed range).
    pub fn from_table(table: toml::Table, origin: &Path) -> Result<Self> {
        let cfg: TrainConfig =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| Error::Config {
                    path: origin.into(),
                    reason: e.to_string(),
                })?;
        cfg.check(origin)?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let t: toml::Table = text.parse().map_err(|e: toml::de::Error| Error::Config {
            path: path.into(),
            reason: e.to_string(),
        })?;
        Self::from_table(t, path)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config serialises")
    }

    fn check(&self, origin: &Path) -> Result<()> {
        let bad = |reason: String| {
            Err(Error::Config {
                path: origin.into(),
                reason,
            })
        };
        if !self.inject_nan.is_empty() && !cfg!(feature = "internals") {
            return bad(
                "inject_nan is a test hook of the NaN guard, available only in builds with the \
                 internals feature"
                    .into(),
            );
        }
        if self.batch == 0 || self.accum == 0 {
            return bad("batch and accum must be at least 1".into());
        }
        if self.size == 0 {
            return bad("size must be positive".into());
        }
        if self.steps.is_none() && self.epochs.is_none() {
            return bad("give steps or epochs".into());
        }
        // Hyper-parameters: each named with its allowed range (a NaN or infinite value would
        // otherwise poison every weight in the first update).
        let finite_in = |name: &str, v: f64, lo: f64, hi: f64, lo_open: bool, hi_open: bool| {
            let ok = v.is_finite()
                && if lo_open { v > lo } else { v >= lo }
                && if hi_open { v < hi } else { v <= hi };
            if ok {
                Ok(())
            } else {
                let (l, h) = (
                    if lo_open { "(" } else { "[" },
                    if hi_open { ")" } else { "]" },
                );
                Err(Error::Config {
                    path: origin.into(),
                    reason: format!("{name} = {v} is outside {l}{lo}, {hi}{h}"),
                })
            }
        };
        let inf = f64::INFINITY;
        finite_in("lr", self.lr, 0.0, inf, true, true)?;
        finite_in("lr_disc", self.lr_disc, 0.0, inf, true, true)?;
        finite_in("betas[0]", self.betas[0], 0.0, 1.0, false, true)?;
        finite_in("betas[1]", self.betas[1], 0.0, 1.0, false, true)?;
        finite_in("eps", self.eps, 0.0, inf, true, true)?;
        finite_in("clip", self.clip, 0.0, inf, true, true)?;
        finite_in("clip_disc", self.clip_disc, 0.0, inf, true, true)?;
        finite_in("ema_start", self.ema_start, 0.0, 1.0, false, false)?;
        for (name, v) in [
            ("weight_decay", self.weight_decay),
            ("weight_decay_disc", self.weight_decay_disc),
            ("l1_weight", self.l1_weight),
            ("mse_weight", self.mse_weight),
            ("chroma_weight", self.chroma_weight),
            ("lpips_weight", self.lpips_weight),
            ("vq_weight", self.vq_weight),
            ("entropy_weight", self.entropy_weight),
            ("kl_weight", self.kl_weight),
            ("latent_noise", self.latent_noise),
            ("disc_weight", self.disc_weight),
        ] {
            finite_in(name, v, 0.0, inf, false, true)?;
        }
        if let Some(e) = self.epochs {
            finite_in("epochs", e, 0.0, inf, true, true)?;
        }
        if self.follows_paper() && self.lpips_weight > 0.0 && self.lpips.is_none() {
            return bad(format!(
                "preset {} is the paper's recipe, which trains with LPIPS at weight {}: give the \
                 converted VGG weights (--set lpips=PATH, see scripts/convert_lpips.py), or \
                 --set lpips_weight=0 to train without it (then the recipe is not the paper's)",
                self.preset.as_deref().unwrap_or_default(),
                self.lpips_weight
            ));
        }
        Ok(())
    }

    fn follows_paper(&self) -> bool {
        self.preset
            .as_deref()
            .and_then(|p| crate::presets::find(p).ok())
            .is_some_and(|p| p.paper)
    }

    /// Where a run from a paper preset departs from the official recipe (the loss terms and the
    /// discriminator), one sentence each; empty for other runs. Callers print them as warnings.
    pub fn recipe_departures(&self) -> Vec<String> {
        if !self.follows_paper() {
            return Vec::new();
        }
        let p = self.preset.as_deref().unwrap_or_default();
        let mut out = Vec::new();
        if self.lpips_weight != 1.0 {
            out.push(format!(
                "LPIPS weight {} (the paper's recipe, preset {p}: 1): not the paper's recipe",
                self.lpips_weight
            ));
        }
        if self.disc != Discriminator::Dino {
            out.push(format!(
                "discriminator {:?} (the paper's recipe, preset {p}: the DINO discriminator): \
                 not the paper's recipe",
                self.disc
            ));
        }
        if self.disc_weight != 1.0 && self.disc != Discriminator::None {
            out.push(format!(
                "discriminator weight {} (the paper's recipe: 1): not the paper's recipe",
                self.disc_weight
            ));
        }
        out
    }

    /// Shorter side before cropping.
    pub fn resize_side(&self) -> u32 {
        self.resize
            .unwrap_or_else(|| (1.125 * self.size as f64).round() as u32)
    }

    /// Optimizer updates for a training set of `n` images.
    pub fn total_steps(&self, n: usize) -> u64 {
        match (self.steps, self.epochs) {
            (Some(s), _) => s,
            (None, Some(e)) => {
                let per_epoch = (n / (self.batch * self.accum)).max(1) as f64;
                (e * per_epoch).round().max(1.0) as u64
            }
            (None, None) => unreachable!("checked"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_files_and_overrides_compose() {
        let lpips = ["lpips=vgg.safetensors".to_string()];
        for p in preset_names() {
            let c = TrainConfig::resolve(Some(p), None, &lpips).unwrap();
            assert!(c.steps.is_some() || c.epochs.is_some(), "{p}");
        }
        let c = TrainConfig::resolve(Some("mar-16384"), None, &lpips).unwrap();
        assert_eq!((c.batch, c.accum, c.lr, c.betas), (16, 4, 5e-4, [0.5, 0.9]));
        assert_eq!(c.weight_decay, 0.005);
        // ImageNet-1k on one process: floor(1281167 / 64) = 20018 updates per epoch.
        assert_eq!(c.total_steps(1_281_167), 200_180);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("run.toml");
        std::fs::write(&f, "batch = 4\nsteps = 7\n[model]\ncodebook_size = 64\n").unwrap();
        let c = TrainConfig::resolve(
            Some("tiny-cpu"),
            Some(&f),
            &[
                "lr=0.01".into(),
                "model.scales=4".into(),
                "out=/tmp/x y".into(),
            ],
        )
        .unwrap();
        assert_eq!((c.batch, c.steps, c.lr, c.size), (4, Some(7), 0.01, 64));
        assert_eq!((c.model.codebook_size, c.model.scales), (64, 4));
        assert_eq!(c.out.as_deref(), Some(Path::new("/tmp/x y")));
        // The saved form reads back identically.
        let saved = dir.path().join("config.toml");
        std::fs::write(&saved, c.to_toml()).unwrap();
        assert_eq!(TrainConfig::load(&saved).unwrap(), c);
        // Hyper-parameters out of range are refused up front, naming the key and the range.
        for (set, key) in [
            ("lr=nan", "lr"),
            ("lr=inf", "lr"),
            ("lr=0", "lr"),
            ("betas=[0.5, 1.0]", "betas[1]"),
            ("eps=0", "eps"),
            ("clip=-1", "clip"),
            ("ema_start=1.5", "ema_start"),
            ("kl_weight=-1", "kl_weight"),
        ] {
            let e = TrainConfig::resolve(Some("tiny-cpu"), None, &[set.into(), "steps=1".into()])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("{key} = ")) && e.contains("outside"),
                "{set}: {e}"
            );
        }
        // Unknown keys are errors, not silently ignored.
        let e = TrainConfig::resolve(None, None, &["stepz=3".into()]).unwrap_err();
        assert!(e.to_string().contains("stepz"), "{e}");
    }

    #[test]
    fn paper_presets_refuse_a_silently_missing_lpips_and_name_departures() {
        let weights = [
            "lpips=/w/vgg.safetensors".to_string(),
            "dino=/w/dino.pth".to_string(),
        ];
        for p in crate::presets::PRESETS
            .iter()
            .filter(|p| p.paper)
            .map(|p| p.name)
        {
            // No LPIPS weights: refused, naming the way out.
            let e = TrainConfig::resolve(Some(p), None, &[])
                .unwrap_err()
                .to_string();
            assert!(e.contains("lpips_weight=0") && e.contains(p), "{e}");
            // The full recipe: no departures, and the preset is saved with the run.
            let c = TrainConfig::resolve(Some(p), None, &weights).unwrap();
            assert_eq!(c.preset.as_deref(), Some(p));
            assert!(
                c.recipe_departures().is_empty(),
                "{:?}",
                c.recipe_departures()
            );
            let saved = TrainConfig::from_table(toml::Table::try_from(&c).unwrap(), Path::new("x"));
            assert_eq!(saved.unwrap(), c);
            // Explicitly without LPIPS and without the discriminator: allowed, and both named.
            let c = TrainConfig::resolve(
                Some(p),
                None,
                &["lpips_weight=0".into(), "disc=none".into()],
            )
            .unwrap();
            let d = c.recipe_departures();
            assert_eq!(d.len(), 2, "{d:?}");
            assert!(
                d[0].contains("LPIPS") && d[1].contains("discriminator"),
                "{d:?}"
            );
        }
        // tiny-cpu makes no claim to the recipe.
        let c = TrainConfig::resolve(Some("tiny-cpu"), None, &[]).unwrap();
        assert!(c.recipe_departures().is_empty());
    }
}
