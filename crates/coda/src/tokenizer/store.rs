//! The token store: a whole dataset's token ids in a folder that numpy reads without coda-rs.
//!
//! ```text
//! STORE/spec.json                what the store holds (tokenizer, scales, views, resize, shards)
//! STORE/shard-00000.ids.npy      uint16 (uint32 when V > 65536) [n, views, L]
//! STORE/shard-00000.labels.npy   int64 [n] (-1 without classes)
//! STORE/shard-00000.keys.json    the n sample keys (relative paths), a JSON list
//! STORE/shard-00000.done.json    the shard's record (counts, sha256 of its files, skipped images),
//!                                written last: a shard without it is redone on restart
//! STORE/manifest.json            spec + every shard record, once all shards are done
//! ```
//!
//! Shard `i` holds the samples `i·S .. (i+1)·S` of the dataset's sorted order (S = shard size),
//! less the unreadable ones, so the content does not depend on interruptions, thread counts,
//! batch sizes or how the shards were split between processes (`shard I/N` takes the shards with
//! index ≡ I mod N; `merge` joins the parts).

use std::path::{Path, PathBuf};

use image::RgbImage;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::{EncodeOptions, Tokenizer};
use crate::data::dataset::{Dataset, Sample};
use crate::error::{Error, Result};

pub const STORE_FORMAT: u32 = 1;
pub const SPEC_FILE: &str = "spec.json";
pub const MANIFEST_FILE: &str = "manifest.json";

/// What a store holds; written when a store is started and checked on every restart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoreSpec {
    pub format_version: u32,
    pub tokenizer_hash: String,
    pub tokenizer_config: serde_json::Value,
    pub codebook_size: usize,
    /// "uint16" or "uint32".
    pub id_dtype: String,
    /// (h_k, w_k) of every scale.
    pub scales: Vec<(usize, usize)>,
    pub tokens_per_view: usize,
    /// "center", and "flip" with horizontal flips.
    pub views: Vec<String>,
    pub image_size: u32,
    pub resize: String,
    pub source: String,
    pub source_kind: String,
    pub num_samples: usize,
    pub classes: Vec<String>,
    pub shard_size: usize,
    pub num_shards: usize,
    pub software: String,
}

/// A finished shard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardRecord {
    pub index: usize,
    /// File name stem (`shard-00000`).
    pub name: String,
    /// Samples stored (the readable ones).
    pub samples: usize,
    pub sha256: ShardHashes,
    /// Unreadable images of this shard: (key, reason).
    pub skipped: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardHashes {
    pub ids: String,
    pub labels: String,
    pub keys: String,
}

/// The store's index: the spec, every shard, every skipped image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(flatten)]
    pub spec: StoreSpec,
    pub stored_samples: usize,
    pub shards: Vec<ShardRecord>,
    pub skipped: Vec<(String, String)>,
}

/// How to tokenize a dataset into a store.
#[derive(Clone, Debug)]
pub struct TokenizeOptions {
    /// Square size (shorter side resized to it, centre crop).
    pub size: u32,
    pub flip: bool,
    pub shard_size: usize,
    pub batch: usize,
    /// (I, N): only the shards with index ≡ I mod N.
    pub part: Option<(usize, usize)>,
    /// Only the first N samples of the dataset.
    pub limit: Option<usize>,
    /// How the source is named in the spec.
    pub source: String,
}

/// Progress of [`tokenize`].
pub enum StoreEvent<'a> {
    /// The store holds this many shards of the selected ones already (a restart).
    Resumed {
        done: usize,
        todo: usize,
        /// Samples in the shards to do (the progress bar's length).
        samples_todo: usize,
    },
    /// `n` more images read (or skipped).
    Images(usize),
    Skipped {
        key: &'a str,
        reason: &'a str,
    },
    ShardDone(usize),
}

fn shard_name(i: usize) -> String {
    format!("shard-{i:05}")
}

fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A `.npy` file (format 1.0): the header dict padded so that the data starts at a multiple of
/// 64 bytes, then the little-endian values.
fn npy_bytes(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

impl StoreSpec {
    fn new(tok: &Tokenizer, ds: &Dataset, n: usize, opts: &TokenizeOptions) -> Result<Self> {
        let s = opts.size as usize;
        let scales = tok.scales_for_image(s, s)?;
        let wide = tok.codebook_size() > 65536;
        Ok(Self {
            format_version: STORE_FORMAT,
            tokenizer_hash: tok.hash().to_string(),
            tokenizer_config: serde_json::to_value(tok.config()).expect("config serialises"),
            codebook_size: tok.codebook_size(),
            id_dtype: if wide { "uint32" } else { "uint16" }.into(),
            tokens_per_view: scales.iter().map(|(h, w)| h * w).sum(),
            scales,
            views: if opts.flip {
                vec!["center".into(), "flip".into()]
            } else {
                vec!["center".into()]
            },
            image_size: opts.size,
            resize: format!(
                "shorter side to {} (Lanczos3), centre crop {0}x{0}",
                opts.size
            ),
            source: opts.source.clone(),
            source_kind: ds.kind.into(),
            num_samples: n,
            classes: ds.classes.clone(),
            shard_size: opts.shard_size,
            num_shards: n.div_ceil(opts.shard_size),
            software: format!("coda-rs {}", env!("CARGO_PKG_VERSION")),
        })
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.into(),
        reason: e.to_string(),
    })
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("serialises") + "\n";
    crate::io::write_atomic(path, text.as_bytes())
}

/// The record of shard `i` if it is complete on disk: its record (written last) exists, and so do
/// the three files it describes.
fn finished_shard(store: &Path, i: usize) -> Result<Option<ShardRecord>> {
    let p = store.join(format!("{}.done.json", shard_name(i)));
    if !p.exists() {
        return Ok(None);
    }
    let r: ShardRecord = read_json(&p)?;
    let all_there = ["ids.npy", "labels.npy", "keys.json"]
        .iter()
        .all(|ext| store.join(format!("{}.{ext}", r.name)).exists());
    Ok(all_there.then_some(r))
}

/// Tokenize `dataset` into the store folder `store` (created, or continued when it holds a
/// started store of the same spec). Returns the manifest when every shard is done (always for a
/// whole run; for a part, once all parts are).
pub fn tokenize(
    tok: &Tokenizer,
    dataset: &Dataset,
    store: &Path,
    opts: &TokenizeOptions,
    events: &mut dyn FnMut(StoreEvent),
) -> Result<Option<Manifest>> {
    if opts.shard_size == 0 {
        return Err(Error::Invalid("the shard size must be at least 1".into()));
    }
    if let Some((i, n)) = opts.part {
        if n == 0 || i >= n {
            return Err(Error::Invalid(format!(
                "shard part {i}/{n}: expected I/N with 0 <= I < N"
            )));
        }
    }
    let n = opts.limit.map_or(dataset.len(), |l| l.min(dataset.len()));
    if n == 0 {
        return Err(Error::Invalid(format!("no images in {}", opts.source)));
    }
    let spec = StoreSpec::new(tok, dataset, n, opts)?;
    tok.check_memory(opts.batch.max(1), opts.size as usize, opts.size as usize)?;
    std::fs::create_dir_all(store).map_err(|e| Error::io(store, e))?;
    remove_leftover_temp_files(store)?;
    let spec_path = store.join(SPEC_FILE);
    if spec_path.exists() {
        let old: StoreSpec = read_json(&spec_path)?;
        let mut mine = spec.clone();
        mine.software = old.software.clone();
        if old != mine {
            return Err(Error::Invalid(format!(
                "{} holds a store of another tokenizer or dataset or settings ({}): use a new folder",
                store.display(),
                spec_differences(&old, &mine).join("; ")
            )));
        }
    } else {
        write_json(&spec_path, &spec)?;
    }
    let selected: Vec<usize> = (0..spec.num_shards)
        .filter(|i| opts.part.is_none_or(|(p, k)| i % k == p))
        .collect();
    let mut todo = Vec::new();
    for &i in &selected {
        if finished_shard(store, i)?.is_none() {
            todo.push(i);
        }
    }
    // Shard i holds samples i·S .. min((i+1)·S, n).
    let shard_range = |i: usize| i * opts.shard_size..((i + 1) * opts.shard_size).min(n);
    events(StoreEvent::Resumed {
        done: selected.len() - todo.len(),
        todo: todo.len(),
        samples_todo: todo.iter().map(|&i| shard_range(i).len()).sum(),
    });
    // The dataset is listed as the shards go: only one shard's samples are in memory.
    let mut listing = dataset.samples();
    let mut position = 0;
    let changed = || {
        Error::Invalid(format!(
            "{}: the dataset changed while it was being tokenized (it listed {} samples at the start)",
            opts.source,
            dataset.len()
        ))
    };
    for i in todo {
        let (lo, hi) = (shard_range(i).start, shard_range(i).end);
        for _ in position..lo {
            listing.next().ok_or_else(changed)??;
        }
        let samples = (lo..hi)
            .map(|_| listing.next().ok_or_else(changed)?)
            .collect::<Result<Vec<Sample>>>()?;
        position = hi;
        write_shard(tok, &spec, &samples, i, store, opts, events)?;
        events(StoreEvent::ShardDone(i));
    }
    finish(store)
}

/// A killed run can leave the temporary files of its atomic writes behind; they are never
/// renamed into place, so they are only clutter.
fn remove_leftover_temp_files(store: &Path) -> Result<()> {
    for e in std::fs::read_dir(store).map_err(|e| Error::io(store, e))? {
        let p = e.map_err(|e| Error::io(store, e))?.path();
        if p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(".coda-tmp-"))
        {
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
}

/// Tokenize the samples of one shard and write its files, the record last.
fn write_shard(
    tok: &Tokenizer,
    spec: &StoreSpec,
    samples: &[Sample],
    index: usize,
    store: &Path,
    opts: &TokenizeOptions,
    events: &mut dyn FnMut(StoreEvent),
) -> Result<()> {
    let views = spec.views.len();
    let l = spec.tokens_per_view;
    // The ids are kept as the file's little-endian bytes (u16 or u32), not as u32 values and then
    // converted: at 10,000 samples of a few thousand tokens, each copy is tens of MB.
    let wide = spec.id_dtype == "uint32";
    let id_width = if wide { 4 } else { 2 };
    let mut ids: Vec<u8> = Vec::with_capacity(samples.len() * views * l * id_width);
    let push_ids = |ids: &mut Vec<u8>, values: &[u32]| {
        for &v in values {
            if wide {
                ids.extend_from_slice(&v.to_le_bytes());
            } else {
                ids.extend_from_slice(&(v as u16).to_le_bytes());
            }
        }
    };
    let mut labels: Vec<i64> = Vec::with_capacity(samples.len());
    let mut keys: Vec<&str> = Vec::with_capacity(samples.len());
    let mut skipped: Vec<(String, String)> = Vec::new();
    let batch = opts.batch.max(1);
    let encode_opts = EncodeOptions {
        batch,
        ..Default::default()
    };
    // Images are read and resized on worker threads a batch ahead of the model, through a
    // bounded queue (two batches), so memory holds a few batches whatever the dataset size.
    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Result<RgbImage>>>(2);
        let size = opts.size;
        scope.spawn(move || {
            use rayon::prelude::*;
            for chunk in samples.chunks(batch) {
                let loaded: Vec<Result<RgbImage>> = chunk
                    .par_iter()
                    .map(|s| s.load().and_then(|im| crate::data::prepare(im, Some(size))))
                    .collect();
                if tx.send(loaded).is_err() {
                    return; // the model side stopped (an error)
                }
            }
        });
        for chunk in samples.chunks(batch) {
            let loaded = rx
                .recv()
                .map_err(|_| Error::Invalid("the image reader stopped".into()))?;
            let mut good = Vec::with_capacity(chunk.len());
            for (s, r) in chunk.iter().zip(loaded) {
                match r {
                    Ok(img) => {
                        good.push(img);
                        labels.push(s.label);
                        keys.push(&s.key);
                    }
                    Err(e) => {
                        let reason = e.to_string();
                        events(StoreEvent::Skipped {
                            key: &s.key,
                            reason: &reason,
                        });
                        skipped.push((s.key.clone(), reason));
                    }
                }
            }
            events(StoreEvent::Images(chunk.len()));
            if good.is_empty() {
                continue;
            }
            let center = flat_ids(&tok.encode_images(&good, &encode_opts)?)?;
            let flipped = if views == 2 {
                let flips: Vec<RgbImage> =
                    good.iter().map(image::imageops::flip_horizontal).collect();
                Some(flat_ids(&tok.encode_images(&flips, &encode_opts)?)?)
            } else {
                None
            };
            for r in 0..good.len() {
                push_ids(&mut ids, &center[r * l..(r + 1) * l]);
                if let Some(f) = &flipped {
                    push_ids(&mut ids, &f[r * l..(r + 1) * l]);
                }
            }
        }
        Ok(())
    })?;
    let m = labels.len();
    let descr = if wide { "<u4" } else { "<u2" };
    let ids_npy = npy_bytes(descr, &[m, views, l], &ids);
    drop(ids);
    let label_bytes: Vec<u8> = labels.iter().flat_map(|v| v.to_le_bytes()).collect();
    let labels_npy = npy_bytes("<i8", &[m], &label_bytes);
    let keys_json = serde_json::to_string(&keys).expect("keys serialise") + "\n";
    let name = shard_name(index);
    let record = ShardRecord {
        index,
        name: name.clone(),
        samples: m,
        sha256: ShardHashes {
            ids: sha256_hex(&ids_npy),
            labels: sha256_hex(&labels_npy),
            keys: sha256_hex(keys_json.as_bytes()),
        },
        skipped,
    };
    crate::io::write_atomic(&store.join(format!("{name}.ids.npy")), &ids_npy)?;
    crate::io::write_atomic(&store.join(format!("{name}.labels.npy")), &labels_npy)?;
    crate::io::write_atomic(
        &store.join(format!("{name}.keys.json")),
        keys_json.as_bytes(),
    )?;
    write_json(&store.join(format!("{name}.done.json")), &record)
}

fn flat_ids(tokens: &super::Tokens) -> Result<Vec<u32>> {
    Ok(tokens.flat()?.flatten_all()?.to_vec1::<u32>()?)
}

fn spec_differences(a: &StoreSpec, b: &StoreSpec) -> Vec<String> {
    let (a, b) = (
        serde_json::to_value(a).expect("serialises"),
        serde_json::to_value(b).expect("serialises"),
    );
    let mut out = Vec::new();
    if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
        for (k, v) in a {
            if b.get(k) != Some(v) {
                let show = |v: Option<&serde_json::Value>| {
                    let s = v.map(|v| v.to_string()).unwrap_or_default();
                    if s.len() > 60 {
                        format!("{}...", &s[..60])
                    } else {
                        s
                    }
                };
                out.push(format!(
                    "{k}: {} here, {} asked",
                    show(Some(v)),
                    show(b.get(k))
                ));
            }
        }
    }
    out
}

/// Write `manifest.json` when every shard of the store is done; None (nothing written) while
/// some are missing.
pub fn finish(store: &Path) -> Result<Option<Manifest>> {
    let spec: StoreSpec = read_json(&store.join(SPEC_FILE))?;
    let mut shards = Vec::with_capacity(spec.num_shards);
    for i in 0..spec.num_shards {
        match finished_shard(store, i)? {
            Some(r) => shards.push(r),
            None => return Ok(None),
        }
    }
    let skipped: Vec<(String, String)> = shards.iter().flat_map(|s| s.skipped.clone()).collect();
    let manifest = Manifest {
        stored_samples: shards.iter().map(|s| s.samples).sum(),
        spec,
        shards,
        skipped,
    };
    write_json(&store.join(MANIFEST_FILE), &manifest)?;
    Ok(Some(manifest))
}

/// Join stores written by `shard I/N` processes into `store`: the shards of each part are moved
/// (renamed, not copied) into `store`, then the manifest is written. Every part must hold a
/// store of the same spec.
pub fn merge(store: &Path, parts: &[PathBuf]) -> Result<Option<Manifest>> {
    let spec_path = store.join(SPEC_FILE);
    let mut spec: Option<StoreSpec> = spec_path
        .exists()
        .then(|| read_json(&spec_path))
        .transpose()?;
    for part in parts {
        let theirs: StoreSpec = read_json(&part.join(SPEC_FILE))?;
        match &spec {
            None => {
                std::fs::create_dir_all(store).map_err(|e| Error::io(store, e))?;
                write_json(&spec_path, &theirs)?;
                spec = Some(theirs.clone());
            }
            Some(s) => {
                let mut t = theirs.clone();
                t.software = s.software.clone();
                if &t != s {
                    return Err(Error::Invalid(format!(
                        "{} holds a store of another spec than {} ({})",
                        part.display(),
                        store.display(),
                        spec_differences(s, &t).join("; ")
                    )));
                }
            }
        }
        for i in 0..theirs.num_shards {
            if finished_shard(store, i)?.is_some() {
                continue;
            }
            if let Some(r) = finished_shard(part, i)? {
                // The record last, so that an interrupted merge leaves no shard half-moved
                // that looks finished.
                for ext in ["ids.npy", "labels.npy", "keys.json", "done.json"] {
                    let f = format!("{}.{ext}", r.name);
                    std::fs::rename(part.join(&f), store.join(&f))
                        .map_err(|e| Error::io(part.join(&f), e))?;
                }
            }
        }
    }
    finish(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_aligned_and_readable() {
        let b = npy_bytes("<u2", &[2, 1, 3], &[0u8; 12]);
        assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
        let hl = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + hl) % 64, 0);
        let h = std::str::from_utf8(&b[10..10 + hl]).unwrap();
        assert!(h.contains("'shape': (2, 1, 3)") && h.ends_with('\n'), "{h}");
        let one = npy_bytes("<i8", &[5], &[0u8; 40]);
        assert!(std::str::from_utf8(&one[10..74]).unwrap().contains("(5,)"));
    }

    #[test]
    fn a_dataset_that_shrinks_while_tokenizing_is_an_error() {
        // The listing is read again shard by shard; a file deleted after the count must stop the
        // run with a clear error (not write a short last shard under the counted size).
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("images");
        std::fs::create_dir_all(&data).unwrap();
        for i in 0..3u8 {
            image::RgbImage::from_pixel(8, 8, image::Rgb([i * 60, 100, 200]))
                .save(data.join(format!("{i}.png")))
                .unwrap();
        }
        let ds = crate::data::dataset::open_dataset(&data).unwrap();
        std::fs::remove_file(data.join("2.png")).unwrap();
        let tok = Tokenizer::default_tokenizer(&candle_core::Device::Cpu).unwrap();
        let opts = TokenizeOptions {
            size: 8,
            flip: false,
            shard_size: 2,
            batch: 2,
            part: None,
            limit: None,
            source: data.display().to_string(),
        };
        let e = tokenize(&tok, &ds, &d.path().join("store"), &opts, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("changed") && e.contains("3 samples"), "{e}");
        // The first shard (samples 0 and 1, still there) was finished before the error.
        assert!(finished_shard(&d.path().join("store"), 0)
            .unwrap()
            .is_some());
        assert!(finished_shard(&d.path().join("store"), 1)
            .unwrap()
            .is_none());
    }
}
