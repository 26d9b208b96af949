//! PSNR over 8-bit RGB images: `20 log10(255 / sqrt(MSE))` over all pixels and channels
//! (coda-method.md §12).

use image::RgbImage;

/// PSNR in dB between two same-sized 8-bit images; infinite when they are identical.
pub fn psnr_u8(a: &RgbImage, b: &RgbImage) -> f64 {
    assert_eq!(
        a.dimensions(),
        b.dimensions(),
        "PSNR needs same-sized images"
    );
    let f = |img: &RgbImage| -> Vec<f64> { img.as_raw().iter().map(|&v| v as f64).collect() };
    super::protocol::psnr(&f(a), &f(b), 255.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_value() {
        // Every value off by 1: MSE 1, PSNR = 20 log10(255) = 48.1308 dB.
        let a = RgbImage::from_pixel(4, 4, image::Rgb([10, 20, 30]));
        let b = RgbImage::from_pixel(4, 4, image::Rgb([11, 21, 29]));
        assert!((psnr_u8(&a, &b) - 48.130_803_608_679_1).abs() < 1e-9);
        assert!(psnr_u8(&a, &a).is_infinite());
    }
}
