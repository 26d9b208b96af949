//! The two ways reconstructions are turned into numbers for PSNR and SSIM (coda-method.md §12).

use serde::{Deserialize, Serialize};

use super::ssim;

/// How a [-1, 1] image becomes the values that PSNR and SSIM compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// The reference's: `clamp((x + 1) / 2, 0, 1)`, then `(x · 255).astype(uint8)`: truncation,
    /// not rounding; data range 255.
    Uint8Truncated,
    /// `clamp((x + 1) / 2, 0, 1)` as floats; data range 1.
    Float,
}

impl Protocol {
    pub fn range(self) -> f64 {
        match self {
            Protocol::Uint8Truncated => 255.0,
            Protocol::Float => 1.0,
        }
    }

    /// Map [-1, 1] values to what this protocol compares.
    pub fn convert(self, x: &[f32]) -> Vec<f64> {
        x.iter()
            .map(|&v| {
                match self {
                    // In float32 throughout, as the reference's numpy code computes it.
                    Protocol::Uint8Truncated => {
                        (((v + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).trunc() as f64
                    }
                    Protocol::Float => ((v as f64 + 1.0) / 2.0).clamp(0.0, 1.0),
                }
            })
            .collect()
    }
}

/// `20 log10(range / sqrt(MSE))` over all values; infinite for identical inputs.
pub fn psnr(a: &[f64], b: &[f64], range: f64) -> f64 {
    assert_eq!(a.len(), b.len());
    let mse = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>() / a.len() as f64;
    if mse == 0.0 {
        return f64::INFINITY;
    }
    20.0 * (range / mse.sqrt()).log10()
}

/// PSNR and SSIM of a reconstruction against its original, both channel-planar (c, h, w) in [-1, 1].
pub fn psnr_ssim(
    original: &[f32],
    reconstruction: &[f32],
    chw: (usize, usize, usize),
    p: Protocol,
) -> (f64, f64) {
    let (a, b) = (p.convert(original), p.convert(reconstruction));
    (psnr(&a, &b, p.range()), ssim::ssim(&a, &b, chw, p.range()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uint8_protocol_truncates() {
        // 0.999 -> (0.9995 · 255) = 254.87 -> 254, not 255.
        assert_eq!(
            Protocol::Uint8Truncated.convert(&[0.999, -1.0, 1.0, 2.0]),
            vec![254.0, 0.0, 255.0, 255.0]
        );
        assert_eq!(Protocol::Float.convert(&[0.0, -3.0]), vec![0.5, 0.0]);
    }
}
