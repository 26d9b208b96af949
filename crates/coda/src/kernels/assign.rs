//! Code assignment: for each query, the code with the largest dot product, as a GEMM with a fused
//! running argmax. Logits are only ever held as a (64 x chunk) tile in cache; the (N, V) matrix
//! that a plain `argmax(Q Kᵀ)` would write to memory never exists.

use rayon::prelude::*;

const QUERY_TILE: usize = 256;

/// Row maximum over 16 lanes: branch-free, so it vectorises.
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = l.max(v);
        }
    }
    let mut m = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for l in lanes {
        m = m.max(l);
    }
    m
}

/// Best (value, index) per query of one task; ties keep the lowest index, as `torch.argmax`.
/// The index is searched only in rows whose maximum beats the running best (rare after the
/// first chunks), so the common path is one vectorised pass.
#[inline(always)]
fn scan_tile(buf: &[f32], rows: usize, cols: usize, c0: usize, best: &mut [(f32, u32)]) {
    for r in 0..rows {
        let row = &buf[r * cols..(r + 1) * cols];
        let m = row_max(row);
        if m > best[r].0 {
            let j = row
                .iter()
                .position(|&v| v == m)
                .expect("the max is in the row");
            best[r] = (m, (c0 + j) as u32);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scan_tile_avx2(
    buf: &[f32],
    rows: usize,
    cols: usize,
    c0: usize,
    best: &mut [(f32, u32)],
) {
    scan_tile(buf, rows, cols, c0, best)
}

fn scan(buf: &[f32], rows: usize, cols: usize, c0: usize, best: &mut [(f32, u32)]) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx2_fma() {
        // SAFETY: the CPU has the features.
        return unsafe { scan_tile_avx2(buf, rows, cols, c0, best) };
    }
    scan_tile(buf, rows, cols, c0, best)
}

/// `argmax_j q_i · k_j` for every row i of `q` (n x d) over the rows of `keys` (v x d), both
/// row-major. `chunk` codes are compared per GEMM call. Deterministic for any thread count:
/// partial results are merged by (value, then lowest index).
pub fn argmax_dot(q: &[f32], n: usize, keys: &[f32], v: usize, d: usize, chunk: usize) -> Vec<u32> {
    assert_eq!(q.len(), n * d);
    assert_eq!(keys.len(), v * d);
    if n == 0 {
        return Vec::new();
    }
    let chunk = chunk.clamp(1, 1024);
    let qtiles = n.div_ceil(QUERY_TILE);
    // Split the codes too when there are few queries, so that every thread has work.
    let want_tasks = 4 * rayon::current_num_threads();
    let splits = want_tasks.div_ceil(qtiles).clamp(1, v.div_ceil(chunk));
    let codes_per_split = v.div_ceil(splits);
    let partial: Vec<Vec<(f32, u32)>> = (0..qtiles * splits)
        .into_par_iter()
        .map_init(
            || vec![0f32; QUERY_TILE * chunk],
            |buf, task| {
                let (qt, s) = (task / splits, task % splits);
                let q0 = qt * QUERY_TILE;
                let rows = QUERY_TILE.min(n - q0);
                let (start, end) = (s * codes_per_split, ((s + 1) * codes_per_split).min(v));
                let mut best = vec![(f32::NEG_INFINITY, u32::MAX); rows];
                let mut c0 = start;
                while c0 < end {
                    let cols = chunk.min(end - c0);
                    // SAFETY: buf holds rows x cols; q rows q0.. and key rows c0.. are in bounds.
                    unsafe {
                        gemm::gemm(
                            rows,
                            cols,
                            d,
                            buf.as_mut_ptr(),
                            1,
                            cols as isize,
                            false,
                            q[q0 * d..].as_ptr(),
                            1,
                            d as isize,
                            keys[c0 * d..].as_ptr(),
                            d as isize,
                            1,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                    scan(&buf[..rows * cols], rows, cols, c0, &mut best);
                    c0 += cols;
                }
                best
            },
        )
        .collect();
    let mut out = vec![0u32; n];
    for qt in 0..qtiles {
        for r in 0..QUERY_TILE.min(n - qt * QUERY_TILE) {
            let mut b = (f32::NEG_INFINITY, u32::MAX);
            for s in 0..splits {
                let c = partial[qt * splits + s][r];
                if c.0 > b.0 || (c.0 == b.0 && c.1 < b.1) {
                    b = c;
                }
            }
            // All logits NaN: fall back to code 0 rather than an out-of-range id.
            out[qt * QUERY_TILE + r] = if b.1 == u32::MAX { 0 } else { b.1 };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(q: &[f32], n: usize, keys: &[f32], v: usize, d: usize) -> Vec<u32> {
        (0..n)
            .map(|i| {
                let mut best = (f32::NEG_INFINITY, 0u32);
                for j in 0..v {
                    let s: f32 = (0..d).map(|t| q[i * d + t] * keys[j * d + t]).sum();
                    if s > best.0 {
                        best = (s, j as u32);
                    }
                }
                best.1
            })
            .collect()
    }

    #[test]
    fn matches_naive_argmax_on_odd_shapes() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for &(n, v, d, chunk) in &[
            (1, 1, 1, 4),
            (3, 1000, 7, 64),
            (130, 517, 32, 100),
            (600, 300, 5, 64),
            (65, 4099, 16, 1024),
            (200, 50, 3, 7),
        ] {
            // Integer-valued data: exact dot products, so exact ties are tested too.
            let q: Vec<f32> = (0..n * d).map(|_| rng.gen_range(-3..4) as f32).collect();
            let k: Vec<f32> = (0..v * d).map(|_| rng.gen_range(-3..4) as f32).collect();
            assert_eq!(
                argmax_dot(&q, n, &k, v, d, chunk),
                naive(&q, n, &k, v, d),
                "{:?}",
                (n, v, d, chunk)
            );
        }
    }
}
