//! # coda: discrete image tokenizers from continuous VAEs
//!
//! coda-rs implements CODA (Continuous-to-Discrete Adaptation, arXiv 2503.17760): a frozen,
//! pretrained KL-VAE (Stable Diffusion, FLUX, MAR KL-16) is turned into a discrete image
//! tokenizer by a multi-scale residual quantizer with attention-based code assignment.
//!
//! The pipeline, folder by folder:
//! - [`vae`]: the continuous KL-VAE, its checkpoint layouts (diffusers, LDM) and loading.
//! - `kernels`: our own CPU ops where candle is missing one or is slow (crate-internal; the
//!   precision of the inference convolutions is chosen per tokenizer or per call:
//!   [`Tokenizer::with_precision`], [`with_precision`]).
//! - [`data`]: images in and out.
//! - [`evaluation`]: reconstruction metrics.
//! - [`io`]: checkpoint files and atomic writes.
//! - [`tokenizer`]: the tokenizer (VAE + quantizer), token files; [`Tokenizer`] is the entry point.
//!
//! Load a tokenizer, turn an image into token ids and back (here the default tokenizer that is
//! compiled into the library with the default `default-tokenizer` feature; `Tokenizer::from_dir`
//! loads a tokenizer folder):
//!
//! ```
//! use coda::{EncodeOptions, Tokenizer};
//! let tok = Tokenizer::default_tokenizer(&candle_core::Device::Cpu)?;
//! let image = image::RgbImage::from_pixel(64, 64, image::Rgb([200, 120, 40]));
//! let tokens = tok.encode_images(&[image], &EncodeOptions::default())?;
//! assert_eq!(tokens.scales.last(), Some(&(16, 16))); // the finest scale is the 16x16 latent
//! assert_eq!(tokens.scales.len(), 10); // coarse to fine, from 1x1
//! let decoded = tok.decode_images(&tokens, None, None)?;
//! assert_eq!(decoded[0].dimensions(), (64, 64));
//! # Ok::<(), coda::Error>(())
//! ```
//!
//! A continuous VAE on its own:
//!
//! ```no_run
//! use coda::vae::{load_vae, LoadOptions};
//! let device = candle_core::Device::Cpu;
//! let vae = load_vae("flux/vae".as_ref(), &LoadOptions::default(), &device)?;
//! let img = coda::data::prepare(coda::data::load_image("photo.jpg".as_ref())?, Some(256))?;
//! let x = coda::data::images_to_tensor(&[img], &device)?;
//! let latent = vae.normalize(vae.encode(&x)?.mode())?;
//! let recon = vae.decode(&vae.denormalize(&latent)?)?;
//! # Ok::<(), coda::Error>(())
//! ```

pub mod data;
pub mod device;
pub mod error;
pub mod evaluation;
/// Fuzz target bodies (for `fuzz/` and the corpus replay test; not an API).
#[cfg(feature = "internals")]
pub mod fuzzing;
pub mod io;
/// Our own CPU kernels: crate-internal, public only with the `internals` feature (the kernel
/// tests and benchmarks enable it).
#[cfg(feature = "internals")]
pub mod kernels;
#[cfg(not(feature = "internals"))]
pub(crate) mod kernels;
pub mod limits;
pub mod presets;
pub mod quantizer;
pub mod tokenizer;
pub mod training;
pub mod vae;

pub use error::{Error, Result};
pub use kernels::amx::available as amx_available;
/// The kernel path in use (at most `CODA_CPU_ISA`) and the best one this CPU has.
pub use kernels::simd::{detected as detected_isa, isa as kernel_isa, Isa};
pub use kernels::{precision, quiet_candle_pool, single_malloc_arena, with_precision, Precision};
pub use tokenizer::{EncodeOptions, Tokenizer};
