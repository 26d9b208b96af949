//! Training: `adapt` (the CODA recipe: frozen VAE, trained LoRA + quantizer), `train-vae` (a
//! KL-VAE from scratch) and `train-vq` (VQGAN / VAR-style baselines), one loop for all three.
//!
//! - [`config`]: the run's keys, presets, TOML files and `--set` overrides.
//! - [`model`]: what is trained in each role.
//! - [`losses`], [`patchgan`], [`dino`]: objectives and the two discriminators.
//! - [`optim`], [`ema`]: AdamW with groups, cosine schedule, clipping; the EMA weights.
//! - [`trainer`]: the loop, evaluation, checkpoints (exact resume) and export.

pub mod config;
pub mod dino;
pub mod ema;
pub mod losses;
pub mod model;
pub mod optim;
pub mod patchgan;
pub mod trainer;

pub use config::TrainConfig;
pub use model::Role;
pub use trainer::{Event, Trainer};
