//! Bad checkpoints and inputs get errors that name the file, the key and both shapes.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use coda::vae::{LoadOptions, Preset, VaeWeights};

fn fixtures() -> PathBuf {
    common::fixtures("vae")
}

fn load_err(path: &Path, opts: &LoadOptions) -> String {
    VaeWeights::load(path, opts, &Device::Cpu)
        .map(|_| ())
        .unwrap_err()
        .to_string()
}

fn edited_copy(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> PathBuf {
    let mut ts: Vec<(String, Tensor)> =
        candle_core::safetensors::load(fixtures().join("ldm.safetensors"), &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
    edit(&mut ts);
    let p = dir.join("edited.safetensors");
    coda::io::write_safetensors(&p, &ts, None).unwrap();
    p
}

#[test]
fn missing_file_says_so() {
    let err = load_err(
        Path::new("/nonexistent/vae.safetensors"),
        &LoadOptions::default(),
    );
    assert!(
        err.contains("/nonexistent/vae.safetensors") && err.contains("no such file"),
        "{err}"
    );
}

#[test]
fn truncated_checkpoint_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixtures().join("ldm.safetensors")).unwrap();
    for (name, len) in [
        ("trunc.safetensors", bytes.len() / 2),
        ("trunc2.safetensors", 5),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, &bytes[..len]).unwrap();
        let err = load_err(&p, &LoadOptions::default());
        assert!(
            err.contains(name) && err.contains("cannot read checkpoint"),
            "{err}"
        );
    }
    let pth = std::fs::read(fixtures().join("ldm.pth")).unwrap();
    let p = dir.path().join("trunc.pth");
    std::fs::write(&p, &pth[..pth.len() / 2]).unwrap();
    let err = load_err(&p, &LoadOptions::default());
    assert!(err.contains("trunc.pth"), "{err}");
}

#[test]
fn mis_shaped_tensor_names_key_and_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let p = edited_copy(dir.path(), |ts| {
        for (k, t) in ts.iter_mut() {
            if k == "decoder.conv_out.bias" {
                *t = Tensor::zeros(5, candle_core::DType::F32, &Device::Cpu).unwrap();
            }
        }
    });
    let err = load_err(&p, &LoadOptions::default());
    assert!(
        err.contains("decoder.conv_out.bias: checkpoint has [5], architecture needs [3]"),
        "{err}"
    );
}

#[test]
fn missing_and_unexpected_tensors_are_listed() {
    let dir = tempfile::tempdir().unwrap();
    let p = edited_copy(dir.path(), |ts| {
        ts.retain(|(k, _)| k != "encoder.mid.block_1.norm2.weight");
        ts.push((
            "encoder.extra.weight".into(),
            Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap(),
        ));
    });
    let err = load_err(&p, &LoadOptions::default());
    assert!(
        err.contains("1 missing tensors") && err.contains("encoder.mid.block_1.norm2.weight"),
        "{err}"
    );
    assert!(
        err.contains("1 unexpected tensors") && err.contains("encoder.extra.weight"),
        "{err}"
    );
}

#[test]
fn wrong_preset_reports_counts_and_first_ten() {
    let err = load_err(
        &fixtures().join("ldm.safetensors"),
        &LoadOptions {
            preset: Some(Preset::Flux),
            ..Default::default()
        },
    );
    assert!(
        err.contains("shape mismatches") && err.contains("missing tensors"),
        "{err}"
    );
    assert!(
        err.contains("... and"),
        "long lists are cut after 10: {err}"
    );
}

#[test]
fn image_size_not_divisible_is_refused() {
    let vae = VaeWeights::load(
        &fixtures().join("ldm.safetensors"),
        &LoadOptions::default(),
        &Device::Cpu,
    )
    .unwrap()
    .build()
    .unwrap();
    let x = Tensor::zeros((1, 3, 30, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    let err = vae.encode(&x).unwrap_err().to_string();
    assert!(err.contains("32x30") && err.contains("factor 4"), "{err}");
}

#[test]
fn training_keys_are_ignored_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let p = edited_copy(dir.path(), |ts| {
        ts.push((
            "loss.discriminator.main.0.weight".into(),
            Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap(),
        ));
    });
    let w = VaeWeights::load(&p, &LoadOptions::default(), &Device::Cpu).unwrap();
    assert_eq!(
        w.ignored_keys,
        vec!["loss.discriminator.main.0.weight".to_string()]
    );
}

/// Issue #15: tokenizer settings that used to panic are refused when the config is read, naming
/// the setting (the config is checked before any weight is read, so no weights are needed here).
#[test]
fn impossible_tokenizer_configs_are_refused() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/tokenizer/config.json"),
    )
    .unwrap();
    let base: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "/scales",
            serde_json::json!({"derived": {"num_scales": 0}}),
            "num_scales",
        ),
        (
            "/scales",
            serde_json::json!({"fixed": {"sizes": []}}),
            "scales",
        ),
        (
            "/scales",
            serde_json::json!({"fixed": {"sizes": [1, 4, 2]}}),
            "increasing",
        ),
        ("/resolution", serde_json::json!(0), "resolution 0"),
        ("/resolution", serde_json::json!(6), "multiple"),
        (
            "/quantizer/codebook_size",
            serde_json::json!(0),
            "codebook_size",
        ),
    ];
    for (pointer, value, expect) in cases {
        let mut cfg = base.clone();
        *cfg.pointer_mut(pointer).unwrap() = value.clone();
        let err = coda::tokenizer::Tokenizer::from_bytes(
            &cfg.to_string(),
            &[],
            Path::new("edited/config.json"),
            &Device::Cpu,
        )
        .err()
        .unwrap_or_else(|| panic!("{pointer} = {value} was accepted"))
        .to_string();
        assert!(
            err.contains(expect) && err.contains("edited/config.json"),
            "{pointer} = {value}: {err}"
        );
    }
}

/// Issue #15: a checkpoint with NaN or infinite weights is refused, naming the tensor, instead
/// of loading and producing NaN images with exit 0.
#[test]
fn non_finite_weights_are_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    for bad in [f32::NAN, f32::INFINITY] {
        let p = edited_copy(dir.path(), |ts| {
            for (k, t) in ts.iter_mut() {
                if k == "decoder.conv_out.bias" {
                    *t = Tensor::new(&[0.0f32, bad, 0.0], &Device::Cpu).unwrap();
                }
            }
        });
        let err = load_err(&p, &LoadOptions::default());
        assert!(
            err.contains("decoder.conv_out.bias holds 1 non-finite value(s)"),
            "{bad}: {err}"
        );
    }
}
