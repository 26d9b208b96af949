//! Checkpoint key layouts. The model uses the original LDM names (`encoder.down.0.block.0...`,
//! used by MAR's `kl16` and BFL's FLUX `ae.safetensors`); diffusers checkpoints
//! (`encoder.down_blocks.0.resnets.0...`) are renamed into them on load.

use std::collections::HashMap;

use candle_core::Tensor;

/// Which naming a checkpoint used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyLayout {
    Ldm,
    Diffusers,
}

impl std::fmt::Display for KeyLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyLayout::Ldm => "ldm",
            KeyLayout::Diffusers => "diffusers",
        })
    }
}

/// Prefixes under which whole-model checkpoints keep the VAE (SD's `first_stage_model.`).
const VAE_PREFIXES: [&str; 3] = ["first_stage_model.", "vae.", "module."];

pub fn detect_layout<'a>(keys: impl IntoIterator<Item = &'a String>) -> KeyLayout {
    let diffusers = keys.into_iter().any(|k| {
        k.contains(".down_blocks.") || k.contains(".up_blocks.") || k.contains(".mid_block.")
    });
    if diffusers {
        KeyLayout::Diffusers
    } else {
        KeyLayout::Ldm
    }
}

/// Strip whole-model prefixes: if any key carries one, keep only the keys under it.
pub fn strip_vae_prefix(tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    for prefix in VAE_PREFIXES {
        if tensors.keys().any(|k| k.starts_with(prefix)) {
            return tensors
                .into_iter()
                .filter_map(|(k, t)| k.strip_prefix(prefix).map(|s| (s.to_string(), t)))
                .collect();
        }
    }
    tensors
}

/// Rename one diffusers key to its LDM name. `levels` is the number of resolution levels,
/// needed because diffusers counts decoder blocks from the coarsest level and LDM from the finest.
/// Keys that are not part of the VAE come back unchanged (and are reported as unexpected).
pub fn diffusers_to_ldm(key: &str, levels: usize) -> String {
    let parts: Vec<&str> = key.split('.').collect();
    let mut out: Vec<String> = Vec::with_capacity(parts.len());
    let mut i = 0;
    while i < parts.len() {
        let p = parts[i];
        let next = parts.get(i + 1).copied();
        let num = next.and_then(|n| n.parse::<usize>().ok());
        match (p, num) {
            ("down_blocks", Some(n)) => {
                out.push(format!("down.{n}"));
                i += 2;
            }
            ("up_blocks", Some(n)) if n < levels => {
                out.push(format!("up.{}", levels - 1 - n));
                i += 2;
            }
            ("resnets", Some(n)) if out.last().map(|s| s == "mid_block").unwrap_or(false) => {
                out.pop();
                out.push(format!("mid.block_{}", n + 1));
                i += 2;
            }
            ("attentions", Some(n)) if out.last().map(|s| s == "mid_block").unwrap_or(false) => {
                out.pop();
                out.push(format!("mid.attn_{}", n + 1));
                i += 2;
            }
            ("resnets", Some(n)) => {
                out.push(format!("block.{n}"));
                i += 2;
            }
            ("attentions", Some(n)) => {
                out.push(format!("attn.{n}"));
                i += 2;
            }
            ("downsamplers", Some(0)) => {
                out.push("downsample".into());
                i += 2;
            }
            ("upsamplers", Some(0)) => {
                out.push("upsample".into());
                i += 2;
            }
            ("to_out", Some(0)) => {
                out.push("proj_out".into());
                i += 2;
            }
            _ => {
                let renamed = match p {
                    "conv_shortcut" => "nin_shortcut",
                    "conv_norm_out" => "norm_out",
                    "group_norm" => "norm",
                    "to_q" | "query" => "q",
                    "to_k" | "key" => "k",
                    "to_v" | "value" => "v",
                    "proj_attn" => "proj_out",
                    other => other,
                };
                out.push(renamed.to_string());
                i += 1;
            }
        }
    }
    out.join(".")
}

/// Rename one LDM key to its diffusers name: the inverse of [`diffusers_to_ldm`], used to
/// export VAEs in the diffusers folder layout.
pub fn ldm_to_diffusers(key: &str, levels: usize) -> String {
    let parts: Vec<&str> = key.split('.').collect();
    let mut out: Vec<String> = Vec::with_capacity(parts.len() + 1);
    let mut i = 0;
    while i < parts.len() {
        let p = parts[i];
        let next = parts.get(i + 1).copied();
        let num = next.and_then(|n| n.parse::<usize>().ok());
        match (p, num, next) {
            ("down", Some(n), _) => {
                out.push(format!("down_blocks.{n}"));
                i += 2;
            }
            ("up", Some(n), _) if n < levels => {
                out.push(format!("up_blocks.{}", levels - 1 - n));
                i += 2;
            }
            ("block", Some(n), _) => {
                out.push(format!("resnets.{n}"));
                i += 2;
            }
            ("attn", Some(n), _) => {
                out.push(format!("attentions.{n}"));
                i += 2;
            }
            ("mid", None, Some(sub)) => {
                let (kind, n) = match (sub.strip_prefix("block_"), sub.strip_prefix("attn_")) {
                    (Some(n), _) => ("resnets", n),
                    (_, Some(n)) => ("attentions", n),
                    _ => ("", "0"),
                };
                let n: usize = n.parse().unwrap_or(1);
                out.push(format!("mid_block.{kind}.{}", n.saturating_sub(1)));
                i += 2;
            }
            _ => {
                let renamed = match p {
                    "downsample" => "downsamplers.0",
                    "upsample" => "upsamplers.0",
                    "nin_shortcut" => "conv_shortcut",
                    "norm_out" => "conv_norm_out",
                    "norm" => "group_norm",
                    "q" => "to_q",
                    "k" => "to_k",
                    "v" => "to_v",
                    "proj_out" => "to_out.0",
                    other => other,
                };
                out.push(renamed.to_string());
                i += 1;
            }
        }
    }
    out.join(".")
}

/// The number of levels of a diffusers checkpoint, from its decoder block indices.
pub fn diffusers_levels<'a>(keys: impl IntoIterator<Item = &'a String>) -> usize {
    keys.into_iter()
        .filter_map(|k| {
            let rest = k.split(".up_blocks.").nth(1)?;
            rest.split('.').next()?.parse::<usize>().ok()
        })
        .max()
        .map(|m| m + 1)
        .unwrap_or(0)
}

/// Attention projections are 1x1 convs in LDM and linears in diffusers; store them as convs.
pub fn is_attention_projection(key: &str) -> bool {
    let is_attn = key.contains(".attn.") || key.contains(".attn_1.");
    let proj = [".q.weight", ".k.weight", ".v.weight", ".proj_out.weight"];
    is_attn && proj.iter().any(|s| key.ends_with(s))
}

/// Rename a whole diffusers state dict to LDM names, reshaping linear attention weights.
pub fn diffusers_state_to_ldm(
    tensors: HashMap<String, Tensor>,
) -> candle_core::Result<HashMap<String, Tensor>> {
    let levels = diffusers_levels(tensors.keys());
    tensors
        .into_iter()
        .map(|(k, t)| {
            let k = diffusers_to_ldm(&k, levels);
            let t = linear_to_conv_if_attention(&k, t)?;
            Ok((k, t))
        })
        .collect()
}

pub fn linear_to_conv_if_attention(key: &str, t: Tensor) -> candle_core::Result<Tensor> {
    if is_attention_projection(key) && t.rank() == 2 {
        let (o, i) = t.dims2()?;
        t.reshape((o, i, 1, 1))
    } else {
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ldm_to_diffusers_inverts_diffusers_to_ldm() {
        for preset in [
            crate::vae::Preset::Flux,
            crate::vae::Preset::Sd,
            crate::vae::Preset::MarKl16,
        ] {
            let cfg = preset.config();
            for (k, _) in cfg.parameter_shapes() {
                let d = super::ldm_to_diffusers(&k, cfg.levels());
                assert_eq!(super::diffusers_to_ldm(&d, cfg.levels()), k, "{k} -> {d}");
            }
        }
        assert_eq!(
            super::ldm_to_diffusers("decoder.up.3.block.2.nin_shortcut.weight", 4),
            "decoder.up_blocks.0.resnets.2.conv_shortcut.weight"
        );
        assert_eq!(
            super::ldm_to_diffusers("encoder.mid.attn_1.proj_out.bias", 4),
            "encoder.mid_block.attentions.0.to_out.0.bias"
        );
    }

    use super::*;

    #[test]
    fn renames_every_diffusers_part() {
        let cases = [
            (
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                "encoder.down.1.block.0.nin_shortcut.weight",
            ),
            (
                "encoder.down_blocks.0.downsamplers.0.conv.bias",
                "encoder.down.0.downsample.conv.bias",
            ),
            (
                "encoder.mid_block.resnets.1.norm2.weight",
                "encoder.mid.block_2.norm2.weight",
            ),
            (
                "encoder.mid_block.attentions.0.group_norm.bias",
                "encoder.mid.attn_1.norm.bias",
            ),
            (
                "encoder.mid_block.attentions.0.to_out.0.weight",
                "encoder.mid.attn_1.proj_out.weight",
            ),
            (
                "decoder.mid_block.attentions.0.query.weight",
                "decoder.mid.attn_1.q.weight",
            ),
            (
                "decoder.up_blocks.0.resnets.2.conv1.weight",
                "decoder.up.3.block.2.conv1.weight",
            ),
            (
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
                "decoder.up.1.upsample.conv.weight",
            ),
            ("encoder.conv_norm_out.weight", "encoder.norm_out.weight"),
            (
                "encoder.down_blocks.3.attentions.1.to_k.weight",
                "encoder.down.3.attn.1.k.weight",
            ),
            ("quant_conv.weight", "quant_conv.weight"),
        ];
        for (d, l) in cases {
            assert_eq!(diffusers_to_ldm(d, 4), l, "{d}");
        }
    }
}
