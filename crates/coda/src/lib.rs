//! # coda: discrete image tokenizers from continuous VAEs
//!
//! coda-rs implements CODA (Continuous-to-Discrete Adaptation, arXiv 2503.17760): a frozen,
//! pretrained KL-VAE (Stable Diffusion, FLUX, MAR KL-16) is turned into a discrete image
//! tokenizer by a multi-scale residual quantizer with attention-based code assignment.
//!
//! The pipeline, folder by folder:
//! - [`vae`]: the continuous KL-VAE, its checkpoint layouts (diffusers, LDM) and loading.
//! - [`kernels`]: our own CPU ops where candle is missing one or is slow.
//! - [`data`]: images in and out.
//! - [`evaluation`]: reconstruction metrics.
//! - [`io`]: checkpoint files and atomic writes.
//!
//! ```no_run
//! use coda::vae::{load_vae, LoadOptions};
//! let device = candle_core::Device::Cpu;
//! let vae = load_vae("flux/vae".as_ref(), &LoadOptions::default(), &device)?;
//! let img = coda::data::prepare(coda::data::load_image("photo.jpg".as_ref())?, Some(256));
//! let x = coda::data::images_to_tensor(&[img], &device)?;
//! let latent = vae.normalize(vae.encode(&x)?.mode())?;
//! let recon = vae.decode(&vae.denormalize(&latent)?)?;
//! # Ok::<(), coda::Error>(())
//! ```

pub mod data;
pub mod error;
pub mod evaluation;
pub mod io;
pub mod kernels;
pub mod quantizer;
pub mod tokenizer;
pub mod training;
pub mod vae;

pub use error::{Error, Result};
pub use kernels::{with_precision, Precision};
pub use tokenizer::{EncodeOptions, Tokenizer};
