//! The Fréchet distance between two Gaussians fitted to feature sets (the "F" of rFID), in f64:
//! d² = |μ1 − μ2|² + tr Σ1 + tr Σ2 − 2 tr sqrt(Σ1 Σ2).
//!
//! tr sqrt(Σ1 Σ2) is computed without a general matrix square root: with S = Σ1^½ (symmetric
//! eigendecomposition, negative eigenvalues from round-off clamped to 0), Σ1 Σ2 is similar to the
//! symmetric PSD matrix S Σ2 S, so the trace is Σ sqrt(λ_i(S Σ2 S)). That is robust where
//! `scipy.linalg.sqrtm` needs an epsilon for singular covariances (fewer samples than dimensions).

use nalgebra::{DMatrix, DVector, SymmetricEigen};

/// Mean and covariance (unbiased, N − 1) of a feature set.
#[derive(Clone, Debug)]
pub struct GaussianStats {
    pub mean: DVector<f64>,
    pub cov: DMatrix<f64>,
    pub count: usize,
}

impl GaussianStats {
    /// Fit to `features` (n rows of `dim` values, row-major); needs at least two rows.
    pub fn fit(features: &[f32], dim: usize) -> crate::Result<Self> {
        let n = features.len() / dim.max(1);
        if n < 2 || features.len() != n * dim {
            return Err(crate::Error::Invalid(format!(
                "need at least 2 feature rows of {dim} values, got {} values",
                features.len()
            )));
        }
        let x = DMatrix::from_row_iterator(n, dim, features.iter().map(|&v| v as f64));
        let mean = DVector::from_iterator(dim, (0..dim).map(|j| x.column(j).sum() / n as f64));
        let mut centred = x;
        for j in 0..dim {
            let m = mean[j];
            centred.column_mut(j).add_scalar_mut(-m);
        }
        let cov = (centred.transpose() * &centred) / (n as f64 - 1.0);
        Ok(Self {
            mean,
            cov,
            count: n,
        })
    }
}

fn psd_sqrt(m: &DMatrix<f64>) -> DMatrix<f64> {
    let eig = SymmetricEigen::new(m.clone());
    let d = eig.eigenvalues.map(|v| v.max(0.0).sqrt());
    &eig.eigenvectors * DMatrix::from_diagonal(&d) * eig.eigenvectors.transpose()
}

/// d² between two fitted Gaussians.
pub fn frechet_distance(a: &GaussianStats, b: &GaussianStats) -> f64 {
    let diff = &a.mean - &b.mean;
    let s = psd_sqrt(&a.cov);
    let mut m = &s * &b.cov * &s;
    // Symmetrise away round-off before the symmetric eigensolver.
    m = (&m + m.transpose()) * 0.5;
    let tr_sqrt: f64 = SymmetricEigen::new(m)
        .eigenvalues
        .iter()
        .map(|&v| v.max(0.0).sqrt())
        .sum();
    diff.dot(&diff) + a.cov.trace() + b.cov.trace() - 2.0 * tr_sqrt
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_sets_are_at_distance_zero_and_shift_adds_its_square() {
        let f: Vec<f32> = (0..50 * 4)
            .map(|i| ((i * 7919) % 101) as f32 / 10.0)
            .collect();
        let a = GaussianStats::fit(&f, 4).unwrap();
        assert!(frechet_distance(&a, &a).abs() < 1e-9);
        let shifted: Vec<f32> = f.iter().map(|v| v + 2.0).collect();
        let b = GaussianStats::fit(&shifted, 4).unwrap();
        // Same covariance, means 2 apart in each of 4 dims: d² = 4 · 2².
        assert!((frechet_distance(&a, &b) - 16.0).abs() < 1e-6);
    }
}
