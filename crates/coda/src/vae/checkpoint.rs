//! Loading real VAE checkpoints: diffusers folders, single-file LDM/diffusers safetensors and
//! PyTorch pickles. The architecture comes from a preset, a diffusers `config.json`, or is
//! inferred from the tensors' names and shapes; every tensor is then checked against it.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::autoencoder::AutoencoderKl;
use super::config::{Preset, VaeConfig};
use super::layout::{self, KeyLayout};
use crate::error::{Error, Result};

/// Key prefixes of training-only modules that VAE checkpoints sometimes carry (LDM `loss.*`
/// holds the discriminator and LPIPS). They are skipped and reported.
const IGNORED_PREFIXES: [&str; 1] = ["loss."];

/// How the user wants a checkpoint read.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    pub preset: Option<Preset>,
    /// Overrides the latent scaling factor of the preset / config / inference.
    pub scaling_factor: Option<f64>,
    pub shift_factor: Option<f64>,
    /// GroupNorm groups, for checkpoints without a config whose model does not use 32.
    pub norm_groups: Option<usize>,
}

/// Where the architecture came from, for `coda info` and error messages.
#[derive(Clone, Debug, PartialEq)]
pub enum ConfigOrigin {
    Preset(Preset),
    DiffusersConfig(PathBuf),
    Inferred,
}

impl std::fmt::Display for ConfigOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigOrigin::Preset(p) => write!(f, "preset {p:?}"),
            ConfigOrigin::DiffusersConfig(p) => write!(f, "{}", p.display()),
            ConfigOrigin::Inferred => f.write_str("inferred from the tensors"),
        }
    }
}

/// A checkpoint's weights under canonical (LDM) names, checked against its architecture.
#[derive(Clone, Debug)]
pub struct VaeWeights {
    pub config: VaeConfig,
    pub tensors: HashMap<String, Tensor>,
    /// The file the tensors were read from.
    pub weights_path: PathBuf,
    pub layout: KeyLayout,
    pub origin: ConfigOrigin,
    /// Training-only keys that were skipped.
    pub ignored_keys: Vec<String>,
}

impl VaeWeights {
    /// Read and check a checkpoint (file or diffusers folder).
    pub fn load(path: &Path, opts: &LoadOptions, device: &Device) -> Result<Self> {
        if !path.exists() {
            return Err(Error::NotFound { path: path.into() });
        }
        let (weights_path, diffusers_config) = resolve_paths(path)?;
        let raw = crate::io::read_tensors(&weights_path, device)?;
        let raw = layout::strip_vae_prefix(raw);
        let key_layout = layout::detect_layout(raw.keys());
        let mut tensors = match key_layout {
            KeyLayout::Diffusers => layout::diffusers_state_to_ldm(raw)?,
            KeyLayout::Ldm => raw,
        };
        let mut ignored_keys: Vec<String> = tensors
            .keys()
            .filter(|k| IGNORED_PREFIXES.iter().any(|p| k.starts_with(p)))
            .cloned()
            .collect();
        ignored_keys.sort();
        for k in &ignored_keys {
            tensors.remove(k);
        }

        let (mut config, origin) = match (opts.preset, &diffusers_config) {
            (Some(p), _) => (p.config(), ConfigOrigin::Preset(p)),
            (None, Some(cfg_path)) => (
                parse_diffusers_config(cfg_path)?,
                ConfigOrigin::DiffusersConfig(cfg_path.clone()),
            ),
            (None, None) => (
                infer_config(&tensors, &weights_path)?,
                ConfigOrigin::Inferred,
            ),
        };
        if let Some(s) = opts.scaling_factor {
            config.scaling_factor = s;
        }
        if let Some(s) = opts.shift_factor {
            config.shift_factor = s;
        }
        if let Some(g) = opts.norm_groups {
            config.norm_groups = g;
        }
        config.validate(&weights_path)?;
        crate::io::check_tensor_shapes(&config.parameter_shapes(), &tensors, &weights_path)?;
        Ok(Self {
            config,
            tensors,
            weights_path,
            layout: key_layout,
            origin,
            ignored_keys,
        })
    }

    /// Build the model from these weights.
    pub fn build(&self) -> Result<AutoencoderKl> {
        let device = self
            .tensors
            .values()
            .next()
            .map(|t| t.device().clone())
            .unwrap_or(Device::Cpu);
        let vb = VarBuilder::from_tensors(self.tensors.clone(), DType::F32, &device);
        AutoencoderKl::new(self.config.clone(), vb)
    }
}

/// Load a VAE checkpoint and build the model in one call.
pub fn load_vae(path: &Path, opts: &LoadOptions, device: &Device) -> Result<AutoencoderKl> {
    VaeWeights::load(path, opts, device)?.build()
}

/// A folder is a diffusers VAE (`config.json` + weights), possibly as the `vae/` subfolder of a
/// pipeline; a file is read as it is.
fn resolve_paths(path: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    if !path.is_dir() {
        return Ok((path.to_path_buf(), None));
    }
    let dir = if path.join("config.json").exists() || !path.join("vae").is_dir() {
        path.to_path_buf()
    } else {
        path.join("vae")
    };
    let config = dir.join("config.json");
    if !config.exists() {
        return Err(Error::Checkpoint {
            path: dir,
            reason: "folder has no config.json (expected a diffusers AutoencoderKL folder)".into(),
        });
    }
    for name in [
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.bin",
        "model.safetensors",
    ] {
        if dir.join(name).exists() {
            return Ok((dir.join(name), Some(config)));
        }
    }
    Err(Error::Checkpoint {
        path: dir,
        reason: "folder has no diffusion_pytorch_model.safetensors or .bin".into(),
    })
}

/// The fields of a diffusers `AutoencoderKL` config.json that define the architecture.
#[derive(Debug, Deserialize)]
struct DiffusersVaeConfig {
    #[serde(default = "three")]
    in_channels: usize,
    #[serde(default = "three")]
    out_channels: usize,
    block_out_channels: Vec<usize>,
    #[serde(default)]
    down_block_types: Vec<String>,
    #[serde(default)]
    up_block_types: Vec<String>,
    #[serde(default = "one")]
    layers_per_block: usize,
    #[serde(default = "silu")]
    act_fn: String,
    #[serde(default = "four")]
    latent_channels: usize,
    #[serde(default = "thirty_two")]
    norm_num_groups: usize,
    /// Not a diffusers key (diffusers' AutoencoderKL uses 1e-6): written by coda-rs for VAEs it
    /// trained with another GroupNorm eps, so that they load back exactly.
    #[serde(default = "diffusers_norm_eps")]
    norm_eps: f64,
    #[serde(default = "sd_scale")]
    scaling_factor: f64,
    #[serde(default)]
    shift_factor: Option<f64>,
    #[serde(default = "yes")]
    use_quant_conv: bool,
    #[serde(default = "yes")]
    use_post_quant_conv: bool,
    #[serde(default = "yes")]
    mid_block_add_attention: bool,
}

fn three() -> usize {
    3
}
fn one() -> usize {
    1
}
fn four() -> usize {
    4
}
fn diffusers_norm_eps() -> f64 {
    1e-6
}

fn thirty_two() -> usize {
    32
}
fn silu() -> String {
    "silu".into()
}
fn sd_scale() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}

/// Translate a diffusers config.json (defaults as in diffusers' `AutoencoderKL.__init__`).
pub fn parse_diffusers_config(path: &Path) -> Result<VaeConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let c: DiffusersVaeConfig = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.into(),
        reason: e.to_string(),
    })?;
    let bad = |reason: String| Error::Config {
        path: path.into(),
        reason,
    };
    if c.act_fn != "silu" && c.act_fn != "swish" {
        return Err(bad(format!(
            "act_fn '{}' is not supported (only silu)",
            c.act_fn
        )));
    }
    let levels = c.block_out_channels.len();
    let attn_flags = |types: &[String], prefix: &str| -> Result<Vec<bool>> {
        if types.is_empty() {
            return Ok(vec![false; levels]);
        }
        if types.len() != levels {
            return Err(bad(format!(
                "{} block types for {levels} levels",
                types.len()
            )));
        }
        types
            .iter()
            .map(|t| match t.as_str() {
                s if s == format!("{prefix}2D") => Ok(false),
                s if s == format!("Attn{prefix}2D") => Ok(true),
                s => Err(bad(format!("block type '{s}' is not supported"))),
            })
            .collect()
    };
    let encoder_attention = attn_flags(&c.down_block_types, "DownEncoderBlock")?;
    // diffusers lists decoder blocks from the coarsest level; our levels start at full resolution.
    let mut decoder_attention = attn_flags(&c.up_block_types, "UpDecoderBlock")?;
    decoder_attention.reverse();
    Ok(VaeConfig {
        in_channels: c.in_channels,
        out_channels: c.out_channels,
        block_channels: c.block_out_channels,
        num_res_blocks: c.layers_per_block,
        encoder_attention,
        decoder_attention,
        mid_attention: c.mid_block_add_attention,
        z_channels: c.latent_channels,
        latent_channels: c.latent_channels,
        quant_conv: c.use_quant_conv,
        post_quant_conv: c.use_post_quant_conv,
        norm_groups: c.norm_num_groups,
        norm_eps: c.norm_eps,
        scaling_factor: c.scaling_factor,
        shift_factor: c.shift_factor.unwrap_or(0.0),
    })
}

/// Infer the architecture from canonical tensor names and shapes. GroupNorm's group count
/// cannot be seen in the weights: 32, as in every released LDM-family VAE.
pub fn infer_config(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<VaeConfig> {
    let dims = |key: &str| -> Result<Vec<usize>> {
        tensors
            .get(key)
            .map(|t| t.dims().to_vec())
            .ok_or_else(|| Error::Checkpoint {
                path: path.into(),
                reason: format!(
                    "cannot infer the architecture: no tensor '{key}' (give --preset, or check the file is a KL-VAE)"
                ),
            })
    };
    let count = |prefix: &str| -> usize {
        let idx: BTreeSet<usize> = tensors
            .keys()
            .filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse().ok())
            .collect();
        idx.into_iter().next_back().map(|m| m + 1).unwrap_or(0)
    };
    let conv_in = dims("encoder.conv_in.weight")?;
    let levels = count("encoder.down.");
    if levels == 0 {
        return Err(Error::Checkpoint {
            path: path.into(),
            reason: "cannot infer the architecture: no encoder.down.* tensors".into(),
        });
    }
    let block_channels = (0..levels)
        .map(|i| dims(&format!("encoder.down.{i}.block.0.conv1.weight")).map(|d| d[0]))
        .collect::<Result<Vec<_>>>()?;
    let has = |k: String| tensors.contains_key(&k);
    let z_channels = dims("decoder.conv_in.weight")?[1];
    let quant_conv = has("quant_conv.weight".into());
    let latent_channels = if quant_conv {
        dims("quant_conv.weight")?[0] / 2
    } else {
        z_channels
    };
    Ok(VaeConfig {
        in_channels: conv_in[1],
        out_channels: dims("decoder.conv_out.weight")?[0],
        num_res_blocks: count("encoder.down.0.block."),
        encoder_attention: (0..levels)
            .map(|i| has(format!("encoder.down.{i}.attn.0.q.weight")))
            .collect(),
        decoder_attention: (0..levels)
            .map(|i| has(format!("decoder.up.{i}.attn.0.q.weight")))
            .collect(),
        mid_attention: has("encoder.mid.attn_1.q.weight".into()),
        z_channels,
        latent_channels,
        quant_conv,
        post_quant_conv: has("post_quant_conv.weight".into()),
        norm_groups: 32,
        norm_eps: 1e-6,
        scaling_factor: 1.0,
        shift_factor: 0.0,
        block_channels,
    })
}
