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
    /// Refuse what the runtime cannot run (instead of panicking later): no scales, an empty or
    /// non-increasing fixed list, an empty codebook, a training resolution that is zero or not a
    /// multiple of the VAE's downsampling factor, and an inconsistent VAE.
    pub fn validate(&self, origin: &std::path::Path) -> crate::Result<()> {
        let bad = |reason: String| {
            Err(crate::Error::Config {
                path: origin.to_path_buf(),
                reason,
            })
        };
        self.vae.validate(origin)?;
        match &self.scales {
            ScaleSpec::Derived { num_scales: 0 } => {
                return bad("scales: num_scales must be at least 1".into())
            }
            ScaleSpec::Fixed { sizes } => {
                if let Err(e) = crate::quantizer::scales::check_list(sizes) {
                    return bad(format!("scales: {e}"));
                }
            }
            ScaleSpec::Derived { .. } => {}
        }
        if self.quantizer.assign != crate::quantizer::AssignRule::Attention
            && self.quantizer.kind != crate::quantizer::QuantizerKind::Attention
        {
            return bad("quantizer.assign applies to the attention quantizer only".into());
        }
        if self.quantizer.codebook_size == 0 {
            return bad("quantizer.codebook_size must be at least 1".into());
        }
        if self.quantizer.dim != self.vae.latent_channels {
            return bad(format!(
                "quantizer.dim {} != the VAE's latent_channels {}",
                self.quantizer.dim, self.vae.latent_channels
            ));
        }
        if let Some(r) = self.resolution {
            let f = self.vae.downsample_factor();
            if r == 0 || !r.is_multiple_of(f) {
                return bad(format!(
                    "resolution {r} must be a positive multiple of the VAE's downsampling factor {f}"
                ));
            }
        }
        Ok(())
    }

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
