//! The VAE against PyTorch: fixtures written by scripts/make_fixtures.py (random weights, both
//! checkpoint layouts, safetensors and .pth) are loaded through the same code paths users hit.
//! Tolerance: max abs error <= 1e-4 for the posterior mean, logvar and the decoder output.

mod common;
use common::max_abs;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::Tensor;
use coda::vae::{ConfigOrigin, KeyLayout, LoadOptions, Preset, VaeConfig, VaeWeights};

const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    common::fixtures("vae")
}

fn io(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(name), &common::device()).unwrap()
}

/// Encode and decode the fixture input and compare every output with PyTorch's.
fn check_against_reference(weights: &VaeWeights, io_file: &str) {
    let vae = weights.build().unwrap();
    let io = io(io_file);
    let post = vae.encode(&io["x"]).unwrap();
    let e_mean = max_abs(&post.mean, &io["mean"]);
    let e_logvar = max_abs(&post.logvar, &io["logvar"]);
    let decoded = vae.decode(&io["mean"]).unwrap();
    let e_dec = max_abs(&decoded, &io["decoded"]);
    println!("{io_file}: mean {e_mean:.2e}, logvar {e_logvar:.2e}, decoded {e_dec:.2e}");
    assert!(e_mean <= TOL, "encoder mean max abs error {e_mean}");
    assert!(e_logvar <= TOL, "encoder logvar max abs error {e_logvar}");
    assert!(e_dec <= TOL, "decoder output max abs error {e_dec}");
}

fn ldm_reference_config() -> VaeConfig {
    #[derive(serde::Deserialize)]
    struct Ref {
        block_channels: Vec<usize>,
        num_res_blocks: usize,
        encoder_attention: Vec<bool>,
        decoder_attention: Vec<bool>,
        mid_attention: bool,
        z_channels: usize,
        latent_channels: usize,
        quant_conv: bool,
        post_quant_conv: bool,
    }
    let r: Ref =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("ldm_config.json")).unwrap())
            .unwrap();
    VaeConfig {
        block_channels: r.block_channels,
        num_res_blocks: r.num_res_blocks,
        encoder_attention: r.encoder_attention,
        decoder_attention: r.decoder_attention,
        mid_attention: r.mid_attention,
        z_channels: r.z_channels,
        latent_channels: r.latent_channels,
        quant_conv: r.quant_conv,
        post_quant_conv: r.post_quant_conv,
        ..VaeConfig::ldm(vec![1], 1)
    }
}

#[test]
fn ldm_safetensors_architecture_is_inferred_and_matches_pytorch() {
    let w = VaeWeights::load(
        &fixtures().join("ldm.safetensors"),
        &LoadOptions::default(),
        &common::device(),
    )
    .unwrap();
    assert_eq!(w.layout, KeyLayout::Ldm);
    assert_eq!(w.origin, ConfigOrigin::Inferred);
    assert_eq!(w.config, ldm_reference_config());
    check_against_reference(&w, "ldm_io.safetensors");
}

#[test]
fn ldm_pth_matches_pytorch() {
    let w = VaeWeights::load(
        &fixtures().join("ldm.pth"),
        &LoadOptions::default(),
        &common::device(),
    )
    .unwrap();
    assert_eq!(w.config, ldm_reference_config());
    check_against_reference(&w, "ldm_io.safetensors");
}

#[test]
fn diffusers_folder_matches_pytorch() {
    let w = VaeWeights::load(
        &fixtures().join("diffusers"),
        &LoadOptions::default(),
        &common::device(),
    )
    .unwrap();
    assert_eq!(w.layout, KeyLayout::Diffusers);
    assert!(matches!(w.origin, ConfigOrigin::DiffusersConfig(_)));
    assert_eq!(w.config.norm_groups, 8);
    assert_eq!(w.config.scaling_factor, 0.3611);
    assert_eq!(w.config.shift_factor, 0.1159);
    assert!(!w.config.quant_conv && !w.config.post_quant_conv);
    check_against_reference(&w, "diffusers_io.safetensors");
}

#[test]
fn diffusers_pth_without_config_is_inferred_and_matches_pytorch() {
    let opts = LoadOptions {
        norm_groups: Some(8),
        ..Default::default()
    };
    let w = VaeWeights::load(&fixtures().join("diffusers.pth"), &opts, &common::device()).unwrap();
    assert_eq!(w.layout, KeyLayout::Diffusers);
    assert_eq!(w.config.block_channels, vec![16, 32, 32]);
    check_against_reference(&w, "diffusers_io.safetensors");
}

#[test]
fn preset_architectures_have_the_reference_parameter_counts() {
    let counts: HashMap<String, usize> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("preset_param_counts.json")).unwrap(),
    )
    .unwrap();
    for (name, preset) in [
        ("flux", Preset::Flux),
        ("sd", Preset::Sd),
        ("mar-kl16", Preset::MarKl16),
    ] {
        assert_eq!(preset.config().parameter_count(), counts[name], "{name}");
    }
}

#[test]
fn posterior_sample_is_seeded_and_mean_is_default() {
    let w = VaeWeights::load(
        &fixtures().join("ldm.safetensors"),
        &LoadOptions::default(),
        &common::device(),
    )
    .unwrap();
    let vae = w.build().unwrap();
    let x = &io("ldm_io.safetensors")["x"];
    let post = vae.encode(x).unwrap();
    let a = post.sample(7).unwrap();
    let b = post.sample(7).unwrap();
    let c = post.sample(8).unwrap();
    assert_eq!(max_abs(&a, &b), 0.0);
    assert!(max_abs(&a, &c) > 0.0);
    assert_eq!(max_abs(post.mode(), &post.mean), 0.0);
}

#[test]
fn normalisation_round_trips() {
    let w = VaeWeights::load(
        &fixtures().join("diffusers"),
        &LoadOptions::default(),
        &common::device(),
    )
    .unwrap();
    let vae = w.build().unwrap();
    let z = Tensor::randn(0f32, 1.0, (1, 4, 2, 3), &common::device()).unwrap();
    let f = vae.normalize(&z).unwrap();
    let expected = ((&z - 0.1159).unwrap() * 0.3611).unwrap();
    assert!(max_abs(&f, &expected) < 1e-7);
    assert!(max_abs(&vae.denormalize(&f).unwrap(), &z) < 1e-6);
}

#[test]
fn backward_through_the_vae_matches_pytorch() {
    // Every kernel's backward in one pass (convs of every geometry, GroupNorm+SiLU, attention,
    // nearest-2x upsampling, the asymmetric-pad downsampler) against PyTorch autograd.
    let w = VaeWeights::load(
        &fixtures().join("ldm.safetensors"),
        &Default::default(),
        &common::device(),
    )
    .unwrap();
    let mut vars: HashMap<String, candle_core::Var> = HashMap::new();
    let mut map: HashMap<String, Tensor> = HashMap::new();
    for (k, t) in &w.tensors {
        let v = candle_core::Var::from_tensor(t).unwrap();
        map.insert(k.clone(), v.as_tensor().clone());
        vars.insert(k.clone(), v);
    }
    let vae = coda::vae::AutoencoderKl::new(
        w.config.clone(),
        candle_nn::VarBuilder::from_tensors(map, candle_core::DType::F32, &common::device()),
    )
    .unwrap();
    let io = io("ldm_io.safetensors");
    let g = io_grad();
    let x = candle_core::Var::from_tensor(&io["x"]).unwrap();
    let post = vae.encode(x.as_tensor()).unwrap();
    let loss = ((vae.decode(&post.mean).unwrap() * &g["probe"])
        .unwrap()
        .sum_all()
        .unwrap()
        + (post.logvar.sum_all().unwrap() * 0.1).unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    let rel = |got: &Tensor, want: &Tensor| {
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let err = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        err / scale.max(1e-6)
    };
    let mut worst = rel(grads.get(x.as_tensor()).unwrap(), &g["dx"]);
    assert!(worst < 1e-4, "input gradient {worst}");
    let mut checked = 0;
    for (k, want) in &g {
        let Some(name) = k.strip_prefix("grad.") else {
            continue;
        };
        let got = grads
            .get(vars[name].as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let e = rel(got, want);
        assert!(e < 1e-4, "gradient of {name}: {e} relative");
        worst = worst.max(e);
        checked += 1;
    }
    assert_eq!(checked, 12);
    println!("VAE backward vs PyTorch: worst {worst:.2e} relative (input + 12 weights)");
}

fn io_grad() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("ldm_grad.safetensors"), &common::device())
        .unwrap()
}
