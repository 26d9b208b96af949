//! The bodies of the fuzz targets (`fuzz/`, cargo-fuzz + libFuzzer on nightly) and of the
//! stable test that replays their corpus and every past finding (`tests/fuzz_corpus.rs`). Each
//! takes arbitrary bytes and must return without a panic, a hang or a runaway allocation: bad
//! input is an `Err`, which is dropped here. Jobs run under a 1 GiB memory limit, so that the
//! estimates of [`crate::limits`] refuse what the fuzzer's 2 GB RSS cap would otherwise catch.

use std::path::PathBuf;

use candle_core::Device;

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// The fuzz targets by name, as in `fuzz/fuzz_targets/NAME.rs` and `fuzz/corpus/NAME/`.
pub const TARGETS: &[(&str, Target)] = &[
    ("image", image),
    ("token_file", token_file),
    ("tokenizer_folder", tokenizer_folder),
    ("vae_checkpoint", vae_checkpoint),
    ("train_config", train_config),
];

fn setup() {
    crate::limits::set_max_memory(Some(1 << 30));
}

/// A scratch file for APIs that read paths (one per process and extension).
fn scratch(data: &[u8], ext: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("coda-fuzz-{}.{ext}", std::process::id()));
    std::fs::write(&p, data).expect("scratch file");
    p
}

/// Image decoding with our limits, then the resize-and-crop of `coda encode`.
pub fn image(data: &[u8]) {
    setup();
    if let Ok(img) = crate::data::image_io::decode_image(data, "fuzz.img".as_ref()) {
        let _ = crate::data::prepare(img, Some(32));
    }
}

/// Token-file reading (its tensors checked against each other and the metadata).
pub fn token_file(data: &[u8]) {
    setup();
    let p = scratch(data, "safetensors");
    let _ = crate::tokenizer::token_file::read(&p, &Device::Cpu);
}

/// A tokenizer folder: config.json up to the first NUL byte, then model.safetensors. What
/// loads also encodes and decodes one small picture.
pub fn tokenizer_folder(data: &[u8]) {
    setup();
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let Ok(config) = std::str::from_utf8(&data[..split]) else {
        return;
    };
    let weights = data.get(split + 1..).unwrap_or_default();
    let Ok(tok) = crate::tokenizer::Tokenizer::from_bytes(
        config,
        weights,
        "fuzz-tokenizer".as_ref(),
        &Device::Cpu,
    ) else {
        return;
    };
    let f = tok.config().vae.downsample_factor().clamp(1, 64) as u32;
    let img = image::RgbImage::from_pixel(2 * f, 2 * f, image::Rgb([90, 140, 200]));
    if let Ok(tokens) = tok.encode_images(&[img], &crate::tokenizer::EncodeOptions::default()) {
        let _ = tok.decode(&tokens);
    }
}

/// A VAE checkpoint: the first byte chooses `.safetensors` or `.pth`, the rest is the file;
/// the architecture is inferred from the tensors, then built.
pub fn vae_checkpoint(data: &[u8]) {
    setup();
    let Some((&kind, file)) = data.split_first() else {
        return;
    };
    let p = scratch(file, if kind % 2 == 0 { "safetensors" } else { "pth" });
    let opts = crate::vae::LoadOptions::default();
    if let Ok(w) = crate::vae::VaeWeights::load(&p, &opts, &Device::Cpu) {
        let _ = w.build();
    }
}

/// A training config (TOML): parsing, validation, and the model a `train-vae` run would build.
pub fn train_config(data: &[u8]) {
    setup();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(table) = text.parse::<toml::Table>() else {
        return;
    };
    let Ok(cfg) = crate::training::TrainConfig::from_table(table, "fuzz.toml".as_ref()) else {
        return;
    };
    let _ = crate::training::trainer::initial_model(crate::training::Role::Vae, &cfg);
}
