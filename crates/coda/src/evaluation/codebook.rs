//! Codebook usage and perplexity over a set of images: per scale and over all scales
//! (coda-method.md §12: the reference computes neither; "100% usage" means distinct ids over
//! the evaluation set).

use serde::Serialize;

use crate::tokenizer::Tokens;

/// Counts of every code, per scale, accumulated over batches.
#[derive(Clone, Debug)]
pub struct CodebookStats {
    codebook_size: usize,
    counts: Vec<Vec<u64>>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CodebookReport {
    /// Percentage of the V codes used at least once, per scale.
    pub usage_per_scale: Vec<f64>,
    /// Percentage of codes used at least once at any scale.
    pub usage_all: f64,
    /// exp(entropy) of the code frequencies, per scale and pooled over all scales.
    pub perplexity_per_scale: Vec<f64>,
    pub perplexity_all: f64,
}

fn perplexity(counts: &[u64]) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let h: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total as f64;
            -p * p.ln()
        })
        .sum();
    h.exp()
}

fn usage(counts: &[u64]) -> f64 {
    100.0 * counts.iter().filter(|&&c| c > 0).count() as f64 / counts.len() as f64
}

impl CodebookStats {
    pub fn new(codebook_size: usize) -> Self {
        Self {
            codebook_size,
            counts: Vec::new(),
        }
    }

    pub fn add(&mut self, tokens: &Tokens) -> crate::Result<()> {
        let per_scale = tokens.to_vecs()?;
        if self.counts.len() < per_scale.len() {
            self.counts
                .resize(per_scale.len(), vec![0; self.codebook_size]);
        }
        for (k, ids) in per_scale.iter().enumerate() {
            for &id in ids {
                let slot = self.counts[k].get_mut(id as usize).ok_or_else(|| {
                    crate::Error::Invalid(format!(
                        "id {id} at scale {k} is outside a codebook of {}",
                        self.codebook_size
                    ))
                })?;
                *slot += 1;
            }
        }
        Ok(())
    }

    pub fn report(&self) -> CodebookReport {
        let mut pooled = vec![0u64; self.codebook_size];
        for c in &self.counts {
            for (p, &v) in pooled.iter_mut().zip(c) {
                *p += v;
            }
        }
        CodebookReport {
            usage_per_scale: self.counts.iter().map(|c| usage(c)).collect(),
            usage_all: usage(&pooled),
            perplexity_per_scale: self.counts.iter().map(|c| perplexity(c)).collect(),
            perplexity_all: perplexity(&pooled),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn usage_and_perplexity_of_known_counts() {
        // Scale 0: ids 0,0 (1 code, perplexity 1); scale 1: 0,1,2,3 twice (4 codes, perplexity 4).
        let scales = vec![(1, 1), (2, 2)];
        let flat =
            Tensor::from_vec(vec![0u32, 0, 1, 2, 3, 0, 0, 1, 2, 3], (2, 5), &Device::Cpu).unwrap();
        let t = Tokens::from_flat(&flat, &scales).unwrap();
        let mut s = CodebookStats::new(8);
        s.add(&t).unwrap();
        let r = s.report();
        assert_eq!(r.usage_per_scale, vec![12.5, 50.0]);
        assert_eq!(r.usage_all, 50.0);
        assert!((r.perplexity_per_scale[0] - 1.0).abs() < 1e-12);
        assert!((r.perplexity_per_scale[1] - 4.0).abs() < 1e-12);
        // Pooled: code 0 four times, 1,2,3 twice each out of 10.
        let p: [f64; 4] = [0.4, 0.2, 0.2, 0.2];
        let want = (-p.iter().map(|p| p * p.ln()).sum::<f64>()).exp();
        assert!((r.perplexity_all - want).abs() < 1e-12);
        let mut small = CodebookStats::new(2);
        assert!(small.add(&t).is_err());
    }
}
