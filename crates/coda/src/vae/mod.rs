//! The continuous KL-VAE that CODA starts from (coda-method.md §3): architecture, blocks,
//! checkpoint layouts and loading.

pub mod autoencoder;
pub mod blocks;
pub mod checkpoint;
pub mod config;
pub mod decoder;
pub mod encoder;
pub mod export;
pub mod layout;
pub mod lora;

pub use autoencoder::{AutoencoderKl, Posterior};
pub use checkpoint::{load_vae, ConfigOrigin, LoadOptions, VaeWeights};
pub use config::{Preset, VaeConfig};
pub use layout::KeyLayout;
pub use lora::LoraConfig;
