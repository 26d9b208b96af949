//! What is trained: a KL-VAE with an optional quantizer, in one of three roles.
//! - `Adapt` (CODA): frozen VAE, trainable LoRA and attention quantizer.
//! - `Vae`: a continuous KL-VAE from scratch.
//! - `Vq`: the baselines, a VAE-architecture autoencoder from scratch with a nearest-neighbour
//!   quantizer on the posterior mean (single-scale VQGAN or VAR-style multi-scale).
//!
//! The model is rebuilt from a name -> tensor map: trainable entries are `Var`s, so gradients
//! reach them; the same builder with the EMA weights gives the evaluation model.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::quantizer::{CodaQuantizer, ScaleSpec, TrainOutput};
use crate::tokenizer::TokenizerConfig;
use crate::vae::AutoencoderKl;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Adapt,
    Vae,
    Vq,
}

impl Role {
    /// Whether a weight of the model is trained in this role (`freeze_encoder`: a VAE's decoder
    /// side only).
    pub fn is_trainable(self, name: &str, freeze_encoder: bool) -> bool {
        match self {
            Role::Adapt => name.contains(".lora_layer.") || name.starts_with("quantizer."),
            Role::Vae if freeze_encoder => {
                name.starts_with("decoder.") || name.starts_with("post_quant_conv.")
            }
            Role::Vae | Role::Vq => true,
        }
    }

    /// Parameter group: 0 for the autoencoder (or its LoRA), 1 for the quantizer.
    pub fn group(self, name: &str) -> usize {
        usize::from(name.starts_with("quantizer."))
    }
}

pub struct TrainModel {
    pub role: Role,
    pub vae: AutoencoderKl,
    pub quantizer: Option<CodaQuantizer>,
    pub scales: ScaleSpec,
}

/// Reconstruction, token ids per scale (empty for a VAE) and the scales.
pub type Reconstruction = (Tensor, Vec<Tensor>, Vec<(usize, usize)>);

/// One forward pass.
pub struct Forward {
    /// Reconstruction, unclamped, [-1, 1] scale.
    pub recon: Tensor,
    pub mean: Tensor,
    pub logvar: Tensor,
    pub quant: Option<TrainOutput>,
}

/// Gaussian noise shaped as `f` (N, C, H, W), each image's standard deviation uniform in
/// [0, max_std]; seeded per image, so a batch's noise does not depend on the thread count.
fn noise_like(f: &Tensor, max_std: f64, seed: u64) -> Result<Tensor> {
    use rand::{Rng, SeedableRng};
    use rand_distr::Distribution;
    let b = f.dim(0)?;
    let per_image = f.elem_count() / b.max(1);
    let mut eps: Vec<f32> = Vec::with_capacity(f.elem_count());
    for i in 0..b {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(i as u64));
        let std: f64 = rng.gen::<f64>() * max_std;
        eps.extend((0..per_image).map(|_| {
            let e: f64 = rand_distr::StandardNormal.sample(&mut rng);
            (e * std) as f32
        }));
    }
    Ok(Tensor::from_vec(eps, f.shape(), f.device())?.to_dtype(f.dtype())?)
}

impl TrainModel {
    /// `config.quantizer` is ignored in the `Vae` role.
    pub fn build(
        role: Role,
        config: &TokenizerConfig,
        tensors: &HashMap<String, Tensor>,
    ) -> Result<Self> {
        let device = tensors
            .values()
            .next()
            .map(|t| t.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &device);
        let vae = AutoencoderKl::new(config.vae.clone(), vb.clone())?;
        let quantizer = match role {
            Role::Vae => None,
            _ => Some(CodaQuantizer::new(
                config.quantizer.clone(),
                vb.pp("quantizer"),
            )?),
        };
        Ok(Self {
            role,
            vae,
            quantizer,
            scales: config.scales.clone(),
        })
    }

    /// Token grids for a latent of (h, w).
    pub fn scales_for(&self, h: usize, w: usize) -> Result<Vec<(usize, usize)>> {
        Ok(self.scales.for_latent(h, w))
    }

    /// Encode, (quantize), decode. The VAE and CODA roles take a posterior sample seeded by
    /// `seed` when `sample` is set; the VQ baselines quantize the mean, as VQGAN's encoder has no
    /// variance. `latent_noise` (VAE role): see [`crate::training::TrainConfig::latent_noise`].
    pub fn forward(
        &self,
        x: &Tensor,
        sample: bool,
        latent_noise: f64,
        seed: u64,
    ) -> Result<Forward> {
        let post = self.vae.encode(x)?;
        let z = if sample && self.role != Role::Vq {
            post.sample(seed)?
        } else {
            post.mean.clone()
        };
        let (z_dec, quant) = match &self.quantizer {
            None if latent_noise > 0.0 => {
                let f = self.vae.normalize(&z)?;
                let noisy = (&f + noise_like(&f, latent_noise, seed ^ 0x005E_ED0F_1A7E)?)?;
                (self.vae.denormalize(&noisy)?, None)
            }
            None => (z, None),
            Some(q) => {
                let f = self.vae.normalize(&z)?;
                let (_, _, h, w) = f.dims4()?;
                let out = q.forward_train(&f, &self.scales_for(h, w)?)?;
                (self.vae.denormalize(&out.f_hat)?, Some(out))
            }
        };
        Ok(Forward {
            recon: self.vae.decode(&z_dec)?,
            mean: post.mean,
            logvar: post.logvar,
            quant,
        })
    }

    /// Inference as the exported model runs it: posterior mean, hard assignment, decode.
    /// Returns the reconstruction and the ids per scale (empty for a VAE).
    pub fn reconstruct(&self, x: &Tensor) -> Result<Reconstruction> {
        let post = self.vae.encode(x)?;
        match &self.quantizer {
            None => Ok((self.vae.decode(&post.mean)?, Vec::new(), Vec::new())),
            Some(q) => {
                let f = self.vae.normalize(&post.mean)?;
                let (_, _, h, w) = f.dims4()?;
                let scales = self.scales_for(h, w)?;
                let tables = q.tables()?;
                let (ids, f_hat) = q.encode(&tables, &f, &scales)?;
                Ok((
                    self.vae.decode(&self.vae.denormalize(&f_hat)?)?,
                    ids,
                    scales,
                ))
            }
        }
    }
}
