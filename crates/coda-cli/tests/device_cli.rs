//! Issue #17 on a machine without a GPU: the `--device` flag, and the device-generic path (the
//! candle ops a CUDA device runs, forced on the CPU with `CODA_GENERIC_OPS=1`) giving the same
//! tokens as our kernels and training a FLUX-size, V = 65536 tokenizer in bounded memory.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root; `CODA_REPO` for a test binary run away from where it was built
/// (scripts/gpu_check.sh carries prebuilt binaries to a GPU machine).
fn repo() -> PathBuf {
    match std::env::var_os("CODA_REPO") {
        Some(r) => PathBuf::from(r),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
    }
    .canonicalize()
    .unwrap()
}

/// The `coda` binary under test (`CODA_BIN` for prebuilt binaries, as `repo`).
fn bin() -> PathBuf {
    std::env::var_os("CODA_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_coda")))
}

/// The GPU of `CODA_TEST_DEVICE=cuda[:N]`, or None after a loud skip line.
fn gpu(test: &str) -> Option<String> {
    match std::env::var("CODA_TEST_DEVICE") {
        Ok(d) if d.starts_with("cuda") => Some(d),
        _ => {
            println!(
                "SKIP {test}: needs a GPU (CODA_TEST_DEVICE=cuda; scripts/gpu_check.sh runs it)"
            );
            None
        }
    }
}

fn coda(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .current_dir(repo())
        .env("RUST_BACKTRACE", "0")
        .env("CODA_DEVICE", "cpu")
        .env_remove("CODA_GENERIC_OPS");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Run `coda` and return its peak resident memory (wait4's ru_maxrss) in bytes.
fn peak_rss(args: &[&str], env: &[(&str, &str)]) -> u64 {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .current_dir(repo())
        .env("CODA_DEVICE", "cpu")
        .env_remove("CODA_GENERIC_OPS")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    // Reaped by wait4 below, which also gives the rusage.
    #[allow(clippy::zombie_processes)]
    let child = cmd.spawn().unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: plain syscall on our own child; rusage is written by the kernel.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4");
    let mut err = String::new();
    use std::io::Read;
    child.stderr.unwrap().read_to_string(&mut err).unwrap();
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{args:?} failed: {err}"
    );
    usage.ru_maxrss as u64 * 1024
}

#[test]
fn device_flag_is_parsed_and_refused_with_the_reason() {
    let photo = repo().join("assets/samples/lake.png");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.png");
    let args = |dev: &str| {
        vec![
            "--device".to_string(),
            dev.to_string(),
            "reconstruct".into(),
            photo.to_str().unwrap().into(),
            "-o".into(),
            out.to_str().unwrap().into(),
            "--size".into(),
            "64".into(),
        ]
    };
    let run = |dev: &str| {
        let a = args(dev);
        coda(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[])
    };
    ok(&run("cpu"), "--device cpu");
    let e = run("tpu");
    assert_eq!(e.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&e.stderr).contains("expected cpu, cuda or cuda:N"),
        "{}",
        String::from_utf8_lossy(&e.stderr)
    );
    if !cfg!(feature = "cuda") {
        let e = run("cuda:0");
        assert_eq!(e.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&e.stderr).contains("no CUDA support"));
    }
}

#[test]
fn generic_ops_give_the_kernels_tokens() {
    // The default tokenizer on a real photo at 128 px: every id identical on both paths
    // (a near-tie could legitimately differ; there is none in this picture, measured).
    let dir = tempfile::tempdir().unwrap();
    let photo = repo().join("assets/samples/lake.png");
    let mut ids = Vec::new();
    for generic in ["0", "1"] {
        let t = dir.path().join(format!("t{generic}.safetensors"));
        let o = coda(
            &[
                "encode",
                photo.to_str().unwrap(),
                "-o",
                t.to_str().unwrap(),
                "--size",
                "128",
            ],
            &[("CODA_GENERIC_OPS", generic)],
        );
        ok(&o, "encode");
        let (tokens, _) = coda::tokenizer::token_file::read(&t, &candle_core::Device::Cpu).unwrap();
        let flat: Vec<u32> = tokens
            .ids
            .iter()
            .flat_map(|s| s.flatten_all().unwrap().to_vec1::<u32>().unwrap())
            .collect();
        ids.push(flat);
    }
    assert!(ids[0].len() > 100);
    let differ = ids[0].iter().zip(&ids[1]).filter(|(a, b)| a != b).count();
    assert_eq!(differ, 0, "{differ} of {} ids differ", ids[0].len());
}

/// A V = 65536 tokenizer on a FLUX-size VAE with random weights (`tokenizer new --random-vae`).
fn flux_tokenizer(dir: &Path, size: usize) -> PathBuf {
    let tok = dir.join("tok");
    let o = coda(
        &[
            "tokenizer",
            "new",
            "--random-vae",
            "--preset",
            "flux",
            "--seed",
            "3",
            "--codebook-size",
            "65536",
            "--lora-rank",
            "8",
            "--resolution",
            &size.to_string(),
            "-o",
            tok.to_str().unwrap(),
        ],
        &[],
    );
    ok(&o, "tokenizer new");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tok.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["vae"]["block_channels"],
        serde_json::json!([128, 256, 512, 512])
    );
    tok
}

/// `n` synthetic size x size pictures in `dir/data`.
fn synthetic_images(dir: &Path, n: u32, size: usize) -> PathBuf {
    let data = dir.join("data");
    std::fs::create_dir(&data).unwrap();
    for i in 0..n {
        let img = image::RgbImage::from_fn(size as u32, size as u32, |x, y| {
            image::Rgb([
                (x * 7 + i * 50) as u8,
                (y * 3 + i) as u8,
                ((x ^ y) * 5) as u8,
            ])
        });
        img.save(data.join(format!("{i}.png"))).unwrap();
    }
    data
}

/// `coda adapt` arguments for `steps` updates of `tok` on `data`, logging every update and
/// skipping evaluation and checkpoints.
fn adapt_args(
    tok: &Path,
    data: &Path,
    out: &Path,
    size: usize,
    batch: usize,
    steps: usize,
) -> Vec<String> {
    let mut a: Vec<String> = ["adapt", "--tokenizer"].map(String::from).to_vec();
    for (flag, v) in [
        ("", tok.display().to_string()),
        ("--data", data.display().to_string()),
        ("--out", out.display().to_string()),
        ("--size", size.to_string()),
        ("--batch", batch.to_string()),
        ("--steps", steps.to_string()),
    ] {
        if !flag.is_empty() {
            a.push(flag.into());
        }
        a.push(v);
    }
    for set in [
        "log_every=1",
        "eval_every=0",
        "checkpoint_every=0",
        "eval_images=1",
    ] {
        a.push("--set".into());
        a.push(set.into());
    }
    a
}

#[test]
fn a_flux_65536_update_on_the_generic_path_stays_within_1_5x_of_the_kernels_memory() {
    // Issue #17: the quantizer's composite training path kept ~15 N x V tensors per scale
    // (about 8 GiB per image at V = 65536); the device-generic path recomputes them in chunks
    // as the CPU ops do. One update at batch 1 on each path, peak RSS of the whole process.
    let size = 256;
    let dir = tempfile::tempdir().unwrap();
    let tok = flux_tokenizer(dir.path(), size);
    let data = synthetic_images(dir.path(), 2, size);
    let run = |generic: &str| {
        let out = dir.path().join(format!("run{generic}"));
        let args = adapt_args(&tok, &data, &out, size, 1, 1);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        peak_rss(&args, &[("CODA_GENERIC_OPS", generic)])
    };
    let kernels = run("0");
    let generic = run("1");
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!(
        "flux-65536 adapt update, batch 1, {size} px: peak RSS kernels {:.2} GiB, generic {:.2} GiB ({:.2}x)",
        gib(kernels),
        gib(generic),
        generic as f64 / kernels as f64
    );
    assert!(
        (generic as f64) <= 1.5 * kernels as f64,
        "generic path {:.2} GiB > 1.5 x kernels {:.2} GiB",
        gib(generic),
        gib(kernels)
    );
}

/// Token ids (all scales, flattened) of `image` at 128 px on `device`.
fn ids_on(device: &str, image: &Path, out: &Path) -> Vec<u32> {
    let o = coda(
        &[
            "--device",
            device,
            "encode",
            image.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--size",
            "128",
        ],
        &[],
    );
    ok(&o, &format!("encode on {device}"));
    let (tokens, _) = coda::tokenizer::token_file::read(out, &candle_core::Device::Cpu).unwrap();
    tokens
        .ids
        .iter()
        .flat_map(|s| s.flatten_all().unwrap().to_vec1::<u32>().unwrap())
        .collect()
}

#[test]
fn gpu_tokens_repeat_run_to_run_and_match_the_cpu_but_near_ties() {
    let Some(dev) = gpu("gpu_tokens_repeat_run_to_run_and_match_the_cpu_but_near_ties") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut total = (0, 0);
    for name in ["lake.png", "kite.png"] {
        let image = repo().join("assets/samples").join(name);
        let a = ids_on(&dev, &image, &dir.path().join("a.safetensors"));
        let b = ids_on(&dev, &image, &dir.path().join("b.safetensors"));
        assert_eq!(a, b, "{name}: GPU ids differ between two runs");
        let cpu = ids_on("cpu", &image, &dir.path().join("c.safetensors"));
        let differ = a.iter().zip(&cpu).filter(|(x, y)| x != y).count();
        println!("{name}: {} ids, {differ} differ from the CPU's", a.len());
        total = (total.0 + differ, total.1 + a.len());
    }
    assert!(total.1 > 0);
    // f32 on both, TF32 off: only near-ties may flip; more than 1% would be a bug.
    assert!(
        total.0 * 100 <= total.1,
        "{} of {} ids differ from the CPU",
        total.0,
        total.1
    );
}

#[test]
fn gpu_flux_65536_adapt_update_at_batch_8() {
    let Some(dev) = gpu("gpu_flux_65536_adapt_update_at_batch_8") else {
        return;
    };
    let size = 256;
    let dir = tempfile::tempdir().unwrap();
    let tok = flux_tokenizer(dir.path(), size);
    let data = synthetic_images(dir.path(), 8, size);
    let out = dir.path().join("run");
    let mut args = vec!["--device".to_string(), dev.clone()];
    args.extend(adapt_args(&tok, &data, &out, size, 8, 4));
    let o = coda(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    ok(&o, "adapt on the GPU");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v.get("train").cloned())
        .collect();
    assert!(steps.len() >= 3, "{metrics}");
    for s in &steps {
        let loss = s["loss"].as_f64().unwrap();
        assert!(loss.is_finite(), "loss {loss}");
        println!(
            "flux-65536 adapt on {dev}, batch 8, {size} px: update {} took {:.3} s, loss {loss:.4}",
            s["step"],
            s["seconds"].as_f64().unwrap()
        );
    }
}
