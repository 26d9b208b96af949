//! `config.json` of a tokenizer folder: everything needed to rebuild the model from
//! `model.safetensors`.

use serde::{Deserialize, Serialize};

use crate::quantizer::{QuantizerConfig, ScaleSpec};
use crate::vae::{LoraConfig, VaeConfig};

/// Bumped whenever the folder format changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenizerConfig {
    pub format_version: u32,
    pub vae: VaeConfig,
    pub quantizer: QuantizerConfig,
    pub scales: ScaleSpec,
    /// LoRA adapters on the VAE convs; absent when there are none (or they were fused).
    pub lora: Option<LoraConfig>,
    /// The image size the tokenizer was trained at, and the default `--size` of the CLI.
    pub resolution: Option<usize>,
}

impl TokenizerConfig {
    /// Every tensor `model.safetensors` must hold: VAE (canonical names), LoRA, and the quantizer
    /// under `quantizer.`.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut p = self.vae.parameter_shapes();
        if let Some(l) = &self.lora {
            p.extend(crate::vae::lora::parameter_shapes(&self.vae, l));
        }
        p.extend(
            self.quantizer
                .parameter_shapes()
                .into_iter()
                .map(|(k, s)| (format!("quantizer.{k}"), s)),
        );
        p
    }
}
