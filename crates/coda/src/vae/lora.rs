//! LoRA adapters on the VAE's convolutions (coda-method.md §7): which convs get one, their
//! parameter shapes, initialisation, and exact fusion into the conv weights for inference.

use std::collections::HashMap;

use candle_core::{Device, Result, Tensor};
use serde::{Deserialize, Serialize};

use super::config::VaeConfig;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    /// A conv gets an adapter when its module path contains any of these substrings, in the
    /// encoder and the decoder alike (MAR: conv1, conv2, upsample, downsample; FLUX: conv1, conv2).
    pub modules: Vec<String>,
}

/// A conv that carries an adapter: module path, out and in channels, kernel size.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraTarget {
    pub path: String,
    pub cout: usize,
    pub cin: usize,
    pub k: usize,
}

/// The convs of `vae` whose module path matches the config, in parameter order. Attention
/// projections are linears in diffusers and never adapted, even though LDM stores them as 1x1 convs.
pub fn targets(vae: &VaeConfig, lora: &LoraConfig) -> Vec<LoraTarget> {
    vae.parameter_shapes()
        .into_iter()
        .filter_map(|(name, shape)| {
            let path = name.strip_suffix(".weight")?;
            let is_attn = path.contains(".attn.") || path.contains(".attn_1.");
            if shape.len() != 4
                || is_attn
                || !lora.modules.iter().any(|m| path.contains(m.as_str()))
            {
                return None;
            }
            Some(LoraTarget {
                path: path.to_string(),
                cout: shape[0],
                cin: shape[1],
                k: shape[2],
            })
        })
        .collect()
}

pub fn parameter_shapes(vae: &VaeConfig, lora: &LoraConfig) -> Vec<(String, Vec<usize>)> {
    targets(vae, lora)
        .into_iter()
        .flat_map(|t| {
            [
                (
                    format!("{}.lora_layer.down.weight", t.path),
                    vec![lora.rank, t.cin, t.k, t.k],
                ),
                (
                    format!("{}.lora_layer.up.weight", t.path),
                    vec![t.cout, lora.rank, 1, 1],
                ),
            ]
        })
        .collect()
}

/// Fresh adapters as the reference initialises them: down ~ N(0, (1/r)²), up = 0, so the
/// adapted VAE starts out identical to the frozen one.
pub fn init(
    vae: &VaeConfig,
    lora: &LoraConfig,
    seed: u64,
    device: &Device,
) -> Result<Vec<(String, Tensor)>> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let normal = rand_distr::Normal::new(0f32, 1.0 / lora.rank as f32).expect("rank > 0");
    parameter_shapes(vae, lora)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with("down.weight") {
                (0..n).map(|_| normal.sample(&mut rng)).collect()
            } else {
                vec![0.0; n]
            };
            Ok((name, Tensor::from_vec(data, shape, device)?))
        })
        .collect()
}

/// Fold every adapter into its conv: `W' = W + reshape(W_up · W_down)` (exact, since `up` is
/// 1x1 without bias and `down` shares the conv's kernel, stride and padding), and drop the adapters.
pub fn fuse(tensors: &mut HashMap<String, Tensor>) -> Result<usize> {
    let paths: Vec<String> = tensors
        .keys()
        .filter_map(|k| k.strip_suffix(".lora_layer.down.weight").map(String::from))
        .collect();
    for path in &paths {
        let down = tensors
            .remove(&format!("{path}.lora_layer.down.weight"))
            .expect("listed");
        let up = tensors
            .remove(&format!("{path}.lora_layer.up.weight"))
            .ok_or_else(|| candle_core::Error::Msg(format!("{path}: LoRA down without up")))?;
        let wkey = format!("{path}.weight");
        let w = tensors
            .get(&wkey)
            .ok_or_else(|| candle_core::Error::Msg(format!("{path}: LoRA on a missing conv")))?;
        let (cout, cin, kh, kw) = w.dims4()?;
        let r = down.dim(0)?;
        let delta = up
            .reshape((cout, r))?
            .matmul(&down.reshape((r, cin * kh * kw))?)?;
        let fused = (w + delta.reshape((cout, cin, kh, kw))?)?;
        tensors.insert(wkey, fused);
    }
    Ok(paths.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vae::Preset;

    fn count(p: Preset, modules: &[&str]) -> (usize, usize, usize) {
        let cfg = LoraConfig {
            rank: 32,
            modules: modules.iter().map(|s| s.to_string()).collect(),
        };
        let t = targets(&p.config(), &cfg);
        let enc = t.iter().filter(|t| t.path.starts_with("encoder.")).count();
        let params: usize = parameter_shapes(&p.config(), &cfg)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        (enc, t.len() - enc, params)
    }

    #[test]
    fn adapter_counts_match_the_reference() {
        // coda-method.md §7: MAR 28 encoder + 38 decoder adapters, 6.02 M parameters;
        // FLUX 20 + 28, 5.82 M.
        let (e, d, p) = count(
            Preset::MarKl16,
            &["conv1", "conv2", "upsample", "downsample"],
        );
        assert_eq!((e, d), (28, 38));
        assert_eq!((p as f64 / 1e4).round() / 100.0, 6.02);
        let (e, d, p) = count(Preset::Flux, &["conv1", "conv2"]);
        assert_eq!((e, d), (20, 28));
        assert_eq!((p as f64 / 1e4).round() / 100.0, 5.82);
    }
}
