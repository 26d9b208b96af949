//! `coda tokenizer new`: a fresh tokenizer on top of any VAE checkpoint, the starting point of
//! adaptation (random codebook, LoRA that starts as the identity).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::config::{TokenizerConfig, FORMAT_VERSION};
use super::{CONFIG_FILE, WEIGHTS_FILE};
use crate::error::{Error, Result};
use crate::quantizer::{attention::init_parameters, QuantizerConfig, ScaleSpec};
use crate::vae::{LoraConfig, VaeWeights};

/// Build the config and weights of a new tokenizer around loaded VAE weights.
pub fn new_tokenizer(
    vae: &VaeWeights,
    quantizer: QuantizerConfig,
    scales: ScaleSpec,
    lora: Option<LoraConfig>,
    resolution: Option<usize>,
    seed: u64,
) -> Result<(TokenizerConfig, HashMap<String, Tensor>)> {
    let device: Device = vae
        .tensors
        .values()
        .next()
        .map(|t| t.device().clone())
        .unwrap_or(Device::Cpu);
    let mut tensors = vae.tensors.clone();
    for (k, t) in init_parameters(&quantizer, seed, &device)? {
        tensors.insert(format!("quantizer.{k}"), t);
    }
    if let Some(l) = &lora {
        for (k, t) in crate::vae::lora::init(&vae.config, l, seed.wrapping_add(1), &device)? {
            tensors.insert(k, t);
        }
    }
    let config = TokenizerConfig {
        format_version: FORMAT_VERSION,
        vae: vae.config.clone(),
        quantizer,
        scales,
        lora,
        resolution,
    };
    config.validate(std::path::Path::new("the new tokenizer's settings"))?;
    Ok((config, tensors))
}

/// A tokenizer folder's config and weights as stored (LoRA unfused), shapes checked: the
/// starting point of `coda adapt`.
pub fn read_folder(dir: &Path) -> Result<(TokenizerConfig, HashMap<String, Tensor>)> {
    let cfg_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let config: TokenizerConfig = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: cfg_path.clone(),
        reason: e.to_string(),
    })?;
    let path = dir.join(WEIGHTS_FILE);
    let tensors = crate::io::read_tensors(&path, &Device::Cpu)?;
    crate::io::check_tensor_shapes(&config.parameter_shapes(), &tensors, &path)?;
    Ok((config, tensors))
}

/// Give a new tokenizer the quantizer (codebook, attention weights, settings, scales) of
/// another tokenizer `from` made on the same encoder: a warm start when only the decoder
/// changed. Refused when the encoder side (weights or latent normalisation) differs, since a
/// quantizer learned on one latent is meaningless on another.
pub fn take_quantizer(
    config: &mut TokenizerConfig,
    tensors: &mut HashMap<String, Tensor>,
    from: &Path,
) -> Result<()> {
    let (other, other_tensors) = read_folder(from)?;
    let refuse = |why: String| {
        Err(Error::Invalid(format!(
            "--quantizer-from {}: {why}; its quantizer only fits the latent of the encoder it was \
             trained on",
            from.display()
        )))
    };
    if other.vae.latent_channels != config.vae.latent_channels
        || other.vae.scaling_factor != config.vae.scaling_factor
        || other.vae.shift_factor != config.vae.shift_factor
    {
        return refuse(format!(
            "latent channels / scaling / shift {} / {} / {} there, {} / {} / {} here",
            other.vae.latent_channels,
            other.vae.scaling_factor,
            other.vae.shift_factor,
            config.vae.latent_channels,
            config.vae.scaling_factor,
            config.vae.shift_factor
        ));
    }
    let encoder_side = |k: &str| {
        (k.starts_with("encoder.") || k.starts_with("quant_conv.")) && !k.contains(".lora_layer.")
    };
    let mut names: Vec<&String> = tensors.keys().filter(|k| encoder_side(k)).collect();
    names.sort();
    for k in names {
        let here = &tensors[k];
        let Some(there) = other_tensors.get(k) else {
            return refuse(format!("it has no {k}"));
        };
        let same = here.dims() == there.dims()
            && here
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .zip(
                    there
                        .flatten_all()?
                        .to_dtype(candle_core::DType::F32)?
                        .to_vec1::<f32>()?,
                )
                .all(|(a, b)| a.to_bits() == b.to_bits());
        if !same {
            return refuse(format!("its {k} differs from this VAE's"));
        }
    }
    let adapts_encoder = |k: &String| {
        (k.starts_with("encoder.") || k.starts_with("quant_conv.")) && k.contains(".lora_layer.")
    };
    if other_tensors.keys().any(adapts_encoder) {
        return refuse(
            "it adapts the encoder (LoRA there), so its latent is not this VAE's".into(),
        );
    }
    tensors.retain(|k, _| !k.starts_with("quantizer."));
    for (k, t) in other_tensors {
        if k.starts_with("quantizer.") {
            tensors.insert(k, t);
        }
    }
    config.quantizer = other.quantizer;
    config.scales = other.scales;
    config.validate(Path::new("the new tokenizer's settings"))?;
    Ok(())
}
