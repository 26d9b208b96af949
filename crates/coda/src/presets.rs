//! Every named configuration in one table: the released VAE architectures, the paper's two
//! tokenizer configurations (VAE, codebook, scales, LoRA and training recipe) and this machine's
//! small recipe. The `--preset` of every command (`--vae`, `import`, `adapt`, `train-*`) resolves
//! a name or alias here, and takes the part it needs.

use crate::error::{Error, Result};
use crate::vae::Preset as VaeArchitecture;

/// The paper's settings of one tokenizer configuration (coda-method.md §10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenizerPreset {
    pub codebook_size: usize,
    /// The fixed scale list of the paper's resolution (latent side last).
    pub scales: &'static [usize],
    /// The VAE convs that carry LoRA adapters.
    pub lora_modules: &'static [&'static str],
}

/// One named configuration.
#[derive(Clone, Copy, Debug)]
pub struct PresetSpec {
    pub name: &'static str,
    /// Other names that resolve to it.
    pub aliases: &'static [&'static str],
    /// The VAE architecture, for `--vae --preset` (None: not a VAE preset).
    pub vae: Option<VaeArchitecture>,
    /// The paper's tokenizer settings, for `import` (None: not an official configuration).
    pub tokenizer: Option<TokenizerPreset>,
    /// Training keys as TOML over the defaults (None: not a training preset).
    pub train: Option<&'static str>,
    /// Claims the official recipe: training refuses a silently missing loss term and reports
    /// every departure from the recipe.
    pub paper: bool,
}

/// The table.
pub const PRESETS: &[PresetSpec] = &[
    PresetSpec {
        name: "tiny-cpu",
        aliases: &[],
        vae: None,
        tokenizer: None,
        // This machine: small crops, small models, a small codebook, no discriminator by
        // default (`--set disc=patchgan` adds one), frequent evaluation.
        train: Some(
            r#"
            size = 64
            batch = 8
            steps = 300
            lr = 1e-3
            lr_disc = 1e-3
            eval_every = 100
            checkpoint_every = 100
            eval_images = 16
            log_every = 10
            ema_start = 0.2
            patchgan = { ndf = 32, layers = 2 }
            disc_weight = 0.1
            [model]
            channels = [32, 64, 128, 128]
            res_blocks = 1
            latent_channels = 8
            norm_groups = 8
            codebook_size = 1024
            "#,
        ),
        paper: false,
    },
    PresetSpec {
        name: "mar-16384",
        aliases: &["mar", "mar-kl16"],
        vae: Some(VaeArchitecture::MarKl16),
        tokenizer: Some(TokenizerPreset {
            codebook_size: 16384,
            scales: &[1, 2, 3, 4, 5, 6, 8, 10, 13, 16],
            lora_modules: &["conv1", "conv2", "upsample", "downsample"],
        }),
        // coda-method.md §10, MAR KL-16, V = 16384: per-GPU batch 16 x 4 accumulation, 10
        // epochs, lr 5e-4, the DINO discriminator (give its weights: --set dino=PATH).
        train: Some(
            r#"
            size = 256
            resize = 288
            batch = 16
            accum = 4
            epochs = 10.0
            lr = 5e-4
            lr_disc = 5e-4
            disc = "dino"
            disc_weight = 1.0
            gan_ramp = "linear"
            adaptive_layer = "decoder.up.4.upsample.conv.lora_layer.up.weight"
            ema_start = 0.4
            eval_every = 2500
            checkpoint_every = 2500
            keep_checkpoints = 20
            "#,
        ),
        paper: true,
    },
    PresetSpec {
        name: "flux-65536",
        aliases: &["flux"],
        vae: Some(VaeArchitecture::Flux),
        tokenizer: Some(TokenizerPreset {
            codebook_size: 65536,
            scales: &[1, 2, 3, 4, 6, 9, 13, 18, 24, 32],
            lora_modules: &["conv1", "conv2"],
        }),
        // FLUX, V = 65536: 12 x 3 accumulation; adaptive weight at the last resnet conv2 of the
        // highest-resolution decoder block.
        train: Some(
            r#"
            size = 256
            resize = 288
            batch = 12
            accum = 3
            epochs = 10.0
            lr = 5e-4
            lr_disc = 5e-4
            disc = "dino"
            disc_weight = 1.0
            gan_ramp = "linear"
            adaptive_layer = "decoder.up.0.block.2.conv2.lora_layer.up.weight"
            ema_start = 0.4
            eval_every = 4500
            checkpoint_every = 4500
            keep_checkpoints = 20
            "#,
        ),
        paper: true,
    },
    PresetSpec {
        name: "sd",
        aliases: &[],
        vae: Some(VaeArchitecture::Sd),
        tokenizer: None,
        train: None,
        paper: false,
    },
];

/// The preset called `name` (or one of its aliases).
pub fn find(name: &str) -> Result<&'static PresetSpec> {
    PRESETS
        .iter()
        .find(|p| p.name == name || p.aliases.contains(&name))
        .ok_or_else(|| {
            Error::Invalid(format!(
                "unknown preset '{name}' (known: {})",
                names(|_| true)
            ))
        })
}

/// The names (with aliases in brackets) of the presets that `keep` selects, for messages.
pub fn names(keep: impl Fn(&PresetSpec) -> bool) -> String {
    PRESETS
        .iter()
        .filter(|p| keep(p))
        .map(|p| {
            if p.aliases.is_empty() {
                p.name.to_string()
            } else {
                format!("{} ({})", p.name, p.aliases.join(", "))
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `find`, requiring the part `what` that `part` takes from it.
pub fn find_part<T>(name: &str, what: &str, part: impl Fn(&PresetSpec) -> Option<T>) -> Result<T> {
    let spec = find(name)?;
    part(spec).ok_or_else(|| {
        Error::Invalid(format!(
            "preset '{name}' has no {what} (presets with one: {})",
            names(|p| part(p).is_some())
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_training_presets_parse() {
        let mut all: Vec<&str> = PRESETS
            .iter()
            .flat_map(|p| std::iter::once(p.name).chain(p.aliases.iter().copied()))
            .collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "a name or alias is used twice");
        for p in PRESETS {
            if let Some(t) = p.train {
                t.parse::<toml::Table>()
                    .unwrap_or_else(|e| panic!("{}: {e}", p.name));
            }
            assert!(
                !p.paper || p.tokenizer.is_some(),
                "{}: a paper preset names its tokenizer",
                p.name
            );
        }
        assert_eq!(find("mar").unwrap().name, "mar-16384");
        let e = find_part("tiny-cpu", "VAE architecture", |p| p.vae)
            .unwrap_err()
            .to_string();
        assert!(e.contains("mar-16384") && e.contains("sd"), "{e}");
    }
}
