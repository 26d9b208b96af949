//! `coda tokenizer new`, `encode`, `decode`, `reconstruct --tokenizer` and `import`, end to end on
//! the bundled photos with the random-weight fixture VAEs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::Device;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn coda_env(args: &[&str], cwd: &Path, threads: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_coda"))
        .args(args)
        .current_dir(cwd)
        .env("RAYON_NUM_THREADS", threads)
        .output()
        .unwrap()
}

fn ok(args: &[&str], cwd: &Path) -> String {
    let o = coda_env(args, cwd, "2");
    assert!(
        o.status.success(),
        "coda {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fail(args: &[&str], cwd: &Path) -> String {
    let o = coda_env(args, cwd, "2");
    assert!(!o.status.success(), "coda {args:?} should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A fresh V=64 tokenizer on the f4 diffusers fixture, working at 32x32.
fn new_tokenizer(dir: &Path) -> PathBuf {
    let vae = repo().join("fixtures/vae/diffusers");
    ok(
        &[
            "tokenizer",
            "new",
            "--vae",
            vae.to_str().unwrap(),
            "--codebook-size",
            "64",
            "--lora-rank",
            "4",
            "--resolution",
            "32",
            "-o",
            "tok",
        ],
        dir,
    );
    dir.join("tok")
}

fn photos() -> String {
    repo().join("assets/photos").display().to_string()
}

#[test]
fn encode_then_decode_reproduces_the_reconstruction() {
    let d = tempfile::tempdir().unwrap();
    new_tokenizer(d.path());
    let out = ok(
        &[
            "encode",
            "--tokenizer",
            "tok",
            "-o",
            "t.safetensors",
            &photos(),
        ],
        d.path(),
    );
    assert!(
        out.contains("encoded 2 images: 204 tokens each over 8 scales"),
        "{out}"
    );
    ok(
        &["decode", "--tokenizer", "tok", "-o", "dec", "t.safetensors"],
        d.path(),
    );
    let lady = repo().join("assets/photos/ladybird.jpg");
    let rec = ok(
        &[
            "reconstruct",
            "--tokenizer",
            "tok",
            "--size",
            "32",
            "--progressive",
            "-o",
            "r.png",
            lady.to_str().unwrap(),
        ],
        d.path(),
    );
    assert!(
        rec.contains("PSNR") && rec.contains("bits       1224 per image"),
        "{rec}"
    );
    let a = image::open(d.path().join("dec/ladybird.png"))
        .unwrap()
        .to_rgb8();
    let b = image::open(d.path().join("r.png")).unwrap().to_rgb8();
    assert_eq!(a, b, "decode(encode(x)) is the reconstruction");
    let strip = image::open(d.path().join("r_progressive.png")).unwrap();
    assert_eq!((strip.width(), strip.height()), (32 * 8, 32));
    // Coarse decoding from a prefix of the scales.
    ok(
        &[
            "decode",
            "--tokenizer",
            "tok",
            "--scales",
            "2",
            "-o",
            "coarse",
            "t.safetensors",
        ],
        d.path(),
    );
    assert!(d.path().join("coarse/cups.png").exists());
}

#[test]
fn tokens_are_identical_for_any_thread_count_and_batch_size() {
    let d = tempfile::tempdir().unwrap();
    new_tokenizer(d.path());
    // bf16x3 needs AMX, bf16 AMX or AVX512_BF16; elsewhere they are refused.
    let amx = coda::amx_available();
    let mut precisions = vec!["f32"];
    if amx {
        precisions.push("bf16x3");
    } else {
        eprintln!("SKIP bf16x3 determinism: no AMX (its refusal is checked instead)");
    }
    if coda::Precision::Bf16.check_supported().is_ok() {
        precisions.push("bf16");
    } else {
        eprintln!("SKIP bf16 determinism: neither AMX nor AVX512_BF16");
    }
    for precision in precisions {
        for sample in [false, true] {
            let mut flats = Vec::new();
            for (threads, batch) in [("1", "1"), ("2", "2"), ("4", "3")] {
                let name = format!("t{threads}{sample}{precision}.safetensors");
                let mut args = vec![
                    "encode",
                    "--tokenizer",
                    "tok",
                    "-o",
                    name.as_str(),
                    "--batch",
                    batch,
                    "--precision",
                    precision,
                ];
                if sample {
                    args.extend(["--sample", "--seed", "3"]);
                }
                let p = photos();
                args.push(&p);
                let o = coda_env(&args, d.path(), threads);
                assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                let (t, _) =
                    coda::tokenizer::token_file::read(&d.path().join(&name), &Device::Cpu).unwrap();
                flats.push(t.flat().unwrap().to_vec2::<u32>().unwrap());
            }
            assert_eq!(
                flats[0], flats[1],
                "{precision}, sample {sample}: same tokens on 1 and 2 threads, batch 1 and 2"
            );
            assert_eq!(
                flats[0], flats[2],
                "{precision}, sample {sample}: same tokens on 1 and 4 threads, batch 1 and 3"
            );
        }
    }
    if !amx {
        let err = fail(
            &[
                "encode",
                "--tokenizer",
                "tok",
                "--precision",
                "bf16x3",
                &photos(),
                "-o",
                "x.safetensors",
            ],
            d.path(),
        );
        assert!(err.contains("AMX"), "{err}");
    }
}

#[test]
fn token_files_of_another_tokenizer_or_with_bad_ids_are_refused() {
    let d = tempfile::tempdir().unwrap();
    new_tokenizer(d.path());
    ok(
        &[
            "encode",
            "--tokenizer",
            "tok",
            "-o",
            "t.safetensors",
            &photos(),
        ],
        d.path(),
    );
    let vae = repo().join("fixtures/vae/diffusers");
    ok(
        &[
            "tokenizer",
            "new",
            "--vae",
            vae.to_str().unwrap(),
            "--codebook-size",
            "64",
            "--seed",
            "9",
            "--resolution",
            "32",
            "-o",
            "other",
        ],
        d.path(),
    );
    let err = fail(
        &[
            "decode",
            "--tokenizer",
            "other",
            "-o",
            "dec",
            "t.safetensors",
        ],
        d.path(),
    );
    assert!(err.contains("--force"), "{err}");
    ok(
        &[
            "decode",
            "--tokenizer",
            "other",
            "--force",
            "-o",
            "dec",
            "t.safetensors",
        ],
        d.path(),
    );
    ok(
        &[
            "tokenizer",
            "new",
            "--vae",
            vae.to_str().unwrap(),
            "--codebook-size",
            "32",
            "--resolution",
            "32",
            "-o",
            "small",
        ],
        d.path(),
    );
    let err = fail(
        &[
            "decode",
            "--tokenizer",
            "small",
            "-o",
            "dec2",
            "t.safetensors",
        ],
        d.path(),
    );
    assert!(
        err.contains("codebook of 64 codes, the tokenizer has 32"),
        "{err}"
    );
    assert!(!d.path().join("dec2").exists());
}

#[test]
fn corrupt_image_in_a_batch_names_the_file_and_writes_no_token_file() {
    let d = tempfile::tempdir().unwrap();
    new_tokenizer(d.path());
    std::fs::create_dir(d.path().join("imgs")).unwrap();
    std::fs::copy(
        repo().join("assets/photos/cups.jpg"),
        d.path().join("imgs/a.jpg"),
    )
    .unwrap();
    std::fs::write(d.path().join("imgs/b.png"), b"not a png").unwrap();
    let err = fail(
        &[
            "encode",
            "--tokenizer",
            "tok",
            "-o",
            "t.safetensors",
            "imgs",
        ],
        d.path(),
    );
    assert!(err.contains("b.png"), "{err}");
    assert!(!d.path().join("t.safetensors").exists());
}

#[test]
fn import_writes_a_working_tokenizer_folder() {
    let d = tempfile::tempdir().unwrap();
    let t = repo().join("fixtures/tokenizer");
    let s = |n: &str| t.join(n).display().to_string();
    let out = ok(
        &[
            "import",
            "--preset",
            "flux",
            "--vae",
            &s("flux_base"),
            "--quantizer",
            &s("flux_quantizer_ema.pth"),
            "--vae-weights",
            &s("flux_vae_ema.pth"),
            "--scales",
            "1,2,3,5,8",
            "-o",
            "imp",
        ],
        d.path(),
    );
    assert!(
        out.contains("V = 256") && out.contains("LoRA rank 4 on 26 convs (conv1,conv2)"),
        "{out}"
    );
    let rec = ok(
        &[
            "reconstruct",
            "--tokenizer",
            "imp",
            "--size",
            "32",
            &format!("{}/cups.jpg", photos()),
        ],
        d.path(),
    );
    assert!(
        rec.contains("103 over 5 scales (1,2,3,5,8), codebook 256"),
        "{rec}"
    );
    let err = fail(
        &[
            "import",
            "--preset",
            "flux",
            "--vae",
            &s("flux_base"),
            "--quantizer",
            &s("flux_vae_ema.pth"),
            "--vae-weights",
            &s("flux_vae_ema.pth"),
            "-o",
            "bad",
        ],
        d.path(),
    );
    assert!(err.contains("codebooks.weight"), "{err}");
}

#[test]
fn eval_records_metrics_and_protocol_and_skips_unreadable_images() {
    let d = tempfile::tempdir().unwrap();
    new_tokenizer(d.path());
    std::fs::create_dir(d.path().join("imgs")).unwrap();
    for f in ["cups.jpg", "ladybird.jpg"] {
        std::fs::copy(
            repo().join("assets/photos").join(f),
            d.path().join("imgs").join(f),
        )
        .unwrap();
    }
    std::fs::write(d.path().join("imgs/broken.png"), b"not a png").unwrap();
    let out = ok(
        &[
            "eval",
            "--tokenizer",
            "tok",
            "--data",
            "imgs",
            "--size",
            "32",
            "--json",
            "e.json",
        ],
        d.path(),
    );
    assert!(out.contains("2 images (1 skipped)"), "{out}");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("e.json")).unwrap()).unwrap();
    assert_eq!(j["data"]["images"], 2);
    assert_eq!(j["data"]["skipped"].as_array().unwrap().len(), 1);
    assert_eq!(j["model"]["tokens_per_image"], 204);
    assert_eq!(j["posterior"], "mean");
    assert_eq!(
        j["precision"], "f32",
        "the convolution arithmetic is recorded"
    );
    for p in ["uint8_truncated", "float"] {
        assert!(j["metrics"]["psnr"][p].as_f64().unwrap() > 0.0);
        let s = j["metrics"]["ssim"][p].as_f64().unwrap();
        assert!(s > -1.0 && s <= 1.0);
    }
    let usage = j["metrics"]["codebook"]["usage_per_scale"]
        .as_array()
        .unwrap();
    assert_eq!(usage.len(), 8);
    // The same harness evaluates the continuous parent VAE.
    let vae = repo().join("fixtures/vae/diffusers");
    ok(
        &[
            "eval",
            "--vae",
            vae.to_str().unwrap(),
            "--data",
            "imgs",
            "--size",
            "32",
            "--json",
            "v.json",
        ],
        d.path(),
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("v.json")).unwrap()).unwrap();
    assert_eq!(v["model"]["kind"], "vae");
    std::fs::create_dir(d.path().join("empty")).unwrap();
    let err = fail(
        &[
            "eval",
            "--tokenizer",
            "tok",
            "--data",
            "empty",
            "--json",
            "x.json",
        ],
        d.path(),
    );
    assert!(err.contains("no image files"), "{err}");
}

#[test]
fn eval_computes_rfid_and_reuses_reference_statistics() {
    let d = tempfile::tempdir().unwrap();
    new_tokenizer(d.path());
    // Deterministic random Inception weights, written as a user's converted weight file would be.
    let w = coda::evaluation::inception::deterministic_weights(&Device::Cpu).unwrap();
    let named: Vec<(String, candle_core::Tensor)> = w.into_iter().collect();
    coda::io::write_safetensors(&d.path().join("inception.safetensors"), &named, None).unwrap();
    let p = photos();
    let first = ok(
        &[
            "eval",
            "--tokenizer",
            "tok",
            "--data",
            &p,
            "--size",
            "32",
            "--inception",
            "inception.safetensors",
            "--save-ref-stats",
            "ref.safetensors",
            "--json",
            "a.json",
        ],
        d.path(),
    );
    assert!(first.contains("rFID"), "{first}");
    let second = ok(
        &[
            "eval",
            "--tokenizer",
            "tok",
            "--data",
            &p,
            "--size",
            "32",
            "--inception",
            "inception.safetensors",
            "--ref-stats",
            "ref.safetensors",
            "--json",
            "b.json",
        ],
        d.path(),
    );
    let read = |f: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.path().join(f)).unwrap()).unwrap()
    };
    let (a, b) = (read("a.json"), read("b.json"));
    let (fa, fb) = (
        a["metrics"]["rfid"]["value"].as_f64().unwrap(),
        b["metrics"]["rfid"]["value"].as_f64().unwrap(),
    );
    assert!(fa.is_finite() && fa >= 0.0, "{fa}");
    assert!(
        (fa - fb).abs() <= 1e-9 * fa.max(1.0),
        "saved statistics give the same rFID: {fa} vs {fb}; {second}"
    );
    assert!(
        a["metrics"]["rfid"]["inception_weights_hash"]
            .as_str()
            .unwrap()
            .len()
            == 16
    );
}

#[test]
fn eval_computes_lpips_when_given_weights() {
    let d = tempfile::tempdir().unwrap();
    new_tokenizer(d.path());
    let shapes = coda::evaluation::lpips::parameter_shapes();
    let named: Vec<(String, candle_core::Tensor)> = shapes
        .into_iter()
        .map(|(k, s)| {
            (
                k,
                candle_core::Tensor::randn(0f32, 0.05, s, &Device::Cpu)
                    .unwrap()
                    .abs()
                    .unwrap(),
            )
        })
        .collect();
    coda::io::write_safetensors(&d.path().join("lpips.safetensors"), &named, None).unwrap();
    let out = ok(
        &[
            "eval",
            "--tokenizer",
            "tok",
            "--data",
            &photos(),
            "--size",
            "32",
            "--lpips",
            "lpips.safetensors",
            "--json",
            "l.json",
        ],
        d.path(),
    );
    assert!(out.contains("LPIPS"), "{out}");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("l.json")).unwrap()).unwrap();
    let v = j["metrics"]["lpips"]["value"].as_f64().unwrap();
    assert!(v.is_finite() && v > 0.0, "{v}");
    assert!(
        j["metrics"]["rfid"].is_null(),
        "no rFID without --inception"
    );
    // Wrong weights are named, not silently used.
    let bad: Vec<(String, candle_core::Tensor)> = vec![(
        "lin0.model.1.weight".into(),
        candle_core::Tensor::zeros((1, 3, 1, 1), candle_core::DType::F32, &Device::Cpu).unwrap(),
    )];
    coda::io::write_safetensors(&d.path().join("bad.safetensors"), &bad, None).unwrap();
    let err = fail(
        &[
            "eval",
            "--tokenizer",
            "tok",
            "--data",
            &photos(),
            "--lpips",
            "bad.safetensors",
            "--json",
            "x.json",
        ],
        d.path(),
    );
    assert!(
        err.contains("lin0.model.1.weight: checkpoint has [1, 3, 1, 1]"),
        "{err}"
    );
}

/// `tokenizer new --quantizer-from DIR --assign nearest-value`: the codebook and scales come
/// from DIR, the rule changes the tokens and the tokenizer hash (token files of one are refused
/// by the other), and a source whose encoder has adapters is refused.
#[test]
fn quantizer_from_and_the_assignment_rule() {
    let d = tempfile::tempdir().unwrap();
    let vae = repo().join("fixtures/vae/diffusers");
    let vae = vae.to_str().unwrap();
    let make = |extra: &[&str], out: &str| {
        let mut args = vec![
            "tokenizer",
            "new",
            "--vae",
            vae,
            "--resolution",
            "32",
            "-o",
            out,
        ];
        args.extend_from_slice(extra);
        ok(&args, d.path())
    };
    make(
        &[
            "--codebook-size",
            "64",
            "--lora-rank",
            "4",
            "--lora-modules",
            "decoder",
        ],
        "dec",
    );
    make(
        &["--quantizer-from", "dec", "--assign", "nearest-value"],
        "nv",
    );
    let config = std::fs::read_to_string(d.path().join("nv/config.json")).unwrap();
    assert!(config.contains("\"assign\": \"nearest_value\""), "{config}");
    assert!(config.contains("\"codebook_size\": 64"), "{config}");
    let enc = |tok: &str, out: &str| {
        ok(
            &["encode", "--tokenizer", tok, "-o", out, &photos()],
            d.path(),
        );
        std::fs::read(d.path().join(out)).unwrap()
    };
    assert_ne!(enc("dec", "a.safetensors"), enc("nv", "b.safetensors"));
    let err = fail(
        &["decode", "--tokenizer", "nv", "-o", "x", "a.safetensors"],
        d.path(),
    );
    assert!(err.contains("hash") || err.contains("tokenizer"), "{err}");

    new_tokenizer(d.path()); // LoRA on conv1/conv2 of encoder and decoder
    let err = fail(
        &[
            "tokenizer",
            "new",
            "--vae",
            vae,
            "--quantizer-from",
            "tok",
            "-o",
            "bad",
        ],
        d.path(),
    );
    assert!(err.contains("adapts the encoder"), "{err}");
}
