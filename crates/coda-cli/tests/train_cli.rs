//! The training commands end to end through the binary, on a handful of crops of the bundled
//! photos: train-vae -> tokenizer new -> adapt (stopped, then resumed) -> eval, and train-vq.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn coda(args: &[&str], cwd: &Path) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_coda"))
        .args(args)
        .current_dir(cwd)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn ok(args: &[&str], cwd: &Path) -> String {
    let (s, out, err) = coda(args, cwd);
    assert!(s, "coda {args:?} failed:\n{err}");
    out + &err
}

/// Tiny model keys shared by the runs: f2, 4 latent channels, 16-px crops.
const TINY: [&str; 14] = [
    "--preset",
    "tiny-cpu",
    "--size",
    "16",
    "--batch",
    "2",
    "--set",
    "model.channels=[8, 16]",
    "--set",
    "model.latent_channels=4",
    "--set",
    "model.norm_groups=4",
    "--set",
    "resize=48",
];

#[test]
fn train_vae_then_adapt_with_resume_then_eval() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = d.join("photos");
    std::fs::create_dir_all(&data).unwrap();
    for f in ["ladybird.jpg", "cups.jpg"] {
        std::fs::copy(repo().join("assets/photos").join(f), data.join(f)).unwrap();
    }
    let mut a = vec![
        "train-vae",
        "--data",
        "photos",
        "--out",
        "vae-run",
        "--steps",
        "3",
    ];
    a.extend(TINY);
    ok(&a, d);
    assert!(d.join("vae-run/vae/config.json").exists());
    assert!(d.join("vae-run/metrics.jsonl").exists());
    ok(
        &[
            "tokenizer",
            "new",
            "--vae",
            "vae-run/vae",
            "--codebook-size",
            "16",
            "--lora-rank",
            "2",
            "--resolution",
            "16",
            "-o",
            "start",
        ],
        d,
    );
    let mut a = vec![
        "adapt",
        "--tokenizer",
        "start",
        "--data",
        "photos",
        "--out",
        "run",
        "--steps",
        "4",
        "--stop-after",
        "2",
    ];
    a.extend(TINY);
    let out = ok(&a, d);
    assert!(out.contains("checkpoint @ 2"), "{out}");
    assert!(!d.join("run/tokenizer").exists(), "exported before the end");
    // Starting afresh over a run folder is refused: nothing is overwritten.
    let mut again = vec![
        "adapt",
        "--tokenizer",
        "start",
        "--data",
        "photos",
        "--out",
        "run",
        "--steps",
        "4",
    ];
    again.extend(TINY);
    let (s, _, err) = coda(&again, d);
    assert!(!s && err.contains("--resume"), "{err}");
    let out = ok(&["adapt", "--resume", "--out", "run"], d);
    assert!(out.contains("updates 2..4"), "{out}");
    assert!(out.contains("exported"), "{out}");
    let json = d.join("eval.json");
    ok(
        &[
            "eval",
            "--tokenizer",
            "run/tokenizer",
            "--data",
            "photos",
            "--size",
            "16",
            "--resize",
            "48",
            "--json",
            json.to_str().unwrap(),
        ],
        d,
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(v["metrics"]["psnr"]["uint8_truncated"].as_f64().unwrap() > 0.0);
    // A missing starting tokenizer and an unknown key are clear errors.
    let (s, _, err) = coda(
        &["adapt", "--data", "photos", "--out", "x", "--steps", "1"],
        d,
    );
    assert!(!s && err.contains("--tokenizer"), "{err}");
    let (s, _, err) = coda(
        &[
            "train-vq",
            "--data",
            "photos",
            "--out",
            "x",
            "--steps",
            "1",
            "--set",
            "lr_typo=1",
        ],
        d,
    );
    assert!(!s && err.contains("lr_typo"), "{err}");
}

#[test]
fn train_vq_multiscale_exports_a_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut a = vec![
        "train-vq",
        "--data",
        repo()
            .join("assets/photos")
            .to_str()
            .unwrap()
            .to_string()
            .leak(),
        "--out",
        "msvq",
        "--steps",
        "2",
        "--set",
        "model.scales=3",
        "--set",
        "model.codebook_size=32",
    ];
    a.extend(TINY);
    ok(&a, d);
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("msvq/tokenizer/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["quantizer"]["kind"], "nearest");
    assert_eq!(cfg["scales"]["derived"]["num_scales"], 3);
}
