//! `coda import`: official CODA checkpoints (the reference's `quantizer_ema.pth` and
//! `vae_ema.pth` state dicts) into a tokenizer folder. Sizes (V, C, d_a, LoRA rank, which convs
//! carry LoRA) are read from the tensors; the preset supplies the rest of the paper's settings.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};

use super::config::{TokenizerConfig, FORMAT_VERSION};
use crate::error::{Error, Result};
use crate::quantizer::{NormKind, QuantizerConfig, ScaleSpec};
use crate::vae::{layout, LoadOptions, LoraConfig, VaeWeights};

/// The paper's two configurations (coda-method.md §10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OfficialPreset {
    Mar,
    Flux,
}

impl std::str::FromStr for OfficialPreset {
    type Err = Error;
    /// A preset name or alias of the table in [`crate::presets`] with the paper's settings.
    fn from_str(s: &str) -> Result<Self> {
        let name = crate::presets::find_part(s, "official tokenizer configuration", |p| {
            p.tokenizer.map(|_| p.name)
        })?;
        Ok(if name == "flux-65536" {
            Self::Flux
        } else {
            Self::Mar
        })
    }
}

impl OfficialPreset {
    fn spec(self) -> &'static crate::presets::PresetSpec {
        let name = match self {
            Self::Mar => "mar-16384",
            Self::Flux => "flux-65536",
        };
        crate::presets::find(name).expect("the official presets are in the table")
    }

    fn tokenizer(self) -> crate::presets::TokenizerPreset {
        self.spec()
            .tokenizer
            .expect("official presets have tokenizer settings")
    }

    pub fn scales(self) -> Vec<usize> {
        self.tokenizer().scales.to_vec()
    }

    pub fn lora_modules(self) -> Vec<String> {
        self.tokenizer()
            .lora_modules
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    /// (scaling, shift) of the latent normalisation: the VAE architecture's.
    pub fn normalisation(self) -> (f64, f64) {
        let vae = self
            .spec()
            .vae
            .expect("official presets name their VAE")
            .config();
        (vae.scaling_factor, vae.shift_factor)
    }

    pub fn codebook_size(self) -> usize {
        self.tokenizer().codebook_size
    }
}

/// The latent normalisation a diffusers base VAE declares in its config.json (`scaling_factor`,
/// `shift_factor`; null or absent shift = 0), as the reference's train_flux.py reads it from the
/// VAE it loads; None for a single-file checkpoint or a config without `scaling_factor`, where
/// the preset's values (the released VAEs') apply.
fn base_normalisation(base_vae: &Path) -> Result<Option<(f64, f64)>> {
    let cfg = base_vae.join("config.json");
    if !base_vae.is_dir() || !cfg.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&cfg).map_err(|e| Error::io(&cfg, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: cfg.clone(),
        reason: e.to_string(),
    })?;
    let Some(scale) = v.get("scaling_factor").and_then(|s| s.as_f64()) else {
        return Ok(None);
    };
    let shift = v
        .get("shift_factor")
        .and_then(|s| s.as_f64())
        .unwrap_or(0.0);
    Ok(Some((scale, shift)))
}

/// Read an official checkpoint into a tokenizer config and weights (not yet saved).
pub fn import_official(
    preset: OfficialPreset,
    base_vae: &Path,
    quantizer_path: &Path,
    vae_weights_path: &Path,
    scales: Option<Vec<usize>>,
    device: &Device,
) -> Result<(TokenizerConfig, HashMap<String, Tensor>)> {
    let (scale, shift) = base_normalisation(base_vae)?.unwrap_or(preset.normalisation());
    let opts = LoadOptions {
        scaling_factor: Some(scale),
        shift_factor: Some(shift),
        ..Default::default()
    };
    let base = VaeWeights::load(base_vae, &opts, device)?;
    let mut tensors = base.tensors.clone();

    // vae_ema.pth: the whole VAE with LoRACompatibleConv layers, in the base's key layout.
    let raw = layout::strip_vae_prefix(crate::io::read_tensors(vae_weights_path, device)?);
    let raw = match layout::detect_layout(raw.keys()) {
        layout::KeyLayout::Diffusers => layout::diffusers_state_to_ldm(raw)?,
        layout::KeyLayout::Ldm => raw,
    };
    let mut lora_paths = BTreeSet::new();
    let mut unexpected = Vec::new();
    let mut rank = None;
    for (k, t) in raw {
        if let Some(path) = k.strip_suffix(".lora_layer.down.weight") {
            lora_paths.insert(path.to_string());
            rank = Some(t.dim(0)?);
            tensors.insert(k, t);
        } else if k.ends_with(".lora_layer.up.weight") {
            tensors.insert(k, t);
        } else if let Some(old) = tensors.get(&k) {
            if old.dims() != t.dims() {
                return Err(Error::CheckpointMismatch {
                    path: vae_weights_path.into(),
                    report: format!(
                        "  {k}: checkpoint has {:?}, base VAE has {:?}",
                        t.dims(),
                        old.dims()
                    ),
                });
            }
            tensors.insert(k, t);
        } else {
            unexpected.push(k);
        }
    }
    if !unexpected.is_empty() {
        unexpected.sort();
        return Err(Error::CheckpointMismatch {
            path: vae_weights_path.into(),
            report: format!(
                "  {} tensors not in the base VAE, e.g. {}",
                unexpected.len(),
                unexpected[..unexpected.len().min(10)].join(", ")
            ),
        });
    }
    let lora = match rank {
        None => None,
        Some(rank) => {
            let preset_cfg = LoraConfig {
                rank,
                modules: preset.lora_modules(),
            };
            let preset_paths: BTreeSet<String> =
                crate::vae::lora::targets(&base.config, &preset_cfg)
                    .into_iter()
                    .map(|t| t.path)
                    .collect();
            // The preset's substrings when they select exactly the adapted convs; else the list itself.
            Some(if preset_paths == lora_paths {
                preset_cfg
            } else {
                LoraConfig {
                    rank,
                    modules: lora_paths.into_iter().collect(),
                }
            })
        }
    };

    // quantizer_ema.pth: codebooks.weight, attn.to_q/k/v, attn.norm_q/k.
    let q = crate::io::read_tensors(quantizer_path, device)?;
    let q: HashMap<String, Tensor> = q
        .into_iter()
        .map(|(k, t)| (k.strip_prefix("module.").unwrap_or(&k).to_string(), t))
        .collect();
    let dims = |k: &str| -> Result<Vec<usize>> {
        q.get(k)
            .map(|t| t.dims().to_vec())
            .ok_or_else(|| Error::Checkpoint {
                path: quantizer_path.into(),
                reason: format!("no tensor '{k}' (expected a CODA quantizer state dict)"),
            })
    };
    let cb = dims("codebooks.weight")?;
    let norm = match (
        q.contains_key("attn.norm_q.weight"),
        q.contains_key("attn.norm_q.bias"),
    ) {
        (true, false) => NormKind::RmsNorm,
        (true, true) => NormKind::LayerNorm,
        _ => NormKind::None,
    };
    let qcfg = QuantizerConfig {
        kind: crate::quantizer::QuantizerKind::Attention,
        attn_dim: dims("attn.to_q.weight")?[0],
        norm,
        ..QuantizerConfig::new(cb[0], cb[1])
    };
    crate::io::check_tensor_shapes(&qcfg.parameter_shapes(), &q, quantizer_path)?;
    for (k, t) in q {
        tensors.insert(format!("quantizer.{k}"), t);
    }
    if qcfg.codebook_size != preset.codebook_size() {
        tracing::warn!(
            "codebook has {} codes; the {preset:?} preset's paper setting is {}",
            qcfg.codebook_size,
            preset.codebook_size()
        );
    }
    let config = TokenizerConfig {
        format_version: FORMAT_VERSION,
        vae: base.config.clone(),
        quantizer: qcfg,
        scales: ScaleSpec::Fixed {
            sizes: scales.unwrap_or_else(|| preset.scales()),
        },
        lora,
        resolution: Some(256),
    };
    crate::io::check_tensor_shapes(&config.parameter_shapes(), &tensors, vae_weights_path)?;
    Ok((config, tensors))
}
