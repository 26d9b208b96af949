//! Winograd F(2x2, 3x3) convolution forward for the 3x3 stride-1 convs that dominate a VAE
//! (pad 1, optionally on a nearest-2x upsampled input): 16 multiplies per 2x2 output tile and
//! channel pair instead of 36, i.e. 2.25x fewer GEMM FLOPs than im2col.
//!
//! Per image and block of tiles: V = Bᵀ d B for every input channel and 4x4 input patch, then 16
//! GEMMs M[t] = U[t] · V[t] with U = G g Gᵀ (the transformed weights, computed once per call),
//! then Y = Aᵀ M A plus bias (and residual) written to the output. Transforms are exact rational
//! arithmetic (±1, ±1/2), so the result differs from direct convolution only by rounding.

use rayon::prelude::*;

use super::conv2d::ConvGeometry;

/// Whether a conv can run through this kernel.
pub fn supports(kh: usize, kw: usize, g: ConvGeometry) -> bool {
    kh == 3
        && kw == 3
        && g.stride == 1
        && g.pad == (1, 1, 1, 1)
        && (g.upsample == 1 || g.upsample == 2)
}

/// G (4x3) of F(2x2, 3x3).
const G2: [[f32; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];

/// U[t][co][ci] = (G g Gᵀ)[t] for the (cout, cin, 3, 3) weights: 16 matrices of cout x cin.
pub fn transform_weights(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    transform_weights_with(&G2, w, cout, cin)
}

/// U[t][co][ci] = (G g Gᵀ)[t] for the (cout, cin, 3, 3) weights and a T x 3 matrix G: T² matrices
/// of cout x cin. Done on every call (a cache would hold 16/9 or 4x the weights), so it runs in
/// parallel on blocks of 64 (co, ci) pairs, each kernel tap a contiguous array over the block
/// (the scalar per-pair version took 3.4 ms for 512 x 512 channels).
pub(crate) fn transform_weights_with<const T: usize>(
    gm: &[[f32; 3]; T],
    w: &[f32],
    cout: usize,
    cin: usize,
) -> Vec<f32> {
    let pairs = cout * cin;
    let mut u = vec![0f32; T * T * pairs];
    let ptr = OutPtr(u.as_mut_ptr());
    let isa = super::simd::isa();
    (0..pairs.div_ceil(WEIGHT_BLOCK))
        .into_par_iter()
        .for_each(|blk| {
            // SAFETY: block blk writes only pairs blk·B.. of every U[t]; the vector versions run
            // only where the CPU has their features.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                if isa >= super::simd::Isa::Avx512 {
                    return weight_block_avx512(gm, w, pairs, blk, ptr);
                }
                if isa == super::simd::Isa::Avx2 {
                    return weight_block_avx2(gm, w, pairs, blk, ptr);
                }
            }
            let _ = isa;
            unsafe { weight_block(gm, w, pairs, blk, ptr) }
        });
    u
}

const WEIGHT_BLOCK: usize = 64;

/// # Safety
/// The CPU has AVX2 and FMA; as [`weight_block`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weight_block_avx2<const T: usize>(
    gm: &[[f32; 3]; T],
    w: &[f32],
    pairs: usize,
    blk: usize,
    u: OutPtr,
) {
    weight_block(gm, w, pairs, blk, u)
}

/// # Safety
/// The CPU has AVX-512F; as [`weight_block`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn weight_block_avx512<const T: usize>(
    gm: &[[f32; 3]; T],
    w: &[f32],
    pairs: usize,
    blk: usize,
    u: OutPtr,
) {
    weight_block(gm, w, pairs, blk, u)
}

/// One block of [`transform_weights_with`].
///
/// # Safety
/// `u` holds T² x `pairs` values, and no other thread writes pairs blk·B..(blk+1)·B of them.
#[inline(always)]
unsafe fn weight_block<const T: usize>(
    gm: &[[f32; 3]; T],
    w: &[f32],
    pairs: usize,
    blk: usize,
    u: OutPtr,
) {
    const B: usize = WEIGHT_BLOCK;
    let p0 = blk * B;
    let n = B.min(pairs - p0);
    let mut g = [[0f32; B]; 9];
    for p in 0..n {
        for (k, gk) in g.iter_mut().enumerate() {
            gk[p] = w[(p0 + p) * 9 + k];
        }
    }
    // t[r][c] = (G g)[r][c] = Σ_j G[r][j] g[3j + c]
    let mut t = [[[0f32; B]; 3]; T];
    for (r, tr) in t.iter_mut().enumerate() {
        for (c, trc) in tr.iter_mut().enumerate() {
            let [a, b, d] = gm[r];
            let (g0, g1, g2) = (&g[c], &g[3 + c], &g[6 + c]);
            for p in 0..B {
                trc[p] = a * g0[p] + b * g1[p] + d * g2[p];
            }
        }
    }
    // U[r][k] = Σ_c t[r][c] G[k][c]
    let mut row = [0f32; B];
    for (r, tr) in t.iter().enumerate() {
        for (k, &[a, b, d]) in gm.iter().enumerate() {
            for p in 0..B {
                row[p] = a * tr[0][p] + b * tr[1][p] + d * tr[2][p];
            }
            let dst = std::slice::from_raw_parts_mut(u.0.add((r * T + k) * pairs + p0), n);
            dst.copy_from_slice(&row[..n]);
        }
    }
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}
impl OutPtr {
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// y = conv3x3(x) + bias (+ residual), stride 1, pad 1, on `x` upsampled `up` times (1 or 2).
/// `u` from [`transform_weights`]. Output (n, cout, oh, ow) with oh = h·up, ow = w·up.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_forward(
    x: &[f32],
    (n, cin, h, w): (usize, usize, usize, usize),
    u: &[f32],
    cout: usize,
    bias: &[f32],
    residual: Option<&[f32]>,
    up: usize,
) -> Vec<f32> {
    let (oh, ow) = (h * up, w * up);
    let (th, tw) = (oh.div_ceil(2), ow.div_ceil(2));
    let tiles = th * tw;
    // Tiles per block: the transformed block (16 x cin x tb) stays within ~1 MiB.
    let tb = ((1usize << 19) / (16 * cin))
        .clamp(32, 1024)
        .min(tiles)
        .max(1);
    let blocks = tiles.div_ceil(tb);
    let mut out = vec![0f32; n * cout * oh * ow];
    let optr = OutPtr(out.as_mut_ptr());
    let geo = Geometry {
        cin,
        cout,
        h,
        w,
        up,
        oh,
        ow,
        tw,
        tb,
        isa: super::simd::isa(),
    };
    let isa = geo.isa;
    (0..n * blocks).into_par_iter().for_each_init(
        || Scratch::new(cin, cout, tb, tw),
        |scratch, task| {
            let (b, blk) = (task / blocks, task % blocks);
            let t0 = blk * tb;
            let nt = tb.min(tiles - t0);
            let xb = &x[b * cin * h * w..][..cin * h * w];
            let ob = b * cout * oh * ow;
            let res = residual.map(|r| &r[ob..][..cout * oh * ow]);
            // SAFETY: the output holds n·cout·oh·ow values; this is image b's.
            let out_b = OutPtr(unsafe { optr.get().add(ob) });
            let job = Block {
                geo: &geo,
                t0,
                nt,
                x: xb,
                u,
                bias,
                residual: res,
            };
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
        },
    );
    out
}

/// Shapes shared by every block of one convolution.
struct Geometry {
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    up: usize,
    oh: usize,
    ow: usize,
    /// Tiles per output row.
    tw: usize,
    /// Tiles per block (the column stride of the transformed buffers).
    tb: usize,
    /// The kernel path (read once per call).
    isa: super::simd::Isa,
}

/// One image's block of `nt` tiles starting at tile `t0`.
struct Block<'a> {
    geo: &'a Geometry,
    t0: usize,
    nt: usize,
    /// The image (cin, h, w).
    x: &'a [f32],
    u: &'a [f32],
    bias: &'a [f32],
    /// The image's residual (cout, oh, ow).
    residual: Option<&'a [f32]>,
}

/// Per-thread buffers: the transformed input V (16 x cin x tb), the products M (16 x cout x tb),
/// and one tile row's worth of the input rows split into even and odd columns and their
/// horizontal transforms.
struct Scratch {
    v: Vec<f32>,
    m: Vec<f32>,
    even: Vec<f32>,
    odd: Vec<f32>,
    horizontal: Vec<f32>,
}

impl Scratch {
    fn new(cin: usize, cout: usize, tb: usize, tw: usize) -> Self {
        let seg = tw.min(tb);
        Scratch {
            v: vec![0f32; 16 * cin * tb],
            m: vec![0f32; 16 * cout * tb],
            even: vec![0f32; 4 * (seg + 1)],
            odd: vec![0f32; 4 * (seg + 1)],
            horizontal: vec![0f32; 16 * seg],
        }
    }
}

/// The block's tiles as runs within one tile row: (first column j in the block, ty, first tx,
/// run length), for `tw` tiles per row (shared with F(4x4, 3x3)).
pub(super) fn tile_runs(
    tw: usize,
    t0: usize,
    nt: usize,
) -> impl Iterator<Item = (usize, usize, usize, usize)> {
    let mut j = 0;
    std::iter::from_fn(move || {
        if j >= nt {
            return None;
        }
        let tile = t0 + j;
        let (ty, tx) = (tile / tw, tile % tw);
        let len = (tw - tx).min(nt - j);
        let run = (j, ty, tx, len);
        j += len;
        Some(run)
    })
}

/// #Safety: the CPU must support AVX2 and FMA; the body is the portable version.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2(job: &Block, s: &mut Scratch, out: OutPtr) {
    block(job, s, out)
}

/// #Safety: the CPU must support AVX-512F, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn block_avx512(job: &Block, s: &mut Scratch, out: OutPtr) {
    block(job, s, out)
}

/// Input transform, 16 GEMMs and output transform of one block. Both transforms are separable
/// (Bᵀ d B = rows then columns) and run over a whole run of tiles of one tile row at a time, as
/// elementwise operations on contiguous slices that the compiler vectorises.
#[inline(always)]
fn block(job: &Block, s: &mut Scratch, out: OutPtr) {
    let g = job.geo;
    let (cin, cout, tb) = (g.cin, g.cout, g.tb);
    for (j0, ty, tx0, len) in tile_runs(g.tw, job.t0, job.nt) {
        for ci in 0..cin {
            input_run(job, s, ci, (j0, ty, tx0, len));
        }
    }
    let nt = job.nt;
    // 16 GEMMs: M[t] (cout x nt) = U[t] (cout x cin) · V[t] (cin x nt)
    for t in 0..16 {
        // SAFETY: buffers of the stated shapes and strides.
        unsafe {
            super::tile_gemm::gemm(
                g.isa,
                (cout, cin, nt),
                job.u[t * cout * cin..].as_ptr(),
                s.v[t * cin * tb..].as_ptr(),
                tb,
                s.m[t * cout * tb..].as_mut_ptr(),
                tb,
            );
        }
    }
    for (j0, ty, tx0, len) in tile_runs(g.tw, job.t0, job.nt) {
        for co in 0..cout {
            output_run(job, &s.m, out, co, (j0, ty, tx0, len));
        }
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
    let (w, up, oh, ow) = (g.w, g.up, g.oh, g.ow);
    let plane = &job.x[ci * g.h * w..][..g.h * w];
    let n1 = len + 1;
    // The 4 input rows of the run (virtual: upsampled and zero-padded), columns 2·tx0 - 1 + 2i
    // (even) and 2·tx0 + 2i (odd), i = 0..=len.
    for r in 0..4 {
        let even = &mut s.even[r * n1..][..n1];
        let odd = &mut s.odd[r * n1..][..n1];
        let vy = (2 * ty + r) as isize - 1;
        if vy < 0 || vy >= oh as isize {
            even.fill(0.0);
            odd.fill(0.0);
            continue;
        }
        let src = &plane[(vy as usize / up) * w..][..w];
        let at = |vx: isize| {
            if vx >= 0 && vx < ow as isize {
                src[vx as usize / up]
            } else {
                0.0
            }
        };
        for (i, (e, o)) in even.iter_mut().zip(odd.iter_mut()).enumerate() {
            let vx = 2 * (tx0 + i) as isize;
            *e = at(vx - 1);
            *o = at(vx);
        }
    }
    // Horizontal: d B for every row, k = column of the 4x4 result. With d0..d3 = even[i],
    // odd[i], even[i+1], odd[i+1]: (d0 - d2, d1 + d2, d2 - d1, d1 - d3).
    for r in 0..4 {
        let e0 = &s.even[r * n1..][..len];
        let e1 = &s.even[r * n1 + 1..][..len];
        let o0 = &s.odd[r * n1..][..len];
        let o1 = &s.odd[r * n1 + 1..][..len];
        let (h01, h23) = s.horizontal[r * 4 * len..][..4 * len].split_at_mut(2 * len);
        let (h0, h1) = h01.split_at_mut(len);
        let (h2, h3) = h23.split_at_mut(len);
        for i in 0..len {
            h0[i] = e0[i] - e1[i];
            h1[i] = o0[i] + e1[i];
            h2[i] = e1[i] - o0[i];
            h3[i] = o0[i] - o1[i];
        }
    }
    // Vertical: Bᵀ (d B), rows (h0 - h2, h1 + h2, h2 - h1, h1 - h3).
    let (cin, tb) = (g.cin, g.tb);
    let hz = &s.horizontal;
    for k in 0..4 {
        let row = |r: usize| &hz[(r * 4 + k) * len..][..len];
        let (d0, d1, d2, d3) = (row(0), row(1), row(2), row(3));
        let col = |r: usize| ((r * 4 + k) * cin + ci) * tb + j0;
        let (c0, c1, c2, c3) = (col(0), col(1), col(2), col(3));
        for i in 0..len {
            s.v[c0 + i] = d0[i] - d2[i];
        }
        for i in 0..len {
            s.v[c1 + i] = d1[i] + d2[i];
        }
        for i in 0..len {
            s.v[c2 + i] = d2[i] - d1[i];
        }
        for i in 0..len {
            s.v[c3 + i] = d1[i] - d3[i];
        }
    }
}

/// Y = Aᵀ M A (2x2 per tile) plus bias and residual, for a run of tiles of output channel `co`.
#[inline(always)]
fn output_run(
    job: &Block,
    m: &[f32],
    out: OutPtr,
    co: usize,
    (j0, ty, tx0, len): (usize, usize, usize, usize),
) {
    let g = job.geo;
    let (cout, tb, oh, ow) = (g.cout, g.tb, g.oh, g.ow);
    let mrow = |r: usize, c: usize| &m[((r * 4 + c) * cout + co) * tb + j0..][..len];
    let bias = job.bias[co];
    // Output columns 2·tx0 .. 2·(tx0 + len), cut at ow (an odd width's last tile has one column).
    let x0 = 2 * tx0;
    let width = (2 * len).min(ow - x0);
    let pairs = width / 2;
    for r in 0..2 {
        let y = 2 * ty + r;
        if y >= oh {
            continue;
        }
        // Aᵀ rows: (M0 + M1 + M2, M1 - (M2 + M3)): rows a + sign·(b + c).
        let (a, b, c, sign) = if r == 0 {
            (0, 1, 2, 1.0)
        } else {
            (1, 2, 3, -1.0)
        };
        let [ma0, ma1, ma2, ma3] = [0, 1, 2, 3].map(|col| mrow(a, col));
        let [mb0, mb1, mb2, mb3] = [0, 1, 2, 3].map(|col| mrow(b, col));
        let [mc0, mc1, mc2, mc3] = [0, 1, 2, 3].map(|col| mrow(c, col));
        let base = (co * oh + y) * ow + x0;
        // SAFETY: the image's output holds cout·oh·ow values, and these `width` pixels belong
        // to this run's tiles, which no other task writes.
        let o = unsafe { std::slice::from_raw_parts_mut(out.get().add(base), width) };
        let res = job.residual.map(|rs| &rs[base..][..width]);
        let vals = |i: usize| {
            // s[col] = Aᵀ row r applied to column col; then A: (s0 + s1 + s2, s1 - s2 - s3).
            let s = |p: f32, q: f32, t: f32| p + sign * (q + t);
            let s0 = s(ma0[i], mb0[i], mc0[i]);
            let s1 = s(ma1[i], mb1[i], mc1[i]);
            let s2 = s(ma2[i], mb2[i], mc2[i]);
            let s3 = s(ma3[i], mb3[i], mc3[i]);
            (s0 + s1 + s2 + bias, s1 - s2 - s3 + bias)
        };
        match res {
            Some(res) => {
                for i in 0..pairs {
                    let (v0, v1) = vals(i);
                    o[2 * i] = v0 + res[2 * i];
                    o[2 * i + 1] = v1 + res[2 * i + 1];
                }
                if width % 2 == 1 {
                    o[width - 1] = vals(pairs).0 + res[width - 1];
                }
            }
            None => {
                for i in 0..pairs {
                    let (v0, v1) = vals(i);
                    o[2 * i] = v0;
                    o[2 * i + 1] = v1;
                }
                if width % 2 == 1 {
                    o[width - 1] = vals(pairs).0;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::conv2d::conv2d_forward;

    #[test]
    fn matches_direct_convolution_on_odd_shapes() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        // (n, cin, h, w, cout, up): odd and non-square sizes (partial edge tiles), batch 1 and 3,
        // channel counts that are not multiples of 16, the upsampling conv.
        for (n, cin, h, w, cout, up) in [
            (1, 3, 7, 5, 4, 1),
            (3, 17, 9, 12, 20, 1),
            (2, 5, 6, 7, 3, 2),
            (1, 40, 16, 16, 33, 1),
        ] {
            let x: Vec<f32> = (0..n * cin * h * w)
                .map(|_| rng.gen_range(-1.0..1.0))
                .collect();
            let wt: Vec<f32> = (0..cout * cin * 9)
                .map(|_| rng.gen_range(-0.3..0.3))
                .collect();
            let b: Vec<f32> = (0..cout).map(|_| rng.gen_range(-0.3..0.3)).collect();
            let res: Vec<f32> = (0..n * cout * h * up * w * up)
                .map(|_| rng.gen_range(-1.0..1.0))
                .collect();
            let g = ConvGeometry {
                stride: 1,
                pad: (1, 1, 1, 1),
                upsample: up,
            };
            let (want, _, _) =
                conv2d_forward(&x, (n, cin, h, w), &wt, (cout, 3, 3), &b, Some(&res), g);
            let u = transform_weights(&wt, cout, cin);
            let got = conv3x3_forward(&x, (n, cin, h, w), &u, cout, &b, Some(&res), up);
            let err = want
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-4, "{:?}: max err {err}", (n, cin, h, w, cout, up));
        }
    }
}
