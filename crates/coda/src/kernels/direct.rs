//! f32 convolution forward as an implicit GEMM on AVX-512 (or AVX2), with no im2col: the input
//! is copied once into a padded layout (row, channel, column phase, column) in which every tap of
//! every input channel is a contiguous run of output pixels, and a micro-tile of `MR` output
//! channels x `NR` segments of 16 output pixels accumulates in registers over taps x input
//! channels (one vector load per segment, one broadcast weight per channel, `MR x NR` FMAs). The
//! im2col gather it replaces copied each input value kh x kw times and cost ~12% of a VAE decode.
//!
//! On AVX2 the same micro-tile runs as three passes of 2 vectors of 8 pixels x 2 quads of output
//! channels ([`micro_avx2`]): 1.2-3x faster than im2col + the `gemm` crate's AVX2 kernel.
//!
//! The same scheme as [`super::dpbf16`] (bf16 channel pairs); padding, stride 2 (a column phase
//! per tap) and nearest-2x upsampling are handled by the packing.

use super::conv2d::{init_accumulator, ConvGeometry, OutPtr};
use rayon::prelude::*;

/// Output channels per micro-tile (the weights are packed in blocks of this many).
pub(super) const MR: usize = 8;
/// Segments of LANES output pixels per micro-tile: MR x NR = 24 accumulators of the 32 registers.
pub(super) const NR: usize = 3;
/// Output pixels per segment (one AVX-512 vector).
const LANES: usize = 16;

/// Whether the AVX-512 micro-kernel runs: the CPU has AVX-512F and the `CODA_CPU_ISA` cap
/// allows it.
pub fn available() -> bool {
    super::simd::has_avx512()
}

/// Whether the AVX2 micro-kernel runs instead ([`micro_avx2`]: AVX2+FMA, AVX-512 not allowed).
pub fn available_avx2() -> bool {
    !super::simd::has_avx512() && super::simd::has_avx2_fma()
}

/// The weights (cout, cin, kh, kw) per block of `MR` output channels, per tap, per input
/// channel: `MR` values (zero beyond cout).
pub fn pack_weights(w: &[f32], (cout, cin, kh, kw): (usize, usize, usize, usize)) -> Vec<f32> {
    let taps = kh * kw;
    let block = taps * cin * MR;
    let mut out = vec![0f32; cout.div_ceil(MR) * block];
    out.par_chunks_mut(block).enumerate().for_each(|(b, dst)| {
        for r in 0..MR.min(cout - b * MR) {
            let co = b * MR + r;
            for ci in 0..cin {
                for tap in 0..taps {
                    dst[(tap * cin + ci) * MR + r] = w[(co * cin + ci) * taps + tap];
                }
            }
        }
    });
    out
}

/// Geometry of one call.
pub(super) struct Plan {
    pub(super) oh: usize,
    pub(super) ow: usize,
    /// Virtual (padded, upsampled) rows the conv reads.
    pub(super) hv: usize,
    /// Columns per phase: the output row rounded up to whole segments, plus the taps' reach.
    pub(super) wq: usize,
}

impl Plan {
    pub(super) fn new(h: usize, w: usize, kh: usize, kw: usize, g: ConvGeometry) -> Plan {
        let (oh, ow) = g.output_size(h, w, kh, kw);
        let s = g.stride;
        Plan {
            oh,
            ow,
            hv: (oh - 1) * s + kh,
            wq: ow.div_ceil(LANES) * LANES + (kw - 1) / s + 1,
        }
    }
}

/// Image `x` (cin, h, w) into `out` in the packed layout: virtual pixel (y', x') holds the
/// (upsampled) input at (y' - pad_top, x' - pad_left), zero outside, at
/// ((y' cin + c) s + x' mod s) wq + x'/s. `out` (hv x cin x s x wq values) comes zeroed, or
/// holding an earlier image of the same shape: every image writes the same positions.
pub(super) fn pack_input_into(
    out: &mut [f32],
    x: &[f32],
    (cin, h, w): (usize, usize, usize),
    p: &Plan,
    g: ConvGeometry,
) {
    let (s, up) = (g.stride, g.upsample);
    let (pt, _, pl, _) = g.pad;
    let row_len = cin * s * p.wq;
    let (vh, vw) = (h * up, w * up);
    out.par_chunks_mut(row_len)
        .enumerate()
        .for_each(|(yv, row)| {
            let Some(uy) = yv.checked_sub(pt).filter(|&u| u < vh) else {
                return;
            };
            let sy = uy / up;
            let x_end = (pl + vw).min(p.wq * s);
            for c in 0..cin {
                let src = &x[(c * h + sy) * w..][..w];
                let dst = &mut row[c * s * p.wq..][..s * p.wq];
                if s == 1 && up == 1 {
                    let n = x_end - pl;
                    dst[pl..x_end].copy_from_slice(&src[..n]);
                } else if s == 1 && up == 2 {
                    for (o, &v) in dst[pl..x_end].chunks_mut(2).zip(src) {
                        o.fill(v);
                    }
                } else if up == 1 {
                    // Stride s: column xv goes to phase xv mod s, so each phase is every s-th
                    // input value from its first column on (a division per value cost 5x).
                    for ph in 0..s {
                        let first = pl + (ph + s - pl % s) % s;
                        if first >= x_end {
                            continue;
                        }
                        let count = (x_end - first).div_ceil(s);
                        let d = &mut dst[ph * p.wq + first / s..][..count];
                        for (o, &v) in d.iter_mut().zip(src[first - pl..].iter().step_by(s)) {
                            *o = v;
                        }
                    }
                } else {
                    for xv in pl..x_end {
                        dst[(xv % s) * p.wq + xv / s] = src[(xv - pl) / up];
                    }
                }
            }
        });
}

/// Images `batch` of `x` (n, cin, h, w) packed by [`pack_input_into`] one after the other into
/// `input`, in parallel over the images.
pub(super) fn pack_images_into(
    input: &mut [f32],
    x: &[f32],
    batch: std::ops::Range<usize>,
    (cin, h, w): (usize, usize, usize),
    p: &Plan,
    g: ConvGeometry,
) {
    let packed_len = p.hv * cin * g.stride * p.wq;
    input
        .par_chunks_mut(packed_len)
        .zip(batch.into_par_iter())
        .for_each(|(dst, b)| {
            pack_input_into(dst, &x[b * cin * h * w..][..cin * h * w], (cin, h, w), p, g)
        });
}

/// Output pixels one run of the tiling should cover at least: maps smaller than this run
/// several images at once, so that both threads get whole micro-tiles (a 16x16 map alone has
/// 16 segments: 6 micro-tiles).
const BATCH_PIXELS: usize = 16384;

/// As [`super::conv2d::conv2d_forward`] (same arithmetic: f32 products and sums, in another
/// order). `packed`: the weights already packed by [`pack_weights`], or None. Callers check
/// [`available`] first.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_forward(
    x: &[f32],
    (n, cin, h, w): (usize, usize, usize, usize),
    weight: &[f32],
    (cout, kh, kw): (usize, usize, usize),
    bias: &[f32],
    residual: Option<&[f32]>,
    g: ConvGeometry,
    packed: Option<&[f32]>,
) -> (Vec<f32>, usize, usize) {
    assert!(
        available() || available_avx2(),
        "direct conv called on a CPU without AVX-512F or AVX2+FMA"
    );
    let micro: Micro<f32> = if available() { micro } else { micro_avx2 };
    let taps = kh * kw;
    let fresh;
    let a: &[f32] = match packed {
        Some(pw) if pw.len() == cout.div_ceil(MR) * taps * cin * MR => pw,
        _ => {
            fresh = pack_weights(weight, (cout, cin, kh, kw));
            &fresh
        }
    };
    let dims = (n, cin, h, w);
    if narrow_applies(w, kw, g) {
        forward_flat(x, dims, a, (cout, kh, kw), bias, residual, g, micro)
    } else {
        forward_rows(x, dims, a, (cout, kh, kw), bias, residual, g, micro)
    }
}

/// Whether [`conv2d_forward`] runs the map as whole images of flattened padded rows
/// ([`forward_flat`]): stride 1 and output rows of 8 to 15 pixels, which a segment per row
/// would leave at most half full. Narrower rows waste as much in the flat form (a 4x4 map is 24
/// flat positions: 2 segments for 16 pixels) and lost to im2col there (AVX-512, 128 channels
/// batch 8: 0.44-0.47 against 0.33-0.45 ms).
pub fn narrow_applies(w: usize, kw: usize, g: ConvGeometry) -> bool {
    let ow = g.output_size(1, w, 1, kw).1;
    g.stride == 1 && (LANES / 2..LANES).contains(&ow)
}

/// The implicit GEMM with a segment per 16 pixels of an output row ([`Plan`]'s layout).
#[allow(clippy::too_many_arguments)]
fn forward_rows(
    x: &[f32],
    (n, cin, h, w): (usize, usize, usize, usize),
    a: &[f32],
    (cout, kh, kw): (usize, usize, usize),
    bias: &[f32],
    residual: Option<&[f32]>,
    g: ConvGeometry,
    micro: Micro<f32>,
) -> (Vec<f32>, usize, usize) {
    let p = Plan::new(h, w, kh, kw, g);
    let (oh, ow) = (p.oh, p.ow);
    let pixels = oh * ow;
    let s = g.stride;
    let mut out = vec![0f32; n * cout * pixels];
    let (tap_off, row_stride, cstride) = walk((kh, kw), cin, s, p.wq);
    let k = (&tap_off[..], cin, cstride);
    let per_run = (BATCH_PIXELS / pixels).clamp(1, n);
    let packed_len = p.hv * cin * s * p.wq;
    let mut input = vec![0f32; per_run * packed_len];
    for b0 in (0..n).step_by(per_run) {
        let images = per_run.min(n - b0);
        // Every image writes the same positions, so the padding stays zero between runs.
        pack_images_into(&mut input, x, b0..b0 + images, (cin, h, w), &p, g);
        let img = b0 * cout * pixels..(b0 + images) * cout * pixels;
        let res = residual.map(|r| &r[img.clone()]);
        run_images(
            &mut out[img],
            (oh, ow),
            (&input, images, packed_len),
            row_stride,
            a,
            bias,
            res,
            k,
            micro,
        );
    }
    (out, oh, ow)
}

/// The implicit GEMM on maps with rows narrower than a segment (stride 1): each channel of the
/// padded (upsampled) image is one flat run of padded rows, so that output pixel (y, x) is
/// flat position y·wp + x and tap (ky, kx) reads position + ky·wp + kx. The output is computed
/// at every flat position (the kw - 1 columns past each row are discarded), in segments of 16
/// that run across rows: an 8x8 map takes 5 segments per image instead of 8 half-empty ones.
/// The same products summed in the same order as [`forward_rows`], so the same bits.
#[allow(clippy::too_many_arguments)]
fn forward_flat(
    x: &[f32],
    (n, cin, h, w): (usize, usize, usize, usize),
    a: &[f32],
    (cout, kh, kw): (usize, usize, usize),
    bias: &[f32],
    residual: Option<&[f32]>,
    g: ConvGeometry,
    micro: Micro<f32>,
) -> (Vec<f32>, usize, usize) {
    let (pt, pb, pl, pr) = g.pad;
    let up = g.upsample;
    let (vh, vw) = (h * up, w * up);
    let (hp, wp) = (vh + pt + pb, vw + pl + pr);
    let (oh, ow) = g.output_size(h, w, kh, kw);
    debug_assert_eq!((oh, ow), (hp + 1 - kh, wp + 1 - kw));
    let (pixels, flat) = (oh * ow, oh * wp);
    let plane = hp * wp;
    let image_len = cin * plane;
    let tap_off: Vec<usize> = (0..kh * kw).map(|t| (t / kw) * wp + t % kw).collect();
    let per_run = (BATCH_PIXELS / flat).clamp(1, n);
    // A segment's full vector of the last channel may reach past the last plane (its extra
    // lanes are discarded outputs): slack for a segment plus the farthest tap.
    let slack = flat.div_ceil(LANES) * LANES + tap_off[tap_off.len() - 1];
    let mut input = vec![0f32; per_run * image_len + slack];
    let mut out = vec![0f32; n * cout * pixels];
    let mut acc = vec![0f32; per_run * cout * flat];
    let mut res_flat = vec![0f32; if residual.is_some() { acc.len() } else { 0 }];
    for b0 in (0..n).step_by(per_run) {
        let images = per_run.min(n - b0);
        let xs = &x[b0 * cin * h * w..(b0 + images) * cin * h * w];
        // Every image writes the same positions, so the padding stays zero between runs.
        input[..images * image_len]
            .par_chunks_mut(plane)
            .zip(xs.par_chunks(h * w))
            .for_each(|(dst, src)| {
                for uy in 0..vh {
                    let row = &src[(uy / up) * w..][..w];
                    let d = &mut dst[(uy + pt) * wp + pl..][..vw];
                    if up == 1 {
                        d.copy_from_slice(row);
                    } else {
                        for (o, &v) in d.chunks_mut(up).zip(row) {
                            o.fill(v);
                        }
                    }
                }
            });
        let acc = &mut acc[..images * cout * flat];
        let res = residual.map(|r| {
            let r = &r[b0 * cout * pixels..(b0 + images) * cout * pixels];
            let rf = &mut res_flat[..images * cout * flat];
            rf.par_chunks_mut(flat)
                .zip(r.par_chunks(pixels))
                .for_each(|(d, s)| {
                    for (d, s) in d.chunks_mut(wp).zip(s.chunks(ow)) {
                        d[..ow].copy_from_slice(s);
                    }
                });
            &*rf
        });
        run_images(
            acc,
            (1, flat),
            (&input, images, image_len),
            0,
            a,
            bias,
            res,
            (&tap_off, cin, plane),
            micro,
        );
        out[b0 * cout * pixels..(b0 + images) * cout * pixels]
            .par_chunks_mut(pixels)
            .zip(acc.par_chunks(flat))
            .for_each(|(d, s)| {
                for (d, s) in d.chunks_mut(ow).zip(s.chunks(wp)) {
                    d.copy_from_slice(&s[..ow]);
                }
            });
    }
    (out, oh, ow)
}

/// How an implicit GEMM walks a packed input laid out as (row, channel group, column phase,
/// column) with `groups` channel groups (channels, or bf16 channel pairs) and `wq` columns per
/// phase: each tap's offset from its output pixel, the offset from one output row to the next,
/// and from one channel group to the next.
pub(super) fn walk(
    (kh, kw): (usize, usize),
    groups: usize,
    s: usize,
    wq: usize,
) -> (Vec<usize>, usize, usize) {
    let tap_off = (0..kh * kw)
        .map(|t| {
            let (ky, kx) = (t / kw, t % kw);
            (ky * groups * s + kx % s) * wq + kx / s
        })
        .collect();
    (tap_off, s * groups * s * wq, s * wq)
}

/// A micro-kernel over one micro-tile: (weights of MR output channels, packed input, NR
/// segments as (first output pixel, valid pixels, input offset), (tap offsets, K groups per tap,
/// input stride of a K group), output rows, their stride, valid rows).
pub(super) type Micro<T> = unsafe fn(
    *const T,
    &[T],
    &[(usize, usize, usize); NR],
    (&[usize], usize, usize),
    *mut f32,
    usize,
    usize,
);

/// The tiling both implicit GEMMs share (f32 here, bf16 channel pairs in [`super::dpbf16`]): the
/// output (cout, oh, ow) of `images` consecutive images, whose packed inputs lie `image_len`
/// apart in `input`, cut into segments of LANES pixels of a row, NR segments per micro-tile, a
/// few micro-tiles per task; each task starts its pixels at bias + residual, then runs `micro`
/// over every block of MR output channels (its weights, `a`, stay in cache across the task's
/// micro-tiles). `row_stride`: the packed input's offset from one output row to the next; `k`:
/// as [`Micro`].
#[allow(clippy::too_many_arguments)]
pub(super) fn run_images<T: Sync>(
    out: &mut [f32],
    (oh, ow): (usize, usize),
    (input, images, image_len): (&[T], usize, usize),
    row_stride: usize,
    a: &[T],
    bias: &[f32],
    residual: Option<&[f32]>,
    k: (&[usize], usize, usize),
    micro: Micro<T>,
) {
    let (cout, pixels) = (bias.len(), oh * ow);
    let block = k.0.len() * k.1 * MR;
    let spr = ow.div_ceil(LANES);
    let per_image = oh * spr;
    let segments = images * per_image;
    let groups = segments.div_ceil(NR);
    let threads = rayon::current_num_threads().max(1);
    let per_task = (groups / (4 * threads)).clamp(1, 16);
    // Segment sg: image b, row y, first column x0; a micro-tile's segments may span images
    // (their output rows are the same cout·pixels apart in every image).
    let segment = |sg: usize| -> (usize, usize, usize) {
        let (b, sl) = (sg / per_image, sg % per_image);
        let (y, x0) = (sl / spr, (sl % spr) * LANES);
        (
            b * cout * pixels + y * ow + x0,
            LANES.min(ow - x0),
            b * image_len + y * row_stride + x0,
        )
    };
    let out_ptr = OutPtr(out.as_mut_ptr());
    (0..groups.div_ceil(per_task))
        .into_par_iter()
        .for_each(|task| {
            let g0 = task * per_task;
            let g1 = (g0 + per_task).min(groups);
            let dst = out_ptr.at(0);
            // SAFETY: this task owns the output pixels of its segments.
            for sg in (g0 * NR)..(g1 * NR).min(segments) {
                let (o, len, _) = segment(sg);
                for (co, &bc) in bias.iter().enumerate() {
                    let row =
                        unsafe { std::slice::from_raw_parts_mut(dst.add(co * pixels + o), len) };
                    init_accumulator(row, bc, residual.map(|r| &r[co * pixels + o..][..len]));
                }
            }
            for cb in 0..cout.div_ceil(MR) {
                let rows = MR.min(cout - cb * MR);
                let wblock = &a[cb * block..][..block];
                for gi in g0..g1 {
                    let seg: [(usize, usize, usize); NR] = std::array::from_fn(|j| {
                        let sg = gi * NR + j;
                        // Past the last segment: segment 0's input, no pixels.
                        if sg < segments {
                            segment(sg)
                        } else {
                            (0, 0, 0)
                        }
                    });
                    // SAFETY: input offsets stay inside the packed buffer (its rows are padded
                    // to whole segments plus the taps' reach); stores are masked.
                    unsafe {
                        let o = dst.add(cb * MR * pixels);
                        micro(wblock.as_ptr(), input, &seg, k, o, pixels, rows)
                    };
                }
            }
        });
}

/// One micro-tile: out[m][segment pixels] += Σ_tap Σ_ci w[m] · x, for `rows` <= MR channels.
///
/// # Safety
/// The CPU has AVX-512F; `a` holds taps x cin x MR values; every segment's input offset plus
/// any tap offset plus cin channel strides plus 16 lies inside `input`; `out` rows (pixels
/// apart) hold the segments' pixels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn micro(
    a: *const f32,
    input: &[f32],
    seg: &[(usize, usize, usize); NR],
    (tap_off, cin, cstride): (&[usize], usize, usize),
    out: *mut f32,
    pixels: usize,
    rows: usize,
) {
    use std::arch::x86_64::*;
    let masks: [__mmask16; NR] = std::array::from_fn(|j| ((1u32 << seg[j].1) - 1) as __mmask16);
    let mut acc = [[_mm512_setzero_ps(); NR]; MR];
    for (m, row) in acc.iter_mut().enumerate().take(rows) {
        for (j, a) in row.iter_mut().enumerate() {
            *a = _mm512_maskz_loadu_ps(masks[j], out.add(m * pixels + seg[j].0));
        }
    }
    let base = input.as_ptr();
    let mut ap = a;
    for &t in tap_off {
        let mut bp: [*const f32; NR] = std::array::from_fn(|j| base.add(seg[j].2 + t));
        for _ in 0..cin {
            let bv: [__m512; NR] = std::array::from_fn(|j| _mm512_loadu_ps(bp[j]));
            for (m, row) in acc.iter_mut().enumerate() {
                let wv = _mm512_set1_ps(*ap.add(m));
                for (a, b) in row.iter_mut().zip(&bv) {
                    *a = _mm512_fmadd_ps(wv, *b, *a);
                }
            }
            ap = ap.add(MR);
            for p in bp.iter_mut() {
                *p = p.add(cstride);
            }
        }
    }
    for (m, row) in acc.iter().enumerate().take(rows) {
        for (j, a) in row.iter().enumerate() {
            _mm512_mask_storeu_ps(out.add(m * pixels + seg[j].0), masks[j], *a);
        }
    }
}

/// [`micro`] on AVX2 (16 registers): the micro-tile's NR segments of 16 pixels are six vectors
/// of 8, run as three pairs of vectors, each for both quads of the MR = 8 output channels: 4
/// channels x 2 vectors = 8 accumulators (enough to hide the FMA latency). With 4 x 3 the
/// compiler spilled an accumulator to the stack inside the loop (16 registers are 12
/// accumulators + 3 inputs + 1 weight, and it kept two weights live): 75 GFLOP/s.
///
/// # Safety
/// As [`micro`], with AVX2 and FMA instead of AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn micro_avx2(
    a: *const f32,
    input: &[f32],
    seg: &[(usize, usize, usize); NR],
    (tap_off, cin, cstride): (&[usize], usize, usize),
    out: *mut f32,
    pixels: usize,
    rows: usize,
) {
    use std::arch::x86_64::*;
    const Q: usize = 4;
    const V: usize = 2;
    let base = input.as_ptr();
    let lane_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for pass in 0..2 * NR / V {
        // Vector i of this pass: segment v / 2, its pixels (v % 2)·8.., of which `len` are valid.
        let vecs: [(usize, usize, usize); V] = std::array::from_fn(|i| {
            let v = pass * V + i;
            let (s, o) = (v / 2, (v % 2) * 8);
            (
                seg[s].0 + o,
                seg[s].1.saturating_sub(o).min(8),
                seg[s].2 + o,
            )
        });
        if vecs.iter().all(|v| v.1 == 0) {
            continue;
        }
        let masks: [__m256i; V] = std::array::from_fn(|i| {
            _mm256_cmpgt_epi32(_mm256_set1_epi32(vecs[i].1 as i32), lane_index)
        });
        for quad in 0..rows.div_ceil(Q) {
            let live = (rows - quad * Q).min(Q);
            let mut acc = [[_mm256_setzero_ps(); V]; Q];
            for (m, row) in acc.iter_mut().enumerate().take(live) {
                for (i, a) in row.iter_mut().enumerate() {
                    let o = out.add((quad * Q + m) * pixels + vecs[i].0);
                    *a = _mm256_maskload_ps(o, masks[i]);
                }
            }
            let mut ap = a.add(quad * Q);
            for &t in tap_off {
                let mut bp: [*const f32; V] = std::array::from_fn(|i| base.add(vecs[i].2 + t));
                for _ in 0..cin {
                    let bv: [__m256; V] = std::array::from_fn(|i| _mm256_loadu_ps(bp[i]));
                    for (m, row) in acc.iter_mut().enumerate() {
                        let wv = _mm256_broadcast_ss(&*ap.add(m));
                        for (a, b) in row.iter_mut().zip(&bv) {
                            *a = _mm256_fmadd_ps(wv, *b, *a);
                        }
                    }
                    ap = ap.add(MR);
                    for p in bp.iter_mut() {
                        *p = p.add(cstride);
                    }
                }
            }
            for (m, row) in acc.iter().enumerate().take(live) {
                for (i, a) in row.iter().enumerate() {
                    let o = out.add((quad * Q + m) * pixels + vecs[i].0);
                    _mm256_maskstore_ps(o, masks[i], *a);
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
use self::micro as micro_avx2;

#[cfg(not(target_arch = "x86_64"))]
unsafe fn micro(
    _: *const f32,
    _: &[f32],
    _: &[(usize, usize, usize); NR],
    _: (&[usize], usize, usize),
    _: *mut f32,
    _: usize,
    _: usize,
) {
    unreachable!("the direct conv is x86-64 only")
}

#[cfg(test)]
mod tests {
    use super::super::amx::tests::{values, CASES};
    use super::*;

    /// Every geometry of the AMX tests (odd channel counts, stride 2, upsampling, 1x1, batch 3,
    /// ragged rows) against the im2col convolution: the same f32 products summed in another
    /// order, so within a few ulps of Σ|w||x|.
    #[test]
    fn direct_conv_matches_im2col() {
        if !available() && !available_avx2() {
            let msg = "SKIP direct conv: this CPU has neither AVX-512F nor AVX2+FMA (or CODA_CPU_ISA caps them)";
            println!("{msg}");
            eprintln!("{msg}");
            return;
        }
        let conv = super::super::conv2d::conv2d_forward;
        for (i, &(n, cin, h, w, cout, kh, kw, g)) in CASES.iter().enumerate() {
            let x = values(n * cin * h * w, i, false);
            let wt = values(cout * cin * kh * kw, i + 17, false);
            let bias = values(cout, i + 5, false);
            let (oh, ow) = g.output_size(h, w, kh, kw);
            let res = values(n * cout * oh * ow, i + 9, false);
            let (dims, wd) = ((n, cin, h, w), (cout, kh, kw));
            let (want, _, _) = conv(&x, dims, &wt, wd, &bias, Some(&res), g);
            let (got, goh, gow) = conv2d_forward(&x, dims, &wt, wd, &bias, Some(&res), g, None);
            assert_eq!((goh, gow), (oh, ow));
            let pw = pack_weights(&wt, (cout, cin, kh, kw));
            let (again, _, _) = conv2d_forward(&x, dims, &wt, wd, &bias, Some(&res), g, Some(&pw));
            assert_eq!(got, again, "case {i}: prepacked weights");
            let ax: Vec<f32> = x.iter().map(|v| v.abs()).collect();
            let aw: Vec<f32> = wt.iter().map(|v| v.abs()).collect();
            let zero = vec![0f32; cout];
            let (mag, _, _) = conv(&ax, dims, &aw, wd, &zero, None, g);
            let mut worst = 0f32;
            for (j, ((a, b), m)) in got.iter().zip(&want).zip(&mag).enumerate() {
                let e = (a - b).abs() / (m + 1e-3);
                worst = worst.max(e);
                // Measured 2.9e-7 at worst.
                assert!(e <= 3e-6, "case {i} at {j}: {a} vs {b} (scale {m})");
            }
            let path = if available() { "avx512" } else { "avx2" };
            println!("case {i} ({path}): worst error / Σ|w||x| = {worst:.2e}");
        }
    }

    /// Narrow maps as flat runs of padded rows give the bits a segment per row gives (the same
    /// products in the same order), with and without a residual, upsampled, at batch 1 and 5.
    #[test]
    fn narrow_maps_flat_equal_a_segment_per_row() {
        if !available() && !available_avx2() {
            let msg = "SKIP narrow maps: this CPU has neither AVX-512F nor AVX2+FMA (or CODA_CPU_ISA caps them)";
            println!("{msg}");
            eprintln!("{msg}");
            return;
        }
        let micro: Micro<f32> = if available() { micro } else { micro_avx2 };
        let same = |p| ConvGeometry::same(1, p);
        let cases = [
            (5, 128, 8, 8, 128, 3, 3, same(1)),
            (1, 7, 5, 11, 11, 3, 3, same(1)),
            (
                2,
                6,
                4,
                6,
                9,
                3,
                3,
                ConvGeometry {
                    stride: 1,
                    pad: (1, 1, 1, 1),
                    upsample: 2,
                },
            ),
            (
                3,
                10,
                8,
                8,
                20,
                2,
                2,
                ConvGeometry {
                    stride: 1,
                    pad: (0, 1, 0, 1),
                    upsample: 1,
                },
            ),
            (2, 16, 6, 9, 8, 1, 1, same(0)),
            (
                1,
                3,
                15,
                15,
                4,
                3,
                3,
                ConvGeometry {
                    stride: 1,
                    pad: (0, 0, 0, 0),
                    upsample: 1,
                },
            ),
        ];
        for (i, &(n, cin, h, w, cout, kh, kw, g)) in cases.iter().enumerate() {
            assert!(narrow_applies(w, kw, g), "case {i} is not narrow");
            let x = values(n * cin * h * w, i, false);
            let wt = values(cout * cin * kh * kw, i + 3, false);
            let bias = values(cout, i + 7, false);
            let (oh, ow) = g.output_size(h, w, kh, kw);
            let res = values(n * cout * oh * ow, i + 11, false);
            let a = pack_weights(&wt, (cout, cin, kh, kw));
            let dims = (n, cin, h, w);
            for r in [None, Some(&res[..])] {
                let rows = forward_rows(&x, dims, &a, (cout, kh, kw), &bias, r, g, micro);
                let flat = forward_flat(&x, dims, &a, (cout, kh, kw), &bias, r, g, micro);
                assert_eq!((flat.1, flat.2), (oh, ow), "case {i}");
                assert!(
                    rows.0 == flat.0,
                    "case {i} (residual: {}): bits differ",
                    r.is_some()
                );
            }
        }
    }
}
