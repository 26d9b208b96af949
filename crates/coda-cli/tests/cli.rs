//! The `coda` binary as a user runs it: the README's main command, outputs, and bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn coda(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_coda"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The command between the README's `main-command` markers, without the cargo prefix.
fn readme_main_command() -> Vec<String> {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let start = readme
        .find("<!-- main-command -->")
        .expect("README marks its main command");
    let block = &readme[start..];
    let line = block
        .lines()
        .find(|l| l.trim_start().starts_with("cargo run"))
        .expect("a cargo run line after the marker");
    let args = line.split(" -- ").nth(1).expect("cargo run ... -- ARGS");
    args.split_whitespace().map(String::from).collect()
}

/// The PSNR the README's main command printed when the default tokenizer was made (32.53 dB on
/// assets/samples/lake.png, 128x128), less about 1 dB.
const README_PSNR_FLOOR: f64 = 31.5;

#[test]
fn readme_main_command_reconstructs_the_bundled_photo() {
    let dir = tempfile::tempdir().unwrap();
    // Run from a copy of the paths the command names, so that its outputs land in the temp dir.
    let args: Vec<String> = readme_main_command()
        .into_iter()
        .map(|a| {
            if repo().join(&a).exists() {
                repo().join(&a).display().to_string()
            } else {
                a
            }
        })
        .collect();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = coda(&refs, dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("embedded default"), "{text}");
    assert!(
        text.contains("tokens     2240 over 10 scales (1,2,3,4,6,9,13,18,24,32)"),
        "{text}"
    );
    assert!(text.contains("bits       22400 per image"), "{text}");
    let psnr: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("PSNR"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no PSNR line in {text}"));
    assert!(
        psnr > README_PSNR_FLOOR,
        "PSNR {psnr} dB below the floor {README_PSNR_FLOOR}"
    );
    let recon = image::open(dir.path().join("lake_recon.png")).unwrap();
    assert_eq!((recon.width(), recon.height()), (128, 128));
    let strip = image::open(dir.path().join("lake_recon_progressive.png")).unwrap();
    assert_eq!((strip.width(), strip.height()), (10 * 128, 128));
    // The strip's last panel is the full reconstruction.
    let last = strip.crop_imm(9 * 128, 0, 128, 128).to_rgb8();
    assert_eq!(last, recon.to_rgb8());
    // Deterministic: a second run writes the same pixels.
    let out2 = coda(&refs, dir.path());
    assert!(out2.status.success());
    assert_eq!(
        image::open(dir.path().join("lake_recon.png"))
            .unwrap()
            .to_rgb8(),
        recon.to_rgb8()
    );
}

#[test]
fn raw_output_holds_image_and_latent() {
    let dir = tempfile::tempdir().unwrap();
    let vae = repo().join("fixtures/vae/diffusers");
    let photo = repo().join("assets/photos/cups.jpg");
    let out = coda(
        &[
            "reconstruct",
            "--vae",
            vae.to_str().unwrap(),
            "--size",
            "64",
            "-o",
            "r.png",
            "--raw",
            "r.safetensors",
            photo.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let raw =
        candle_core::safetensors::load(dir.path().join("r.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert_eq!(raw["image"].dims(), &[1, 3, 64, 64]);
    assert_eq!(raw["latent"].dims(), &[1, 4, 16, 16]);
    // The PNG is the raw decoder output, clamped and rounded.
    let png = image::open(dir.path().join("r.png")).unwrap().to_rgb8();
    let from_raw = coda::data::tensor_to_images(&raw["image"])
        .unwrap()
        .remove(0);
    assert_eq!(png, from_raw);
}

#[test]
fn corrupt_image_names_the_file_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(repo().join("assets/photos/cups.jpg")).unwrap();
    std::fs::write(dir.path().join("truncated.jpg"), &bytes[..bytes.len() / 3]).unwrap();
    let vae = repo().join("fixtures/vae/diffusers");
    let out = coda(
        &[
            "reconstruct",
            "--vae",
            vae.to_str().unwrap(),
            "-o",
            "out.png",
            "--raw",
            "out.safetensors",
            "truncated.jpg",
        ],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("truncated.jpg"), "{}", stderr(&out));
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 1, "only the input remains: {left:?}");
}

#[test]
fn missing_paths_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let vae = repo().join("fixtures/vae/diffusers");
    let out = coda(
        &["reconstruct", "--vae", vae.to_str().unwrap(), "nope.png"],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("nope.png: no such file"),
        "{}",
        stderr(&out)
    );
    let out = coda(&["info", "--vae", "missing.safetensors"], dir.path());
    assert!(
        stderr(&out).contains("missing.safetensors: no such file"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn size_the_vae_cannot_take_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let vae = repo().join("fixtures/vae/ldm.safetensors");
    let photo = repo().join("assets/photos/cups.jpg");
    let out = coda(
        &[
            "reconstruct",
            "--vae",
            vae.to_str().unwrap(),
            "--size",
            "30",
            photo.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not a multiple of the VAE's downsampling factor 4"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn info_reports_architecture_and_latent_shape() {
    let vae = repo().join("fixtures/vae/ldm.pth");
    let out = coda(
        &["info", "--vae", vae.to_str().unwrap(), "--size", "64"],
        &repo(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("parameters       765091"), "{text}");
    assert!(text.contains("[4, 16, 16]"), "{text}");
    assert!(
        text.contains("encoder levels 2, decoder levels 1"),
        "{text}"
    );
}

#[test]
fn ci_runs_the_readme_test_command() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let start = readme
        .find("<!-- test-command -->")
        .expect("README marks its test command");
    let cmd = readme[start..]
        .lines()
        .find(|l| l.starts_with("cargo ") || l.starts_with("bash "))
        .unwrap()
        .trim();
    let ci = std::fs::read_to_string(repo().join(".ci/run")).unwrap();
    assert!(
        ci.lines().any(|l| l.trim() == cmd),
        ".ci/run must call `{cmd}`"
    );
}
