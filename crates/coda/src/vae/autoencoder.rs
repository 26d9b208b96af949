//! The KL-VAE: encoder -> diagonal Gaussian posterior -> (normalised) latent -> decoder.

use candle_core::{Device, Module, Tensor};
use candle_nn::VarBuilder;
use rand::SeedableRng;
use rand_distr::Distribution;

use super::blocks::Conv2d;
use super::config::VaeConfig;
use super::decoder::Decoder;
use super::encoder::Encoder;
use crate::error::{Error, Result};

/// A diagonal Gaussian over the latent, as the encoder predicts it.
#[derive(Clone, Debug)]
pub struct Posterior {
    pub mean: Tensor,
    /// Clamped to [-30, 20] as in LDM's `DiagonalGaussianDistribution`.
    pub logvar: Tensor,
}

impl Posterior {
    /// The deterministic latent: what tokens are computed from by default.
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }

    /// `mean + exp(logvar / 2) * eps`. Image `b` of the batch draws its eps from a generator
    /// seeded with `seed + b`, so a sample depends on the seed and the image's position only,
    /// never on the batch size or thread count.
    pub fn sample(&self, seed: u64) -> Result<Tensor> {
        let b = self.mean.dim(0)?;
        let per_image = self.mean.elem_count() / b.max(1);
        let normal = rand_distr::StandardNormal;
        let mut eps: Vec<f32> = Vec::with_capacity(self.mean.elem_count());
        for i in 0..b {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(i as u64));
            eps.extend((0..per_image).map(|_| -> f32 { normal.sample(&mut rng) }));
        }
        let eps = Tensor::from_vec(eps, self.mean.shape(), self.mean.device())?
            .to_dtype(self.mean.dtype())?;
        let std = (&self.logvar * 0.5)?.exp()?;
        Ok((&self.mean + std.mul(&eps)?)?)
    }
}

#[derive(Clone, Debug)]
pub struct AutoencoderKl {
    config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    device: Device,
}

impl AutoencoderKl {
    /// Build from canonical (LDM-named) weights; see `vae::checkpoint` for loading real files.
    pub fn new(config: VaeConfig, vb: VarBuilder) -> Result<Self> {
        let (z, l) = (config.z_channels, config.latent_channels);
        let quant_conv = if config.quant_conv {
            Some(Conv2d::new(vb.pp("quant_conv"), 2 * z, 2 * l, 1, 1, 0)?)
        } else {
            None
        };
        let post_quant_conv = if config.post_quant_conv {
            Some(Conv2d::new(vb.pp("post_quant_conv"), l, z, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), &config)?,
            decoder: Decoder::new(vb.pp("decoder"), &config)?,
            quant_conv,
            post_quant_conv,
            device: vb.device().clone(),
            config,
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Check that an image batch has a shape the VAE accepts.
    pub fn check_image_shape(&self, x: &Tensor) -> Result<()> {
        let dims = x.dims();
        let f = self.config.downsample_factor();
        if dims.len() != 4 || dims[1] != self.config.in_channels {
            return Err(Error::Invalid(format!(
                "expected images of shape (B, {}, H, W), got {:?}",
                self.config.in_channels, dims
            )));
        }
        if !dims[2].is_multiple_of(f) || !dims[3].is_multiple_of(f) || dims[2] == 0 || dims[3] == 0
        {
            return Err(Error::Invalid(format!(
                "image size {}x{} is not a multiple of the VAE's downsampling factor {f}",
                dims[3], dims[2]
            )));
        }
        Ok(())
    }

    /// Images in [-1, 1], (B, C, H, W) -> posterior over the (unnormalised) latent.
    pub fn encode(&self, x: &Tensor) -> Result<Posterior> {
        self.check_image_shape(x)?;
        let (b, _, h, w) = x.dims4()?;
        crate::limits::check(
            &format!("encoding {b} image(s) of {w}x{h}"),
            crate::limits::inference_bytes(&self.config, b, h, w),
        )?;
        let mut moments = self.encoder.forward(x)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        let mean = moments.narrow(1, 0, self.config.latent_channels)?;
        let logvar = moments
            .narrow(1, self.config.latent_channels, self.config.latent_channels)?
            .clamp(-30f32, 20f32)?;
        Ok(Posterior { mean, logvar })
    }

    /// Unnormalised latent -> images (unclamped, [-1, 1] scale).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let (b, c, zh, zw) = z.dims4()?;
        if c != self.config.latent_channels {
            return Err(Error::Invalid(format!(
                "expected latents with {} channels, got {c}",
                self.config.latent_channels
            )));
        }
        let f = self.config.downsample_factor();
        let (h, w) = (zh.saturating_mul(f), zw.saturating_mul(f));
        crate::limits::check(
            &format!("decoding {b} image(s) of {w}x{h}"),
            crate::limits::inference_bytes(&self.config, b, h, w),
        )?;
        let mut z = z.clone();
        if let Some(p) = &self.post_quant_conv {
            z = p.forward(&z)?;
        }
        Ok(self.decoder.forward(&z)?)
    }

    /// `f = (z - shift) * scale`: the latent the quantizer sees.
    pub fn normalize(&self, z: &Tensor) -> Result<Tensor> {
        Ok(((z - self.config.shift_factor)? * self.config.scaling_factor)?)
    }

    /// Inverse of [`normalize`](Self::normalize).
    pub fn denormalize(&self, f: &Tensor) -> Result<Tensor> {
        Ok(((f / self.config.scaling_factor)? + self.config.shift_factor)?)
    }
}
