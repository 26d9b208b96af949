//! Writing a VAE in the diffusers folder layout (`config.json` +
//! `diffusion_pytorch_model.safetensors`, diffusers key names), so that diffusers and
//! `coda tokenizer new --vae` read our trained VAEs like any released one.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use super::config::VaeConfig;
use super::layout::{is_attention_projection, ldm_to_diffusers};
use crate::error::{Error, Result};

pub const DIFFUSERS_WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

/// The diffusers `config.json` of a VAE config.
pub fn diffusers_config(cfg: &VaeConfig, sample_size: usize) -> serde_json::Value {
    let kind = |attn: bool, base: &str| {
        if attn {
            format!("Attn{base}")
        } else {
            base.to_string()
        }
    };
    let down: Vec<String> = cfg
        .encoder_attention
        .iter()
        .map(|&a| kind(a, "DownEncoderBlock2D"))
        .collect();
    // diffusers lists decoder blocks from the coarsest level.
    let up: Vec<String> = cfg
        .decoder_attention
        .iter()
        .rev()
        .map(|&a| kind(a, "UpDecoderBlock2D"))
        .collect();
    let mut config = serde_json::json!({
        "_class_name": "AutoencoderKL",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": cfg.block_channels,
        "down_block_types": down,
        "up_block_types": up,
        "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": sample_size,
        "scaling_factor": cfg.scaling_factor,
        "shift_factor": cfg.shift_factor,
        "use_quant_conv": cfg.quant_conv,
        "use_post_quant_conv": cfg.post_quant_conv,
        "mid_block_add_attention": cfg.mid_attention,
    });
    if cfg.norm_eps != 1e-6 {
        // diffusers hard-codes 1e-6 and ignores this key: only coda-rs reads it back.
        config["norm_eps"] = serde_json::json!(cfg.norm_eps);
    }
    config
}

/// Write `tensors` (LDM names, as the runtime uses them) as a diffusers folder, atomically file
/// by file. diffusers stores attention projections as linears: they are reshaped to 2-D.
pub fn write_diffusers(
    dir: &Path,
    cfg: &VaeConfig,
    tensors: &HashMap<String, Tensor>,
    sample_size: usize,
) -> Result<()> {
    if cfg.z_channels != cfg.latent_channels {
        return Err(Error::Invalid(format!(
            "diffusers' AutoencoderKL needs z_channels == latent_channels (got {} and {})",
            cfg.z_channels, cfg.latent_channels
        )));
    }
    crate::io::check_tensor_shapes(&cfg.parameter_shapes(), tensors, dir)?;
    let mut named: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| {
            let t = if is_attention_projection(k) && t.rank() == 4 {
                let (o, i, _, _) = t.dims4()?;
                t.reshape((o, i))?
            } else {
                t.clone()
            };
            Ok((ldm_to_diffusers(k, cfg.levels()), t))
        })
        .collect::<Result<_>>()?;
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let json = serde_json::to_string_pretty(&diffusers_config(cfg, sample_size))
        .expect("a JSON value serialises");
    // The folder is written atomically as a whole (issue #15).
    crate::io::write_dir_atomic(dir, "config.json", |tmp| {
        crate::io::write_safetensors(&tmp.join(DIFFUSERS_WEIGHTS), &named, None)?;
        crate::io::write_atomic(&tmp.join("config.json"), json.as_bytes())
    })
}

/// Fresh weights for training a VAE from scratch, initialised as PyTorch's defaults do: conv
/// weights and biases U(±1/sqrt(fan_in)) (kaiming-uniform with a = sqrt(5)), norms 1 and 0.
pub fn init_parameters(cfg: &VaeConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let shapes = cfg.parameter_shapes();
    let fan_in: HashMap<String, usize> = shapes
        .iter()
        .filter(|(_, s)| s.len() == 4)
        .map(|(k, s)| {
            (
                k.trim_end_matches(".weight").to_string(),
                s[1] * s[2] * s[3],
            )
        })
        .collect();
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let module = name
                .trim_end_matches(".weight")
                .trim_end_matches(".bias")
                .to_string();
            let data: Vec<f32> = match fan_in.get(&module) {
                Some(&f) => {
                    let b = 1.0 / (f as f32).sqrt();
                    let u = rand_distr::Uniform::new_inclusive(-b, b);
                    (0..n).map(|_| u.sample(&mut rng)).collect()
                }
                // GroupNorm: weight 1, bias 0.
                None => vec![if name.ends_with(".weight") { 1.0 } else { 0.0 }; n],
            };
            Ok((
                name,
                Tensor::from_vec(data, shape, &candle_core::Device::Cpu)?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exported_folder_loads_back_identically() {
        let mut cfg = VaeConfig::ldm(vec![8, 16], 4);
        cfg.norm_groups = 4;
        cfg.encoder_attention = vec![false, true];
        cfg.decoder_attention = vec![false, true];
        cfg.scaling_factor = 0.5;
        cfg.shift_factor = 0.1;
        let tensors = init_parameters(&cfg, 3).unwrap();
        let dir = tempfile::tempdir().unwrap();
        write_diffusers(dir.path(), &cfg, &tensors, 32).unwrap();
        let loaded = crate::vae::VaeWeights::load(
            dir.path(),
            &Default::default(),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert_eq!(loaded.config, cfg);
        for (k, t) in &tensors {
            let diff = (t - &loaded.tensors[k])
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(diff, 0.0, "{k}");
        }
    }
}
