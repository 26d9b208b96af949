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

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if is_image_path(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// Expand files and folders into image files. A path that does not exist is an error.
pub fn collect_images(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            walk(p, &mut out)?;
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
