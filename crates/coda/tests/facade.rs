//! The library facade on the embedded default tokenizer: image-level calls agree with the tensor
//! path, tokens do not depend on batch size or thread pool, precision belongs to the tokenizer or
//! the call (never to the process), and bad input is refused with a clear error.

use std::path::PathBuf;

use candle_core::Device;
use coda::tokenizer::{token_file::TokenFileMeta, Posterior, Tokenizer, Tokens};
use coda::{EncodeOptions, Precision};

fn photos() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    vec![
        root.join("assets/samples/lake.png"),
        root.join("assets/samples/kite.png"),
        root.join("assets/photos/cups.jpg"),
    ]
}

fn ids(t: &Tokens) -> Vec<u32> {
    t.flat().unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// 64-px crops keep the tests quick (the scales for a 16x16 latent).
const SIZE: u32 = 64;

/// The photos prepared at `SIZE`, as images and as one tensor.
fn prepared() -> (Vec<image::RgbImage>, candle_core::Tensor) {
    let images: Vec<_> = coda::data::load_prepared(&photos(), Some(SIZE))
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let x = coda::data::images_to_tensor(&images, &Device::Cpu).unwrap();
    (images, x)
}

#[test]
fn image_calls_match_the_tensor_path_and_ignore_batch_size() {
    let tok = Tokenizer::default_tokenizer(&Device::Cpu).unwrap();
    let (images, x) = prepared();
    let reference = ids(&tok.encode(&x).unwrap());
    for batch in [1, 2, 8] {
        let opts = EncodeOptions {
            batch,
            ..Default::default()
        };
        assert_eq!(ids(&tok.encode_images(&images, &opts).unwrap()), reference);
        assert_eq!(
            ids(&tok.encode_paths(&photos(), Some(SIZE), &opts).unwrap()),
            reference,
            "batch {batch}"
        );
    }
    // Sampling: row r uses seed + r whatever the batch size; different from the mean.
    let sampled = |batch| {
        let opts = EncodeOptions {
            batch,
            sample_seed: Some(7),
            ..Default::default()
        };
        ids(&tok.encode_images(&images, &opts).unwrap())
    };
    let one = sampled(1);
    assert_eq!(one, sampled(3));
    assert_ne!(one, reference);
    let third = tok
        .encode_with(&x.narrow(0, 2, 1).unwrap(), Posterior::Sample(9))
        .unwrap()
        .tokens;
    let l = third.len_per_image();
    assert_eq!(ids(&third), one[2 * l..3 * l].to_vec());
    // Decoding to images gives what the tensor path gives.
    let tokens = tok
        .encode_images(&images, &EncodeOptions::default())
        .unwrap();
    let decoded = tok.decode_images(&tokens, None, None).unwrap();
    let via_tensor = coda::data::tensor_to_images(&tok.decode(&tokens).unwrap()).unwrap();
    assert_eq!(decoded, via_tensor);
    assert_eq!(decoded[0].dimensions(), (SIZE, SIZE));
}

#[test]
fn an_own_thread_pool_gives_the_same_tokens() {
    let images: Vec<_> = coda::data::load_prepared(&photos()[..2], Some(SIZE))
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let opts = EncodeOptions::default();
    let global = Tokenizer::default_tokenizer(&Device::Cpu).unwrap();
    let reference = ids(&global.encode_images(&images, &opts).unwrap());
    for threads in [1, 3] {
        let tok = Tokenizer::default_tokenizer(&Device::Cpu)
            .unwrap()
            .with_threads(threads)
            .unwrap();
        assert_eq!(ids(&tok.encode_images(&images, &opts).unwrap()), reference);
    }
    // Two threads sharing one tokenizer.
    let tok = std::sync::Arc::new(global);
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let (tok, images) = (tok.clone(), images.clone());
            std::thread::spawn(move || ids(&tok.encode_images(&images, &opts).unwrap()))
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), reference);
    }
}

#[test]
fn precision_is_scoped_never_process_wide() {
    assert_eq!(coda::precision(), Precision::F32);
    let inner = coda::with_precision(Precision::Bf16, coda::precision);
    assert_eq!(inner, Precision::Bf16);
    assert_eq!(coda::precision(), Precision::F32, "restored");
    // Another thread never sees this thread's scope.
    let seen = coda::with_precision(Precision::Bf16x3, || {
        std::thread::spawn(coda::precision).join().unwrap()
    });
    assert_eq!(seen, Precision::F32);
    let tok = Tokenizer::default_tokenizer(&Device::Cpu).unwrap();
    if coda::amx_available() {
        let fast = tok.with_precision(Precision::Bf16x3).unwrap();
        assert_eq!(fast.precision(), Precision::Bf16x3);
    } else {
        assert!(
            std::env::var("CODA_REQUIRE_AMX").is_err(),
            "CODA_REQUIRE_AMX is set but this CPU/OS gives no AMX"
        );
        println!("SKIP bf16x3 tokenizer: this CPU has no AMX; checking the refusal instead");
        let err = tok
            .with_precision(Precision::Bf16x3)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("AMX"), "{err}");
    }
    let tok = Tokenizer::default_tokenizer(&Device::Cpu).unwrap();
    match tok.with_precision(Precision::Bf16) {
        Ok(fast) => assert_eq!(fast.precision(), Precision::Bf16),
        Err(e) => {
            assert!(
                std::env::var("CODA_REQUIRE_BF16").is_err(),
                "CODA_REQUIRE_BF16 is set but bf16 is refused: {e}"
            );
            println!("SKIP bf16 tokenizer: this CPU has neither AMX nor AVX512_BF16");
            assert!(e.to_string().contains("AVX512_BF16"), "{e}");
        }
    }
}

/// The AMX precisions through the whole tokenizer (the conv op's dispatch, its weight cache,
/// fused residuals): bf16x3 keeps f32's tokens and pictures, bf16 stays close. On the CPU's
/// tiles where it has AMX, and everywhere on the software model of the tile unit, which
/// must then give the hardware's tokens.
#[test]
fn amx_precisions_keep_f32_tokens_on_the_tiles_and_their_software_model() {
    use coda::kernels::amx::with_emulated_tiles;
    let tok = Tokenizer::default_tokenizer(&Device::Cpu).unwrap();
    let (_, x) = prepared();
    let f32_tokens = tok.encode(&x).unwrap();
    let f32_pixels = tok.decode(&f32_tokens).unwrap();
    let run = |p: Precision| {
        let t = Tokenizer::default_tokenizer(&Device::Cpu)
            .unwrap()
            .with_precision(p)
            .unwrap();
        let tokens = t.encode(&x).unwrap();
        // Decode f32's tokens, so that the pixels compare the decoder alone.
        (ids(&tokens), t.decode(&f32_tokens).unwrap())
    };
    let psnr = |a: &candle_core::Tensor| {
        let mse: f32 = (a - &f32_pixels)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        // Pixels in [-1, 1]: a peak-to-peak range of 2.
        10.0 * (4.0 / mse).log10()
    };
    let hardware = coda::amx_available();
    if !hardware {
        assert!(
            std::env::var("CODA_REQUIRE_AMX").is_err(),
            "CODA_REQUIRE_AMX is set but this CPU/OS gives no AMX"
        );
        println!(
            "SKIP the AMX tokenizer on hardware tiles: this CPU has no AMX; software model only"
        );
    }
    for p in [Precision::Bf16x3, Precision::Bf16] {
        let model = with_emulated_tiles(|| run(p));
        let mut results = vec![("software model", model.clone())];
        if hardware {
            let got = run(p);
            assert_eq!(
                got.0,
                model.0,
                "{}: hardware tiles' tokens vs the model's",
                p.name()
            );
            results.push(("hardware tiles", got));
        }
        for (on, (tokens, pixels)) in results {
            let same = tokens
                .iter()
                .zip(ids(&f32_tokens))
                .filter(|(a, b)| **a == *b)
                .count() as f64
                / tokens.len() as f64;
            let db = psnr(&pixels);
            println!(
                "{} on {on}: {:.2}% of f32's tokens, decoder PSNR vs f32 {db:.1} dB",
                p.name(),
                100.0 * same
            );
            match p {
                Precision::Bf16x3 => {
                    assert_eq!(same, 1.0, "bf16x3 on {on}: f32's tokens");
                    // Measured 118.6 dB on the model; 10x that MSE is 108.6.
                    assert!(db > 105.0, "bf16x3 on {on}: {db} dB");
                }
                // Measured 51.7% of the tokens (a 16x16 latent's near-ties flip under bf16's
                // 8-bit mantissa), 64.3 dB.
                _ => assert!(
                    same > 0.3 && db > 54.0,
                    "bf16 on {on}: {same} of tokens, {db} dB"
                ),
            }
        }
    }
}

#[test]
fn bad_input_is_refused_with_a_clear_error() {
    let tok = Tokenizer::default_tokenizer(&Device::Cpu).unwrap();
    let opts = EncodeOptions::default();
    let err = tok.encode_images(&[], &opts).unwrap_err().to_string();
    assert!(err.contains("empty"), "{err}");
    let mixed = vec![image::RgbImage::new(64, 64), image::RgbImage::new(32, 64)];
    let err = tok.encode_images(&mixed, &opts).unwrap_err().to_string();
    assert!(err.contains("image 1 is 32x64"), "{err}");
    let odd = vec![image::RgbImage::new(30, 30)];
    let err = tok.encode_images(&odd, &opts).unwrap_err().to_string();
    assert!(err.contains("multiple"), "{err}");
    let missing = vec![PathBuf::from("/nonexistent/cat.png")];
    let err = tok
        .encode_paths(&missing, None, &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/cat.png"), "{err}");
    // Token files of another tokenizer or codebook.
    let path = std::path::Path::new("t.safetensors");
    let meta = |v: usize, hash: &str| TokenFileMeta {
        codebook_size: v,
        tokenizer_hash: hash.into(),
        sources: vec![],
    };
    let v = tok.codebook_size();
    assert!(tok
        .check_token_file(&meta(v, tok.hash()), path, false)
        .unwrap()
        .is_none());
    let err = tok
        .check_token_file(&meta(v + 1, tok.hash()), path, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("codebook"), "{err}");
    assert!(tok.check_token_file(&meta(v, "0123"), path, false).is_err());
    let warning = tok.check_token_file(&meta(v, "0123"), path, true).unwrap();
    assert!(warning.unwrap().contains("0123"));
}

/// Issue #15: with `sample`, evaluation seeded a batch from its first row, so an unreadable
/// image shifted the seeds of the images after it (the numbers then depended on the batch size).
#[test]
fn evaluation_seeds_do_not_shift_after_a_skipped_image() {
    use coda::evaluation::{EvalModel, EvalOptions};
    let tok = Tokenizer::default_tokenizer(&Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.png");
    std::fs::write(&broken, b"not a png").unwrap();
    let p = photos();
    let paths = vec![p[0].clone(), broken, p[1].clone(), p[2].clone()];
    let eval = |batch| {
        let opts = EvalOptions {
            size: SIZE,
            batch,
            sample: true,
            seed: 3,
            ..Default::default()
        };
        let r = EvalModel::Tokenizer(&tok)
            .evaluate(&paths, &opts, &mut |_| {})
            .unwrap();
        assert_eq!(r.json["data"]["images"], 3);
        r.json["metrics"]["psnr"]["float"].as_f64().unwrap()
    };
    assert_eq!(eval(4), eval(1));
}
