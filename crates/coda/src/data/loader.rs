//! Training batches: a deterministic sample order (a fresh permutation per epoch, drawn from
//! the run seed), random crops after resizing the shorter side (to a fixed side, or to a side
//! drawn per sample), an optional flip, optional colour augmentation, decoding on several
//! threads, and prefetching on a background thread so that the model is never starved.
//!
//! Everything about batch `i` is a function of (seed, i): a resumed run draws exactly the
//! batches an uninterrupted run would have drawn. A corrupt image is skipped (the next image of
//! the permutation takes its place), counted and reported, and never stops a run.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};

use image::RgbImage;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use super::image_io::load_image;
use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct Augment {
    /// Crop size (square).
    pub size: u32,
    /// Shorter side after resizing, before the crop (the reference: round(1.125 · size)).
    pub resize: u32,
    /// Random crop (training) or centre crop (validation).
    pub random_crop: bool,
    /// Random horizontal flip (the reference has none).
    pub flip: bool,
    /// Random scale: the shorter side is drawn per sample, log-uniformly from
    /// [`resize`, `resize_max`] (capped at the picture's own shorter side; never upsampled
    /// beyond `resize`), and the crop is cut from the full picture and resized to `size`.
    pub resize_max: Option<u32>,
    /// Colour augmentation: a random permutation of the RGB channels and a random saturation
    /// factor (log-uniform in [1/2, 2], clamped to [0, 255]), so that no hue or saturation is
    /// rare in training whatever the palette of the pictures.
    pub colour: bool,
}

/// Images resized to their shorter side, kept in memory while under a budget: small datasets
/// are decoded once.
struct Cache {
    images: HashMap<usize, Arc<RgbImage>>,
    bytes: usize,
    budget: usize,
}

pub struct Sampler {
    paths: Vec<PathBuf>,
    aug: Augment,
    seed: u64,
    cache: Mutex<Cache>,
    bad: Mutex<BTreeSet<usize>>,
    /// The shuffled order of the epoch last asked for: built once per epoch, not per sample.
    order: Mutex<Option<(u64, Arc<Vec<usize>>)>>,
}

/// A decoded batch: pixels as a flat (B, 3, H, W) f32 buffer in [-1, 1].
pub struct Batch {
    pub index: u64,
    pub data: Vec<f32>,
    pub batch: usize,
    pub size: usize,
}

fn mix(a: u64, b: u64) -> u64 {
    // splitmix64 of a combination: independent streams per (seed, item).
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub fn resize_shorter(img: &RgbImage, side: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let (nw, nh) = if w <= h {
        (side, ((side as u64 * h as u64) / w as u64).max(1) as u32)
    } else {
        (((side as u64 * w as u64) / h as u64).max(1) as u32, side)
    };
    if (nw, nh) == (w, h) {
        return img.clone();
    }
    super::image_io::resize_lanczos3(img, nw, nh)
}

impl Sampler {
    pub fn new(paths: Vec<PathBuf>, aug: Augment, seed: u64, cache_mb: usize) -> Result<Self> {
        if paths.is_empty() {
            return Err(Error::Invalid("no training images found".into()));
        }
        if aug.resize < aug.size {
            return Err(Error::Invalid(format!(
                "resize {} is smaller than the crop {}",
                aug.resize, aug.size
            )));
        }
        Ok(Self {
            paths,
            aug,
            seed,
            cache: Mutex::new(Cache {
                images: HashMap::new(),
                bytes: 0,
                budget: cache_mb << 20,
            }),
            bad: Mutex::new(BTreeSet::new()),
            order: Mutex::new(None),
        })
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// Corrupt images met so far, by path.
    pub fn bad_images(&self) -> Vec<PathBuf> {
        let bad = self.bad.lock().expect("not poisoned");
        bad.iter().map(|&i| self.paths[i].clone()).collect()
    }

    /// The image index at position `pos` of the sample stream (epoch = pos / n).
    fn index_at(&self, pos: u64) -> usize {
        let n = self.paths.len() as u64;
        let epoch = pos / n;
        let mut order = self.order.lock().expect("not poisoned");
        let perm = match &*order {
            Some((e, perm)) if *e == epoch => perm.clone(),
            _ => {
                let mut perm: Vec<usize> = (0..self.paths.len()).collect();
                let mut rng = rand::rngs::StdRng::seed_from_u64(mix(self.seed, epoch));
                perm.shuffle(&mut rng);
                let perm = Arc::new(perm);
                *order = Some((epoch, perm.clone()));
                perm
            }
        };
        perm[(pos % n) as usize]
    }

    /// Image `i` as the crops are cut from it: resized to the fixed shorter side, or as decoded
    /// when the scale is drawn per sample.
    fn resized(&self, i: usize) -> Result<Arc<RgbImage>> {
        if let Some(img) = self.cache.lock().expect("not poisoned").images.get(&i) {
            return Ok(img.clone());
        }
        let decoded = load_image(&self.paths[i])?;
        let img = Arc::new(match self.aug.resize_max {
            Some(_) => decoded,
            None => resize_shorter(&decoded, self.aug.resize),
        });
        let mut c = self.cache.lock().expect("not poisoned");
        let bytes = img.as_raw().len();
        if c.bytes + bytes <= c.budget {
            c.bytes += bytes;
            c.images.insert(i, img.clone());
        }
        Ok(img)
    }

    /// Sample `pos` of the stream, cropped (and flipped) with randomness drawn from (seed, pos).
    /// A corrupt image is recorded and the next position's image is used instead.
    pub fn sample(&self, pos: u64) -> Result<RgbImage> {
        let n = self.paths.len() as u64;
        for k in 0..n {
            let i = self.index_at(pos + k);
            match self.resized(i) {
                Ok(img) => return Ok(self.crop(&img, pos)),
                Err(e) => {
                    tracing::warn!("skipping corrupt image: {e}");
                    self.bad.lock().expect("not poisoned").insert(i);
                }
            }
        }
        Err(Error::Invalid(
            "every training image failed to decode".into(),
        ))
    }

    fn crop(&self, img: &RgbImage, pos: u64) -> RgbImage {
        let mut rng = rand::rngs::StdRng::seed_from_u64(mix(self.seed ^ 0xC0DA, pos));
        let mut out = match self.aug.resize_max {
            Some(max) => self.scaled_crop(img, max, &mut rng),
            None => self.fixed_crop(img, &mut rng),
        };
        if self.aug.flip && rng.gen_bool(0.5) {
            image::imageops::flip_horizontal_in_place(&mut out);
        }
        if self.aug.colour {
            colour_jitter(&mut out, &mut rng);
        }
        out
    }

    /// A crop of the picture at a shorter side drawn log-uniformly from [resize, max]: the crop
    /// is cut at full resolution (its side is size · shorter / side) and resized to `size`,
    /// which costs a resize of the crop only.
    fn scaled_crop(&self, img: &RgbImage, max: u32, rng: &mut impl Rng) -> RgbImage {
        let s = self.aug.size;
        let (w, h) = img.dimensions();
        let short = w.min(h);
        let lo = self.aug.resize.min(short) as f64;
        let hi = (max.min(short) as f64).max(lo);
        let side = if self.aug.random_crop {
            (lo.ln() + rng.gen::<f64>() * (hi.ln() - lo.ln())).exp()
        } else {
            lo
        };
        let c = ((s as f64 * short as f64 / side).round() as u32).clamp(1, short);
        let (left, top) = if self.aug.random_crop {
            (rng.gen_range(0..=w - c), rng.gen_range(0..=h - c))
        } else {
            ((w - c) / 2, (h - c) / 2)
        };
        let cut = image::imageops::crop_imm(img, left, top, c, c).to_image();
        if c == s {
            cut
        } else {
            super::image_io::resize_lanczos3(&cut, s, s)
        }
    }

    fn fixed_crop(&self, img: &RgbImage, rng: &mut impl Rng) -> RgbImage {
        let s = self.aug.size;
        let (w, h) = img.dimensions();
        let (left, top) = if self.aug.random_crop {
            (rng.gen_range(0..=w - s), rng.gen_range(0..=h - s))
        } else {
            (
                ((w - s) as f64 / 2.0).round_ties_even() as u32,
                ((h - s) as f64 / 2.0).round_ties_even() as u32,
            )
        };
        image::imageops::crop_imm(img, left, top, s, s).to_image()
    }

    /// Batch `index` of `batch` samples (stream positions index·batch ..), decoded in parallel.
    pub fn batch(&self, index: u64, batch: usize) -> Result<Batch> {
        let images: Vec<RgbImage> = (0..batch as u64)
            .into_par_iter()
            .map(|j| self.sample(index * batch as u64 + j))
            .collect::<Result<_>>()?;
        let s = self.aug.size as usize;
        let mut data = vec![0f32; batch * 3 * s * s];
        for (b, img) in images.iter().enumerate() {
            for (p, px) in img.pixels().enumerate() {
                for c in 0..3 {
                    data[(b * 3 + c) * s * s + p] = px[c] as f32 / 127.5 - 1.0;
                }
            }
        }
        Ok(Batch {
            index,
            data,
            batch,
            size: s,
        })
    }
}

/// A random permutation of the channels (each of the six equally likely) and a saturation
/// factor f, log-uniform in [1/2, 2]: each pixel becomes grey + f · (pixel − grey), with grey
/// its Rec. 601 luma, rounded and clamped to [0, 255].
pub fn colour_jitter(img: &mut RgbImage, rng: &mut impl Rng) {
    const PERMS: [[usize; 3]; 6] = [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ];
    let perm = PERMS[rng.gen_range(0..6)];
    let f = ((rng.gen::<f32>() * 2.0 - 1.0) * std::f32::consts::LN_2).exp();
    for px in img.pixels_mut() {
        let v = [px[perm[0]], px[perm[1]], px[perm[2]]].map(f32::from);
        let grey = 0.299 * v[0] + 0.587 * v[1] + 0.114 * v[2];
        for c in 0..3 {
            px[c] = (grey + f * (v[c] - grey)).round().clamp(0.0, 255.0) as u8;
        }
    }
}

/// Decode batches `start, start+1, ..` on a background thread, `depth` ahead of the consumer.
pub fn prefetch(
    sampler: Arc<Sampler>,
    start: u64,
    batch: usize,
    depth: usize,
) -> Receiver<Result<Batch>> {
    let (tx, rx) = sync_channel(depth.max(1));
    std::thread::spawn(move || {
        let mut i = start;
        loop {
            let b = sampler.batch(i, batch);
            let failed = b.is_err();
            if tx.send(b).is_err() || failed {
                return;
            }
            i += 1;
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(n: usize) -> (tempfile::TempDir, Vec<PathBuf>) {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = Vec::new();
        for i in 0..n {
            let img = RgbImage::from_fn(40 + i as u32, 36, |x, y| {
                image::Rgb([(x * 5) as u8, (y * 7) as u8, (i * 40) as u8])
            });
            let p = dir.path().join(format!("{i}.png"));
            img.save(&p).unwrap();
            paths.push(p);
        }
        (dir, paths)
    }

    fn aug() -> Augment {
        Augment {
            size: 16,
            resize: 20,
            random_crop: true,
            flip: true,
            resize_max: None,
            colour: false,
        }
    }

    #[test]
    fn batches_are_a_function_of_seed_and_index() {
        let (_d, paths) = folder(5);
        let a = Sampler::new(paths.clone(), aug(), 7, 0).unwrap();
        let b = Sampler::new(paths.clone(), aug(), 7, 64).unwrap();
        for i in [0u64, 3, 11] {
            assert_eq!(a.batch(i, 3).unwrap().data, b.batch(i, 3).unwrap().data);
        }
        let c = Sampler::new(paths, aug(), 8, 0).unwrap();
        assert_ne!(a.batch(0, 3).unwrap().data, c.batch(0, 3).unwrap().data);
        // Each epoch visits every image once.
        let mut seen: Vec<usize> = (0..5).map(|p| a.index_at(5 + p)).collect();
        seen.sort();
        assert_eq!(seen, vec![0, 1, 2, 3, 4]);
    }

    /// Issue #15: the epoch's order was rebuilt (O(n)) for every sample; now it is built once per
    /// epoch, and positions asked in any order (epochs interleaved) still get the same images.
    #[test]
    fn epoch_order_is_built_once_and_independent_of_query_order() {
        let (_d, paths) = folder(5);
        let a = Sampler::new(paths.clone(), aug(), 7, 0).unwrap();
        let fresh = |p: u64| {
            Sampler::new(paths.clone(), aug(), 7, 0)
                .unwrap()
                .index_at(p)
        };
        for p in [0u64, 7, 1, 12, 3, 5, 2, 14] {
            assert_eq!(a.index_at(p), fresh(p), "position {p}");
        }
        let first = a.order.lock().unwrap().clone().unwrap().1;
        a.index_at(14);
        let again = a.order.lock().unwrap().clone().unwrap().1;
        assert!(Arc::ptr_eq(&first, &again), "the epoch's order is reused");
    }

    #[test]
    fn random_scale_and_colour_are_deterministic_and_vary() {
        let (_d, paths) = folder(3);
        let a = Augment {
            resize_max: Some(36),
            colour: true,
            ..aug()
        };
        let s1 = Sampler::new(paths.clone(), a.clone(), 3, 0).unwrap();
        let s2 = Sampler::new(paths, a, 3, 64).unwrap();
        let batches: Vec<Vec<f32>> = (0..6).map(|i| s1.batch(i, 2).unwrap().data).collect();
        for (i, b) in batches.iter().enumerate() {
            assert_eq!(b.len(), 2 * 3 * 16 * 16);
            assert_eq!(*b, s2.batch(i as u64, 2).unwrap().data, "batch {i}");
        }
        // Different draws give different crops.
        assert_ne!(batches[0], batches[1]);
    }

    #[test]
    fn colour_jitter_permutes_channels_and_keeps_grey() {
        let mut seen = BTreeSet::new();
        for seed in 0..64u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            // A grey pixel has no saturation to scale and no channel order to permute.
            let mut img = RgbImage::from_fn(2, 1, |x, _| {
                if x == 0 {
                    image::Rgb([90, 90, 90])
                } else {
                    image::Rgb([10, 120, 250])
                }
            });
            colour_jitter(&mut img, &mut rng);
            assert_eq!(img.get_pixel(0, 0).0, [90, 90, 90]);
            let p = img.get_pixel(1, 0).0;
            // Which channel holds the largest value tells the permutation.
            let argmax = (0..3).max_by_key(|&c| p[c]).unwrap();
            seen.insert(argmax);
        }
        assert_eq!(seen.len(), 3, "every channel order occurs");
    }

    #[test]
    fn corrupt_image_is_skipped_and_reported() {
        let (dir, mut paths) = folder(4);
        let bad = dir.path().join("bad.jpg");
        std::fs::write(&bad, b"\\xff\\xd8 not a jpeg").unwrap();
        paths.push(bad.clone());
        let s = Sampler::new(paths, aug(), 1, 16).unwrap();
        for i in 0..4 {
            let b = s.batch(i, 5).unwrap();
            assert_eq!(b.data.len(), 5 * 3 * 16 * 16);
        }
        assert_eq!(s.bad_images(), vec![bad]);
        let rx = prefetch(Arc::new(s), 0, 2, 2);
        for _ in 0..3 {
            assert!(rx.recv().unwrap().is_ok());
        }
    }
}
