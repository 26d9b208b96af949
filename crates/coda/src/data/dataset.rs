//! Datasets to tokenize: an ImageFolder tree (class subfolders give integer labels, in sorted
//! class-name order, as torchvision's `ImageFolder`), a flat folder, a list file (one path per
//! line; CSV or JSONL with `path` and an optional `label`), or WebDataset `.tar` shards (a `.tar`
//! file or a folder of them: members grouped by key, the image member by extension, the label
//! from the `.cls` member). Samples come in a deterministic order, each with a stable key: its
//! path relative to the dataset root, or its WebDataset key.

use std::path::{Path, PathBuf};

use super::folder::ImageWalk;
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

/// A dataset: how to list its samples, and how many there are. The samples are not held in
/// memory: [`Dataset::samples`] lists them again, lazily, in the same order, so memory stays
/// bounded by the largest folder (or list line, or tar shard), not by the dataset.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Class names in label order (empty without classes).
    pub classes: Vec<String>,
    /// What the source was: "imagefolder", "folder", "list" or "webdataset".
    pub kind: &'static str,
    len: usize,
    source: Source,
}

#[derive(Clone, Debug)]
enum Source {
    /// The images of one folder (not its subfolders).
    Flat(PathBuf),
    /// Class folders, in label order, each searched recursively.
    ImageFolder {
        root: PathBuf,
        class_dirs: Vec<PathBuf>,
    },
    List {
        path: PathBuf,
        ext: String,
    },
    WebDataset(Vec<PathBuf>),
}

type Samples<'a> = Box<dyn Iterator<Item = Result<Sample>> + 'a>;

impl Dataset {
    /// The number of samples.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The samples in the dataset's order, listed lazily (the folders, list or shards are read
    /// again, one folder / line / shard at a time).
    pub fn samples(&self) -> Samples<'_> {
        match &self.source {
            Source::Flat(root) => Box::new(ImageWalk::new(root, false).map(move |p| {
                p.map(|p| Sample {
                    key: relative_key(root, &p),
                    path: p,
                    label: -1,
                    member: None,
                })
            })),
            Source::ImageFolder { root, class_dirs } => {
                Box::new(class_dirs.iter().enumerate().flat_map(move |(label, dir)| {
                    ImageWalk::new(dir, true).map(move |p| {
                        p.map(|p| Sample {
                            key: relative_key(root, &p),
                            path: p,
                            label: label as i64,
                            member: None,
                        })
                    })
                }))
            }
            Source::List { path, ext } => match ListRows::open(path, ext) {
                Err(e) => Box::new(std::iter::once(Err(e))),
                Ok(rows) => {
                    let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
                    Box::new(rows.map(move |r| {
                        r.map(|(key, label)| Sample {
                            path: base.join(&key),
                            key,
                            label,
                            member: None,
                        })
                    }))
                }
            },
            Source::WebDataset(tars) => Box::new(tars.iter().flat_map(|t| match tar_samples(t) {
                Ok(v) => v.into_iter().map(Ok).collect::<Vec<_>>(),
                Err(e) => vec![Err(e)],
            })),
        }
    }

    /// The samples, all in memory (for small datasets and tests).
    pub fn collect_samples(&self) -> Result<Vec<Sample>> {
        self.samples().collect()
    }
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
/// or a list file (`.txt`, `.csv`, `.jsonl`). It is listed once here, to count and check it.
pub fn open_dataset(src: &Path) -> Result<Dataset> {
    if !src.exists() {
        return Err(Error::NotFound { path: src.into() });
    }
    let (source, kind, classes) = if src.is_dir() {
        let entries = sorted_entries(src)?;
        let tars: Vec<PathBuf> = entries
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "tar"))
            .cloned()
            .collect();
        let class_dirs: Vec<PathBuf> = entries.iter().filter(|p| p.is_dir()).cloned().collect();
        if !tars.is_empty()
            && class_dirs.is_empty()
            && !entries.iter().any(|p| super::folder::is_image_path(p))
        {
            (Source::WebDataset(tars), "webdataset", Vec::new())
        } else if class_dirs.is_empty() {
            (Source::Flat(src.to_path_buf()), "folder", Vec::new())
        } else {
            // torchvision ImageFolder: every subfolder is a class (sorted by name), its images
            // found recursively; files beside the class folders are not part of the dataset.
            let classes = class_dirs
                .iter()
                .map(|d| {
                    d.file_name()
                        .map(|n| n.to_string_lossy().to_string())
                        .unwrap_or_default()
                })
                .collect();
            let root = src.to_path_buf();
            (
                Source::ImageFolder { root, class_dirs },
                "imagefolder",
                classes,
            )
        }
    } else {
        let ext = src
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        match ext.as_str() {
            "txt" | "lst" | "csv" | "jsonl" => (
                Source::List {
                    path: src.to_path_buf(),
                    ext,
                },
                "list",
                Vec::new(),
            ),
            "tar" => (
                Source::WebDataset(vec![src.to_path_buf()]),
                "webdataset",
                Vec::new(),
            ),
            _ => {
                return Err(Error::Invalid(format!(
                    "{}: a dataset is a folder or a list file (.txt, .csv, .jsonl)",
                    src.display()
                )))
            }
        }
    };
    let mut ds = Dataset {
        classes,
        kind,
        len: 0,
        source,
    };
    let mut len = 0;
    for s in ds.samples() {
        s?;
        len += 1;
    }
    ds.len = len;
    Ok(ds)
}

/// The rows of a list file, `(path as written, label)`, read a line at a time. The list's order
/// is kept (it is the user's); keys are the paths as written.
struct ListRows {
    lines: std::iter::Enumerate<std::io::Lines<std::io::BufReader<std::fs::File>>>,
    path: PathBuf,
    ext: String,
    /// CSV: the `path` and `label` column indices.
    columns: Option<(usize, Option<usize>)>,
}

impl ListRows {
    fn open(path: &Path, ext: &str) -> Result<Self> {
        use std::io::BufRead;
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut rows = ListRows {
            lines: std::io::BufReader::new(f).lines().enumerate(),
            path: path.into(),
            ext: ext.into(),
            columns: None,
        };
        if ext == "csv" {
            // A header naming the columns `path` and (optionally) `label`; plain commas, no
            // quoting (paths with commas need the JSONL form).
            let (hi, header) = rows
                .next_line()?
                .ok_or_else(|| rows.bad(1, "empty CSV (a header with `path` is needed)".into()))?;
            let cols: Vec<&str> = header.split(',').map(|c| c.trim()).collect();
            let pi = cols
                .iter()
                .position(|c| *c == "path")
                .ok_or_else(|| rows.bad(hi + 1, format!("header {cols:?} has no `path` column")))?;
            let li = cols.iter().position(|c| *c == "label");
            rows.columns = Some((pi, li));
        }
        Ok(rows)
    }

    fn bad(&self, line: usize, reason: String) -> Error {
        Error::Config {
            path: self.path.clone(),
            reason: format!("line {line}: {reason}"),
        }
    }

    /// The next non-empty line and its index.
    fn next_line(&mut self) -> Result<Option<(usize, String)>> {
        for (i, line) in self.lines.by_ref() {
            let line = line.map_err(|e| Error::io(&self.path, e))?;
            if !line.trim().is_empty() {
                return Ok(Some((i, line)));
            }
        }
        Ok(None)
    }

    fn parse(&self, i: usize, line: &str) -> Result<(String, i64)> {
        let bad = |reason: String| self.bad(i + 1, reason);
        match (self.ext.as_str(), self.columns) {
            ("jsonl", _) => {
                let v: serde_json::Value =
                    serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
                let path = v["path"]
                    .as_str()
                    .ok_or_else(|| bad("no \"path\" string".into()))?;
                let label = match &v["label"] {
                    serde_json::Value::Null => -1,
                    l => l
                        .as_i64()
                        .ok_or_else(|| bad(format!("label {l} is not an integer")))?,
                };
                Ok((path.to_string(), label))
            }
            ("csv", Some((pi, li))) => {
                let f: Vec<&str> = line.split(',').map(|c| c.trim()).collect();
                let path = f.get(pi).ok_or_else(|| bad("missing path".into()))?;
                let label = match li.and_then(|li| f.get(li)) {
                    None | Some(&"") => -1,
                    Some(l) => l
                        .parse()
                        .map_err(|_| bad(format!("label {l:?} is not an integer")))?,
                };
                Ok((path.to_string(), label))
            }
            _ => Ok((line.trim().to_string(), -1)),
        }
    }
}

impl Iterator for ListRows {
    type Item = Result<(String, i64)>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.next_line() {
            Err(e) => Some(Err(e)),
            Ok(None) => None,
            Ok(Some((i, line))) => Some(self.parse(i, &line)),
        }
    }
}

/// The samples of one WebDataset shard: its members, in order, grouped by key (the member path
/// up to the first dot of its file name); a sample is a key with an image member (jpg, jpeg, png,
/// webp), labelled by its `.cls` member (an integer as text) when there is one. Member data is
/// skipped by seeking; only the `.cls` members are read.
fn tar_samples(tar_path: &Path) -> Result<Vec<Sample>> {
    let f = std::fs::File::open(tar_path).map_err(|e| Error::io(tar_path, e))?;
    let mut archive = tar::Archive::new(f);
    let bad = |reason: String| Error::Config {
        path: tar_path.into(),
        reason,
    };
    // key -> (image member, label), in first-seen order.
    let mut order: Vec<String> = Vec::new();
    let mut groups: std::collections::HashMap<String, (Option<TarMember>, i64)> =
        Default::default();
    for entry in archive
        .entries_with_seek()
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
            g.1 = text
                .trim()
                .parse()
                .map_err(|_| bad(format!("{name}: label {:?} is not an integer", text.trim())))?;
        }
    }
    let mut samples = Vec::new();
    for key in order {
        if let Some((Some(member), label)) = groups.remove(&key) {
            samples.push(Sample {
                key,
                path: tar_path.to_path_buf(),
                label,
                member: Some(member),
            });
        }
    }
    Ok(samples)
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
        let samples = ds.collect_samples().unwrap();
        let keys: Vec<(&str, i64)> = samples.iter().map(|s| (s.key.as_str(), s.label)).collect();
        assert_eq!(
            keys,
            [("n01/sub/a.png", 0), ("n01/z.jpg", 0), ("n02/b.png", 1)]
        );

        let csv = d.path().join("list.csv");
        std::fs::write(&csv, "label,path\n3,train/n02/b.png\n,train/n01/z.jpg\n").unwrap();
        let samples = open_dataset(&csv).unwrap().collect_samples().unwrap();
        assert_eq!(samples[0].label, 3);
        assert_eq!(samples[1].label, -1);
        assert_eq!(samples[0].path, d.path().join("train/n02/b.png"));
        let jsonl = d.path().join("list.jsonl");
        std::fs::write(
            &jsonl,
            "{\"path\": \"a.png\", \"label\": 7}\n{\"path\": \"b.png\"}\n",
        )
        .unwrap();
        let samples = open_dataset(&jsonl).unwrap().collect_samples().unwrap();
        assert_eq!((samples[0].label, samples[1].label), (7, -1));
        std::fs::write(&jsonl, "{\"path\": \"a.png\", \"label\": \"cat\"}\n").unwrap();
        let e = open_dataset(&jsonl).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("not an integer"), "{e}");
    }

    #[test]
    fn lazy_listing_keeps_the_sorted_walk_order() {
        // Names whose string order differs from their path order ('-' < '/' < 'a'), nested.
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("data");
        for name in [
            "c/a-b/1.png",
            "c/a/2.png",
            "c/a/b/3.PNG",
            "c/a.b.png",
            "c/0.jpg",
            "d/x.webp",
        ] {
            let p = root.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, b"x").unwrap();
        }
        std::fs::write(root.join("c/notes.txt"), b"x").unwrap();
        let ds = open_dataset(&root).unwrap();
        let lazy: Vec<PathBuf> = ds.samples().map(|s| s.unwrap().path).collect();
        let walked =
            crate::data::folder::collect_images(&[root.join("c"), root.join("d")]).unwrap();
        assert_eq!(lazy, walked);
        assert_eq!(ds.len(), 6);
        // Listing twice gives the same samples; a file removed after opening shows in the listing.
        assert_eq!(ds.collect_samples().unwrap(), ds.collect_samples().unwrap());
        std::fs::remove_file(root.join("d/x.webp")).unwrap();
        assert_eq!(ds.samples().count(), 5);
        // A flat folder lists only its own images.
        let flat = open_dataset(&root.join("c/a")).unwrap();
        assert_eq!(flat.kind, "imagefolder");
        let flat = open_dataset(&root.join("c/a/b")).unwrap();
        assert_eq!((flat.kind, flat.len()), ("folder", 1));
        // Symbolic links to folders are followed, as torchvision's ImageFolder does.
        #[cfg(unix)]
        {
            let linked = d.path().join("linked");
            std::fs::create_dir_all(&linked).unwrap();
            std::os::unix::fs::symlink(root.join("c/a"), linked.join("cls")).unwrap();
            let keys: Vec<String> = open_dataset(&linked)
                .unwrap()
                .samples()
                .map(|s| s.unwrap().key)
                .collect();
            assert_eq!(keys, ["cls/2.png", "cls/b/3.PNG"]);
        }
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
        let samples = ds.collect_samples().unwrap();
        let got: Vec<(&str, i64)> = samples.iter().map(|s| (s.key.as_str(), s.label)).collect();
        assert_eq!(got, [("s/000", 4), ("s/001", 1), ("s/002", -1)]);
        assert_eq!(samples[1].load().unwrap().get_pixel(0, 0).0, [20, 2, 3]);
        let e = samples[2].load().unwrap_err().to_string();
        assert!(e.contains("shard-000.tar[s/002.jpg]"), "{e}");
        // A folder of shards reads them in sorted order.
        let ds = open_dataset(d.path()).unwrap();
        assert_eq!((ds.kind, ds.len()), ("webdataset", 3));
    }
}
