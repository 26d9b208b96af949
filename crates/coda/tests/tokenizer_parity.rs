//! Official-format checkpoints (reduced-size, random weights, both presets' structures) imported
//! through `coda import`'s code path, against the PyTorch reference: token ids identical except
//! at near-ties (top-2 logit gap < 1e-5), decoded images within 1e-4.

mod common;
use common::max_abs;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use coda::tokenizer::import::{import_official, OfficialPreset};
use coda::tokenizer::{Tokenizer, Tokens};

fn fixtures() -> PathBuf {
    common::fixtures("tokenizer")
}

fn io(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join(format!("{name}_io.safetensors")),
        &common::device(),
    )
    .unwrap()
}

const SCALES: [usize; 5] = [1, 2, 3, 5, 8];

fn import(name: &str, preset: OfficialPreset, base: &str, dir: &Path) -> Tokenizer {
    let (cfg, tensors) = import_official(
        preset,
        &fixtures().join(base),
        &fixtures().join(format!("{name}_quantizer_ema.pth")),
        &fixtures().join(format!("{name}_vae_ema.pth")),
        Some(SCALES.to_vec()),
        &common::device(),
    )
    .unwrap();
    assert_eq!(
        cfg.lora.as_ref().unwrap().modules,
        preset.lora_modules(),
        "preset LoRA modules recognised"
    );
    Tokenizer::save(dir, &cfg, &tensors).unwrap();
    Tokenizer::from_dir(dir, &common::device()).unwrap()
}

fn reference_tokens(io: &HashMap<String, Tensor>) -> Tokens {
    Tokens {
        scales: SCALES.iter().map(|&s| (s, s)).collect(),
        ids: (0..SCALES.len())
            .map(|k| io[&format!("ids_{k}")].to_dtype(DType::U32).unwrap())
            .collect(),
    }
}

fn check(name: &str, preset: OfficialPreset, base: &str) {
    let dir = tempfile::tempdir().unwrap();
    let tok = import(name, preset, base, dir.path());
    let io = io(name);
    let enc = tok
        .encode_with(&io["x"], coda::tokenizer::Posterior::Mean)
        .unwrap();
    let e_f = max_abs(&enc.latent, &io["f"]);
    assert!(e_f <= 1e-4, "{name}: latent max abs error {e_f}");
    let (mut same, mut total, mut unexplained) = (0usize, 0usize, 0usize);
    for (k, got) in enc.tokens.ids.iter().enumerate() {
        let want = io[&format!("ids_{k}")]
            .to_dtype(DType::U32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        let gap = io[&format!("gap_{k}")]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for ((g, w), gap) in got
            .flatten_all()
            .unwrap()
            .to_vec1::<u32>()
            .unwrap()
            .iter()
            .zip(&want)
            .zip(&gap)
        {
            total += 1;
            if g == w {
                same += 1;
            } else if *gap >= 1e-5 {
                unexplained += 1;
            }
        }
    }
    println!(
        "{name}: token match {same}/{total} ({:.2}%), latent error {e_f:.2e}",
        100.0 * same as f64 / total as f64
    );
    assert_eq!(
        unexplained, 0,
        "{name}: ids differ where the top-2 logits are >= 1e-5 apart"
    );
    if same == total {
        let e_hat = max_abs(&enc.latent_hat, &io["f_hat"]);
        assert!(e_hat <= 1e-4, "{name}: f_hat max abs error {e_hat}");
    }
    // Decode the reference's own ids: the decoder path alone.
    let decoded = tok.decode(&reference_tokens(&io)).unwrap();
    let e_dec = max_abs(&decoded, &io["decoded"]);
    println!("{name}: decoded max abs error {e_dec:.2e}");
    assert!(e_dec <= 1e-4, "{name}: decoded max abs error {e_dec}");
}

#[test]
fn mar_structure_import_matches_pytorch() {
    check("mar", OfficialPreset::Mar, "mar_base.safetensors");
}

#[test]
fn flux_structure_import_matches_pytorch() {
    check("flux", OfficialPreset::Flux, "flux_base");
}

#[test]
fn fused_and_unfused_lora_agree() {
    let (cfg, tensors) = import_official(
        OfficialPreset::Mar,
        &fixtures().join("mar_base.safetensors"),
        &fixtures().join("mar_quantizer_ema.pth"),
        &fixtures().join("mar_vae_ema.pth"),
        Some(SCALES.to_vec()),
        &common::device(),
    )
    .unwrap();
    let fused =
        Tokenizer::from_tensors(cfg.clone(), tensors.clone(), Path::new("mar"), true).unwrap();
    let unfused = Tokenizer::from_tensors(cfg, tensors, Path::new("mar"), false).unwrap();
    assert_eq!(
        fused.hash(),
        unfused.hash(),
        "the hash is of the stored weights"
    );
    let io = io("mar");
    let tokens = reference_tokens(&io);
    let e = max_abs(
        &fused.decode(&tokens).unwrap(),
        &unfused.decode(&tokens).unwrap(),
    );
    assert!(e <= 1e-5, "fusion changed the output by {e}");
}

#[test]
fn progressive_prefix_decodes_and_bad_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tok = import("flux", OfficialPreset::Flux, "flux_base", dir.path());
    let io = io("flux");
    let tokens = reference_tokens(&io);
    let coarse = tok.decode_prefix(&tokens, 1).unwrap();
    assert_eq!(coarse.dims(), &[2, 3, 32, 32]);
    assert!(tok.decode_prefix(&tokens, 0).is_err());
    assert!(tok.decode_prefix(&tokens, 6).is_err());
    // An id out of range names the scale.
    let mut bad = tokens.clone();
    bad.ids[3] = (bad.ids[3].ones_like().unwrap() * 256.0).unwrap();
    let err = tok.decode(&bad).unwrap_err().to_string();
    assert!(err.contains("scale_3") && err.contains("256"), "{err}");
    // A wrong number of scales.
    let mut short = tokens.clone();
    short.ids.pop();
    short.scales.pop();
    let err = tok.decode(&short).unwrap_err().to_string();
    assert!(
        err.contains("do not match the tokenizer's schedule"),
        "{err}"
    );
}

/// Issue #15: `import --preset flux` always used 0.3611 / 0.1159 and ignored the base VAE's own
/// config.json; train_flux.py reads the normalisation from the VAE it loads.
#[test]
fn import_takes_the_normalisation_of_a_diffusers_base() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    std::fs::create_dir_all(&base).unwrap();
    for e in std::fs::read_dir(fixtures().join("flux_base")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, base.join(p.file_name().unwrap())).unwrap();
    }
    let cfg_path = base.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["scaling_factor"] = serde_json::json!(0.5);
    cfg["shift_factor"] = serde_json::Value::Null;
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let (tok, _) = import_official(
        OfficialPreset::Flux,
        &base,
        &fixtures().join("flux_quantizer_ema.pth"),
        &fixtures().join("flux_vae_ema.pth"),
        Some(SCALES.to_vec()),
        &common::device(),
    )
    .unwrap();
    assert_eq!((tok.vae.scaling_factor, tok.vae.shift_factor), (0.5, 0.0));
}
