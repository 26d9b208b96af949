//! The weight gradient of a convolution, dW[co][ci][tap] = Σ_images Σ_pixels
//! dy[co][p] · x[ci][p·stride + tap], as a register-blocked reduction with no im2col. The input is
//! packed once per image into the implicit GEMM's padded layout ([`super::direct`]: row,
//! channel, column), where every (channel, tap) pair is one contiguous run of pixels per output
//! row; a micro-tile of `MR` output channels x `NJ` (channel, tap) pairs then accumulates
//! vectors of pixels in registers (`MR + NJ` loads for `MR x NJ` FMAs) and is summed across lanes
//! once per block of rows. The im2col path it replaces copied each input value kh x kw times
//! and then let the GEMM pack that copy again: 13% of a tiny-cpu training update went to the
//! copy alone.

use super::conv2d::{ConvGeometry, OutPtr};
use super::direct::{pack_images_into, walk, Plan};
use rayon::prelude::*;

/// Whether a vector path runs (AVX-512F, or AVX2+FMA, as `CODA_CPU_ISA` allows).
pub fn available() -> bool {
    super::simd::has_avx512() || super::simd::has_avx2_fma()
}

/// Bytes of input and output gradient one block of rows may occupy: about half an L2 cache, so
/// that both stay there while every micro-tile of the block reads them.
const BLOCK_BYTES: usize = 512 << 10;

/// Output pixels a pass should cover at least: smaller maps run several images per pass.
const GROUP_PIXELS: usize = 1024;

/// Pixels per block of the dy transpose: 64 pixels x 128 channels is 32 KiB.
const TRANSPOSE_PIXELS: usize = 64;

/// dW (cout, cin, kh, kw) of the conv of `x` (n, cin, h, w) given its output gradient
/// `dy` (n, cout, oh, ow). Callers check [`available`].
pub fn conv2d_weight_grad(
    x: &[f32],
    (n, cin, h, w): (usize, usize, usize, usize),
    dy: &[f32],
    (cout, kh, kw): (usize, usize, usize),
    g: ConvGeometry,
) -> Vec<f32> {
    assert!(available());
    let p = Plan::new(h, w, kh, kw, g);
    let (oh, ow, wq) = (p.oh, p.ow, p.wq);
    let pixels = oh * ow;
    let taps = kh * kw;
    let pairs = cin * taps;
    let wide = super::simd::has_avx512();
    let lanes = if wide { 16 } else { 8 };
    // Output channels per vector run, padded to whole vectors (the padding's dy is zero).
    let coutp = cout.div_ceil(lanes) * lanes;
    let vectors = coutp / lanes;
    // Pair j = ci·taps + tap (dW's own order): its offset in a packed image from an output
    // pixel's position (stride s: a column phase per tap, s virtual rows per output row).
    let (tap_off, row_stride, cstride) = walk((kh, kw), cin, g.stride, wq);
    let j_off: Vec<usize> = (0..pairs)
        .map(|j| tap_off[j % taps] + (j / taps) * cstride)
        .collect();
    // Small maps run several images per pass (virtual rows run on from one image into the
    // next), so that a pass has enough rows to share among the threads: an 8x8 map alone is
    // 8 rows, and three parallel regions per image cost more than its FMAs.
    let group = (GROUP_PIXELS / pixels).clamp(1, n);
    let packed_len = p.hv * cin * g.stride * wq;
    // Each virtual row's first value in the packed images (dy_cl's rows are uniform).
    let row_off: Vec<usize> = (0..group * oh)
        .map(|r| (r / oh) * packed_len + (r % oh) * row_stride)
        .collect();
    let row_bytes = 4 * (coutp * ow + row_stride);
    let rows = (BLOCK_BYTES / row_bytes.max(1)).clamp(1, group * oh);
    // Micro-tiles: up to 4 vectors of output channels (2 on AVX2) x as many pairs as leave
    // 24 (12) accumulators.
    let mv = vectors.min(if wide { 4 } else { 2 });
    let nj = if wide { 24 } else { 12 } / mv;
    let tiles: Vec<(usize, usize)> = (0..pairs.div_ceil(nj))
        .flat_map(|jb| (0..vectors.div_ceil(mv)).map(move |vb| (vb * mv, jb * nj)))
        .collect();
    // dW as (pair, output channel): each tile adds whole vectors into its own block.
    let mut dwt = vec![0f32; pairs * coutp];
    let out = OutPtr(dwt.as_mut_ptr());
    let mut dy_cl = vec![0f32; group * pixels * coutp];
    // One group of packed images at a time, in one buffer: the padding stays zero throughout.
    let mut input = vec![0f32; group * packed_len];
    for b0 in (0..n).step_by(group) {
        let images = group.min(n - b0);
        pack_images_into(&mut input, x, b0..b0 + images, (cin, h, w), &p, g);
        // dy of these images, pixel-major (channels last), in blocks of TRANSPOSE_PIXELS
        // pixels: each channel's run is read contiguously and its strided writes stay within
        // one L1-sized block (reading a channel per value instead was 6% of a tiny-cpu update).
        dy_cl
            .par_chunks_mut(pixels * coutp)
            .take(images)
            .enumerate()
            .for_each(|(i, dst)| {
                let dyb = &dy[(b0 + i) * cout * pixels..][..cout * pixels];
                dst.par_chunks_mut(coutp * TRANSPOSE_PIXELS)
                    .enumerate()
                    .for_each(|(c, dst)| {
                        let p0 = c * TRANSPOSE_PIXELS;
                        let np = dst.len() / coutp;
                        for co in 0..cout {
                            let src = &dyb[co * pixels + p0..][..np];
                            for (d, &v) in dst[co..].iter_mut().step_by(coutp).zip(src) {
                                *d = v;
                            }
                        }
                    });
            });
        for r0 in (0..images * oh).step_by(rows) {
            let span = r0..(r0 + rows).min(images * oh);
            tiles.par_iter().for_each(|&(v, j)| {
                let t = Tile {
                    dy: &dy_cl[..],
                    coutp,
                    ow,
                    v: (v, mv.min(vectors - v)),
                    input: &input,
                    row_off: &row_off,
                    j_off: &j_off[j..(j + nj).min(pairs)],
                    rows: span.clone(),
                };
                // SAFETY: the tile owns dwt's pairs j.. at channels v·lanes..; every offset stays
                // within the packed images and dy_cl.
                unsafe {
                    let o = out.at(j * coutp + v * lanes);
                    match (wide, mv) {
                        (true, 4) => tile512::<4, 6>(&t, o),
                        (true, 3) => tile512::<3, 8>(&t, o),
                        (true, 2) => tile512::<2, 12>(&t, o),
                        (true, _) => tile512::<1, 24>(&t, o),
                        (false, 2) => tile256::<2, 6>(&t, o),
                        (false, _) => tile256::<1, 12>(&t, o),
                    }
                }
            });
        }
    }
    let mut dw = vec![0f32; cout * pairs];
    dw.par_chunks_mut(pairs).enumerate().for_each(|(co, row)| {
        for (j, v) in row.iter_mut().enumerate() {
            *v = dwt[j * coutp + co];
        }
    });
    dw
}

/// One micro-tile's inputs: dy (pixels, coutp) pixel-major, the tile's vectors of output
/// channels (first, count), its (channel, tap) pairs' offsets, and the virtual output rows
/// (rows of consecutive images) to sum over.
struct Tile<'a> {
    dy: &'a [f32],
    coutp: usize,
    ow: usize,
    v: (usize, usize),
    input: &'a [f32],
    /// Each virtual row's offset in `input`.
    row_off: &'a [usize],
    j_off: &'a [usize],
    rows: std::ops::Range<usize>,
}

/// out[j·coutp + channel] += Σ over the tile's pixels of x[pair j][p] · dy[p][channel], `MV`
/// vectors of 16 channels x `NJ` pairs in registers (one broadcast input value per pair and
/// pixel, one load per vector of dy).
///
/// # Safety
/// AVX-512F; `out` addresses the tile's block of dwt.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile512<const MV: usize, const NJ: usize>(t: &Tile, out: *mut f32) {
    use std::arch::x86_64::*;
    const L: usize = 16;
    let (v0, v_count) = t.v;
    let off: [usize; NJ] = std::array::from_fn(|j| t.j_off[j.min(t.j_off.len() - 1)]);
    let vo: [usize; MV] = std::array::from_fn(|m| (v0 + m.min(v_count - 1)) * L);
    let mut acc = [[_mm512_setzero_ps(); NJ]; MV];
    let x = t.input.as_ptr();
    for oy in t.rows.clone() {
        let xr = x.add(t.row_off[oy]);
        let mut d = t.dy.as_ptr().add(oy * t.ow * t.coutp);
        for ox in 0..t.ow {
            let dv: [__m512; MV] = std::array::from_fn(|m| _mm512_loadu_ps(d.add(vo[m])));
            for (j, &o) in off.iter().enumerate() {
                let xv = _mm512_set1_ps(*xr.add(o + ox));
                for m in 0..MV {
                    acc[m][j] = _mm512_fmadd_ps(dv[m], xv, acc[m][j]);
                }
            }
            d = d.add(t.coutp);
        }
    }
    for (j, col) in (0..t.j_off.len()).zip(0..NJ) {
        for (m, a) in acc.iter().enumerate().take(v_count) {
            let o = out.add(j * t.coutp + m * L);
            _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), a[col]));
        }
    }
}

/// As [`tile512`] with 8-channel AVX2 vectors (12 accumulators of the 16 registers).
///
/// # Safety
/// AVX2 and FMA; as [`tile512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile256<const MV: usize, const NJ: usize>(t: &Tile, out: *mut f32) {
    use std::arch::x86_64::*;
    const L: usize = 8;
    let (v0, v_count) = t.v;
    let off: [usize; NJ] = std::array::from_fn(|j| t.j_off[j.min(t.j_off.len() - 1)]);
    let vo: [usize; MV] = std::array::from_fn(|m| (v0 + m.min(v_count - 1)) * L);
    let mut acc = [[_mm256_setzero_ps(); NJ]; MV];
    let x = t.input.as_ptr();
    for oy in t.rows.clone() {
        let xr = x.add(t.row_off[oy]);
        let mut d = t.dy.as_ptr().add(oy * t.ow * t.coutp);
        for ox in 0..t.ow {
            let dv: [__m256; MV] = std::array::from_fn(|m| _mm256_loadu_ps(d.add(vo[m])));
            for (j, &o) in off.iter().enumerate() {
                let xv = _mm256_broadcast_ss(&*xr.add(o + ox));
                for m in 0..MV {
                    acc[m][j] = _mm256_fmadd_ps(dv[m], xv, acc[m][j]);
                }
            }
            d = d.add(t.coutp);
        }
    }
    for (j, col) in (0..t.j_off.len()).zip(0..NJ) {
        for (m, a) in acc.iter().enumerate().take(v_count) {
            let o = out.add(j * t.coutp + m * L);
            _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), a[col]));
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile512<const MV: usize, const NJ: usize>(_: &Tile, _: *mut f32) {
    unreachable!("x86-64 only")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile256<const MV: usize, const NJ: usize>(_: &Tile, _: *mut f32) {
    unreachable!("x86-64 only")
}

#[cfg(test)]
mod tests {
    use super::super::amx::tests::{values, CASES};
    use super::*;

    /// Every geometry of the conv tests (odd channel counts, 1x1, stride 2, upsampling, batch 3,
    /// ragged rows, asymmetric padding) against the im2col weight gradient: the same f32 products summed in
    /// another order, so within a few ulps of Σ|dy||x|.
    #[test]
    fn weight_grad_matches_im2col() {
        if !available() {
            let msg = "SKIP weight-gradient kernel: this CPU has neither AVX-512F nor AVX2+FMA \
                       (or CODA_CPU_ISA caps it)";
            println!("{msg}");
            eprintln!("{msg}");
            return;
        }
        let reference = super::super::conv2d::conv2d_backward_gather;
        let mut tested = 0;
        for (i, &(n, cin, h, w, cout, kh, kw, g)) in CASES.iter().enumerate() {
            let x = values(n * cin * h * w, i, false);
            let wt = values(cout * cin * kh * kw, i + 17, false);
            let (oh, ow) = g.output_size(h, w, kh, kw);
            let dy = values(n * cout * oh * ow, i + 9, false);
            let dims = (n, cin, h, w);
            let (_, want, _) = reference(&x, dims, &wt, (cout, kh, kw), &dy, g, (false, true));
            let got = conv2d_weight_grad(&x, dims, &dy, (cout, kh, kw), g);
            let ax: Vec<f32> = x.iter().map(|v| v.abs()).collect();
            let ady: Vec<f32> = dy.iter().map(|v| v.abs()).collect();
            let (_, mag, _) = reference(&ax, dims, &wt, (cout, kh, kw), &ady, g, (false, true));
            let mut worst = 0f32;
            for (j, ((a, b), m)) in got.iter().zip(&want).zip(&mag).enumerate() {
                let e = (a - b).abs() / (m + 1e-3);
                worst = worst.max(e);
                assert!(e <= 1e-5, "case {i} at {j}: {a} vs {b} (scale {m})");
            }
            println!("case {i}: worst error / Σ|dy||x| = {worst:.2e}");
            tested += 1;
        }
        assert_eq!(tested, CASES.len());
    }
}
