//! `coda tokenize` end to end with the embedded default tokenizer on a small ImageFolder of real
//! photos (a corrupt file among them): the store holds `coda encode`'s ids, a run killed with
//! SIGKILL and restarted gives the identical store, and so do two `--shard I/2` parts merged,
//! whatever the batch size and thread count.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn coda(args: &[&str], threads: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_coda"))
        .args(args)
        .env("RAYON_NUM_THREADS", threads)
        .output()
        .unwrap()
}

fn ok(args: &[&str], threads: &str) -> String {
    let o = coda(args, threads);
    assert!(
        o.status.success(),
        "coda {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// An ImageFolder: two classes of real photos and one corrupt JPEG.
fn dataset(dir: &Path) -> PathBuf {
    let root = dir.join("data");
    let r = repo();
    for (class, src) in [
        ("cups", "assets/photos/cups.jpg"),
        ("cups", "assets/samples/kite.png"),
        ("lake", "assets/samples/lake.png"),
        ("lake", "assets/photos/ladybird.jpg"),
    ] {
        let d = root.join(class);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(r.join(src), d.join(Path::new(src).file_name().unwrap())).unwrap();
    }
    std::fs::write(root.join("lake/broken.jpg"), b"\xff\xd8\xff\xe0 truncated").unwrap();
    root
}

/// Every file of a store folder and its bytes.
fn contents(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().to_string(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

fn npy_u16(path: &Path) -> (Vec<usize>, Vec<u16>) {
    let b = std::fs::read(path).unwrap();
    let hl = u16::from_le_bytes([b[8], b[9]]) as usize;
    let header = std::str::from_utf8(&b[10..10 + hl]).unwrap();
    assert!(header.contains("'descr': '<u2'"), "{header}");
    let shape_txt = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let shape = shape_txt
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let data = b[10 + hl..]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    (shape, data)
}

#[test]
fn store_matches_encode_survives_sigkill_and_merges() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let d = data.to_str().unwrap();
    let store = tmp.path().join("store");
    let s = store.to_str().unwrap();
    let common = ["--size", "64", "--shard-size", "2", "--flip"];

    let out = ok(
        &[
            &["tokenize", "--data", d, "-o", s, "--batch", "3"],
            &common[..],
        ]
        .concat(),
        "2",
    );
    assert!(out.contains("4 samples in 3 shards, 1 skipped"), "{out}");
    let reference = contents(&store);
    let manifest: serde_json::Value = serde_json::from_slice(&reference["manifest.json"]).unwrap();
    assert_eq!(manifest["classes"], serde_json::json!(["cups", "lake"]));
    assert_eq!(manifest["skipped"][0][0], "lake/broken.jpg");
    assert_eq!(manifest["views"], serde_json::json!(["center", "flip"]));

    // The centre views are `coda encode`'s ids for the same files in the same order.
    let tokens = tmp.path().join("t.safetensors");
    let files: Vec<String> = [
        "cups/cups.jpg",
        "cups/kite.png",
        "lake/ladybird.jpg",
        "lake/lake.png",
    ]
    .iter()
    .map(|k| data.join(k).to_string_lossy().to_string())
    .collect();
    let mut args = vec!["encode", "--size", "64", "-o", tokens.to_str().unwrap()];
    args.extend(files.iter().map(|s| s.as_str()));
    ok(&args, "2");
    let (encoded, _) =
        coda::tokenizer::token_file::read(&tokens, &candle_core::Device::Cpu).unwrap();
    let encoded: Vec<u32> = encoded
        .flat()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let l = manifest["tokens_per_view"].as_u64().unwrap() as usize;
    let mut keys = Vec::new();
    let mut row = 0;
    for shard in 0..3 {
        let (shape, ids) = npy_u16(&store.join(format!("shard-{shard:05}.ids.npy")));
        let k: Vec<String> =
            serde_json::from_slice(&reference[&format!("shard-{shard:05}.keys.json")]).unwrap();
        assert_eq!(shape, [k.len(), 2, l]);
        for r in 0..k.len() {
            let centre: Vec<u32> = ids[r * 2 * l..r * 2 * l + l]
                .iter()
                .map(|&v| v as u32)
                .collect();
            let flip = &ids[r * 2 * l + l..(r + 1) * 2 * l];
            assert_eq!(centre, encoded[row * l..(row + 1) * l], "row {row}");
            assert!(
                centre.iter().zip(flip).any(|(a, &b)| *a != b as u32),
                "flip view differs"
            );
            row += 1;
        }
        keys.extend(k);
    }
    assert_eq!(
        keys,
        [
            "cups/cups.jpg",
            "cups/kite.png",
            "lake/ladybird.jpg",
            "lake/lake.png"
        ]
    );

    // Killed with SIGKILL while running (after its first shard), then run again: the same store.
    let killed = tmp.path().join("killed");
    let k = killed.to_str().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_coda"))
        .args(
            [
                &["tokenize", "--data", d, "-o", k, "--batch", "1"],
                &common[..],
            ]
            .concat(),
        )
        .env("RAYON_NUM_THREADS", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let first = killed.join("shard-00000.done.json");
    let t0 = std::time::Instant::now();
    while !first.exists() && t0.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    assert!(
        !killed.join("manifest.json").exists(),
        "the run finished before it was killed: the test proves nothing"
    );
    let out = ok(
        &[
            &["tokenize", "--data", d, "-o", k, "--batch", "2"],
            &common[..],
        ]
        .concat(),
        "1",
    );
    assert!(out.contains("4 samples in 3 shards"), "{out}");
    assert_eq!(contents(&killed), reference, "restarted store differs");

    // Two parts in two folders, merged: the same store.
    let (p0, p1) = (tmp.path().join("part0"), tmp.path().join("part1"));
    for (i, p) in [(0, &p0), (1, &p1)] {
        let part = format!("{i}/2");
        let out = ok(
            &[
                &[
                    "tokenize",
                    "--data",
                    d,
                    "-o",
                    p.to_str().unwrap(),
                    "--shard",
                    &part,
                ],
                &common[..],
            ]
            .concat(),
            "2",
        );
        assert!(out.contains("this part is done"), "{out}");
    }
    let out = ok(
        &[
            "tokenize",
            "merge",
            p0.to_str().unwrap(),
            p1.to_str().unwrap(),
        ],
        "2",
    );
    assert!(out.contains("4 samples in 3 shards"), "{out}");
    assert_eq!(contents(&p0), reference, "merged store differs");

    // A store of other settings is refused, not mixed.
    let o = coda(
        &[
            "tokenize",
            "--data",
            d,
            "-o",
            s,
            "--size",
            "32",
            "--shard-size",
            "2",
            "--flip",
        ],
        "2",
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("image_size") && err.contains("new folder"),
        "{err}"
    );
}

/// Issue #15: `decode` created its output folder before checking its input (34 empty or partly
/// written folders after refusals such as `--scales 100`).
#[test]
fn refused_decode_leaves_no_output_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tmp.path().join("t.safetensors");
    let lake = repo().join("assets/samples/lake.png");
    ok(
        &[
            "encode",
            "--size",
            "64",
            "-o",
            tokens.to_str().unwrap(),
            lake.to_str().unwrap(),
        ],
        "2",
    );
    let out = tmp.path().join("png");
    for extra in [&["--scales", "100"][..], &["--scales", "0"][..]] {
        let mut args = vec![
            "decode",
            "-o",
            out.to_str().unwrap(),
            tokens.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = coda(&args, "2");
        assert!(!o.status.success(), "{extra:?} should be refused");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("scales"), "{err}");
        assert!(!out.exists(), "{extra:?} left {} behind", out.display());
    }
    ok(
        &[
            "decode",
            "-o",
            out.to_str().unwrap(),
            tokens.to_str().unwrap(),
        ],
        "2",
    );
    assert!(out.join("lake.png").exists());
}

/// WebDataset shards give the same ids as the same pictures in a folder (keys are the
/// WebDataset keys, labels the `.cls` members; a corrupt member is skipped and listed).
#[test]
fn webdataset_tar_gives_the_folder_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let tar_path = tmp.path().join("train-000.tar");
    let mut t = tar::Builder::new(std::fs::File::create(&tar_path).unwrap());
    let members = [
        ("cups/cups.jpg", "0"),
        ("cups/kite.png", "0"),
        ("lake/broken.jpg", "1"),
        ("lake/ladybird.jpg", "1"),
        ("lake/lake.png", "1"),
    ];
    for (i, (file, cls)) in members.iter().enumerate() {
        let ext = Path::new(file).extension().unwrap().to_str().unwrap();
        t.append_path_with_name(data.join(file), format!("{i:04}.{ext}"))
            .unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(cls.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        t.append_data(&mut h, format!("{i:04}.cls"), cls.as_bytes())
            .unwrap();
    }
    t.finish().unwrap();
    drop(t);
    let (a, b) = (tmp.path().join("from-folder"), tmp.path().join("from-tar"));
    for (src, out) in [(&data, &a), (&tar_path, &b)] {
        ok(
            &[
                "tokenize",
                "--data",
                src.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
                "--size",
                "64",
                "--shard-size",
                "10",
            ],
            "2",
        );
    }
    let ids = |d: &Path| npy_u16(&d.join("shard-00000.ids.npy"));
    assert_eq!(ids(&a), ids(&b));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["source_kind"], "webdataset");
    assert_eq!(m["skipped"][0][0], "0002");
    let keys: Vec<String> =
        serde_json::from_slice(&std::fs::read(b.join("shard-00000.keys.json")).unwrap()).unwrap();
    assert_eq!(keys, ["0000", "0001", "0003", "0004"]);
    let labels = std::fs::read(b.join("shard-00000.labels.npy")).unwrap();
    let hl = u16::from_le_bytes([labels[8], labels[9]]) as usize;
    let labels: Vec<i64> = labels[10 + hl..]
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(labels, [0, 0, 1, 1]);
}

/// Issue #15: outputs were forced to mode 0644 whatever the umask.
#[cfg(unix)]
#[test]
fn outputs_honour_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let lake = repo().join("assets/samples/lake.png");
    for (umask, mode) in [("077", 0o600), ("022", 0o644)] {
        let out = tmp.path().join(format!("t{umask}.safetensors"));
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "umask {umask} && exec \"$0\" encode --size 32 -o \"$1\" \"$2\"",
            ))
            .arg(env!("CARGO_BIN_EXE_coda"))
            .arg(&out)
            .arg(&lake)
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
        let got = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(got, mode, "umask {umask}");
    }
}
