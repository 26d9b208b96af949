//! The multi-scale schedule: the (h_k, w_k) token grids, coarse to fine, ending at the latent size.

use serde::{Deserialize, Serialize};

/// The number of scales CODA uses for both of its configs.
pub const DEFAULT_NUM_SCALES: usize = 10;

/// One side's schedule: starting from `n`, each scale is `floor(r · previous)` (at least one less),
/// down to 1, with the smallest ratio r (a multiple of 1e-4) that gives exactly `k` scales. This
/// reproduces the paper's lists: 16 -> `[1,2,3,4,5,6,8,10,13,16]` (r = 0.8334) and
/// 32 -> `[1,2,3,4,6,9,13,18,24,32]` (r = 0.75). Sides shorter than `k` get every size 1..=n.
pub fn derive_side(n: usize, k: usize) -> Vec<usize> {
    assert!(n >= 1 && k >= 1);
    if k == 1 {
        // A single scale is the latent itself (the single-scale VQ baseline).
        return vec![n];
    }
    if n <= k {
        return (1..=n).collect();
    }
    let chain = |r: u64| -> Vec<usize> {
        let mut s = vec![n];
        while *s.last().unwrap() > 1 {
            let prev = *s.last().unwrap();
            let next = ((prev as u64 * r) / 10_000) as usize;
            s.push(next.min(prev - 1).max(1));
        }
        s.reverse();
        s
    };
    for r in 1..10_000u64 {
        let c = chain(r);
        if c.len() == k {
            return c;
        }
    }
    // Unreachable for n > k: r close to 1 gives n scales, r small gives 2; lengths step by one.
    chain(9_999)
}

/// Scales for a (h, w) latent. Square latents use [`derive_side`]; non-square ones derive the longer
/// side and scale it to the shorter one, keeping the aspect ratio at every scale (as VAR's (h, w)
/// patch numbers do), so both sides have the same number of scales.
pub fn derive(h: usize, w: usize, k: usize) -> Vec<(usize, usize)> {
    let long = h.max(w);
    let short = h.min(w);
    let long_side = derive_side(long, k);
    let short_side: Vec<usize> = long_side
        .iter()
        .map(|&l| ((l * short) as f64 / long as f64).round().max(1.0) as usize)
        .collect();
    long_side
        .into_iter()
        .zip(short_side)
        .map(|(l, s)| if h >= w { (l, s) } else { (s, l) })
        .collect()
}

/// How a tokenizer picks its scales for a latent size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleSpec {
    /// Derived from the latent size with this many scales (any resolution works).
    Derived { num_scales: usize },
    /// A fixed list of square sizes for one latent size, as in the paper's configs; other latent
    /// sizes fall back to the derived rule with the same number of scales.
    Fixed { sizes: Vec<usize> },
}

impl ScaleSpec {
    pub fn num_scales(&self) -> usize {
        match self {
            ScaleSpec::Derived { num_scales } => *num_scales,
            ScaleSpec::Fixed { sizes } => sizes.len(),
        }
    }

    pub fn for_latent(&self, h: usize, w: usize) -> Vec<(usize, usize)> {
        match self {
            ScaleSpec::Fixed { sizes } if h == w && sizes.last() == Some(&h) => {
                sizes.iter().map(|&s| (s, s)).collect()
            }
            _ => derive(h, w, self.num_scales()),
        }
    }
}

/// Parse "1,2,3,4,5,6,8,10,13,16" into a fixed list (strictly increasing).
pub fn parse_list(s: &str) -> Result<Vec<usize>, String> {
    let v: Vec<usize> = s
        .split(',')
        .map(|t| {
            t.trim()
                .parse::<usize>()
                .map_err(|e| format!("bad scale '{t}': {e}"))
        })
        .collect::<Result<_, _>>()?;
    check_list(&v)?;
    Ok(v)
}

/// A fixed list must be non-empty, positive and strictly increasing.
pub fn check_list(v: &[usize]) -> Result<(), String> {
    if v.is_empty() || v[0] == 0 || v.windows(2).any(|w| w[1] <= w[0]) {
        return Err(format!(
            "scales must be positive and strictly increasing, got {v:?}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproduces_the_paper_lists() {
        assert_eq!(derive_side(16, 10), vec![1, 2, 3, 4, 5, 6, 8, 10, 13, 16]);
        assert_eq!(derive_side(32, 10), vec![1, 2, 3, 4, 6, 9, 13, 18, 24, 32]);
    }

    #[test]
    fn other_sizes_are_increasing_and_end_at_the_latent() {
        for n in [8, 11, 20, 24, 48, 64, 100] {
            let s = derive_side(n, 10);
            assert_eq!(s.len(), 10.min(n), "{n}: {s:?}");
            assert_eq!(*s.last().unwrap(), n);
            assert_eq!(s[0], 1);
            assert!(s.windows(2).all(|w| w[1] > w[0]), "{n}: {s:?}");
        }
    }

    #[test]
    fn non_square_keeps_aspect_and_ends_at_the_latent() {
        let s = derive(16, 24, 10);
        assert_eq!(s.len(), 10);
        assert_eq!(*s.last().unwrap(), (16, 24));
        assert_eq!(s[0], (1, 1));
        assert!(s.windows(2).all(|w| w[1].0 >= w[0].0 && w[1].1 > w[0].1));
        let t = derive(24, 16, 10);
        assert_eq!(t.iter().map(|&(a, b)| (b, a)).collect::<Vec<_>>(), s);
    }
}
