//! PyTorch's `area` and `bicubic` resizing (coda-method.md §4, §13.2-3) as exact separable
//! matrices: `y = R_h · x · R_wᵀ`. Being plain matmuls, they are differentiable and cheap.

use candle_core::{Device, Result, Tensor};

/// `F.interpolate(mode='area')` = `adaptive_avg_pool2d` along one axis: output i averages
/// `[floor(i·n/m), ceil((i+1)·n/m))`, so windows overlap when m does not divide n.
pub fn area_matrix(n_in: usize, n_out: usize) -> Vec<f32> {
    let mut m = vec![0f32; n_out * n_in];
    for i in 0..n_out {
        let start = (i * n_in) / n_out;
        let end = ((i + 1) * n_in).div_ceil(n_out);
        let w = 1.0 / (end - start) as f32;
        for j in start..end {
            m[i * n_in + j] = w;
        }
    }
    m
}

/// Keys cubic kernel with A = -0.75, as PyTorch's `upsample_bicubic2d`, evaluated in f32 with
/// the same operation order, so that the weights are bit-identical to PyTorch's.
const A: f32 = -0.75;

fn cubic_near(x: f32) -> f32 {
    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
}

fn cubic_far(x: f32) -> f32 {
    ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
}

/// `F.interpolate(mode='bicubic', align_corners=False)` along one axis: no antialias, border
/// taps clamped to the edge, no clamping of values.
pub fn bicubic_matrix(n_in: usize, n_out: usize) -> Vec<f32> {
    let mut m = vec![0f32; n_out * n_in];
    if n_in == n_out {
        for i in 0..n_in {
            m[i * n_in + i] = 1.0;
        }
    } else {
        // PyTorch computes the scale and source index in f32 for f32 tensors.
        let scale = n_in as f32 / n_out as f32;
        for dst in 0..n_out {
            let src = scale * (dst as f32 + 0.5) - 0.5;
            let i0 = src.floor();
            let t = src - i0;
            let i0 = i0 as i64;
            let w = [
                cubic_far(t + 1.0),
                cubic_near(t),
                cubic_near(1.0 - t),
                cubic_far(2.0 - t),
            ];
            for (k, wk) in w.iter().enumerate() {
                let idx = (i0 - 1 + k as i64).clamp(0, n_in as i64 - 1) as usize;
                m[dst * n_in + idx] += wk;
            }
        }
    }
    m
}

/// `F.interpolate(mode='bilinear', align_corners=False)` along one axis, no antialias (the resize
/// pytorch-fid applies before Inception): source index clamped below at 0, upper tap at n-1.
pub fn bilinear_matrix(n_in: usize, n_out: usize) -> Vec<f32> {
    let mut m = vec![0f32; n_out * n_in];
    let scale = n_in as f32 / n_out as f32;
    for dst in 0..n_out {
        let src = (scale * (dst as f32 + 0.5) - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(n_in - 1);
        let i1 = (i0 + 1).min(n_in - 1);
        let l1 = src - i0 as f32;
        m[dst * n_in + i0] += 1.0 - l1;
        m[dst * n_in + i1] += l1;
    }
    m
}

/// A separable 2-D resize: precomputed row and column matrices.
#[derive(Clone, Debug)]
pub struct Resize2d {
    /// (h_out, h_in)
    rows: Tensor,
    /// (w_in, w_out): already transposed for the right-hand matmul.
    cols_t: Tensor,
    identity: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Area,
    Bicubic,
    Bilinear,
}

impl Resize2d {
    pub fn new(
        mode: Mode,
        (h_in, w_in): (usize, usize),
        (h_out, w_out): (usize, usize),
        device: &Device,
    ) -> Result<Self> {
        let f = match mode {
            Mode::Area => area_matrix,
            Mode::Bicubic => bicubic_matrix,
            Mode::Bilinear => bilinear_matrix,
        };
        let rows = Tensor::from_vec(f(h_in, h_out), (h_out, h_in), device)?;
        let cols_t = Tensor::from_vec(f(w_in, w_out), (w_out, w_in), device)?
            .t()?
            .contiguous()?;
        Ok(Self {
            rows,
            cols_t,
            identity: (h_in, w_in) == (h_out, w_out),
        })
    }

    /// Resize the last two dims of (B, C, H, W).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        if self.identity {
            return Ok(x.clone());
        }
        let y = x.broadcast_matmul(&self.cols_t)?;
        self.rows.broadcast_matmul(&y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn area_windows_overlap_as_in_pytorch() {
        // 16 -> 5: [0,4) [3,7) [6,10) [9,13) [12,16)
        let m = area_matrix(16, 5);
        let windows: Vec<(usize, usize)> = (0..5)
            .map(|i| {
                let row = &m[i * 16..(i + 1) * 16];
                let first = row.iter().position(|&v| v > 0.0).unwrap();
                let last = row.iter().rposition(|&v| v > 0.0).unwrap();
                (first, last + 1)
            })
            .collect();
        assert_eq!(windows, vec![(0, 4), (3, 7), (6, 10), (9, 13), (12, 16)]);
    }

    #[test]
    fn bicubic_rows_sum_to_one_and_identity_is_exact() {
        for (a, b) in [(1, 16), (3, 16), (13, 32), (24, 32), (5, 7)] {
            let m = bicubic_matrix(a, b);
            for r in 0..b {
                let s: f32 = m[r * a..(r + 1) * a].iter().sum();
                assert!((s - 1.0).abs() < 1e-6, "{a}->{b} row {r}: {s}");
            }
        }
        let m = bicubic_matrix(4, 4);
        assert_eq!(m, area_matrix(4, 4));
    }
}
