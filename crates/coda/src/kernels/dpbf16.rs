//! The bf16 precision's convolution forward on CPUs with AVX512_BF16 but no AMX (AMD Zen 4 and
//! later; Intel Cooper Lake): `vdpbf16ps` multiplies 16 pairs of bf16 values and adds each
//! pair's two products to an f32 lane, twice the multiply-adds of an f32 FMA per instruction.
//!
//! The same implicit GEMM as [`super::amx`] and the same packed input (bf16 channel pairs of one
//! pixel as a u32; rows of (channel pair, column phase, column)), so padding, stride 2 and
//! nearest-2x upsampling come for free. A micro-tile is `MR` output channels x `NR` segments of
//! 16 consecutive output pixels of one row: per tap and input-channel pair it loads `NR` vectors
//! of 16 pixel pairs, broadcasts each channel's weight pair, and issues `MR x NR` dot products
//! into registers. Outputs are f32, as on AMX: only the operands are rounded to bf16.

use super::amx::{pack_input, to_bf16, Plan};
use super::conv2d::ConvGeometry;
use super::direct::{run_images, walk, MR, NR};
use rayon::prelude::*;

/// Whether this path runs: the CPU has AVX512_BF16 and the `CODA_CPU_ISA` cap allows it.
pub fn available() -> bool {
    super::simd::isa() >= super::simd::Isa::Avx512Bf16
}

/// A conv's weights (cout, cin, kh, kw) as bf16 pairs of input channels: per block of `MR`
/// output channels, per tap, per input-channel pair, `MR` u32 (zero beyond cout and cin).
pub fn pack_weights(w: &[f32], (cout, cin, kh, kw): (usize, usize, usize, usize)) -> Vec<u32> {
    let taps = kh * kw;
    let kp = cin.div_ceil(2);
    let block = taps * kp * MR;
    let mut out = vec![0u32; cout.div_ceil(MR) * block];
    out.par_chunks_mut(block).enumerate().for_each(|(b, dst)| {
        for r in 0..MR.min(cout - b * MR) {
            let co = b * MR + r;
            for tap in 0..taps {
                for pr in 0..kp {
                    let at = |ci: usize| {
                        if ci < cin {
                            w[(co * cin + ci) * taps + tap]
                        } else {
                            0.0
                        }
                    };
                    dst[(tap * kp + pr) * MR + r] =
                        to_bf16(at(2 * pr)) as u32 | (to_bf16(at(2 * pr + 1)) as u32) << 16;
                }
            }
        }
    });
    out
}

/// As [`super::conv2d::conv2d_forward`] with bf16 operands and f32 sums on AVX512_BF16.
/// `packed`: the weights already packed by [`pack_weights`] (a model conv keeps them), or None.
/// Callers check [`available`] first.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_forward(
    x: &[f32],
    (n, cin, h, w): (usize, usize, usize, usize),
    weight: &[f32],
    (cout, kh, kw): (usize, usize, usize),
    bias: &[f32],
    residual: Option<&[f32]>,
    g: ConvGeometry,
    packed: Option<&[u32]>,
) -> (Vec<f32>, usize, usize) {
    assert!(
        available(),
        "vdpbf16ps conv called on a CPU without AVX512_BF16"
    );
    let p = Plan::new((cin, h, w), (cout, kh, kw), g);
    let (oh, ow) = (p.oh, p.ow);
    let pixels = oh * ow;
    let s = g.stride;
    let taps = kh * kw;
    let kp = cin.div_ceil(2);
    let fresh;
    let a: &[u32] = match packed {
        Some(pw) if pw.len() == cout.div_ceil(MR) * taps * kp * MR => pw,
        _ => {
            fresh = pack_weights(weight, (cout, cin, kh, kw));
            &fresh
        }
    };
    let mut out = vec![0f32; n * cout * pixels];
    // The packed input stores cp / 2 channel pairs per row; the products run over the kp real ones.
    let (tap_off, row_stride, pstride) = walk((kh, kw), p.cp / 2, s, p.wq);
    let k = (&tap_off[..], kp, pstride);
    for b in 0..n {
        let input = pack_input(&x[b * cin * h * w..(b + 1) * cin * h * w], &p, false);
        let img = b * cout * pixels;
        let res = residual.map(|r| &r[img..img + cout * pixels]);
        let dst = &mut out[img..img + cout * pixels];
        run_images(
            dst,
            (oh, ow),
            (&input.hi, 1, 0),
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

/// One micro-tile: out[m][seg pixels] += Σ_tap Σ_pair w[m] · x, for `rows` <= MR channels.
///
/// # Safety
/// The CPU has AVX512_BF16; `a` holds taps x kp x MR u32; every segment's input offset plus
/// any tap offset plus kp pair strides plus 16 lies inside `input`; `out` rows (pixels apart)
/// hold the segments' pixels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn micro(
    a: *const u32,
    input: &[u32],
    seg: &[(usize, usize, usize); NR],
    (tap_off, kp, pstride): (&[usize], usize, usize),
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
        let mut bp: [*const u32; NR] = std::array::from_fn(|j| base.add(seg[j].2 + t));
        for _ in 0..kp {
            let bv: [__m512bh; NR] =
                std::array::from_fn(|j| std::mem::transmute(_mm512_loadu_si512(bp[j] as *const _)));
            for (m, row) in acc.iter_mut().enumerate() {
                let wv: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(m) as i32));
                for (a, b) in row.iter_mut().zip(&bv) {
                    *a = _mm512_dpbf16_ps(*a, wv, *b);
                }
            }
            ap = ap.add(MR);
            for p in bp.iter_mut() {
                *p = p.add(pstride);
            }
        }
    }
    for (m, row) in acc.iter().enumerate().take(rows) {
        for (j, a) in row.iter().enumerate() {
            _mm512_mask_storeu_ps(out.add(m * pixels + seg[j].0), masks[j], *a);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn micro(
    _: *const u32,
    _: &[u32],
    _: &[(usize, usize, usize); NR],
    _: (&[usize], usize, usize),
    _: *mut f32,
    _: usize,
    _: usize,
) {
    unreachable!("AVX512_BF16 is x86-64 only")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::amx::tests::{values, CASES};
    use super::*;

    /// Whether `what` cannot run here: says so loudly, and fails where CODA_REQUIRE_BF16 says the
    /// CPU must have the instructions.
    pub(crate) fn skipped(what: &str) -> bool {
        if available() {
            return false;
        }
        let msg = format!("SKIP {what}: this CPU has no AVX512_BF16 (or CODA_CPU_ISA caps it)");
        println!("{msg}");
        eprintln!("{msg}");
        assert!(
            std::env::var("CODA_REQUIRE_BF16").is_err(),
            "CODA_REQUIRE_BF16 is set but the CPU lacks AVX512_BF16"
        );
        true
    }

    /// Every geometry of the AMX tests (odd channel counts, stride 2, upsampling, 1x1, batch 3,
    /// ragged rows): operands exact in bf16 give the f32 result up to summation order; others
    /// stay within bf16 rounding of each product (2^-8 relative to Σ|w||x|).
    #[test]
    fn bf16_conv_matches_f32_within_bf16_rounding() {
        if skipped("dpbf16 conv") {
            return;
        }
        let conv = super::super::conv2d::conv2d_forward;
        for (i, &(n, cin, h, w, cout, kh, kw, g)) in CASES.iter().enumerate() {
            for exact in [true, false] {
                let x = values(n * cin * h * w, i, exact);
                let wt = values(cout * cin * kh * kw, i + 17, exact);
                let bias = values(cout, i + 5, false);
                let (oh, ow) = g.output_size(h, w, kh, kw);
                let res = values(n * cout * oh * ow, i + 9, false);
                let (dims, wd) = ((n, cin, h, w), (cout, kh, kw));
                let (want, _, _) = conv(&x, dims, &wt, wd, &bias, Some(&res), g);
                let (got, goh, gow) = conv2d_forward(&x, dims, &wt, wd, &bias, Some(&res), g, None);
                assert_eq!((goh, gow), (oh, ow));
                let pw = pack_weights(&wt, (cout, cin, kh, kw));
                let (again, _, _) =
                    conv2d_forward(&x, dims, &wt, wd, &bias, Some(&res), g, Some(&pw));
                assert_eq!(got, again, "case {i}: prepacked weights");
                let ax: Vec<f32> = x.iter().map(|v| v.abs()).collect();
                let aw: Vec<f32> = wt.iter().map(|v| v.abs()).collect();
                let zero = vec![0f32; cout];
                let (mag, _, _) = conv(&ax, dims, &aw, wd, &zero, None, g);
                let tol = if exact { 1e-6 } else { 1.0 / 128.0 };
                let mut worst = 0f32;
                for (j, ((a, b), m)) in got.iter().zip(&want).zip(&mag).enumerate() {
                    let e = (a - b).abs() / (m + 1e-3);
                    worst = worst.max(e);
                    assert!(
                        e <= tol,
                        "case {i} exact={exact} at {j}: {a} vs {b} (scale {m})"
                    );
                }
                println!("case {i} exact={exact}: worst error / Σ|w||x| = {worst:.2e}");
            }
        }
    }

    /// The upsampling conv as four sub-pixel phases in bf16 (`conv2d::dpbf16_forward`, as a model
    /// conv runs it): within bf16 rounding of the f32 nine-tap conv on the upsampled input (each
    /// phase weight, a sum of up to four taps, is rounded once: 2^-9 of Σ|w| of its taps, the
    /// input 2^-9), and the cached phase kernels give the same result as packing on the call.
    #[test]
    fn bf16_subpixel_upsampling_conv_matches_f32_within_bf16_rounding() {
        if skipped("dpbf16 sub-pixel conv") {
            return;
        }
        use super::super::amx::Packed;
        use super::super::subpixel::phase_weights;
        let g = ConvGeometry {
            stride: 1,
            pad: (1, 1, 1, 1),
            upsample: 2,
        };
        let conv = super::super::conv2d::conv2d_forward;
        for (i, &(n, cin, h, w, cout)) in [(1, 3, 5, 7, 2), (2, 37, 9, 21, 40), (1, 64, 16, 16, 64)]
            .iter()
            .enumerate()
        {
            let x = values(n * cin * h * w, i, false);
            let wt = values(cout * cin * 9, i + 17, false);
            let bias = values(cout, i + 5, false);
            let (dims, wd) = ((n, cin, h, w), (cout, 3, 3));
            let (want, oh, ow) = conv(&x, dims, &wt, wd, &bias, None, g);
            let f = super::super::conv2d::dpbf16_forward;
            let (got, goh, gow) = f(&x, dims, &wt, wd, &bias, None, g, None);
            assert_eq!((goh, gow), (oh, ow));
            let k = phase_weights(&wt, cout, cin);
            let packed = Packed::PhasePairs(std::array::from_fn(|p| {
                pack_weights(&k[p], (cout, cin, 2, 2))
            }));
            let (again, _, _) = f(&x, dims, &wt, wd, &bias, None, g, Some(&packed));
            assert_eq!(got, again, "case {i}: cached phase kernels");
            let ax: Vec<f32> = x.iter().map(|v| v.abs()).collect();
            let aw: Vec<f32> = wt.iter().map(|v| v.abs()).collect();
            let zero = vec![0f32; cout];
            let (mag, _, _) = conv(&ax, dims, &aw, wd, &zero, None, g);
            let mut worst = 0f32;
            for (j, ((a, b), m)) in got.iter().zip(&want).zip(&mag).enumerate() {
                let e = (a - b).abs() / (m + 1e-3);
                worst = worst.max(e);
                assert!(e <= 1.0 / 128.0, "case {i} at {j}: {a} vs {b} (scale {m})");
            }
            println!("sub-pixel case {i}: worst error / Σ|w||x| = {worst:.2e}");
        }
    }
}
