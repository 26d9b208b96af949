//! Issue #15: jobs that would need more memory than the machine has are refused up front with
//! the estimate and the limit, instead of aborting in the allocator; refused jobs leave nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// Run `coda` under `ulimit -v` (KiB) when given, as the fuzz campaign did (4 GB cap).
fn coda_capped(args: &[&str], cwd: &Path, cap_kib: Option<u64>) -> Output {
    let bin = env!("CARGO_BIN_EXE_coda");
    let mut cmd = Command::new("bash");
    let script = match cap_kib {
        Some(k) => format!("ulimit -v {k}; exec \"$0\" \"$@\""),
        None => "exec \"$0\" \"$@\"".into(),
    };
    cmd.arg("-c")
        .arg(script)
        .arg(bin)
        .args(args)
        .current_dir(cwd);
    cmd.env("RUST_BACKTRACE", "0").env_remove("CODA_MAX_MEMORY");
    cmd.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_refused(o: &Output, what: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{what}: exit 1 expected\n{err}");
    assert!(
        !err.contains("panicked") && !err.contains("memory allocation"),
        "{what}: {err}"
    );
}

const CAP_4GB: Option<u64> = Some(4_000_000);

fn zeros_png(path: &Path, w: u32, h: u32) {
    image::RgbImage::new(w, h).save(path).unwrap();
}

#[test]
fn a_huge_image_at_its_own_size_is_refused_with_the_estimate() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("zeros.png");
    // 4096x4096 zeros: 50 KB of PNG; at its own size the default tokenizer needs ~17 GB.
    zeros_png(&png, 4096, 4096);
    let t0 = Instant::now();
    let o = coda_capped(
        &["reconstruct", png.to_str().unwrap(), "-o", "out.png"],
        dir.path(),
        CAP_4GB,
    );
    assert_refused(&o, "reconstruct");
    let err = stderr(&o);
    assert!(
        err.contains("1 image(s) of 4096x4096 at a time needs about")
            && err.contains("above the limit of 3.4 GiB")
            && err.contains("--max-memory"),
        "{err}"
    );
    assert!(!dir.path().join("out.png").exists());
    assert!(t0.elapsed().as_secs() < 30, "{:?}", t0.elapsed());
}

#[test]
fn max_memory_flag_lowers_and_raises_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let img = repo().join("assets/samples/lake.png");
    let img = img.to_str().unwrap();
    // 512 px: about 270 MB estimated for the default tokenizer.
    let o = coda_capped(
        &[
            "reconstruct",
            img,
            "--size",
            "512",
            "-o",
            "a.png",
            "--max-memory",
            "100M",
        ],
        dir.path(),
        None,
    );
    assert_refused(&o, "--max-memory 100M");
    assert!(
        stderr(&o).contains("above the limit of 100 MiB"),
        "{}",
        stderr(&o)
    );
    assert!(!dir.path().join("a.png").exists());
    let o = coda_capped(
        &[
            "reconstruct",
            img,
            "--size",
            "512",
            "-o",
            "b.png",
            "--max-memory",
            "2G",
        ],
        dir.path(),
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(dir.path().join("b.png").exists());
    let o = coda_capped(
        &["reconstruct", img, "--max-memory", "lots"],
        dir.path(),
        None,
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("memory size 'lots'"), "{}", stderr(&o));
}

#[test]
fn a_tokenizer_with_a_huge_resolution_is_refused_before_resizing() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("tok");
    std::fs::create_dir(&tok).unwrap();
    let src = repo().join("assets/tokenizer");
    std::fs::copy(src.join("model.safetensors"), tok.join("model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    let lake = repo().join("assets/samples/lake.png");
    for (resolution, expect) in [
        (100_000, "image size 100000 is outside 1..=65535"),
        (16_384, "needs about"),
    ] {
        cfg["resolution"] = resolution.into();
        std::fs::write(tok.join("config.json"), cfg.to_string()).unwrap();
        let o = coda_capped(
            &[
                "encode",
                "--tokenizer",
                tok.to_str().unwrap(),
                lake.to_str().unwrap(),
                "-o",
                "t.safetensors",
            ],
            dir.path(),
            CAP_4GB,
        );
        assert_refused(&o, "encode");
        assert!(stderr(&o).contains(expect), "{}", stderr(&o));
        assert!(!dir.path().join("t.safetensors").exists());
    }
}

#[test]
fn training_jobs_too_big_for_memory_are_refused_and_leave_no_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("imgs");
    std::fs::create_dir(&data).unwrap();
    std::fs::copy(repo().join("assets/samples/lake.png"), data.join("a.png")).unwrap();
    let tok = repo().join("assets/tokenizer");
    for extra in [
        &["--size", "4096"][..],
        &["--batch", "1000000"],
        &["--set", "accum=1000000000"],
    ] {
        let mut args = vec![
            "adapt",
            "--preset",
            "tiny-cpu",
            "--tokenizer",
            tok.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--steps",
            "1",
            "--out",
            "run",
        ];
        args.extend_from_slice(extra);
        let o = coda_capped(&args, dir.path(), CAP_4GB);
        assert_refused(&o, &format!("{extra:?}"));
        assert!(
            stderr(&o).contains("a training update of") && stderr(&o).contains("needs about"),
            "{extra:?}: {}",
            stderr(&o)
        );
        assert!(
            !dir.path().join("run").exists(),
            "{extra:?} left a run folder"
        );
    }
}
