//! The DINO discriminator against the PyTorch reference (scripts/reference/dino_disc.py) on a
//! tiny random ViT: logits through the three input paths (bicubic resize, crop, area resize),
//! chained spectral-norm power iterations, and the gradients of the input and of every head
//! parameter. Fixtures: `python scripts/make_fixtures.py`.

mod common;

use std::collections::HashMap;

use candle_core::{Tensor, Var};
use coda::training::dino::{DinoConfig, DinoDisc};
use common::{abs_max, fixtures, load, max_abs};

const TOL: f32 = 1e-4;

#[test]
fn dino_discriminator_matches_pytorch() {
    let dir = fixtures("training");
    let weights = load(&dir.join("dino_weights.safetensors"));
    let io = load(&dir.join("dino_io.safetensors"));
    let cfg = DinoConfig {
        image: 32,
        patch: 8,
        dim: 48,
        depth: 4,
        heads: 4,
        mlp: 96,
        taps: vec![1, 3],
    };
    let vit: HashMap<String, Tensor> = weights
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("vit.").map(|k| (k.to_string(), v.clone())))
        .collect();
    let d = DinoDisc::new(cfg.clone(), &vit, &dir, 0).unwrap();
    d.load_spectral_state(&|k| weights.get(k).cloned()).unwrap();
    let mut heads: HashMap<String, Tensor> = HashMap::new();
    let mut vars: Vec<(String, Var)> = Vec::new();
    for (k, _) in cfg.head_shapes() {
        let v = Var::from_tensor(&weights[&k]).unwrap();
        heads.insert(k.clone(), v.as_tensor().clone());
        vars.push((k, v));
    }
    let x1 = Var::from_tensor(&io["x1"]).unwrap();
    let logits1 = d.forward(&heads, x1.as_tensor(), None).unwrap();
    let e = max_abs(&logits1, &io["logits1"]);
    println!(
        "logits (bicubic path): max abs err {e:.2e} (|logits| {:.2})",
        abs_max(&io["logits1"])
    );
    assert!(e < TOL, "logits1 {e}");
    let grads = (logits1 * &io["probe"])
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let dx = grads.get(x1.as_tensor()).unwrap();
    let rel = max_abs(dx, &io["dx1"]) / abs_max(&io["dx1"]);
    println!("input gradient through the frozen ViT: {rel:.2e} relative");
    assert!(rel < TOL, "dx {rel}");
    let mut worst = 0f32;
    for (k, v) in &vars {
        let g = grads.get(v.as_tensor()).unwrap();
        let r = &io[&format!("grad.{k}")];
        // Biases right before a BatchNorm have a zero gradient (only rounding noise): they are
        // measured against the gradient scale of the layer's weight instead of their own.
        let scale = abs_max(r).max(1e-3);
        let rel = max_abs(g, r) / scale;
        worst = worst.max(rel);
        assert!(rel < 1e-3, "grad {k}: {rel} (|grad| {})", abs_max(r));
    }
    println!("head parameter gradients: worst {worst:.2e} relative");
    let state: HashMap<String, Tensor> = d.spectral_state().into_iter().collect();
    for (k, t) in &state {
        let e = max_abs(t, &io[&format!("after1.{k}")]);
        assert!(e < TOL, "{k} after one power iteration: {e}");
    }
    let l2 = d.forward(&heads, &io["x2"], Some((3, 5))).unwrap();
    let e2 = max_abs(&l2, &io["logits2"]);
    let l3 = d.forward(&heads, &io["x3"], None).unwrap();
    let e3 = max_abs(&l3, &io["logits3"]);
    println!("crop path {e2:.2e}, area path {e3:.2e}");
    assert!(e2 < TOL && e3 < TOL, "{e2} {e3}");
}

#[test]
fn vit_s16_heads_have_the_reference_parameter_count() {
    // coda-method.md §6.4: 5 x 1 477 249 = 7.39 M trainable discriminator parameters.
    let n: usize = DinoConfig::vit_s16()
        .head_shapes()
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    assert_eq!(n, 5 * 1_477_249);
}
