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

/// `d/photos` with the two bundled photos.
fn bundled_photos(d: &Path) -> PathBuf {
    let data = d.join("photos");
    std::fs::create_dir_all(&data).unwrap();
    for f in ["ladybird.jpg", "cups.jpg"] {
        std::fs::copy(repo().join("assets/photos").join(f), data.join(f)).unwrap();
    }
    data
}

/// `adapt` on the default tokenizer with 16-px crops: 6 updates, a checkpoint every 2.
fn adapt_args<'a>(data: &'a str, out: &'a str, tok: &'a str) -> Vec<&'a str> {
    vec![
        "adapt",
        "--preset",
        "tiny-cpu",
        "--tokenizer",
        tok,
        "--data",
        data,
        "--out",
        out,
        "--size",
        "16",
        "--batch",
        "2",
        "--steps",
        "6",
        "--set",
        "resize=48",
        "--set",
        "checkpoint_every=2",
        "--set",
        "eval_every=3",
        "--set",
        "eval_images=2",
    ]
}

/// Run `coda` with `CODA_FAILPOINT` set: it must die by SIGKILL at that point.
fn killed_at(point: &str, args: &[&str], cwd: &Path) {
    use std::os::unix::process::ExitStatusExt;
    let o = Command::new(env!("CARGO_BIN_EXE_coda"))
        .args(args)
        .current_dir(cwd)
        .env("RAYON_NUM_THREADS", "2")
        .env("CODA_FAILPOINT", point)
        .output()
        .unwrap();
    assert_eq!(
        o.status.signal(),
        Some(9),
        "{point}: the run was not killed there (status {:?}): the test proves nothing\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Issue #15: kill -9 anywhere (mid-update, during a checkpoint write, right after the final
/// checkpoint, during the export), then `--resume`: the exported tokenizer is bit-identical to
/// an uninterrupted run's, and nothing temporary is left.
#[test]
fn adapt_killed_anywhere_resumes_to_the_identical_export() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    bundled_photos(d);
    let tok = repo().join("assets/tokenizer");
    let tok = tok.to_str().unwrap();
    ok(&adapt_args("photos", "whole", tok), d);
    killed_at("update@3", &adapt_args("photos", "run", tok), d);
    let resume = ["adapt", "--resume", "--out", "run"];
    killed_at("checkpoint-half-written@4", &resume, d);
    killed_at("checkpoint-written@6", &resume, d);
    // The final checkpoint exists and no export: resume must export (it did not before).
    assert!(d.join("run/checkpoints/step-00000006").exists());
    assert!(!d.join("run/tokenizer").exists());
    killed_at("folder-written", &resume, d);
    assert!(
        !d.join("run/tokenizer").exists(),
        "a half export is visible"
    );
    let out = ok(&resume, d);
    assert!(out.contains("exported"), "{out}");
    for f in ["model.safetensors", "config.json"] {
        let a = std::fs::read(d.join("whole/tokenizer").join(f)).unwrap();
        let b = std::fs::read(d.join("run/tokenizer").join(f)).unwrap();
        assert!(a == b, "{f} differs after the kills");
    }
    for sub in ["run", "run/checkpoints"] {
        for e in std::fs::read_dir(d.join(sub)).unwrap() {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!n.starts_with(".coda-tmp"), "{sub}/{n} left behind");
        }
    }
    // Resuming a finished run exports again, to the same bits.
    ok(&resume, d);
    let a = std::fs::read(d.join("whole/tokenizer/model.safetensors")).unwrap();
    assert!(a == std::fs::read(d.join("run/tokenizer/model.safetensors")).unwrap());
}

/// Issue #15: on --resume every flag applies on top of the saved config, and a change of what
/// the run computes is refused (listed) unless --allow-changes.
#[test]
fn resume_refuses_changes_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = bundled_photos(d);
    let tok = repo().join("assets/tokenizer");
    let tok = tok.to_str().unwrap();
    let mut a = adapt_args("photos", "run", tok);
    a.extend(["--stop-after", "2"]);
    ok(&a, d);
    let (s, _, err) = coda(&["adapt", "--resume", "--out", "run", "--batch", "3"], d);
    assert!(
        !s && err.contains("batch: 2 -> 3") && err.contains("--allow-changes"),
        "{err}"
    );
    let (s, _, err) = coda(&["adapt", "--resume", "--out", "run", "--steps", "8"], d);
    assert!(!s && err.contains("total updates: 6 -> 8"), "{err}");
    // A new image in the data folder changes the run.
    std::fs::copy(
        repo().join("assets/samples/lake.png"),
        data.join("lake.png"),
    )
    .unwrap();
    let (s, _, err) = coda(&["adapt", "--resume", "--out", "run"], d);
    assert!(!s && err.contains("training images: 2"), "{err}");
    std::fs::remove_file(data.join("lake.png")).unwrap();
    // --preset/--config start new runs; they are refused with --resume.
    let (s, _, err) = coda(
        &["adapt", "--resume", "--out", "run", "--preset", "tiny-cpu"],
        d,
    );
    assert!(!s && err.contains("--preset"), "{err}");
    // The cadence of logs and checkpoints may change; a moved data folder with the same files
    // is the same run.
    std::fs::rename(d.join("photos"), d.join("moved")).unwrap();
    let out = ok(
        &[
            "adapt",
            "--resume",
            "--out",
            "run",
            "--data",
            "moved",
            "--stop-after",
            "1",
            "--set",
            "log_every=1",
        ],
        d,
    );
    assert!(
        out.contains("updates 2..6") && !out.contains("warning"),
        "{out}"
    );
    let out = ok(
        &[
            "adapt",
            "--resume",
            "--out",
            "run",
            "--steps",
            "8",
            "--allow-changes",
        ],
        d,
    );
    assert!(
        out.contains("total updates: 6 -> 8") && out.contains("updates 3..8"),
        "{out}"
    );
    assert!(d.join("run/tokenizer/config.json").exists());
}
