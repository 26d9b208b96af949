//! Image-level calls of a [`Tokenizer`]: decoded pixels or image files in, token ids out, and
//! back to pixels. The CLI and the Python package both go through these, so that the same images
//! and options give bit-identical ids everywhere.

use std::path::{Path, PathBuf};

use image::RgbImage;

use super::token_file::TokenFileMeta;
use super::{Posterior, Tokenizer, Tokens};
use crate::error::{Error, Result};
use crate::kernels::Precision;

/// Images per model call when the caller does not say.
pub const DEFAULT_BATCH: usize = 8;

/// Options of [`Tokenizer::encode_images`] and [`Tokenizer::encode_paths`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncodeOptions {
    /// Images per model call. Tokens do not depend on it.
    pub batch: usize,
    /// Sample the posterior instead of taking its mean: row `r` of the call uses seed + r, so
    /// that the tokens do not depend on the batch size either.
    pub sample_seed: Option<u64>,
    /// Precision of this call (None: the tokenizer's).
    pub precision: Option<Precision>,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        Self {
            batch: DEFAULT_BATCH,
            sample_seed: None,
            precision: None,
        }
    }
}

impl EncodeOptions {
    fn posterior_for_row(&self, row: usize) -> Posterior {
        match self.sample_seed {
            Some(seed) => Posterior::Sample(seed.wrapping_add(row as u64)),
            None => Posterior::Mean,
        }
    }
}

impl Tokenizer {
    /// The size images are prepared to when the caller gives none: the tokenizer's resolution
    /// (shorter side resized to it, centre crop), or the image's own size for a tokenizer
    /// without one.
    pub fn default_image_size(&self) -> Option<u32> {
        self.config().resolution.map(|r| r as u32)
    }

    /// Encode decoded RGB images, all of one size (a multiple of the downsampling factor).
    pub fn encode_images(&self, images: &[RgbImage], options: &EncodeOptions) -> Result<Tokens> {
        let Some(first) = images.first() else {
            return Err(Error::Invalid(
                "no images to encode (an empty batch)".into(),
            ));
        };
        let dims = first.dimensions();
        if let Some((i, img)) = images
            .iter()
            .enumerate()
            .find(|(_, im)| im.dimensions() != dims)
        {
            return Err(Error::Invalid(format!(
                "image {i} is {}x{}, image 0 is {}x{}: one call encodes images of one size",
                img.width(),
                img.height(),
                dims.0,
                dims.1
            )));
        }
        self.scales_for_image(dims.1 as usize, dims.0 as usize)?;
        let batch = options.batch.max(1);
        self.check_memory(batch.min(images.len()), dims.1 as usize, dims.0 as usize)?;
        self.run(options.precision, || -> Result<Tokens> {
            let mut parts = Vec::with_capacity(images.len().div_ceil(batch));
            for (i, chunk) in images.chunks(batch).enumerate() {
                let x = crate::data::images_to_tensor(chunk, self.device())?;
                let posterior = options.posterior_for_row(i * batch);
                parts.push(self.encode_now(&x, posterior)?.tokens);
            }
            Ok(Tokens::cat(&parts)?)
        })
    }

    /// Refuse, before anything is read, a batch of h x w images whose encoding or decoding would
    /// need more memory than [`crate::limits::max_memory`].
    pub fn check_memory(&self, batch: usize, h: usize, w: usize) -> Result<()> {
        crate::limits::check(
            &format!("tokenizing {batch} image(s) of {w}x{h} at a time"),
            crate::limits::inference_bytes(&self.config().vae, batch, h, w),
        )
    }

    /// Read, prepare (shorter side to `size` and centre crop, as `coda encode`; None keeps each
    /// image's own size) and encode image files. The first unreadable file is an error naming it.
    pub fn encode_paths(
        &self,
        paths: &[PathBuf],
        size: Option<u32>,
        options: &EncodeOptions,
    ) -> Result<Tokens> {
        if paths.is_empty() {
            return Err(Error::Invalid(
                "no images to encode (an empty batch)".into(),
            ));
        }
        // Read in slices of a few batches, so that memory holds a few batches of pixels, not the
        // whole list; the rows keep their global numbers for the seed rule.
        let batch = options.batch.max(1);
        if let Some(s) = size {
            crate::data::image_io::check_size(s)?;
            self.check_memory(batch, s as usize, s as usize)?;
        }
        let slice = batch * 4;
        let mut parts = Vec::with_capacity(paths.len().div_ceil(slice));
        for (j, chunk) in paths.chunks(slice).enumerate() {
            let images = self.run(None, || {
                crate::data::load_prepared(chunk, size)
                    .into_iter()
                    .collect::<Result<Vec<_>>>()
            })?;
            let opts = EncodeOptions {
                sample_seed: options
                    .sample_seed
                    .map(|s| s.wrapping_add((j * slice) as u64)),
                ..*options
            };
            parts.push(self.encode_images(&images, &opts)?);
        }
        Ok(Tokens::cat(&parts)?)
    }

    /// Decode tokens to RGB images, from the first `scales` scales (None: all of them).
    pub fn decode_images(
        &self,
        tokens: &Tokens,
        scales: Option<usize>,
        precision: Option<Precision>,
    ) -> Result<Vec<RgbImage>> {
        let k = scales.unwrap_or(tokens.scales.len());
        let mut out = Vec::with_capacity(tokens.batch());
        let mut start = 0;
        while start < tokens.batch() {
            let n = DEFAULT_BATCH.min(tokens.batch() - start);
            let x = self.decode_in(&tokens.slice(start, n)?, k, precision)?;
            out.extend(crate::data::tensor_to_images(&x)?);
            start += n;
        }
        Ok(out)
    }

    /// Whether the tokens of a token file (`path`, for messages) can be decoded by this
    /// tokenizer: a different codebook size is refused; a different tokenizer hash is refused
    /// unless `force`, and then returned as a warning to show.
    pub fn check_token_file(
        &self,
        meta: &TokenFileMeta,
        path: &Path,
        force: bool,
    ) -> Result<Option<String>> {
        if meta.codebook_size != self.codebook_size() {
            return Err(Error::Invalid(format!(
                "{}: tokens for a codebook of {} codes, the tokenizer has {}",
                path.display(),
                meta.codebook_size,
                self.codebook_size()
            )));
        }
        if meta.tokenizer_hash == self.hash() {
            return Ok(None);
        }
        if !force {
            return Err(Error::Invalid(format!(
                "{} was written by tokenizer {}, not {} (this one)",
                path.display(),
                meta.tokenizer_hash,
                self.hash()
            )));
        }
        Ok(Some(format!(
            "decoding tokens of tokenizer {} with {}",
            meta.tokenizer_hash,
            self.hash()
        )))
    }

    /// The (height, width) in pixels of the square image whose tokens number `len` per image,
    /// for ids that come without their image size (flat rows). Several sizes can share a count
    /// in principle; the smallest is taken, and a count that fits none is an error.
    pub fn square_image_size_for(&self, len: usize) -> Result<(usize, usize)> {
        let f = self.config().vae.downsample_factor();
        // Tokens grow at least as the latent area, so the side is at most sqrt(len).
        let max_side = (len as f64).sqrt() as usize + 1;
        (1..=max_side)
            .find(|&s| {
                self.config()
                    .scales
                    .for_latent(s, s)
                    .iter()
                    .map(|(h, w)| h * w)
                    .sum::<usize>()
                    == len
            })
            .map(|s| (s * f, s * f))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{len} tokens per image fit no square image for this tokenizer; give the image size"
                ))
            })
    }

    /// Flat rows of ids (`n` rows of L, scale-major as [`Tokens::flat`]) for images of
    /// `height` x `width` pixels, checked against this tokenizer (shapes, id range).
    pub fn tokens_from_flat(
        &self,
        ids: Vec<u32>,
        n: usize,
        height: usize,
        width: usize,
    ) -> Result<Tokens> {
        let scales = self.scales_for_image(height, width)?;
        let l: usize = scales.iter().map(|(h, w)| h * w).sum();
        if n == 0 || ids.len() != n * l {
            return Err(Error::Invalid(format!(
                "{} ids for {n} images of {width}x{height} px: expected {n} rows of {l}",
                ids.len()
            )));
        }
        let flat = candle_core::Tensor::from_vec(ids, (n, l), self.device())?;
        let tokens = Tokens::from_flat(&flat, &scales)?;
        self.validate(&tokens)?;
        Ok(tokens)
    }
}
