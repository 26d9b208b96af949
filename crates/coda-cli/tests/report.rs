//! The HTML report rendered in headless Chromium: every image decodes and the metrics table holds
//! the JSON's numbers. CI installs Debian's chromium and sets CODA_REQUIRE_CHROMIUM=1, so there the
//! test cannot skip; elsewhere it skips with a message when no chromium is installed.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            let out = Command::new("which").arg(name).output().ok()?;
            out.status
                .success()
                .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string()))
        })
}

#[test]
fn report_renders_in_headless_chromium_with_the_json_numbers() {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var("CODA_REQUIRE_CHROMIUM").is_err(),
            "CODA_REQUIRE_CHROMIUM is set but no chromium is installed"
        );
        eprintln!("skipped: no chromium installed (CI installs it)");
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let coda = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_coda"))
            .args(args)
            .current_dir(d.path())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "coda {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let vae = repo().join("fixtures/vae/diffusers");
    coda(&[
        "tokenizer",
        "new",
        "--vae",
        vae.to_str().unwrap(),
        "--codebook-size",
        "64",
        "--resolution",
        "32",
        "-o",
        "tok",
    ]);
    let photos = repo().join("assets/photos");
    coda(&[
        "eval",
        "--tokenizer",
        "tok",
        "--data",
        photos.to_str().unwrap(),
        "--size",
        "32",
        "--json",
        "e.json",
        "--report",
        "rep",
    ]);
    let page = d.path().join("rep/index.html");
    let out = Command::new(&browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("data-images-loaded=\"true\""),
        "not every image decoded in {}: {}",
        browser.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("e.json")).unwrap()).unwrap();
    for v in [
        format!(
            "{:.4}",
            j["metrics"]["psnr"]["uint8_truncated"].as_f64().unwrap()
        ),
        format!("{:.4}", j["metrics"]["psnr"]["float"].as_f64().unwrap()),
        format!(
            "{:.4}",
            j["metrics"]["ssim"]["uint8_truncated"].as_f64().unwrap()
        ),
        format!(
            "{:.2}",
            j["metrics"]["codebook"]["usage_all"].as_f64().unwrap()
        ),
    ] {
        assert!(
            dom.contains(&format!("<td class=\"v\">{v}</td>")),
            "the table lacks {v}"
        );
    }
    // Three images per sample (original, reconstruction, error) plus the plot and strips.
    assert!(dom.matches("<img").count() > 2 * 3, "too few images");
    // And a screenshot, for a person to look at.
    let shot = d.path().join("report.png");
    let s = Command::new(&browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=1200,1600",
        ])
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap();
    assert!(
        s.status.success()
            && std::fs::metadata(&shot)
                .map(|m| m.len() > 10_000)
                .unwrap_or(false),
        "screenshot failed"
    );
}
