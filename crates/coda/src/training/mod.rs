//! Training: `adapt` (the CODA recipe: frozen VAE, trained LoRA + quantizer), `train-vae` (a
//! KL-VAE from scratch) and `train-vq` (VQGAN / VAR-style baselines), one loop for all three.
//!
//! - [`config`]: the run's keys, presets, TOML files and `--set` overrides.
//! - `model`: what is trained in each role ([`Role`]).
//! - `losses`, `patchgan`, `dino`: objectives and the two discriminators.
//! - `optim`, `ema`: AdamW with groups, cosine schedule, clipping; the EMA weights.
//! - `restart`: dead-code restart (an `adapt` option).
//!   (These six are crate-internal; the `internals` feature makes them public for tests.)
//! - [`trainer`]: the loop, evaluation, checkpoints (exact resume) and export.

pub mod config;
pub mod trainer;

// The trainer's parts: crate-internal, public only with the `internals` feature (the parity
// tests of the discriminators and losses enable it).
macro_rules! internal_modules {
    ($($m:ident),*) => {$(
        #[cfg(feature = "internals")]
        pub mod $m;
        #[cfg(not(feature = "internals"))]
        #[allow(dead_code)]
        pub(crate) mod $m;
    )*};
}
internal_modules!(dino, ema, losses, model, optim, patchgan, restart);

pub use config::TrainConfig;
pub use model::Role;
pub use trainer::{Event, RunIdentity, Start, Trainer};
