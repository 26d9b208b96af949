//! `coda tokenizer new`: a fresh tokenizer on top of any VAE checkpoint, the starting point of
//! adaptation (random codebook, LoRA that starts as the identity).

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::config::{TokenizerConfig, FORMAT_VERSION};
use crate::error::Result;
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
