//! Image files <-> tensors in [-1, 1]. Resizing follows torchvision's `Resize(int)` +
//! `CenterCrop` (the reference's validation transform), with Lanczos3 filtering.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::error::{Error, Result};

/// Resize with the Lanczos3 filter (support scaled by the reduction when downscaling, as PIL's
/// `Image.resize(LANCZOS)` and torchvision's `Resize` on PIL images do). `fast_image_resize`'s
/// fixed-point u8 convolution: 7x faster than `image::imageops::resize` on 512-px photos (0.7
/// instead of 6.8 ms each, against 60-80 ms of model CPU time per 128-px image); measured on the training
/// photos to 144 px: 99.97% of values within one level of `image`'s, mean absolute difference
/// 0.08-0.17 levels from PIL's (`image`'s: 0.08-0.12); byte-identical on every x86 SIMD path (plain
/// Rust, SSE4.1, AVX2: `resize_is_the_same_on_every_simd_path`), so tokens do not depend on the CPU.
pub fn resize_lanczos3(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    use fast_image_resize as fr;
    if img.dimensions() == (width, height) {
        return img.clone();
    }
    let (w, h) = img.dimensions();
    let src = fr::images::ImageRef::new(w, h, img.as_raw(), fr::PixelType::U8x3)
        .expect("an RgbImage's buffer is w*h*3 bytes");
    let mut dst = fr::images::Image::new(width, height, fr::PixelType::U8x3);
    let opts =
        fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Lanczos3));
    fr::Resizer::new()
        .resize(&src, &mut dst, &opts)
        .expect("same pixel type, non-empty sizes");
    RgbImage::from_raw(width, height, dst.into_vec()).expect("w*h*3 bytes")
}

/// Decode an image file (PNG, JPEG, WebP) to RGB. Grayscale is expanded to three channels and an
/// alpha channel is dropped, as PIL's `convert('RGB')` does in the reference data pipeline.
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image(&bytes, path)
}

/// Decode an encoded image held in memory (e.g. a member of a tar shard); `origin` names it in
/// errors.
pub fn decode_image(bytes: &[u8], origin: &Path) -> Result<RgbImage> {
    let path = origin;
    let bad = |reason: String| Error::Image {
        path: path.into(),
        reason,
    };
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(e.to_string()))?;
    // Refused from the header, before any pixel is decoded (issue #15).
    reader.limits(crate::limits::image_limits());
    match reader.format() {
        None => return Err(bad("unknown or unsupported image format".into())),
        // The JPEG decoder fills a truncated file's missing rows silently; refuse it instead.
        Some(image::ImageFormat::Jpeg) => check_jpeg_complete(bytes).map_err(bad)?,
        Some(_) => {}
    }
    let img = reader.decode().map_err(|e| bad(e.to_string()))?;
    Ok(img.into_rgb8())
}

/// Walk a JPEG's marker segments and entropy-coded data up to the end-of-image marker.
fn check_jpeg_complete(b: &[u8]) -> std::result::Result<(), String> {
    let truncated = || Err("truncated JPEG (no end-of-image marker)".to_string());
    if b.len() < 4 || b[0] != 0xFF || b[1] != 0xD8 {
        return Err("not a JPEG (no start-of-image marker)".into());
    }
    let mut i = 2;
    loop {
        // Skip fill bytes before a marker.
        while i < b.len() && b[i] == 0xFF && b.get(i + 1) == Some(&0xFF) {
            i += 1;
        }
        if i + 1 >= b.len() {
            return truncated();
        }
        if b[i] != 0xFF {
            return Err(format!("corrupt JPEG (expected a marker at byte {i})"));
        }
        let marker = b[i + 1];
        i += 2;
        match marker {
            0xD9 => return Ok(()),
            0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        if i + 1 >= b.len() {
            return truncated();
        }
        let len = u16::from_be_bytes([b[i], b[i + 1]]) as usize;
        i += len;
        if i > b.len() {
            return truncated();
        }
        if marker == 0xDA {
            // Entropy-coded data runs to the next marker that is not a stuffed 0xFF00 or a restart.
            loop {
                if i + 1 >= b.len() {
                    return truncated();
                }
                if b[i] == 0xFF
                    && b[i + 1] != 0x00
                    && !(0xD0..=0xD7).contains(&b[i + 1])
                    && b[i + 1] != 0xFF
                {
                    break;
                }
                i += 1;
            }
        }
    }
}

/// Resize the shorter side to `size` (Lanczos3; the longer side scaled and truncated as
/// torchvision does), then centre-crop `size` x `size`. `None` leaves the image as it is.
/// A size of 0 or above [`crate::limits::MAX_IMAGE_SIDE`] is refused, and so is a resize whose
/// intermediate picture would not fit the memory limit.
pub fn prepare(img: RgbImage, size: Option<u32>) -> Result<RgbImage> {
    let Some(size) = size else { return Ok(img) };
    check_size(size)?;
    let img = limit_aspect(img);
    let (w, h) = img.dimensions();
    if w == size && h == size {
        return Ok(img);
    }
    let (nw, nh) = if w <= h {
        (size, ((size as u64 * h as u64) / w as u64) as u32)
    } else {
        (((size as u64 * w as u64) / h as u64) as u32, size)
    };
    // Lanczos resizing goes through a float intermediate of nw x h and the nw x nh result.
    let inter = (nw as u64 * h.max(nh) as u64).saturating_mul(3 * 4 + 3);
    crate::limits::check(&format!("resizing a {w}x{h} image to {nw}x{nh}"), inter)?;
    let resized = if (nw, nh) == (w, h) {
        img
    } else {
        resize_lanczos3(&img, nw, nh)
    };
    // torchvision CenterCrop: offsets rounded half to even, as Python's round().
    let left = ((nw - size) as f64 / 2.0).round_ties_even() as u32;
    let top = ((nh - size) as f64 / 2.0).round_ties_even() as u32;
    Ok(image::imageops::crop_imm(&resized, left, top, size, size).to_image())
}

/// An image size (`--size`, a tokenizer's resolution) must be 1..=MAX_IMAGE_SIDE.
pub fn check_size(size: u32) -> Result<()> {
    if size == 0 || size > crate::limits::MAX_IMAGE_SIDE {
        return Err(Error::Invalid(format!(
            "image size {size} is outside 1..={}",
            crate::limits::MAX_IMAGE_SIDE
        )));
    }
    Ok(())
}

/// Longest side over shortest side beyond which [`prepare`] first cuts the picture's centre.
pub const MAX_ASPECT: u32 = 16;

/// A picture more elongated than [`MAX_ASPECT`]:1 loses its ends first (the centre strip of
/// that aspect ratio, which holds the final centre crop with a wide margin). Without this, a
/// 65535x1 image resized to a shorter side of 128 would become an 8-gigapixel intermediate
/// (issue #15: 19 s and 0.9 GB for a 270-byte PNG). Pictures up to 16:1 (panoramas included)
/// are untouched.
fn limit_aspect(img: RgbImage) -> RgbImage {
    let (w, h) = img.dimensions();
    let (w64, h64) = (w as u64, h as u64);
    if w64 > MAX_ASPECT as u64 * h64 {
        let nw = MAX_ASPECT * h;
        image::imageops::crop_imm(&img, (w - nw) / 2, 0, nw, h).to_image()
    } else if h64 > MAX_ASPECT as u64 * w64 {
        let nh = MAX_ASPECT * w;
        image::imageops::crop_imm(&img, 0, (h - nh) / 2, w, nh).to_image()
    } else {
        img
    }
}

/// The centre `size` x `size` crop (torchvision's rounding); the image must be at least that big.
pub fn center_crop(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let left = ((w.saturating_sub(size)) as f64 / 2.0).round_ties_even() as u32;
    let top = ((h.saturating_sub(size)) as f64 / 2.0).round_ties_even() as u32;
    image::imageops::crop_imm(img, left, top, size.min(w), size.min(h)).to_image()
}

/// The reference's training (and, by accident, evaluation) crop: resize the shorter side to
/// round(1.125 · size) with Lanczos3, then a random `size` x `size` crop, drawn from `seed`.
pub fn prepare_random_crop(img: RgbImage, size: u32, seed: u64) -> RgbImage {
    use rand::{Rng, SeedableRng};
    let big = (1.125 * size as f64).round() as u32;
    let (w, h) = img.dimensions();
    let (nw, nh) = if w <= h {
        (big, ((big as u64 * h as u64) / w as u64) as u32)
    } else {
        (((big as u64 * w as u64) / h as u64) as u32, big)
    };
    let resized = resize_lanczos3(&img, nw, nh);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let left = rng.gen_range(0..=nw - size);
    let top = rng.gen_range(0..=nh - size);
    image::imageops::crop_imm(&resized, left, top, size, size).to_image()
}

/// Stack same-sized RGB images into a (B, 3, H, W) f32 tensor in [-1, 1].
pub fn images_to_tensor(images: &[RgbImage], device: &Device) -> Result<Tensor> {
    let Some(first) = images.first() else {
        return Err(Error::Invalid("no images to stack".into()));
    };
    let (w, h) = first.dimensions();
    let (w, h) = (w as usize, h as usize);
    let n = images.len();
    crate::limits::check(
        &format!("a tensor of {n} image(s) of {w}x{h}"),
        (n as u64).saturating_mul((3 * h * w * 4) as u64),
    )?;
    let mut data = Vec::with_capacity(n * 3 * h * w);
    for img in images {
        if img.dimensions() != first.dimensions() {
            return Err(Error::Invalid(format!(
                "images of different sizes in one batch: {:?} vs {:?}",
                img.dimensions(),
                first.dimensions()
            )));
        }
        let raw = img.as_raw();
        for c in 0..3 {
            data.extend(raw[c..].iter().step_by(3).map(|&v| v as f32 / 127.5 - 1.0));
        }
    }
    Ok(Tensor::from_vec(data, (images.len(), 3, h, w), device)?)
}

/// (B, 3, H, W) in [-1, 1] -> RGB images: clamp, scale to [0, 255] and round.
pub fn tensor_to_images(x: &Tensor) -> Result<Vec<RgbImage>> {
    let (b, c, h, w) = x.dims4()?;
    if c != 3 {
        return Err(Error::Invalid(format!("expected 3 channels, got {c}")));
    }
    let x = x
        .to_device(&Device::Cpu)?
        .to_dtype(candle_core::DType::F32)?;
    let data = x.flatten_all()?.to_vec1::<f32>()?;
    let plane = h * w;
    Ok((0..b)
        .map(|i| {
            let base = i * 3 * plane;
            let mut buf = vec![0u8; 3 * plane];
            for p in 0..plane {
                for ch in 0..3 {
                    let v = data[base + ch * plane + p];
                    buf[3 * p + ch] = ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8;
                }
            }
            RgbImage::from_raw(w as u32, h as u32, buf).expect("buffer sized to the image")
        })
        .collect())
}

/// Write a PNG atomically (temp file + rename).
pub fn save_png(path: &Path, img: &RgbImage) -> Result<()> {
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| Error::Image {
        path: path.into(),
        reason: e.to_string(),
    })?;
    crate::io::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_round_trip_is_exact_for_u8_images() {
        let img = RgbImage::from_fn(5, 3, |x, y| {
            image::Rgb([x as u8 * 40, y as u8 * 90, 255 - x as u8])
        });
        let t = images_to_tensor(std::slice::from_ref(&img), &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 3, 3, 5]);
        assert_eq!(tensor_to_images(&t).unwrap()[0], img);
    }

    fn textured(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let v = |a: f64| (127.5 + 127.5 * a.sin()) as u8;
            image::Rgb([
                v(x as f64 * 0.31 + y as f64 * 0.07),
                v((x * y) as f64 * 0.002),
                if (x / 7 + y / 5) % 2 == 0 { 20 } else { 230 },
            ])
        })
    }

    #[test]
    fn resize_matches_the_image_crates_lanczos3() {
        // Another filter (or a wrong support) is several levels off on this texture; the two
        // Lanczos3 implementations differ by rounding (measured: mean 0.1-0.2 levels).
        let img = textured(300, 200);
        for (w, h) in [(216, 144), (96, 64), (450, 300)] {
            let ours = resize_lanczos3(&img, w, h);
            let diff = |other: &RgbImage| {
                let d: Vec<f64> = ours
                    .as_raw()
                    .iter()
                    .zip(other.as_raw())
                    .map(|(a, b)| (*a as f64 - *b as f64).abs())
                    .collect();
                d.iter().sum::<f64>() / d.len() as f64
            };
            let lanczos =
                image::imageops::resize(&img, w, h, image::imageops::FilterType::Lanczos3);
            let bilinear =
                image::imageops::resize(&img, w, h, image::imageops::FilterType::Triangle);
            let (dl, db) = (diff(&lanczos), diff(&bilinear));
            assert!(
                dl < 0.5 && db > 4.0 * dl,
                "{w}x{h}: lanczos {dl}, bilinear {db}"
            );
        }
    }

    #[test]
    fn resize_is_the_same_on_every_simd_path() {
        use fast_image_resize as fr;
        let img = textured(123, 77);
        let src = fr::images::ImageRef::new(123, 77, img.as_raw(), fr::PixelType::U8x3).unwrap();
        let opts = fr::ResizeOptions::new()
            .resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Lanczos3));
        let mut outs = Vec::new();
        let mut skipped = Vec::new();
        for (name, ext) in [
            ("plain Rust", fr::CpuExtensions::None),
            #[cfg(target_arch = "x86_64")]
            ("SSE4.1", fr::CpuExtensions::Sse4_1),
            #[cfg(target_arch = "x86_64")]
            ("AVX2", fr::CpuExtensions::Avx2),
        ] {
            if !ext.is_supported() {
                skipped.push(name);
                continue;
            }
            for (w, h) in [(40, 25), (200, 125)] {
                let mut r = fr::Resizer::new();
                // Safety: only extensions this CPU supports.
                unsafe { r.set_cpu_extensions(ext) };
                let mut dst = fr::images::Image::new(w, h, fr::PixelType::U8x3);
                r.resize(&src, &mut dst, &opts).unwrap();
                outs.push((name, (w, h), dst.into_vec()));
            }
        }
        if !skipped.is_empty() {
            eprintln!("SKIPPED resize paths this CPU lacks: {skipped:?}");
        }
        for (name, size, out) in &outs {
            let reference = outs.iter().find(|o| o.1 == *size).unwrap();
            assert!(
                out == &reference.2,
                "{name} differs from {} at {size:?}",
                reference.0
            );
        }
        // Our function takes the fastest path; it must give the same bytes.
        let ours = resize_lanczos3(&img, 200, 125);
        assert_eq!(
            ours.as_raw(),
            &outs.iter().find(|o| o.1 == (200, 125)).unwrap().2
        );
    }

    #[test]
    fn prepare_crops_to_a_square_of_the_requested_size() {
        let img = RgbImage::new(300, 200);
        let out = prepare(img, Some(64)).unwrap();
        assert_eq!(out.dimensions(), (64, 64));
    }

    #[test]
    fn truncated_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let img = RgbImage::from_fn(64, 48, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 5) as u8, (x ^ y) as u8])
        });
        for (name, fmt) in [
            ("a.jpg", image::ImageFormat::Jpeg),
            ("a.png", image::ImageFormat::Png),
        ] {
            let mut bytes = Vec::new();
            img.write_to(&mut std::io::Cursor::new(&mut bytes), fmt)
                .unwrap();
            let whole = dir.path().join(name);
            std::fs::write(&whole, &bytes).unwrap();
            assert!(load_image(&whole).is_ok(), "{name} complete");
            let cut = dir.path().join(format!("cut-{name}"));
            std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
            let err = load_image(&cut).unwrap_err().to_string();
            assert!(err.contains(&format!("cut-{name}")), "{err}");
        }
    }

    #[test]
    fn corrupt_file_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("broken.png");
        std::fs::write(&p, b"\x89PNG\r\n\x1a\nnot really").unwrap();
        let err = load_image(&p).unwrap_err().to_string();
        assert!(err.contains("broken.png"), "{err}");
    }
}

#[cfg(test)]
mod aspect_tests {
    use super::*;

    /// Issue #15: a 65535x1 PNG of a few hundred bytes took 19 s and 0.9 GB to prepare.
    #[test]
    fn extreme_aspect_ratios_are_cheap_and_ordinary_ones_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("line.png");
        RgbImage::from_fn(65535, 1, |x, _| image::Rgb([(x % 256) as u8, 0, 0]))
            .save(&p)
            .unwrap();
        let line = load_image(&p).unwrap();
        // The resize works on the centre 16x1 strip, not on the whole line (measured: 0.05 s
        // instead of 19 s; timings are not asserted in tests).
        assert_eq!(limit_aspect(line.clone()).dimensions(), (16, 1));
        let out = prepare(line, Some(128)).unwrap();
        assert_eq!(out.dimensions(), (128, 128));
        let tall = RgbImage::from_pixel(1, 40_000, image::Rgb([9, 9, 9]));
        assert_eq!(prepare(tall, Some(64)).unwrap().dimensions(), (64, 64));
        // 16:1 and flatter is exactly the plain resize-then-crop.
        let pano = RgbImage::from_fn(320, 20, |x, y| image::Rgb([x as u8, y as u8, 7]));
        assert_eq!(limit_aspect(pano.clone()), pano);
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in bytes {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }

    /// A PNG that claims w x h RGB pixels but holds an empty zlib stream as pixel data.
    fn png_header_only(w: u32, h: u32) -> Vec<u8> {
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend(w.to_be_bytes());
        ihdr.extend(h.to_be_bytes());
        ihdr.extend([8, 2, 0, 0, 0]); // 8-bit RGB, no interlace
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        out.extend(13u32.to_be_bytes());
        out.extend(&ihdr);
        out.extend(crc32(&ihdr).to_be_bytes());
        let idat = b"IDAT\x78\x9c\x03\x00\x00\x00\x00\x01";
        out.extend(8u32.to_be_bytes());
        out.extend(idat);
        out.extend(crc32(idat).to_be_bytes());
        out.extend(0u32.to_be_bytes());
        out.extend(b"IEND");
        out.extend(crc32(b"IEND").to_be_bytes());
        out
    }

    /// Issue #15: what an image may cost is decided from its header, before decoding.
    #[test]
    fn oversized_images_are_refused_from_the_header() {
        for (w, h) in [(70_000, 10), (20_000, 20_000), (1 << 31, 1)] {
            let err = decode_image(&png_header_only(w, h), Path::new("claims.png"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("claims.png") && err.to_lowercase().contains("limit"),
                "{w}x{h}: {err}"
            );
        }
        // Within the limits, the same file gets as far as the missing pixel data.
        let err = decode_image(&png_header_only(100, 100), Path::new("small.png"))
            .unwrap_err()
            .to_string();
        assert!(!err.to_lowercase().contains("limit"), "{err}");
    }

    #[test]
    fn sizes_outside_the_range_are_refused() {
        let img = RgbImage::new(8, 8);
        for s in [0, crate::limits::MAX_IMAGE_SIDE + 1] {
            let err = prepare(img.clone(), Some(s)).unwrap_err().to_string();
            assert!(err.contains("outside 1..=65535"), "{err}");
        }
    }
}
