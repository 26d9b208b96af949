//! SSIM as the reference evaluation computes it (coda-method.md §12): MATLAB-style Gaussian window
//! 11x11, σ = 1.5, C1 = (0.01·L)², C2 = (0.03·L)², statistics with population (not sample)
//! covariance, averaged over the "valid" region (the 5-pixel border, where the window would leave
//! the image, is dropped), per channel, then over channels. Identical to skimage's
//! `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`.

/// The normalised 11-tap Gaussian (σ = 1.5) of `cv2.getGaussianKernel(11, 1.5)`.
fn gaussian_11() -> [f64; 11] {
    let mut g = [0f64; 11];
    for (i, v) in g.iter_mut().enumerate() {
        let x = i as f64 - 5.0;
        *v = (-x * x / (2.0 * 1.5 * 1.5)).exp();
    }
    let s: f64 = g.iter().sum();
    g.map(|v| v / s)
}

/// Separable 11x11 Gaussian filter, valid region only: (h-10) x (w-10).
fn filter_valid(x: &[f64], h: usize, w: usize, g: &[f64; 11]) -> Vec<f64> {
    let (vh, vw) = (h - 10, w - 10);
    let mut rows = vec![0f64; h * vw];
    for y in 0..h {
        for x0 in 0..vw {
            rows[y * vw + x0] = (0..11).map(|k| g[k] * x[y * w + x0 + k]).sum();
        }
    }
    let mut out = vec![0f64; vh * vw];
    for y0 in 0..vh {
        for x0 in 0..vw {
            out[y0 * vw + x0] = (0..11).map(|k| g[k] * rows[(y0 + k) * vw + x0]).sum();
        }
    }
    out
}

/// Mean SSIM of one channel (row-major h x w planes) with data range `range` (255 for 8-bit).
/// Undefined (NaN, `null` in JSON reports) for images smaller than the 11x11 window.
pub fn ssim_plane(a: &[f64], b: &[f64], h: usize, w: usize, range: f64) -> f64 {
    if h < 11 || w < 11 {
        return f64::NAN;
    }
    let g = gaussian_11();
    let (c1, c2) = ((0.01 * range).powi(2), (0.03 * range).powi(2));
    let prod = |p: &[f64], q: &[f64]| -> Vec<f64> { p.iter().zip(q).map(|(x, y)| x * y).collect() };
    let mu1 = filter_valid(a, h, w, &g);
    let mu2 = filter_valid(b, h, w, &g);
    let e11 = filter_valid(&prod(a, a), h, w, &g);
    let e22 = filter_valid(&prod(b, b), h, w, &g);
    let e12 = filter_valid(&prod(a, b), h, w, &g);
    let n = mu1.len();
    (0..n)
        .map(|i| {
            let (m1, m2) = (mu1[i], mu2[i]);
            let (s11, s22, s12) = (e11[i] - m1 * m1, e22[i] - m2 * m2, e12[i] - m1 * m2);
            ((2.0 * m1 * m2 + c1) * (2.0 * s12 + c2))
                / ((m1 * m1 + m2 * m2 + c1) * (s11 + s22 + c2))
        })
        .sum::<f64>()
        / n as f64
}

/// Mean SSIM over the channels of two channel-planar (c, h, w) images.
pub fn ssim(a: &[f64], b: &[f64], (c, h, w): (usize, usize, usize), range: f64) -> f64 {
    assert_eq!(a.len(), c * h * w);
    assert_eq!(b.len(), c * h * w);
    (0..c)
        .map(|k| {
            ssim_plane(
                &a[k * h * w..(k + 1) * h * w],
                &b[k * h * w..(k + 1) * h * w],
                h,
                w,
                range,
            )
        })
        .sum::<f64>()
        / c as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue #15: `adapt --size 8` panicked here at its first evaluation, after training.
    #[test]
    fn images_smaller_than_the_window_have_no_ssim() {
        let a = vec![10.0; 3 * 8 * 8];
        assert!(ssim(&a, &a, (3, 8, 8), 255.0).is_nan());
    }

    #[test]
    fn identical_images_score_one_and_noise_lowers_it() {
        let a: Vec<f64> = (0..3 * 20 * 17).map(|i| ((i * 37) % 256) as f64).collect();
        assert!((ssim(&a, &a, (3, 20, 17), 255.0) - 1.0).abs() < 1e-12);
        let b: Vec<f64> = a
            .iter()
            .enumerate()
            .map(|(i, v)| (v + ((i * 13) % 7) as f64 - 3.0).clamp(0.0, 255.0))
            .collect();
        let s = ssim(&a, &b, (3, 20, 17), 255.0);
        assert!(s < 1.0 && s > 0.5, "{s}");
    }
}
