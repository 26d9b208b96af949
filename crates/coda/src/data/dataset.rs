//! Datasets to tokenize: an ImageFolder tree (class subfolders give integer labels, in sorted
//! class-name order, as torchvision's `ImageFolder`), a flat folder, a list file (one path per
//! line; CSV or JSONL with `path` and an optional `label`), or WebDataset `.tar` shards (a `.tar`
//! file or a folder of them: members grouped by key, the image member by extension, the label
//! from the `.cls` member). Samples come in a deterministic order, each with a stable key: its
//! path relative to the dataset root, or its WebDataset key.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One image of a dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Stable key: the path relative to the dataset root (or as written in the list),
    /// `/`-separated; the WebDataset key for a tar member.
    pub key: String,
    /// The image file, or the tar shard that holds it.
    pub path: PathBuf,
    /// The class index; -1 when the dataset has no labels.
    pub label: i64,
    /// Where in the tar shard the image's bytes are.
    pub member: Option<TarMember>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TarMember {
    pub name: String,
    pub offset: u64,
    pub len: u64,
}

impl Sample {
    /// Read and decode the image; errors name the file (and the tar member).
    pub fn load(&self) -> Result<image::RgbImage> {
        match &self.member {
            None => super::image_io::load_image(&self.path),
            Some(m) => {
                use std::io::{Read, Seek, SeekFrom};
                let origin = PathBuf::from(format!("{}[{}]", self.path.display(), m.name));
                let mut f =
                    std::fs::File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
                let mut bytes = vec![0u8; m.len as usize];
                f.seek(SeekFrom::Start(m.offset))
                    .and_then(|_| f.read_exact(&mut bytes))
                    .map_err(|e| Error::io(&origin, e))?;
                super::image_io::decode_image(&bytes, &origin)
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dataset {
    pub samples: Vec<Sample>,
    /// Class names in label order (empty without classes).
    pub classes: Vec<String>,
    /// What the source was: "imagefolder", "folder", "list" or "webdataset".
    pub kind: &'static str,
}

fn relative_key(root: &Path, p: &Path) -> String {
    p.strip_prefix(root)
        .unwrap_or(p)
        .components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    Ok(v)
}

/// Open a dataset: a folder (ImageFolder when it holds subfolders, else a flat folder of images)
/// or a list file (`.txt`, `.csv`, `.jsonl`).
pub fn open_dataset(src: &Path) -> Result<Dataset> {
    if !src.exists() {
        return Err(Error::NotFound { path: src.into() });
    }
    if src.is_dir() {
        let entries = sorted_entries(src)?;
        let tars: Vec<PathBuf> = entries
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "tar"))
            .cloned()
            .collect();
        if !tars.is_empty()
            && !entries
                .iter()
                .any(|p| p.is_dir() || super::folder::is_image_path(p))
        {
            return open_webdataset(&tars);
        }
        return open_folder(src);
    }
    let ext = src
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "txt" | "lst" | "csv" | "jsonl" => open_list(src, &ext),
        "tar" => open_webdataset(&[src.to_path_buf()]),
        _ => Err(Error::Invalid(format!(
            "{}: a dataset is a folder or a list file (.txt, .csv, .jsonl)",
            src.display()
        ))),
    }
}

fn open_folder(root: &Path) -> Result<Dataset> {
    let entries = sorted_entries(root)?;
    let class_dirs: Vec<&PathBuf> = entries.iter().filter(|p| p.is_dir()).collect();
    if class_dirs.is_empty() {
        let samples = entries
            .iter()
            .filter(|p| super::folder::is_image_path(p))
            .map(|p| Sample {
                key: relative_key(root, p),
                path: p.clone(),
                label: -1,
                member: None,
            })
            .collect();
        return Ok(Dataset {
            samples,
            classes: Vec::new(),
            kind: "folder",
        });
    }
    // torchvision ImageFolder: every subfolder is a class (sorted by name), its images found
    // recursively; files beside the class folders are not part of the dataset.
    let mut samples = Vec::new();
    let mut classes = Vec::new();
    for (label, dir) in class_dirs.into_iter().enumerate() {
        classes.push(
            dir.file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default(),
        );
        for p in super::folder::collect_images(std::slice::from_ref(dir))? {
            samples.push(Sample {
                key: relative_key(root, &p),
                path: p,
                label: label as i64,
                member: None,
            });
        }
    }
    Ok(Dataset {
        samples,
        classes,
        kind: "imagefolder",
    })
}

fn open_list(list: &Path, ext: &str) -> Result<Dataset> {
    let text = std::fs::read_to_string(list).map_err(|e| Error::io(list, e))?;
    let base = list.parent().unwrap_or(Path::new("."));
    let bad = |line: usize, reason: String| Error::Config {
        path: list.into(),
        reason: format!("line {line}: {reason}"),
    };
    let mut rows: Vec<(String, i64)> = Vec::new();
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    match ext {
        "jsonl" => {
            for (i, line) in lines {
                let v: serde_json::Value =
                    serde_json::from_str(line).map_err(|e| bad(i + 1, e.to_string()))?;
                let path = v["path"]
                    .as_str()
                    .ok_or_else(|| bad(i + 1, "no \"path\" string".into()))?;
                let label = match &v["label"] {
                    serde_json::Value::Null => -1,
                    l => l
                        .as_i64()
                        .ok_or_else(|| bad(i + 1, format!("label {l} is not an integer")))?,
                };
                rows.push((path.to_string(), label));
            }
        }
        "csv" => {
            // A header naming the columns `path` and (optionally) `label`; plain commas, no
            // quoting (paths with commas need the JSONL form).
            let (hi, header) = lines
                .next()
                .ok_or_else(|| bad(1, "empty CSV (a header with `path` is needed)".into()))?;
            let cols: Vec<&str> = header.split(',').map(|c| c.trim()).collect();
            let pi = cols
                .iter()
                .position(|c| *c == "path")
                .ok_or_else(|| bad(hi + 1, format!("header {cols:?} has no `path` column")))?;
            let li = cols.iter().position(|c| *c == "label");
            for (i, line) in lines {
                let f: Vec<&str> = line.split(',').map(|c| c.trim()).collect();
                let path = f.get(pi).ok_or_else(|| bad(i + 1, "missing path".into()))?;
                let label = match li.and_then(|li| f.get(li)) {
                    None | Some(&"") => -1,
                    Some(l) => l
                        .parse()
                        .map_err(|_| bad(i + 1, format!("label {l:?} is not an integer")))?,
                };
                rows.push((path.to_string(), label));
            }
        }
        _ => {
            for (_, line) in lines {
                rows.push((line.trim().to_string(), -1));
            }
        }
    }
    // The list's order is kept (it is the user's), keys are the paths as written.
    let samples = rows
        .into_iter()
        .map(|(key, label)| Sample {
            path: base.join(&key),
            key,
            label,
            member: None,
        })
        .collect();
    Ok(Dataset {
        samples,
        classes: Vec::new(),
        kind: "list",
    })
}

/// WebDataset shards: the members of each tar, in order, grouped by key (the member path up to
/// the first dot of its file name); a sample is a key with an image member (jpg, jpeg, png,
/// webp), labelled by its `.cls` member (an integer as text) when there is one.
fn open_webdataset(tars: &[PathBuf]) -> Result<Dataset> {
    let mut samples = Vec::new();
    for tar_path in tars {
        let f = std::fs::File::open(tar_path).map_err(|e| Error::io(tar_path, e))?;
        let mut archive = tar::Archive::new(f);
        let bad = |reason: String| Error::Config {
            path: tar_path.clone(),
            reason,
        };
        // key -> (image member, label), in first-seen order.
        let mut order: Vec<String> = Vec::new();
        let mut groups: std::collections::HashMap<String, (Option<TarMember>, i64)> =
            Default::default();
        for entry in archive
            .entries()
            .map_err(|e| bad(format!("not a tar file ({e})")))?
        {
            let mut entry = entry.map_err(|e| bad(format!("corrupt tar ({e})")))?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let name = entry
                .path()
                .map_err(|e| bad(format!("bad member name ({e})")))?
                .to_string_lossy()
                .to_string();
            let (dir, file) = match name.rfind('/') {
                Some(i) => (&name[..=i], &name[i + 1..]),
                None => ("", name.as_str()),
            };
            let Some(dot) = file.find('.') else { continue };
            let key = format!("{dir}{}", &file[..dot]);
            let ext = file[dot + 1..].to_ascii_lowercase();
            if !groups.contains_key(&key) {
                order.push(key.clone());
            }
            let g = groups.entry(key).or_insert((None, -1));
            if ["jpg", "jpeg", "png", "webp"].contains(&ext.as_str()) {
                g.0 = Some(TarMember {
                    name: name.clone(),
                    offset: entry.raw_file_position(),
                    len: entry.size(),
                });
            } else if ext == "cls" {
                let mut text = String::new();
                use std::io::Read;
                entry
                    .read_to_string(&mut text)
                    .map_err(|e| bad(format!("{name}: {e}")))?;
                g.1 = text.trim().parse().map_err(|_| {
                    bad(format!("{name}: label {:?} is not an integer", text.trim()))
                })?;
            }
        }
        for key in order {
            if let Some((Some(member), label)) = groups.remove(&key) {
                samples.push(Sample {
                    key,
                    path: tar_path.clone(),
                    label,
                    member: Some(member),
                });
            }
        }
    }
    Ok(Dataset {
        samples,
        classes: Vec::new(),
        kind: "webdataset",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imagefolder_lists_and_keys() {
        let d = tempfile::tempdir().unwrap();
        for (class, name) in [("n02", "b.png"), ("n01", "z.jpg"), ("n01", "sub/a.png")] {
            let p = d.path().join("train").join(class).join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, b"x").unwrap();
        }
        std::fs::write(d.path().join("train/readme.txt"), b"x").unwrap();
        let ds = open_dataset(&d.path().join("train")).unwrap();
        assert_eq!(ds.kind, "imagefolder");
        assert_eq!(ds.classes, ["n01", "n02"]);
        let keys: Vec<(&str, i64)> = ds
            .samples
            .iter()
            .map(|s| (s.key.as_str(), s.label))
            .collect();
        assert_eq!(
            keys,
            [("n01/sub/a.png", 0), ("n01/z.jpg", 0), ("n02/b.png", 1)]
        );

        let csv = d.path().join("list.csv");
        std::fs::write(&csv, "label,path\n3,train/n02/b.png\n,train/n01/z.jpg\n").unwrap();
        let ds = open_dataset(&csv).unwrap();
        assert_eq!(ds.samples[0].label, 3);
        assert_eq!(ds.samples[1].label, -1);
        assert_eq!(ds.samples[0].path, d.path().join("train/n02/b.png"));
        let jsonl = d.path().join("list.jsonl");
        std::fs::write(
            &jsonl,
            "{\"path\": \"a.png\", \"label\": 7}\n{\"path\": \"b.png\"}\n",
        )
        .unwrap();
        let ds = open_dataset(&jsonl).unwrap();
        assert_eq!((ds.samples[0].label, ds.samples[1].label), (7, -1));
        std::fs::write(&jsonl, "{\"path\": \"a.png\", \"label\": \"cat\"}\n").unwrap();
        let e = open_dataset(&jsonl).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("not an integer"), "{e}");
    }

    #[test]
    fn webdataset_members_group_by_key() {
        let d = tempfile::tempdir().unwrap();
        let png = |v: u8| {
            let mut b = Vec::new();
            image::RgbImage::from_pixel(4, 3, image::Rgb([v, 2, 3]))
                .write_to(&mut std::io::Cursor::new(&mut b), image::ImageFormat::Png)
                .unwrap();
            b
        };
        let tar_path = d.path().join("shard-000.tar");
        let mut t = tar::Builder::new(std::fs::File::create(&tar_path).unwrap());
        let mut add = |name: &str, bytes: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            t.append_data(&mut h, name, bytes).unwrap();
        };
        add("s/000.png", &png(10));
        add("s/000.cls", b"4\n");
        add("s/001.cls", b"1");
        add("s/001.json", b"{}");
        add("s/002.jpg", b"not a jpeg");
        add("s/003.txt", b"no image: not a sample");
        add("s/001.png", &png(20));
        t.finish().unwrap();
        drop(t);
        let ds = open_dataset(&tar_path).unwrap();
        assert_eq!(ds.kind, "webdataset");
        let got: Vec<(&str, i64)> = ds
            .samples
            .iter()
            .map(|s| (s.key.as_str(), s.label))
            .collect();
        assert_eq!(got, [("s/000", 4), ("s/001", 1), ("s/002", -1)]);
        assert_eq!(ds.samples[1].load().unwrap().get_pixel(0, 0).0, [20, 2, 3]);
        let e = ds.samples[2].load().unwrap_err().to_string();
        assert!(e.contains("shard-000.tar[s/002.jpg]"), "{e}");
        // A folder of shards reads them in sorted order.
        let ds = open_dataset(d.path()).unwrap();
        assert_eq!((ds.kind, ds.samples.len()), ("webdataset", 3));
    }
}
