//! Winograd F(4x4, 3x3) convolution forward for the 3x3 stride-1 pad-1 convs: 36 multiplies per
//! 4x4 output tile and channel pair instead of 144 (4x fewer GEMM FLOPs than im2col; F(2x2, 3x3)
//! in [`super::winograd`] saves 2.25x), and fewer transformed values per output pixel (36/16
//! against 16/4). Lavin & Gray's points (0, ±1, ±2, ∞):
//!
//! ```text
//! Bᵀ = [4  0 -5  0 1 0]    G = [ 1/4     0    0 ]    Aᵀ = [1 1  1 1  1 0]
//!      [0 -4 -4  1 1 0]        [-1/6 -1/6 -1/6]         [0 1 -1 2 -2 0]
//!      [0  4 -4 -1 1 0]        [-1/6  1/6 -1/6]         [0 1  1 4  4 0]
//!      [0 -2 -1  2 1 0]        [1/24 1/12  1/6]         [0 1 -1 8 -8 1]
//!      [0  2 -1 -2 1 0]        [1/24 -1/12 1/6]
//!      [0  4  0 -5 0 1]        [ 0     0    1 ]
//! ```
//!
//! Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A. The transforms' larger coefficients cost accuracy: the error
//! against direct convolution is measured in the tests (a few 1e-6 of the output's scale).
//! Same structure as F(2x2, 3x3): per block of tiles, the input transform over runs of tiles of
//! one tile row (separable, elementwise on contiguous slices), 36 GEMMs, the output transform.

use rayon::prelude::*;

use super::conv2d::ConvGeometry;

/// Whether a conv can run through this kernel: 3x3, stride 1, pad 1, on the input as it is or
/// nearest-upsampled 2x (the decoder's upsampling conv; the upsampled input is never formed).
pub fn supports(kh: usize, kw: usize, g: ConvGeometry) -> bool {
    kh == 3
        && kw == 3
        && g.stride == 1
        && g.pad == (1, 1, 1, 1)
        && (g.upsample == 1 || g.upsample == 2)
}

/// G (6x3); the transform itself ([`apply_g`]) uses its structure.
#[cfg(test)]
const G: [[f32; 3]; 6] = [
    [0.25, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// U[t][co][ci] = (G g Gᵀ)[t] for the (cout, cin, 3, 3) weights: 36 matrices of cout x cin.
pub fn transform_weights(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let pairs = cout * cin;
    assert_eq!(w.len(), 9 * pairs, "3x3 weights of the wrong size");
    let mut u = vec![0f32; 36 * pairs];
    let ptr = crate::kernels::conv2d::OutPtr(u.as_mut_ptr());
    let isa = super::simd::isa();
    (0..pairs.div_ceil(WEIGHT_BLOCK))
        .into_par_iter()
        .for_each(|blk| {
            // SAFETY: block blk writes only pairs blk·B.. of every U[t]; the vector versions
            // run only where the CPU has their features.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                if isa >= super::simd::Isa::Avx512 {
                    return weight_block_avx512(w, pairs, blk, ptr.at(0));
                }
                if isa == super::simd::Isa::Avx2 {
                    return weight_block_avx2(w, pairs, blk, ptr.at(0));
                }
            }
            let _ = isa;
            unsafe { weight_block(w, pairs, blk, ptr.at(0)) }
        });
    u
}

/// [`transform_weights`] of `cout` rows on the calling thread, into `u` (36 x cout x cin): a
/// task's own rows ([`Weights::Raw`]); the caller's target features apply (inlined).
#[inline(always)]
fn transform_weights_serial(w: &[f32], cout: usize, cin: usize, u: &mut [f32]) {
    let pairs = cout * cin;
    assert!(w.len() >= 9 * pairs && u.len() == 36 * pairs);
    for blk in 0..pairs.div_ceil(WEIGHT_BLOCK) {
        // SAFETY: `u` holds 36 x pairs values, and this thread is its only writer.
        unsafe { weight_block(w, pairs, blk, u.as_mut_ptr()) }
    }
}

/// Weight pairs per block of the transform.
const WEIGHT_BLOCK: usize = 64;

/// # Safety
/// The CPU has AVX2 and FMA; as [`weight_block`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weight_block_avx2(w: &[f32], pairs: usize, blk: usize, u: *mut f32) {
    weight_block(w, pairs, blk, u)
}

/// # Safety
/// The CPU has AVX-512F; as [`weight_block`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn weight_block_avx512(w: &[f32], pairs: usize, blk: usize, u: *mut f32) {
    weight_block(w, pairs, blk, u)
}

/// G applied to the columns (g0, g1, g2) of WEIGHT_BLOCK weight pairs, with G's structure (rows
/// 1-2 and 3-4 share their even part): 11 operations for its 6 rows instead of 30.
#[inline(always)]
fn apply_g(g: [&[f32; WEIGHT_BLOCK]; 3], out: [&mut [f32; WEIGHT_BLOCK]; 6]) {
    let [g0, g1, g2] = g;
    let [o0, o1, o2, o3, o4, o5] = out;
    for p in 0..WEIGHT_BLOCK {
        let (a, b, c) = (g0[p], g1[p], g2[p]);
        let quarter = 0.25 * a;
        let even = a + c;
        o0[p] = quarter;
        o1[p] = (even + b) * (-1.0 / 6.0);
        o2[p] = (even - b) * (-1.0 / 6.0);
        // a/24 + c/6 = (a/4 + c)/6
        let even4 = (quarter + c) * (1.0 / 6.0);
        let odd4 = b * (1.0 / 12.0);
        o3[p] = even4 + odd4;
        o4[p] = even4 - odd4;
        o5[p] = c;
    }
}

/// One block of [`transform_weights`]: pairs blk·B.. of every U[t].
///
/// # Safety
/// `u` holds 36 x `pairs` values, and no other thread writes pairs blk·B..(blk+1)·B of them.
#[inline(always)]
unsafe fn weight_block(w: &[f32], pairs: usize, blk: usize, u: *mut f32) {
    const B: usize = WEIGHT_BLOCK;
    let p0 = blk * B;
    let n = B.min(pairs - p0);
    let mut g = [[0f32; B]; 9];
    for p in 0..n {
        for (k, gk) in g.iter_mut().enumerate() {
            gk[p] = w[(p0 + p) * 9 + k];
        }
    }
    // t[r][c] = (G g)[r][c]: G down each of g's 3 columns (g[3j + c], j = 0..3).
    let mut t = [[[0f32; B]; 6]; 3];
    for (c, tc) in t.iter_mut().enumerate() {
        let [t0, t1, t2, t3, t4, t5] = tc;
        apply_g([&g[c], &g[3 + c], &g[6 + c]], [t0, t1, t2, t3, t4, t5]);
    }
    // U[r][k] = (t Gᵀ)[r][k]: G along each row r of t.
    let mut row = [[0f32; B]; 6];
    #[allow(clippy::needless_range_loop)] // r picks a row of each of t's 3 columns
    for r in 0..6 {
        let [r0, r1, r2, r3, r4, r5] = &mut row;
        apply_g([&t[0][r], &t[1][r], &t[2][r]], [r0, r1, r2, r3, r4, r5]);
        for (k, rk) in row.iter().enumerate() {
            let dst = std::slice::from_raw_parts_mut(u.add((r * 6 + k) * pairs + p0), n);
            dst.copy_from_slice(&rk[..n]);
        }
    }
}

/// The weights of a conv as [`conv3x3_forward`] takes them.
#[derive(Clone, Copy, Debug)]
pub enum Weights<'a> {
    /// From [`transform_weights`] (36 x cout x cin).
    Transformed(&'a [f32]),
    /// The (cout, cin, 3, 3) weight as it is: each task transforms its own output channels,
    /// [`FUSED_ROWS`] at a time, into a buffer that stays in cache while its 36 tile GEMMs read
    /// it. Same values as [`transform_weights`] (the same arithmetic per weight pair), so the
    /// same bits. For few blocks per call: there the whole transform (36 x cout x cin values
    /// written to memory and read back, 37 MiB at 512 channels, 5-7 ms on 2 threads) costs
    /// more than the convolution.
    Raw(&'a [f32]),
}

/// Output channels per fused weight transform: 36 x 16 x cin values (1.2 MiB at 512 channels).
const FUSED_ROWS: usize = 16;

/// Whether a conv on `n` images of (h, w) (the output's size) with `cin` input channels should
/// take its weights [`Weights::Raw`]: when there are no more blocks than threads, so that no
/// thread transforms more than the whole weight once (and with the output channels split, a
/// part of it). Either way the output has the same bits, so this may depend on the threads.
/// AMD EPYC, 2 threads, fastest of 5 (`W4_ONLY=c,size,batch kernel_bench`), whole transform per
/// call against fused: 512 ch 16x16 batch 1 (1 block) 12.5-14.4 against 6.3-7.3 ms, 32x32 (1
/// block) 23-28 against 16-20, 256 ch 32x32 (2 blocks) 6.7-8.3 against 5.0-7.2; 512 ch 64x64
/// (4 blocks) 50.6 against 53.0, 16x16 batch 8 38.2 against 38.4.
pub fn fuses_weight_transform(n: usize, cin: usize, h: usize, w: usize) -> bool {
    let blocks = n * (h.div_ceil(4) * w.div_ceil(4)).div_ceil(block_tiles(cin, h, w));
    blocks <= rayon::current_num_threads()
}

/// y = conv3x3(x) + bias (+ residual), stride 1, pad 1, on `x` nearest-upsampled `up` times (1
/// or 2; the output is (h·up, w·up)); `u` from [`transform_weights`].
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_forward(
    x: &[f32],
    (n, cin, ih, iw): (usize, usize, usize, usize),
    u: Weights,
    cout: usize,
    bias: &[f32],
    residual: Option<&[f32]>,
    up: usize,
) -> Vec<f32> {
    let (h, w) = (ih * up, iw * up);
    let blocks = n * (h.div_ceil(4) * w.div_ceil(4)).div_ceil(block_tiles(cin, h, w));
    // Fewer blocks than threads (small maps: one block per image at 512 channels up to 32x32),
    // so each block's output channels are split between tasks: each transforms the block's
    // input again (36 x cin x tiles values) and streams only its own rows of U.
    let threads = rayon::current_num_threads();
    let parts = if blocks >= threads {
        1
    } else {
        threads.div_ceil(blocks).min(cout.div_ceil(64))
    };
    forward_in_parts(x, (n, cin, ih, iw), u, cout, bias, residual, up, parts)
}

/// Tiles per block.
fn block_tiles(cin: usize, h: usize, w: usize) -> usize {
    // The transformed block (36 x cin x tb) stays within ~2 MiB, in whole column strips of the
    // tile GEMMs (48 on AVX-512, 16 on AVX2: `tile_gemm`).
    // From 512 input channels, 64: each block streams all of U (36 x cout x cin, 37 MiB at 512
    // channels), and halving the blocks was 9-25% faster at 512 channels (32x32 to 128x128,
    // one thread, AMD EPYC) than 32, while 256 channels gained nothing.
    match ((1usize << 19) / (36 * cin)).clamp(32, 512) {
        tb if tb >= 96 => tb / 48 * 48,
        tb => tb / 16 * 16,
    }
    .max(if cin >= 512 { 64 } else { 0 })
    .min(h.div_ceil(4) * w.div_ceil(4))
    .max(1)
}

/// [`conv3x3_forward`] with each block's output channels split into `parts` tasks (in whole
/// micro-tiles of 8 rows). Every output value is the same sum in the same order whatever
/// `parts` is, so the result does not depend on the thread count.
#[allow(clippy::too_many_arguments)]
fn forward_in_parts(
    x: &[f32],
    (n, cin, ih, iw): (usize, usize, usize, usize),
    u: Weights,
    cout: usize,
    bias: &[f32],
    residual: Option<&[f32]>,
    up: usize,
    parts: usize,
) -> Vec<f32> {
    assert!(
        up == 1 || up == 2,
        "F(4x4, 3x3) upsamples 1x or 2x, not {up}x"
    );
    let (h, w) = (ih * up, iw * up);
    let (th, tw) = (h.div_ceil(4), w.div_ceil(4));
    let tiles = th * tw;
    let tb = block_tiles(cin, h, w);
    let blocks = tiles.div_ceil(tb);
    let part_rows = cout.div_ceil(parts.max(1)).next_multiple_of(8);
    let parts = cout.div_ceil(part_rows);
    let mut out = vec![0f32; n * cout * h * w];
    let optr = crate::kernels::conv2d::OutPtr(out.as_mut_ptr());
    let geo = Geometry {
        cin,
        cout,
        h,
        w,
        ih,
        iw,
        up,
        tw,
        tb,
        isa: super::simd::isa(),
    };
    let isa = geo.isa;
    let fused_rows = match u {
        Weights::Transformed(u) => {
            assert_eq!(
                u.len(),
                36 * cout * cin,
                "transformed weights of the wrong size"
            );
            0
        }
        Weights::Raw(w) => {
            assert_eq!(w.len(), 9 * cout * cin, "3x3 weights of the wrong size");
            FUSED_ROWS
        }
    };
    (0..n * blocks * parts).into_par_iter().for_each(|task| {
        SCRATCH.with_borrow_mut(|scratch| {
            scratch.fit(cin, cout, tb, tw, fused_rows);
            let (task, part) = (task / parts, task % parts);
            let (b, blk) = (task / blocks, task % blocks);
            let t0 = blk * tb;
            let nt = tb.min(tiles - t0);
            let ob = b * cout * h * w;
            let job = Block {
                geo: &geo,
                t0,
                nt,
                co: part * part_rows..((part + 1) * part_rows).min(cout),
                x: &x[b * cin * ih * iw..][..cin * ih * iw],
                u,
                bias,
                residual: residual.map(|r| &r[ob..][..cout * h * w]),
            };
            let out_b = crate::kernels::conv2d::OutPtr(optr.at(ob));
            // SAFETY: the vector versions run only where the CPU has their features.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                match isa {
                    super::simd::Isa::Avx512
                    | super::simd::Isa::Avx512Bf16
                    | super::simd::Isa::Amx => return block_avx512(&job, scratch, out_b),
                    super::simd::Isa::Avx2 => return block_avx2(&job, scratch, out_b),
                    super::simd::Isa::Scalar => {}
                }
            }
            let _ = isa;
            block(&job, scratch, out_b)
        })
    });
    out
}

struct Geometry {
    cin: usize,
    cout: usize,
    /// The output's (and the virtual, upsampled input's) size.
    h: usize,
    w: usize,
    /// The input as stored, and its upsampling factor (h = ih·up).
    ih: usize,
    iw: usize,
    up: usize,
    /// Tiles per output row.
    tw: usize,
    /// Tiles per block (the column stride of the transformed buffers).
    tb: usize,
    /// The kernel path (read once per call).
    isa: super::simd::Isa,
}

struct Block<'a> {
    geo: &'a Geometry,
    t0: usize,
    nt: usize,
    /// The output channels this task computes.
    co: std::ops::Range<usize>,
    x: &'a [f32],
    u: Weights<'a>,
    bias: &'a [f32],
    residual: Option<&'a [f32]>,
}

thread_local! {
    /// Each thread's buffers, kept from one call to the next: zeroing a fresh set (4 MiB) per
    /// rayon job was 2.7% of a MAR tokenizer run on the AVX2 path (perf: `Scratch::new` and its
    /// memset). At most 36 x (cin + cout) x tb floats, about 4 MiB, per thread.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Per-thread buffers (each at least as long as the conv in hand needs): V (36 x cin x tb), M (36 x cout x tb), the 6 input rows of a run in four
/// column phases (columns 4i - 1 + c, c = 0..4) and their horizontal transforms, the output
/// transform's buffer.
#[derive(Default)]
struct Scratch {
    v: Vec<f32>,
    m: Vec<f32>,
    /// The fused weight transform's rows (36 x FUSED_ROWS x cin), [`Weights::Raw`] only.
    u: Vec<f32>,
    phase: Vec<f32>,
    horizontal: Vec<f32>,
    /// The output transform's intermediate columns (24 x run) and one row's results (4 x run).
    out: Vec<f32>,
}

impl Scratch {
    /// Grows the buffers to what a (cin, cout, tb, tw) conv needs; every value a block reads is
    /// written first in that block, so what the buffers held before does not matter.
    fn fit(&mut self, cin: usize, cout: usize, tb: usize, tw: usize, fused_rows: usize) {
        let seg = tw.min(tb);
        let grow = |v: &mut Vec<f32>, len: usize| {
            if v.len() < len {
                v.resize(len, 0.0);
            }
        };
        grow(&mut self.v, 36 * cin * tb);
        grow(&mut self.m, 36 * cout * tb);
        grow(&mut self.u, 36 * fused_rows * cin);
        grow(&mut self.phase, 6 * 4 * (seg + 1));
        grow(&mut self.horizontal, 36 * seg);
        grow(&mut self.out, 28 * seg);
    }
}

/// #Safety: the CPU must support AVX2 and FMA; the body is the portable version.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2(job: &Block, s: &mut Scratch, out: crate::kernels::conv2d::OutPtr) {
    block(job, s, out)
}

/// #Safety: the CPU must support AVX-512F, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn block_avx512(job: &Block, s: &mut Scratch, out: crate::kernels::conv2d::OutPtr) {
    block(job, s, out)
}

#[inline(always)]
fn block(job: &Block, s: &mut Scratch, out: crate::kernels::conv2d::OutPtr) {
    let g = job.geo;
    let (cin, cout, tb) = (g.cin, g.cout, g.tb);
    for (j0, ty, tx0, len) in super::winograd::tile_runs(g.tw, job.t0, job.nt) {
        // The run's stored input rows and columns.
        let stored = |v: std::ops::Range<isize>| {
            let up = g.up as isize;
            v.start.div_euclid(up)..(v.end - 1).div_euclid(up) + 1
        };
        let rows = stored(4 * ty as isize - 1..4 * ty as isize + 5);
        let cols = stored(4 * tx0 as isize - 1..4 * (tx0 + len) as isize + 3);
        for ci in 0..cin {
            if ci + 1 < cin {
                let next = job.x[(ci + 1) * g.ih * g.iw..].as_ptr();
                prefetch_rows(next, (g.ih, g.iw), rows.clone(), cols.clone());
            }
            input_run(job, s, ci, (j0, ty, tx0, len));
        }
    }
    let nt = job.nt;
    let co = job.co.clone();
    // 36 GEMMs: M[t] (co x nt) = U[t] (co x cin) · V[t] (cin x nt)
    match job.u {
        Weights::Transformed(u) => {
            for t in 0..36 {
                // SAFETY: buffers of the stated shapes and strides.
                unsafe {
                    super::tile_gemm::gemm(
                        g.isa,
                        (co.len(), cin, nt),
                        u[(t * cout + co.start) * cin..].as_ptr(),
                        s.v[t * cin * tb..].as_ptr(),
                        tb,
                        s.m[(t * cout + co.start) * tb..].as_mut_ptr(),
                        tb,
                    );
                }
            }
        }
        Weights::Raw(w) => {
            for c0 in co.clone().step_by(FUSED_ROWS) {
                let rows = FUSED_ROWS.min(co.end - c0);
                let ur = &mut s.u[..36 * rows * cin];
                transform_weights_serial(&w[c0 * cin * 9..], rows, cin, ur);
                for t in 0..36 {
                    // SAFETY: as above; U[t] of these rows starts at t x rows x cin.
                    unsafe {
                        super::tile_gemm::gemm(
                            g.isa,
                            (rows, cin, nt),
                            ur[t * rows * cin..].as_ptr(),
                            s.v[t * cin * tb..].as_ptr(),
                            tb,
                            s.m[(t * cout + c0) * tb..].as_mut_ptr(),
                            tb,
                        );
                    }
                }
            }
        }
    }
    for (j0, ty, tx0, len) in super::winograd::tile_runs(g.tw, job.t0, job.nt) {
        let rows = 4 * ty as isize..4 * ty as isize + 4;
        let cols = 4 * tx0 as isize..4 * (tx0 + len) as isize;
        let plane = g.h * g.w;
        for co in co.clone() {
            if co + 1 < job.co.end {
                let hw = (g.h, g.w);
                prefetch_rows(out.at((co + 1) * plane), hw, rows.clone(), cols.clone());
                if let Some(rs) = job.residual {
                    prefetch_rows(
                        rs[(co + 1) * plane..].as_ptr(),
                        hw,
                        rows.clone(),
                        cols.clone(),
                    );
                }
            }
            output_run(job, &s.m, &mut s.out, out, co, (j0, ty, tx0, len));
        }
    }
}

/// Bᵀ d for every i of six input slices into six output slices (one pass, no branches: the
/// compiler vectorises it).
#[inline(always)]
fn input_transform(d: [&[f32]; 6], out: [&mut [f32]; 6]) {
    let [d0, d1, d2, d3, d4, d5] = d;
    let [o0, o1, o2, o3, o4, o5] = out;
    let n = o0.len();
    let (d0, d1, d2, d3, d4, d5) = (&d0[..n], &d1[..n], &d2[..n], &d3[..n], &d4[..n], &d5[..n]);
    let (o1, o2, o3, o4, o5) = (
        &mut o1[..n],
        &mut o2[..n],
        &mut o3[..n],
        &mut o4[..n],
        &mut o5[..n],
    );
    for i in 0..n {
        let (a, b, c, d, e, f) = (d0[i], d1[i], d2[i], d3[i], d4[i], d5[i]);
        o0[i] = 4.0 * a - 5.0 * c + e;
        o1[i] = -4.0 * (b + c) + d + e;
        o2[i] = 4.0 * (b - c) - d + e;
        o3[i] = 2.0 * (d - b) - c + e;
        o4[i] = 2.0 * (b - d) - c + e;
        o5[i] = 4.0 * b - 5.0 * d + f;
    }
}

/// V[t][ci][j0..j0+len] for a run of tiles (ty, tx0..tx0+len) of input channel `ci`.
#[inline(always)]
fn input_run(
    job: &Block,
    s: &mut Scratch,
    ci: usize,
    (j0, ty, tx0, len): (usize, usize, usize, usize),
) {
    let g = job.geo;
    let (h, iw) = (g.h, g.iw);
    let plane = &job.x[ci * g.ih * iw..][..g.ih * iw];
    let n1 = len + 1;
    // The 6 input rows 4·ty - 1 + r of the run, in four column phases: phase c holds columns
    // 4·(tx0 + i) - 1 + c, i = 0..=len (tile i reads phases 0..4 at i and phases 0, 1 at i + 1),
    // zero outside the image.
    let x0 = 4 * tx0 as isize - 1;
    for r in 0..6 {
        let vy = (4 * ty + r) as isize - 1;
        let phases = &mut s.phase[r * 4 * n1..][..4 * n1];
        if vy < 0 || vy >= h as isize {
            phases.fill(0.0);
        } else if g.up == 1 {
            split_row(&plane[vy as usize * iw..][..iw], x0, phases, g.isa);
        } else {
            split_row_up2(&plane[vy as usize / 2 * iw..][..iw], x0, phases, g.isa);
        }
    }
    // Horizontal: d B for every row; horizontal[(r, k)] over the run.
    for r in 0..6 {
        let ph = |c: usize, off: usize| &s.phase[(r * 4 + c) * n1 + off..][..len];
        let d = [ph(0, 0), ph(1, 0), ph(2, 0), ph(3, 0), ph(0, 1), ph(1, 1)];
        let hz = &mut s.horizontal[r * 6 * len..][..6 * len];
        let mut outs = hz.chunks_exact_mut(len);
        let out: [&mut [f32]; 6] = std::array::from_fn(|_| outs.next().unwrap());
        input_transform(d, out);
    }
    // Vertical: Bᵀ (d B) into V[(r', k)][ci].
    let (cin, tb) = (g.cin, g.tb);
    let hz = &s.horizontal;
    let v = OutSlices(s.v.as_mut_ptr());
    for k in 0..6 {
        let d: [&[f32]; 6] = std::array::from_fn(|r| &hz[(r * 6 + k) * len..][..len]);
        // SAFETY: the six destinations are disjoint runs of V (different t = (r', k)).
        let out: [&mut [f32]; 6] =
            std::array::from_fn(|rr| unsafe { v.slice(((rr * 6 + k) * cin + ci) * tb + j0, len) });
        input_transform(d, out);
    }
}

/// Disjoint mutable runs of one buffer.
struct OutSlices(*mut f32);

impl OutSlices {
    /// #Safety: the run lies in the buffer and overlaps no other live one.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, offset: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(offset), len)
    }
}

/// Aᵀ m for every i of six slices into four (one pass, vectorised).
#[inline(always)]
fn output_transform(m: [&[f32]; 6], out: [&mut [f32]; 4]) {
    let [m0, m1, m2, m3, m4, m5] = m;
    let [o0, o1, o2, o3] = out;
    let n = o0.len();
    let (m0, m1, m2, m3, m4, m5) = (&m0[..n], &m1[..n], &m2[..n], &m3[..n], &m4[..n], &m5[..n]);
    let (o1, o2, o3) = (&mut o1[..n], &mut o2[..n], &mut o3[..n]);
    for i in 0..n {
        let (p, q) = (m1[i] + m2[i], m1[i] - m2[i]);
        let (u, v) = (m3[i] + m4[i], m3[i] - m4[i]);
        o0[i] = m0[i] + p + u;
        o1[i] = q + 2.0 * v;
        o2[i] = p + 4.0 * u;
        o3[i] = q + 8.0 * v + m5[i];
    }
}

/// Y = Aᵀ M A (4x4 per tile) plus bias and residual, for a run of tiles of output channel `co`:
/// Aᵀ over the 6 rows of M for each of its 6 columns (all four output rows at once), then per
/// output row A over the columns, both elementwise on contiguous slices of the run.
#[inline(always)]
fn output_run(
    job: &Block,
    m: &[f32],
    tmp: &mut [f32],
    out: crate::kernels::conv2d::OutPtr,
    co: usize,
    (j0, ty, tx0, len): (usize, usize, usize, usize),
) {
    let g = job.geo;
    let (cout, tb, h, w) = (g.cout, g.tb, g.h, g.w);
    let bias = job.bias[co];
    let x0 = 4 * tx0;
    let width = (4 * len).min(w - x0);
    // cols[(r, c)]: output row r's column c, (4 x 6) runs; outs: one output row's 4 columns.
    let (cols, outs) = tmp.split_at_mut(24 * len);
    let colp = OutSlices(cols.as_mut_ptr());
    for c in 0..6 {
        let rows: [&[f32]; 6] =
            std::array::from_fn(|a| &m[((a * 6 + c) * cout + co) * tb + j0..][..len]);
        // SAFETY: four disjoint runs of `cols`.
        let dst: [&mut [f32]; 4] =
            std::array::from_fn(|r| unsafe { colp.slice((r * 6 + c) * len, len) });
        output_transform(rows, dst);
    }
    for r in 0..4 {
        let y = 4 * ty + r;
        if y >= h {
            break;
        }
        let src: [&[f32]; 6] = std::array::from_fn(|c| &cols[(r * 6 + c) * len..][..len]);
        {
            let mut it = outs[..4 * len].chunks_exact_mut(len);
            let dst: [&mut [f32]; 4] = std::array::from_fn(|_| it.next().unwrap());
            output_transform(src, dst);
        }
        let base = (co * h + y) * w + x0;
        // SAFETY: these `width` pixels of the image's output belong to this run's tiles, which
        // no other task writes.
        let o = unsafe { std::slice::from_raw_parts_mut(out.at(base), width) };
        let (q0, q1, q2, q3) = (
            &outs[..len],
            &outs[len..2 * len],
            &outs[2 * len..3 * len],
            &outs[3 * len..4 * len],
        );
        let full = width / 4;
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if g.isa != super::simd::Isa::Scalar {
            done = full / 8 * 8;
            // SAFETY: the CPU has AVX2 (every path above scalar); 4·done pixels of `o` and of
            // the residual row, `done` values of each output column phase.
            unsafe {
                quads::join(
                    [q0.as_ptr(), q1.as_ptr(), q2.as_ptr(), q3.as_ptr()],
                    done,
                    bias,
                    job.residual.map(|rs| rs[base..][..4 * done].as_ptr()),
                    o.as_mut_ptr(),
                );
            }
        }
        // What the shuffles left (all of the row on the scalar path): whole quads, then the edge.
        let (q, res) = (
            [q0, q1, q2, q3],
            job.residual.map(|rs| &rs[base..][..width]),
        );
        for i in done..full {
            for c in 0..4 {
                o[4 * i + c] = q[c][i] + bias + res.map_or(0.0, |r| r[4 * i + c]);
            }
        }
        for x in 4 * full..width {
            o[x] = outs[(x % 4) * len + x / 4] + bias + res.map_or(0.0, |r| r[x]);
        }
    }
}

/// Asks for rows `rows` x columns `cols` of a plane of width `w` (clipped to it) to be brought
/// into cache. The next channel's rows lie a plane away, where the hardware prefetcher does not
/// look: without this, the input row loads and the output stores waited on memory (perf: ~40%
/// of the samples outside the GEMMs at 128 channels, 256x256).
#[inline(always)]
fn prefetch_rows(
    plane: *const f32,
    (h, w): (usize, usize),
    rows: std::ops::Range<isize>,
    cols: std::ops::Range<isize>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        let (c0, c1) = (
            cols.start.max(0) as usize,
            cols.end.min(w as isize).max(0) as usize,
        );
        for y in rows.start.max(0) as usize..rows.end.min(h as isize).max(0) as usize {
            for c in (c0..c1).step_by(16) {
                // SAFETY: an address inside the (h, w) plane; a prefetch reads nothing and
                // changes nothing that the program can see.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                        plane.add(y * w + c) as *const i8,
                    )
                }
            }
        }
    }
    let _ = (plane, h, w, rows, cols);
}

/// Columns x0 + 4i + c (i = 0..n1, c = 0..4) of one input row into the four phases
/// (`phases[c·n1 + i]`, n1 = phases.len() / 4), zero outside the row.
#[inline(always)]
fn split_row(src: &[f32], x0: isize, phases: &mut [f32], isa: super::simd::Isa) {
    let n1 = phases.len() / 4;
    let w = src.len() as isize;
    // Quads lo..hi lie inside the row: no checks there.
    let lo = (if x0 < 0 { (-x0 + 3) / 4 } else { 0 } as usize).min(n1);
    let hi = (((w - x0).max(0) / 4) as usize).clamp(lo, n1);
    let mut body = lo..lo;
    #[cfg(target_arch = "x86_64")]
    if isa != super::simd::Isa::Scalar && hi - lo >= 8 {
        let n = (hi - lo) / 8 * 8;
        let p = phases.as_mut_ptr();
        // SAFETY: the CPU has AVX2; quads lo..lo + n lie in `src`, and each phase has n1 >= hi
        // values.
        unsafe {
            quads::split(
                src.as_ptr().offset(x0 + 4 * lo as isize),
                n,
                [
                    p.add(lo),
                    p.add(n1 + lo),
                    p.add(2 * n1 + lo),
                    p.add(3 * n1 + lo),
                ],
            );
        }
        body = lo..lo + n;
    }
    let _ = (isa, hi);
    for i in (0..body.start).chain(body.end..n1) {
        for c in 0..4 {
            let col = x0 + (4 * i + c) as isize;
            phases[c * n1 + i] = if (0..w).contains(&col) {
                src[col as usize]
            } else {
                0.0
            };
        }
    }
}

/// As [`split_row`] on the row `src` nearest-upsampled 2x (virtual column c is `src[c / 2]`):
/// the upsampled row is never formed.
#[inline(always)]
fn split_row_up2(src: &[f32], x0: isize, phases: &mut [f32], isa: super::simd::Isa) {
    let n1 = phases.len() / 4;
    let sw = src.len() as isize;
    let w = 2 * sw;
    let mut body = 0..0;
    // Runs start at virtual column 4m - 1: quad i reads stored columns 2k - 1, 2k, 2k, 2k + 1
    // (k = m + i), inside the row for k in 1..sw / 2.
    #[cfg(target_arch = "x86_64")]
    if isa != super::simd::Isa::Scalar && x0.rem_euclid(4) == 3 {
        let m = (x0 + 1) / 4;
        let lo = (1 - m).clamp(0, n1 as isize) as usize;
        let hi = (sw / 2 - m).clamp(lo as isize, n1 as isize) as usize;
        let n = (hi - lo) / 8 * 8;
        let p = phases.as_mut_ptr();
        // SAFETY: the CPU has AVX2; stored columns 2(m + lo) - 1 .. 2(m + lo + n) lie in `src`
        // (k = m + lo >= 1, k = m + lo + n - 1 < sw / 2), each phase has n1 >= lo + n values.
        unsafe {
            quads::split_up2(
                src.as_ptr().offset(2 * (m + lo as isize)),
                n,
                [
                    p.add(lo),
                    p.add(n1 + lo),
                    p.add(2 * n1 + lo),
                    p.add(3 * n1 + lo),
                ],
            );
        }
        body = lo..lo + n;
    }
    let _ = isa;
    for i in (0..body.start).chain(body.end..n1) {
        for c in 0..4 {
            let col = x0 + (4 * i + c) as isize;
            phases[c * n1 + i] = if (0..w).contains(&col) {
                src[col as usize / 2]
            } else {
                0.0
            };
        }
    }
}

/// Four-way column (de)interleaving with AVX2 shuffles: the phase split of the input rows and
/// the output rows' scatter, which the compiler left scalar (with the row copy before the split,
/// ~20% of an F(4x4) conv at 128 channels by perf).
#[cfg(target_arch = "x86_64")]
mod quads {
    use std::arch::x86_64::*;

    /// The 4x4 transpose of each 128-bit lane: r[c] holds element c of a, b, d, e in that lane.
    #[inline(always)]
    unsafe fn transpose4(a: __m256, b: __m256, d: __m256, e: __m256) -> [__m256; 4] {
        let (t0, t1) = (_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
        let (t2, t3) = (_mm256_unpacklo_ps(d, e), _mm256_unpackhi_ps(d, e));
        [
            _mm256_shuffle_ps::<0x44>(t0, t2),
            _mm256_shuffle_ps::<0xEE>(t0, t2),
            _mm256_shuffle_ps::<0x44>(t1, t3),
            _mm256_shuffle_ps::<0xEE>(t1, t3),
        ]
    }

    /// p[c][i] = src[4i + c] for i in 0..n (a multiple of 8).
    /// #Safety: AVX2; 4n values at `src`, n at each p[c].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn split(src: *const f32, n: usize, p: [*mut f32; 4]) {
        for i in (0..n).step_by(8) {
            let s = src.add(4 * i);
            // Quads q0..q8 of 8 tiles; a lane of b holds quads k and k + 4.
            let (a0, a1) = (_mm256_loadu_ps(s), _mm256_loadu_ps(s.add(8)));
            let (a2, a3) = (_mm256_loadu_ps(s.add(16)), _mm256_loadu_ps(s.add(24)));
            let r = transpose4(
                _mm256_permute2f128_ps::<0x20>(a0, a2),
                _mm256_permute2f128_ps::<0x31>(a0, a2),
                _mm256_permute2f128_ps::<0x20>(a1, a3),
                _mm256_permute2f128_ps::<0x31>(a1, a3),
            );
            for c in 0..4 {
                _mm256_storeu_ps(p[c].add(i), r[c]);
            }
        }
    }

    /// The even and the odd elements of the 16 values at q, each in order.
    #[inline(always)]
    unsafe fn deinterleave(q: *const f32) -> (__m256, __m256) {
        let (a, b) = (_mm256_loadu_ps(q), _mm256_loadu_ps(q.add(8)));
        (
            in_order(_mm256_shuffle_ps::<0x88>(a, b)),
            in_order(_mm256_shuffle_ps::<0xDD>(a, b)),
        )
    }

    /// [v0 v1 v2 v3 | v4 v5 v6 v7] (a shuffle's [a0 a2 b0 b2 | a4 a6 b4 b6]) as
    /// [v0 v1 v4 v5 v2 v3 v6 v7].
    #[inline(always)]
    unsafe fn in_order(v: __m256) -> __m256 {
        _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(v)))
    }

    /// p[0][i] = s[2i - 1], p[1][i] = p[2][i] = s[2i], p[3][i] = s[2i + 1] for i in 0..n (a
    /// multiple of 8): the phases of a row upsampled 2x, for tiles starting at an odd virtual
    /// column.
    /// #Safety: AVX2; s[-1..2n] readable, n values at each p[c].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn split_up2(s: *const f32, n: usize, p: [*mut f32; 4]) {
        for i in (0..n).step_by(8) {
            let (even, odd) = deinterleave(s.add(2 * i));
            let (before, _) = deinterleave(s.add(2 * i).sub(1));
            _mm256_storeu_ps(p[0].add(i), before);
            _mm256_storeu_ps(p[1].add(i), even);
            _mm256_storeu_ps(p[2].add(i), even);
            _mm256_storeu_ps(p[3].add(i), odd);
        }
    }

    /// dst[4i + c] = p[c][i] + bias (+ residual[4i + c]) for i in 0..n (a multiple of 8).
    /// #Safety: AVX2; n values at each p[c], 4n at `dst` and at the residual.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn join(
        p: [*const f32; 4],
        n: usize,
        bias: f32,
        residual: Option<*const f32>,
        dst: *mut f32,
    ) {
        let b = _mm256_set1_ps(bias);
        for i in (0..n).step_by(8) {
            let v: [__m256; 4] =
                std::array::from_fn(|c| _mm256_add_ps(_mm256_loadu_ps(p[c].add(i)), b));
            // r[k] holds quads k and k + 4.
            let r = transpose4(v[0], v[1], v[2], v[3]);
            let mut q = [
                _mm256_permute2f128_ps::<0x20>(r[0], r[1]),
                _mm256_permute2f128_ps::<0x20>(r[2], r[3]),
                _mm256_permute2f128_ps::<0x31>(r[0], r[1]),
                _mm256_permute2f128_ps::<0x31>(r[2], r[3]),
            ];
            let d = dst.add(4 * i);
            if let Some(rs) = residual {
                for (k, qk) in q.iter_mut().enumerate() {
                    *qk = _mm256_add_ps(*qk, _mm256_loadu_ps(rs.add(4 * i + 8 * k)));
                }
            }
            for (k, qk) in q.iter().enumerate() {
                _mm256_storeu_ps(d.add(8 * k), *qk);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::conv2d::conv2d_forward;

    #[test]
    fn weight_transform_is_g_g_transposed() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        // 7 x 13 = 91 pairs: one whole block of 64 and a partial one.
        let (cout, cin) = (7, 13);
        let w: Vec<f32> = (0..cout * cin * 9)
            .map(|_| rng.gen_range(-1.0..1.0))
            .collect();
        let u = transform_weights(&w, cout, cin);
        let mut serial = vec![f32::NAN; 36 * cout * cin];
        transform_weights_serial(&w, cout, cin, &mut serial);
        assert!(serial == u, "the serial transform differs");
        let mut worst = 0f64;
        for p in 0..cout * cin {
            for r in 0..6 {
                for k in 0..6 {
                    let mut want = 0f64;
                    for (j, gr) in G[r].iter().enumerate() {
                        for (c, gk) in G[k].iter().enumerate() {
                            want += *gr as f64 * w[p * 9 + 3 * j + c] as f64 * *gk as f64;
                        }
                    }
                    let got = u[(r * 6 + k) * cout * cin + p] as f64;
                    worst = worst.max((got - want).abs());
                }
            }
        }
        eprintln!("U against G g Gᵀ in f64: {worst:.2e}");
        // f32 rounding of a few operations on values up to 1: measured 1.7e-8.
        assert!(worst < 2e-7, "U differs from G g Gᵀ by {worst}");
    }

    #[test]
    fn matches_direct_convolution_on_odd_shapes() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        // The threads keep their buffers from one conv to the next: fill every thread's with
        // NaNs first, larger than every case below needs; no stale value may reach an output.
        rayon::broadcast(|_| {
            SCRATCH.with_borrow_mut(|s| {
                s.fit(256, 256, 512, 64, FUSED_ROWS);
                for buf in [
                    &mut s.v,
                    &mut s.m,
                    &mut s.u,
                    &mut s.phase,
                    &mut s.horizontal,
                ] {
                    buf.fill(f32::NAN);
                }
                s.out.fill(f32::NAN);
            })
        });
        // Sizes not divisible by 4 (partial edge tiles), batch 1 and 3, channel counts that are
        // not multiples of 16, a VAE-like 128-channel layer, and blocks that start mid-image
        // (256 channels: 48 tiles per block, 100 tiles), rows wide enough for the AVX2 column
        // shuffles (8 quads at a time) with ragged ends on both sides (77 and 83 columns; 33:
        // 7 whole quads inside the row, the 8th would read past its end).
        for (n, cin, h, w, cout) in [
            (1, 6, 13, 33, 7),
            (1, 8, 35, 77, 9),
            (2, 5, 6, 83, 3),
            (1, 3, 7, 5, 4),
            (3, 17, 9, 14, 20),
            (1, 40, 16, 16, 33),
            (1, 128, 20, 24, 128),
            (2, 256, 40, 40, 64),
        ] {
            let x: Vec<f32> = (0..n * cin * h * w)
                .map(|_| rng.gen_range(-1.0..1.0))
                .collect();
            let wt: Vec<f32> = (0..cout * cin * 9)
                .map(|_| rng.gen_range(-0.3..0.3))
                .collect();
            let b: Vec<f32> = (0..cout).map(|_| rng.gen_range(-0.3..0.3)).collect();
            let res: Vec<f32> = (0..n * cout * 4 * h * w)
                .map(|_| rng.gen_range(-1.0..1.0))
                .collect();
            let u = transform_weights(&wt, cout, cin);
            for (up, residual) in [(1, true), (1, false), (2, true), (2, false)] {
                let g = ConvGeometry {
                    stride: 1,
                    pad: (1, 1, 1, 1),
                    upsample: up,
                };
                let residual = residual.then(|| &res[..n * cout * up * up * h * w]);
                let (want, _, _) =
                    conv2d_forward(&x, (n, cin, h, w), &wt, (cout, 3, 3), &b, residual, g);
                let dims = (n, cin, h, w);
                let got =
                    conv3x3_forward(&x, dims, Weights::Transformed(&u), cout, &b, residual, up);
                assert_eq!(got.len(), want.len());
                // Output channels split between tasks (as on small maps), and the weights
                // transformed by each task for its own rows, split or not: the same bits.
                let raw = Weights::Raw(&wt);
                let transformed = Weights::Transformed(&u);
                for (parts, u, name) in [(3, transformed, "U"), (1, raw, "raw"), (3, raw, "raw")] {
                    let other = forward_in_parts(&x, dims, u, cout, &b, residual, up, parts);
                    assert!(
                        other == got,
                        "{:?}: {parts} parts with {name} weights differ",
                        (cin, h, w)
                    );
                }
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                let err = want
                    .iter()
                    .zip(&got)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max)
                    / scale;
                let case = (n, cin, h, w, cout, up, residual.is_some());
                eprintln!("F(4x4, 3x3) {case:?}: {err:.2e}");
                // Measured at most 1.1e-5 (the 256-channel case); F(2x2, 3x3) gives ~1e-6.
                assert!(err < 7e-5, "{case:?}: max err {err}");
                assert!(
                    got.iter().all(|v| v.is_finite()),
                    "a stale NaN in the output"
                );
            }
        }
    }
}
