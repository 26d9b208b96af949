//! The KL-VAE architecture as data: one struct describes the LDM family (Stable Diffusion,
//! FLUX, MAR KL-16) in both of its checkpoint layouts. See coda-method.md §3.

use serde::{Deserialize, Serialize};

/// Architecture and latent normalisation of a continuous KL-VAE.
///
/// Levels are indexed from the full-resolution level (0) down to the coarsest one, for the
/// encoder and the decoder alike (the LDM convention: `decoder.up.0` is the full-resolution level).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    /// Image channels in (3 for RGB).
    pub in_channels: usize,
    /// Image channels out.
    pub out_channels: usize,
    /// Channel count of each level, e.g. FLUX `[128, 256, 512, 512]`.
    pub block_channels: Vec<usize>,
    /// Res-blocks per encoder level; the decoder has one more per level.
    pub num_res_blocks: usize,
    /// Self-attention after each res-block of an encoder level (MAR KL-16: only the 16x16 level).
    pub encoder_attention: Vec<bool>,
    /// Self-attention after each res-block of a decoder level.
    pub decoder_attention: Vec<bool>,
    /// Self-attention in the middle blocks of encoder and decoder.
    pub mid_attention: bool,
    /// Channels of the encoder output / decoder input (`z_channels`).
    pub z_channels: usize,
    /// Channels of the posterior (`embed_dim`); equals `z_channels` without `quant_conv`.
    pub latent_channels: usize,
    /// A 1x1 conv from the encoder's moments to the posterior's (2*z -> 2*latent).
    pub quant_conv: bool,
    /// A 1x1 conv on the latent before decoding (latent -> z).
    pub post_quant_conv: bool,
    pub norm_groups: usize,
    pub norm_eps: f64,
    /// Latent normalisation: `f = (z - shift_factor) * scaling_factor`.
    pub scaling_factor: f64,
    pub shift_factor: f64,
}

/// Named architectures of released VAEs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// MAR's `kl16.safetensors`: f16, 16 latent channels, encoder attention at 16x16, x0.2325.
    MarKl16,
    /// FLUX.1 VAE (`ae.safetensors` or diffusers `vae/`): f8, 16 channels, (z-0.1159)x0.3611.
    Flux,
    /// Stable Diffusion 1.x/2.x VAE (`sd-vae-ft-mse`): f8, 4 channels, x0.18215.
    Sd,
}

impl std::str::FromStr for Preset {
    type Err = crate::Error;
    /// A preset name or alias of the table in [`crate::presets`] that names a VAE.
    fn from_str(s: &str) -> crate::Result<Self> {
        crate::presets::find_part(s, "VAE architecture", |p| p.vae)
    }
}

impl Preset {
    pub fn config(self) -> VaeConfig {
        match self {
            // MAR models/vae.py: ch=128, ch_mult=(1,1,2,2,4), attn_resolutions=(16,) in the
            // encoder only, embed_dim=16; the scale 0.2325 is hard-coded in CODA's train_mar.py.
            Preset::MarKl16 => VaeConfig {
                block_channels: vec![128, 128, 256, 256, 512],
                encoder_attention: vec![false, false, false, false, true],
                decoder_attention: vec![false; 5],
                quant_conv: true,
                post_quant_conv: true,
                scaling_factor: 0.2325,
                shift_factor: 0.0,
                ..VaeConfig::ldm(vec![128, 256, 512, 512], 16)
            },
            // FLUX.1-dev vae/config.json: scaling 0.3611, shift 0.1159, no quant convs.
            Preset::Flux => VaeConfig {
                quant_conv: false,
                post_quant_conv: false,
                scaling_factor: 0.3611,
                shift_factor: 0.1159,
                ..VaeConfig::ldm(vec![128, 256, 512, 512], 16)
            },
            Preset::Sd => VaeConfig {
                scaling_factor: 0.18215,
                ..VaeConfig::ldm(vec![128, 256, 512, 512], 4)
            },
        }
    }
}

impl VaeConfig {
    /// An LDM-style VAE with mid attention only, 2 res-blocks, quant convs and no normalisation.
    pub fn ldm(block_channels: Vec<usize>, latent_channels: usize) -> Self {
        let levels = block_channels.len();
        VaeConfig {
            in_channels: 3,
            out_channels: 3,
            block_channels,
            num_res_blocks: 2,
            encoder_attention: vec![false; levels],
            decoder_attention: vec![false; levels],
            mid_attention: true,
            z_channels: latent_channels,
            latent_channels,
            quant_conv: true,
            post_quant_conv: true,
            norm_groups: 32,
            norm_eps: 1e-6,
            scaling_factor: 1.0,
            shift_factor: 0.0,
        }
    }

    pub fn levels(&self) -> usize {
        self.block_channels.len()
    }

    /// Spatial downsampling factor between image and latent.
    pub fn downsample_factor(&self) -> usize {
        1 << (self.levels() - 1)
    }

    /// Check internal consistency; `origin` names where the config came from, for the error.
    pub fn validate(&self, origin: &std::path::Path) -> crate::Result<()> {
        let bad = |reason: String| {
            Err(crate::Error::Config {
                path: origin.to_path_buf(),
                reason,
            })
        };
        if self.block_channels.is_empty() {
            return bad("block_channels is empty".into());
        }
        // Found by fuzzing (fuzz/regressions/train_config): zero channels reached a panic in the
        // weight initialisation.
        for (name, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("z_channels", self.z_channels),
            ("latent_channels", self.latent_channels),
        ]
        .into_iter()
        .chain(self.block_channels.iter().map(|&c| ("block_channels", c)))
        {
            if v == 0 {
                return bad(format!("{name} must be at least 1, got 0"));
            }
        }
        if self.levels() > 16 {
            return bad(format!("{} levels: at most 16", self.levels()));
        }
        if self.encoder_attention.len() != self.levels()
            || self.decoder_attention.len() != self.levels()
        {
            return bad(format!(
                "{} levels but {} encoder and {} decoder attention flags",
                self.levels(),
                self.encoder_attention.len(),
                self.decoder_attention.len()
            ));
        }
        for &c in &self.block_channels {
            if self.norm_groups == 0 || !c.is_multiple_of(self.norm_groups) {
                return bad(format!(
                    "{c} channels cannot be split into {} GroupNorm groups",
                    self.norm_groups
                ));
            }
        }
        if !self.quant_conv && self.latent_channels != self.z_channels {
            return bad(format!(
                "latent_channels {} != z_channels {} without quant_conv",
                self.latent_channels, self.z_channels
            ));
        }
        if !self.post_quant_conv && self.latent_channels != self.z_channels {
            return bad(format!(
                "latent_channels {} != z_channels {} without post_quant_conv",
                self.latent_channels, self.z_channels
            ));
        }
        if self.scaling_factor == 0.0 || !self.scaling_factor.is_finite() {
            return bad(format!(
                "scaling_factor {} is unusable",
                self.scaling_factor
            ));
        }
        Ok(())
    }

    /// Every parameter the model needs, in the canonical (LDM) naming, with its shape.
    /// Loading compares a checkpoint against this list before building anything.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut p = Vec::new();
        let conv = |p: &mut Vec<(String, Vec<usize>)>, name: &str, o, i, k| {
            p.push((format!("{name}.weight"), vec![o, i, k, k]));
            p.push((format!("{name}.bias"), vec![o]));
        };
        let norm = |p: &mut Vec<(String, Vec<usize>)>, name: &str, c| {
            p.push((format!("{name}.weight"), vec![c]));
            p.push((format!("{name}.bias"), vec![c]));
        };
        let resnet = |p: &mut Vec<(String, Vec<usize>)>, name: &str, cin, cout| {
            norm(p, &format!("{name}.norm1"), cin);
            conv(p, &format!("{name}.conv1"), cout, cin, 3);
            norm(p, &format!("{name}.norm2"), cout);
            conv(p, &format!("{name}.conv2"), cout, cout, 3);
            if cin != cout {
                conv(p, &format!("{name}.nin_shortcut"), cout, cin, 1);
            }
        };
        let attn = |p: &mut Vec<(String, Vec<usize>)>, name: &str, c| {
            norm(p, &format!("{name}.norm"), c);
            for m in ["q", "k", "v", "proj_out"] {
                conv(p, &format!("{name}.{m}"), c, c, 1);
            }
        };
        let mid = |p: &mut Vec<(String, Vec<usize>)>, name: &str, c| {
            resnet(p, &format!("{name}.block_1"), c, c);
            if self.mid_attention {
                attn(p, &format!("{name}.attn_1"), c);
            }
            resnet(p, &format!("{name}.block_2"), c, c);
        };
        let ch = &self.block_channels;
        let last = *ch.last().unwrap();

        conv(&mut p, "encoder.conv_in", ch[0], self.in_channels, 3);
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            for j in 0..self.num_res_blocks {
                resnet(&mut p, &format!("encoder.down.{i}.block.{j}"), cin, cout);
                cin = cout;
                if self.encoder_attention[i] {
                    attn(&mut p, &format!("encoder.down.{i}.attn.{j}"), cout);
                }
            }
            if i + 1 != ch.len() {
                conv(
                    &mut p,
                    &format!("encoder.down.{i}.downsample.conv"),
                    cout,
                    cout,
                    3,
                );
            }
        }
        mid(&mut p, "encoder.mid", last);
        norm(&mut p, "encoder.norm_out", last);
        conv(&mut p, "encoder.conv_out", 2 * self.z_channels, last, 3);
        if self.quant_conv {
            conv(
                &mut p,
                "quant_conv",
                2 * self.latent_channels,
                2 * self.z_channels,
                1,
            );
        }
        if self.post_quant_conv {
            conv(
                &mut p,
                "post_quant_conv",
                self.z_channels,
                self.latent_channels,
                1,
            );
        }

        conv(&mut p, "decoder.conv_in", last, self.z_channels, 3);
        mid(&mut p, "decoder.mid", last);
        let mut cin = last;
        for i in (0..ch.len()).rev() {
            let cout = ch[i];
            for j in 0..self.num_res_blocks + 1 {
                resnet(&mut p, &format!("decoder.up.{i}.block.{j}"), cin, cout);
                cin = cout;
                if self.decoder_attention[i] {
                    attn(&mut p, &format!("decoder.up.{i}.attn.{j}"), cout);
                }
            }
            if i != 0 {
                conv(
                    &mut p,
                    &format!("decoder.up.{i}.upsample.conv"),
                    cout,
                    cout,
                    3,
                );
            }
        }
        norm(&mut p, "decoder.norm_out", ch[0]);
        conv(&mut p, "decoder.conv_out", self.out_channels, ch[0], 3);
        p
    }

    /// Saturating: an absurd config (from a fuzzer or a typo) gives usize::MAX, not a panic.
    pub fn parameter_count(&self) -> usize {
        self.parameter_shapes()
            .iter()
            .map(|(_, s)| s.iter().fold(1usize, |a, &b| a.saturating_mul(b)))
            .fold(0usize, usize::saturating_add)
    }
}
