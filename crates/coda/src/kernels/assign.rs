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

/// # Safety
/// The CPU must support AVX2 and FMA (the caller checks `is_x86_feature_detected!`); the
/// slices are bounds-checked as in the safe version.
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

/// The keys in blocks of 16 codes, dimension-major inside a block ([block][dim][16]), for the
/// fused AVX-512 kernel; `bias` is 0 for real codes and -inf for the padding (up to a whole
/// number of NB blocks), so that a padded code never wins (the accumulators start from it).
#[cfg(target_arch = "x86_64")]
#[derive(Debug)]
struct PackedKeys {
    data: Vec<f32>,
    bias: Vec<f32>,
    blocks: usize,
}

/// Queries and code blocks per register block of the fused kernel: 4 x 4 accumulators of 16
/// logits, each broadcast query component and each key vector used 4 times.
#[cfg(target_arch = "x86_64")]
const QB: usize = 4;
#[cfg(target_arch = "x86_64")]
const NB: usize = 4;

/// Code blocks per cache chunk: 32 KiB of keys (512 codes at d = 16, 256 at d = 32), so that a
/// chunk stays in L1 while every query of the task passes over it.
#[cfg(target_arch = "x86_64")]
fn chunk_blocks(d: usize) -> usize {
    ((32 * 1024) / (d.max(1) * 64) / NB * NB).max(NB)
}

#[cfg(target_arch = "x86_64")]
fn pack_keys(keys: &[f32], v: usize, d: usize) -> PackedKeys {
    let blocks = v.div_ceil(16).div_ceil(NB) * NB;
    let mut data = vec![0f32; blocks * d * 16];
    let mut bias = vec![f32::NEG_INFINITY; blocks * 16];
    for j in 0..v {
        let (blk, lane) = (j / 16, j % 16);
        bias[j] = 0.0;
        for k in 0..d {
            data[(blk * d + k) * 16 + lane] = keys[j * d + k];
        }
    }
    PackedKeys { data, bias, blocks }
}

/// Running per-lane best (value, index) of 4 queries (`q` as [dim][4]) over code blocks
/// cb0..cb1 (multiples of 4): the logits of 4 x 64 codes at a time stay in registers. Lane l of
/// a query's state holds the best over codes ≡ l (mod 16). Common path: the 4 blocks' maximum
/// against the running best, one compare; only when some lane improves (rare after the first
/// blocks) are the blocks merged one by one with strict `>`, which keeps the earliest code on
/// ties, exactly as a sequential scan.
///
/// # Safety
/// The CPU must support AVX-512F (the caller checks it). `q` holds at least `QB * d` values,
/// `best_v` and `best_i` at least `QB * 16`, and `cb0..cb1` lies within `keys`' packed blocks:
/// the vector loads read unchecked at those offsets.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scan_fused(
    q: &[f32],
    d: usize,
    keys: &PackedKeys,
    (cb0, cb1): (usize, usize),
    best_v: &mut [f32],
    best_i: &mut [u32],
) {
    use std::arch::x86_64::*;
    debug_assert!(q.len() >= QB * d && best_v.len() >= QB * 16 && best_i.len() >= QB * 16);
    debug_assert!(cb0 % NB == 0 && cb1 % NB == 0 && cb1 <= keys.blocks);
    let mut bv = [_mm512_setzero_ps(); QB];
    for (r, b) in bv.iter_mut().enumerate() {
        *b = _mm512_loadu_ps(best_v.as_ptr().add(r * 16));
    }
    let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let qp = q.as_ptr();
    let mut cb = cb0;
    while cb < cb1 {
        let kb = keys.data.as_ptr().add(cb * d * 16);
        let mut acc = [[_mm512_setzero_ps(); NB]; QB];
        for j in 0..NB {
            let bias = _mm512_loadu_ps(keys.bias.as_ptr().add((cb + j) * 16));
            for a in acc.iter_mut() {
                a[j] = bias;
            }
        }
        for k in 0..d {
            let mut kv = [_mm512_setzero_ps(); NB];
            for (j, v) in kv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(kb.add((j * d + k) * 16));
            }
            let qk = qp.add(k * QB);
            for (r, a) in acc.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*qk.add(r));
                for j in 0..NB {
                    a[j] = _mm512_fmadd_ps(b, kv[j], a[j]);
                }
            }
        }
        for r in 0..QB {
            let a = &acc[r];
            let m = _mm512_max_ps(_mm512_max_ps(a[0], a[1]), _mm512_max_ps(a[2], a[3]));
            if _mm512_cmp_ps_mask::<_CMP_GT_OQ>(m, bv[r]) != 0 {
                let bi_ptr = best_i.as_mut_ptr().add(r * 16);
                let mut bi = _mm512_loadu_si512(bi_ptr as *const _);
                for (j, &aj) in a.iter().enumerate() {
                    let mk = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(aj, bv[r]);
                    bv[r] = _mm512_mask_blend_ps(mk, bv[r], aj);
                    let idx = _mm512_add_epi32(_mm512_set1_epi32(((cb + j) * 16) as i32), lanes);
                    bi = _mm512_mask_blend_epi32(mk, bi, idx);
                }
                _mm512_storeu_si512(bi_ptr as *mut _, bi);
            }
        }
        cb += NB;
    }
    for (r, b) in bv.iter().enumerate() {
        _mm512_storeu_ps(best_v.as_mut_ptr().add(r * 16), *b);
    }
}

/// [`scan_fused`] on AVX2+FMA: each 16-code block as two 8-lane halves, 4 queries x 2 halves
/// of accumulators, one block at a time; every block is merged into the running per-lane best
/// with strict `>` (blend), codes in increasing order, so ties keep the earliest code as there.
///
/// # Safety
/// The CPU must support AVX2 and FMA; the slices and block range as for [`scan_fused`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scan_fused_avx2(
    q: &[f32],
    d: usize,
    keys: &PackedKeys,
    (cb0, cb1): (usize, usize),
    best_v: &mut [f32],
    best_i: &mut [u32],
) {
    use std::arch::x86_64::*;
    debug_assert!(q.len() >= QB * d && best_v.len() >= QB * 16 && best_i.len() >= QB * 16);
    debug_assert!(cb1 <= keys.blocks);
    let mut bv = [[_mm256_setzero_ps(); 2]; QB];
    let mut bi = [[_mm256_setzero_si256(); 2]; QB];
    for r in 0..QB {
        for h in 0..2 {
            bv[r][h] = _mm256_loadu_ps(best_v.as_ptr().add(r * 16 + h * 8));
            bi[r][h] = _mm256_loadu_si256(best_i.as_ptr().add(r * 16 + h * 8) as *const __m256i);
        }
    }
    let lanes = [
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15),
    ];
    let qp = q.as_ptr();
    for cb in cb0..cb1 {
        let kb = keys.data.as_ptr().add(cb * d * 16);
        let bias = keys.bias.as_ptr().add(cb * 16);
        let mut acc = [[_mm256_loadu_ps(bias), _mm256_loadu_ps(bias.add(8))]; QB];
        for k in 0..d {
            let k0 = _mm256_loadu_ps(kb.add(k * 16));
            let k1 = _mm256_loadu_ps(kb.add(k * 16 + 8));
            let qk = qp.add(k * QB);
            for (r, a) in acc.iter_mut().enumerate() {
                let b = _mm256_set1_ps(*qk.add(r));
                a[0] = _mm256_fmadd_ps(b, k0, a[0]);
                a[1] = _mm256_fmadd_ps(b, k1, a[1]);
            }
        }
        let base = _mm256_set1_epi32((cb * 16) as i32);
        for r in 0..QB {
            for h in 0..2 {
                let m = _mm256_cmp_ps::<_CMP_GT_OQ>(acc[r][h], bv[r][h]);
                bv[r][h] = _mm256_blendv_ps(bv[r][h], acc[r][h], m);
                let idx = _mm256_castsi256_ps(_mm256_add_epi32(base, lanes[h]));
                let old = _mm256_castsi256_ps(bi[r][h]);
                bi[r][h] = _mm256_castps_si256(_mm256_blendv_ps(old, idx, m));
            }
        }
    }
    for r in 0..QB {
        for h in 0..2 {
            _mm256_storeu_ps(best_v.as_mut_ptr().add(r * 16 + h * 8), bv[r][h]);
            _mm256_storeu_si256(
                best_i.as_mut_ptr().add(r * 16 + h * 8) as *mut __m256i,
                bi[r][h],
            );
        }
    }
}

/// The fused kernel over one task's queries (rows x d) and code blocks cb0..cb1: cache chunks
/// of codes outside, register blocks of 4 queries inside.
#[cfg(target_arch = "x86_64")]
fn fused_task(
    q: &[f32],
    rows: usize,
    d: usize,
    keys: &PackedKeys,
    (cb0, cb1): (usize, usize),
) -> Vec<(f32, u32)> {
    let groups = rows.div_ceil(QB);
    // Queries by groups of 4, dimension-major inside a group ([group][dim][4]): the kernel's
    // broadcasts then sit at fixed offsets from one pointer.
    let mut qpad = vec![0f32; groups * QB * d];
    for r in 0..rows {
        let (g, i) = (r / QB, r % QB);
        for k in 0..d {
            qpad[(g * d + k) * QB + i] = q[r * d + k];
        }
    }
    let mut best_v = vec![f32::NEG_INFINITY; groups * QB * 16];
    let mut best_i = vec![u32::MAX; groups * QB * 16];
    let avx512 = super::simd::has_avx512();
    let mut c = cb0;
    while c < cb1 {
        let ce = (c + chunk_blocks(d)).min(cb1);
        for gidx in 0..groups {
            let sl = gidx * QB * 16..(gidx + 1) * QB * 16;
            let qs = &qpad[gidx * QB * d..(gidx + 1) * QB * d];
            // SAFETY: the CPU has AVX-512, or AVX2+FMA (checked by the caller, and here which);
            // the slices hold 4 queries.
            unsafe {
                if avx512 {
                    scan_fused(
                        qs,
                        d,
                        keys,
                        (c, ce),
                        &mut best_v[sl.clone()],
                        &mut best_i[sl],
                    )
                } else {
                    scan_fused_avx2(
                        qs,
                        d,
                        keys,
                        (c, ce),
                        &mut best_v[sl.clone()],
                        &mut best_i[sl],
                    )
                }
            };
        }
        c = ce;
    }
    (0..rows)
        .map(|r| {
            let mut b = (f32::NEG_INFINITY, u32::MAX);
            for l in 0..16 {
                let (v, i) = (best_v[r * 16 + l], best_i[r * 16 + l]);
                if i != u32::MAX && (v > b.0 || (v == b.0 && i < b.1)) {
                    b = (v, i);
                }
            }
            b
        })
        .collect()
}

/// A codebook's keys prepared once for repeated assignments (every scale of every batch): the
/// row-major keys, and on AVX-512 CPUs their packed form for the fused kernel.
#[derive(Debug)]
pub struct Codebook {
    keys: Vec<f32>,
    v: usize,
    d: usize,
    #[cfg(target_arch = "x86_64")]
    packed: Option<PackedKeys>,
}

impl Codebook {
    /// `keys`: v x d, row-major.
    pub fn new(keys: Vec<f32>, v: usize, d: usize) -> Self {
        assert_eq!(keys.len(), v * d);
        #[cfg(target_arch = "x86_64")]
        let packed = super::simd::has_avx2_fma().then(|| pack_keys(&keys, v, d));
        Codebook {
            keys,
            v,
            d,
            #[cfg(target_arch = "x86_64")]
            packed,
        }
    }

    pub fn len(&self) -> usize {
        self.v
    }

    pub fn is_empty(&self) -> bool {
        self.v == 0
    }

    /// The best code for each of the n queries (n x d, row-major); ties go to the lowest index.
    /// `chunk` codes per GEMM tile on the portable path.
    pub fn argmax(&self, q: &[f32], n: usize, chunk: usize) -> Vec<u32> {
        assert_eq!(q.len(), n * self.d);
        if n == 0 {
            return Vec::new();
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(p) = &self.packed {
            // (A cap lowered since the keys were packed falls through to the portable path.)
            if super::simd::has_avx2_fma() {
                return argmax_dot_fused(q, n, p, self.d);
            }
        }
        argmax_dot_gemm(q, n, &self.keys, self.v, self.d, chunk)
    }
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
    Codebook::new(keys.to_vec(), v, d).argmax(q, n, chunk)
}

/// The portable path: GEMM tiles of (256 queries x `chunk` codes) and a vectorised scan.
pub fn argmax_dot_gemm(
    q: &[f32],
    n: usize,
    keys: &[f32],
    v: usize,
    d: usize,
    chunk: usize,
) -> Vec<u32> {
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
                        super::sgemm::gemm(
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
    merge(&partial, n, splits)
}

/// One id per query from the per-split partial results (ties: the lowest index, as
/// `torch.argmax`).
fn merge(partial: &[Vec<(f32, u32)>], n: usize, splits: usize) -> Vec<u32> {
    let qtiles = n.div_ceil(QUERY_TILE);
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

/// [`argmax_dot`] with the fused AVX-512 kernel: same task split (query tiles x code ranges,
/// merged deterministically), no logits tile in memory.
#[cfg(target_arch = "x86_64")]
fn argmax_dot_fused(q: &[f32], n: usize, packed: &PackedKeys, d: usize) -> Vec<u32> {
    let blocks = packed.blocks;
    let qtiles = n.div_ceil(QUERY_TILE);
    let want_tasks = 4 * rayon::current_num_threads();
    let splits = want_tasks
        .div_ceil(qtiles)
        .clamp(1, blocks.div_ceil(chunk_blocks(d)));
    let blocks_per_split = blocks.div_ceil(splits).div_ceil(NB) * NB;
    let partial: Vec<Vec<(f32, u32)>> = (0..qtiles * splits)
        .into_par_iter()
        .map(|task| {
            let (qt, s) = (task / splits, task % splits);
            let q0 = qt * QUERY_TILE;
            let rows = QUERY_TILE.min(n - q0);
            let cb0 = (s * blocks_per_split).min(blocks);
            let cb1 = ((s + 1) * blocks_per_split).min(blocks);
            fused_task(&q[q0 * d..(q0 + rows) * d], rows, d, packed, (cb0, cb1))
        })
        .collect();
    merge(&partial, n, splits)
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
            (9, 2100, 16, 64),
            (300, 70000, 16, 4096),
        ] {
            // Integer-valued data: exact dot products, so exact ties are tested too.
            let q: Vec<f32> = (0..n * d).map(|_| rng.gen_range(-3..4) as f32).collect();
            let k: Vec<f32> = (0..v * d).map(|_| rng.gen_range(-3..4) as f32).collect();
            let want = naive(&q, n, &k, v, d);
            assert_eq!(
                argmax_dot_gemm(&q, n, &k, v, d, chunk),
                want,
                "gemm {:?}",
                (n, v, d, chunk)
            );
            #[cfg(target_arch = "x86_64")]
            if crate::kernels::simd::has_avx2_fma() {
                let packed = pack_keys(&k, v, d);
                assert_eq!(
                    argmax_dot_fused(&q, n, &packed, d),
                    want,
                    "fused {:?}",
                    (n, v, d, chunk)
                );
            }
        }
    }
}
