//! Image files from the command line: files as given, folders searched recursively (sorted, so
//! that row order is reproducible), decoded in parallel.

use std::path::{Path, PathBuf};

use image::RgbImage;
use rayon::prelude::*;

use crate::error::{Error, Result};

const EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

pub fn is_image_path(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

/// The image files under a folder, depth-first, each folder's entries in sorted order, holding
/// only the names of the folders on the current path. Whether an entry is a folder comes from the
/// directory listing itself (no `stat` per file, which counts on an ImageNet-size tree listed
/// twice), except for symbolic links, which are followed.
pub(crate) struct ImageWalk {
    stack: Vec<(PathBuf, std::vec::IntoIter<(std::ffi::OsString, bool)>)>,
    recurse: bool,
    error: Option<Error>,
}

impl ImageWalk {
    pub(crate) fn new(dir: &Path, recurse: bool) -> Self {
        let mut w = ImageWalk {
            stack: Vec::new(),
            recurse,
            error: None,
        };
        w.enter(dir);
        w
    }

    fn enter(&mut self, dir: &Path) {
        let names = std::fs::read_dir(dir).and_then(|rd| {
            rd.map(|e| {
                let e = e?;
                let t = e.file_type()?;
                let is_dir = t.is_dir() || (t.is_symlink() && e.path().is_dir());
                Ok((e.file_name(), is_dir))
            })
            .collect::<std::io::Result<Vec<_>>>()
        });
        match names {
            Ok(mut names) => {
                names.sort();
                self.stack.push((dir.to_path_buf(), names.into_iter()));
            }
            Err(e) => self.error = Some(Error::io(dir, e)),
        }
    }
}

impl Iterator for ImageWalk {
    type Item = Result<PathBuf>;

    fn next(&mut self) -> Option<Result<PathBuf>> {
        loop {
            if let Some(e) = self.error.take() {
                self.stack.clear();
                return Some(Err(e));
            }
            let (dir, names) = self.stack.last_mut()?;
            match names.next() {
                None => {
                    self.stack.pop();
                }
                Some((name, is_dir)) => {
                    let p = dir.join(name);
                    if is_dir {
                        if self.recurse {
                            self.enter(&p);
                        }
                    } else if is_image_path(&p) {
                        return Some(Ok(p));
                    }
                }
            }
        }
    }
}

/// Expand files and folders into image files. A path that does not exist is an error.
pub fn collect_images(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            for image in ImageWalk::new(p, true) {
                out.push(image?);
            }
        } else if p.exists() {
            out.push(p.clone());
        } else {
            return Err(Error::NotFound { path: p.clone() });
        }
    }
    Ok(out)
}

/// Decode and prepare images on all threads; each result keeps its own error (naming the file).
pub fn load_prepared(paths: &[PathBuf], size: Option<u32>) -> Vec<Result<RgbImage>> {
    paths
        .par_iter()
        .map(|p| super::image_io::load_image(p).and_then(|img| super::image_io::prepare(img, size)))
        .collect()
}
