//! The decoder's `Upsample2D` (nearest-2x upsampling, then a 3x3 conv with pad 1) as four 2x2
//! convs on the low-resolution input, one per output phase (the sub-pixel form of the same map).
//!
//! Output row 2i + a reads upsampled rows 2i + a - 1 ..= 2i + a + 1, which are input rows
//! (i - 1, i, i) for a = 0 and (i, i, i + 1) for a = 1: the kernel rows that read the same input
//! row can be summed beforehand, leaving 2 rows (and, by the same argument, 2 columns). Each phase
//! is then an ordinary conv with a 2x2 kernel and a one-sided zero padding, 4 taps per output
//! instead of 9: 16/36 of the FLOPs, forward and backward, and no upsampled input ever exists.
//! Exact up to the rounding of the summed weights (tested against the 9-tap conv).

use super::conv2d::ConvGeometry;
use rayon::prelude::*;

/// Whether (kernel, geometry) is the upsampling conv this module rewrites.
pub fn applies(kh: usize, kw: usize, g: ConvGeometry) -> bool {
    kh == 3
        && kw == 3
        && g == ConvGeometry {
            stride: 1,
            pad: (1, 1, 1, 1),
            upsample: 2,
        }
}

/// The 3x3 kernel rows (or columns) that phase `a` folds into its 2-tap row `t`.
fn folded(a: usize, t: usize) -> &'static [usize] {
    match (a, t) {
        (0, 0) => &[0],
        (0, _) => &[1, 2],
        (_, 0) => &[0, 1],
        _ => &[2],
    }
}

/// Geometry of phase (a, b): input rows (i - 1, i) for a = 0 (pad on top), (i, i + 1) for
/// a = 1 (pad below); the same for columns with b.
pub fn phase_geometry(a: usize, b: usize) -> ConvGeometry {
    ConvGeometry {
        stride: 1,
        pad: (1 - a, a, 1 - b, b),
        upsample: 1,
    }
}

/// The four phases' (cout, cin, 2, 2) kernels, index 2a + b.
pub fn phase_weights(w: &[f32], cout: usize, cin: usize) -> [Vec<f32>; 4] {
    std::array::from_fn(|phase| {
        let (a, b) = (phase / 2, phase % 2);
        let mut out = vec![0f32; cout * cin * 4];
        for (o, k) in out.chunks_exact_mut(4).zip(w.chunks_exact(9)) {
            for ty in 0..2 {
                for tx in 0..2 {
                    o[ty * 2 + tx] = folded(a, ty)
                        .iter()
                        .flat_map(|&ky| folded(b, tx).iter().map(move |&kx| k[ky * 3 + kx]))
                        .sum();
                }
            }
        }
        out
    })
}

/// The adjoint of [`phase_weights`]: the 3x3 kernel's gradient from the four phases' 2x2 ones.
pub fn fold_weight_grads(dwc: &[Vec<f32>; 4], cout: usize, cin: usize) -> Vec<f32> {
    let mut dw = vec![0f32; cout * cin * 9];
    for (phase, d) in dwc.iter().enumerate() {
        let (a, b) = (phase / 2, phase % 2);
        for (k, g) in dw.chunks_exact_mut(9).zip(d.chunks_exact(4)) {
            for ty in 0..2 {
                for tx in 0..2 {
                    for &ky in folded(a, ty) {
                        for &kx in folded(b, tx) {
                            k[ky * 3 + kx] += g[ty * 2 + tx];
                        }
                    }
                }
            }
        }
    }
    dw
}

/// Four (planes, h, w) phase maps into one (planes, 2h, 2w) map: out[2i + a, 2j + b] = phase
/// 2a + b at (i, j).
pub fn interleave(phases: &[Vec<f32>; 4], planes: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0f32; planes * 4 * h * w];
    out.par_chunks_mut(4 * h * w)
        .enumerate()
        .for_each(|(p, dst)| {
            for i in 0..h {
                for a in 0..2 {
                    let row = &mut dst[(2 * i + a) * 2 * w..][..2 * w];
                    let (even, odd) = (&phases[2 * a], &phases[2 * a + 1]);
                    let base = (p * h + i) * w;
                    for (j, pair) in row.chunks_exact_mut(2).enumerate() {
                        pair[0] = even[base + j];
                        pair[1] = odd[base + j];
                    }
                }
            }
        });
    out
}

/// The inverse of [`interleave`]: a (planes, 2h, 2w) map into its four (planes, h, w) phases.
pub fn deinterleave(x: &[f32], planes: usize, h: usize, w: usize) -> [Vec<f32>; 4] {
    std::array::from_fn(|phase| {
        let (a, b) = (phase / 2, phase % 2);
        let mut out = vec![0f32; planes * h * w];
        out.par_chunks_mut(h * w).enumerate().for_each(|(p, dst)| {
            let src = &x[p * 4 * h * w..][..4 * h * w];
            for i in 0..h {
                let row = &src[(2 * i + a) * 2 * w..][..2 * w];
                for (j, d) in dst[i * w..][..w].iter_mut().enumerate() {
                    *d = row[2 * j + b];
                }
            }
        });
        out
    })
}

/// conv3x3(upsample2(x), pad 1) (+ bias) over NCHW f32 for (n, cin, h, w) inputs: `conv`
/// computes one phase from its (cout, cin, 2, 2) kernel and geometry as n (cout, h, w) maps, bias
/// included (each output pixel is in exactly one phase). Returns (out, 2h, 2w).
pub fn forward(
    (n, cin, h, w): (usize, usize, usize, usize),
    weight: &[f32],
    cout: usize,
    conv: impl Fn(&[f32], ConvGeometry) -> Vec<f32>,
) -> (Vec<f32>, usize, usize) {
    let kernels = phase_weights(weight, cout, cin);
    forward_phases((n, h, w), cout, |p, g| conv(&kernels[p], g))
}

/// As [`forward`], with `conv` (phase index 2a + b, geometry) holding its phase kernels already
/// (the reduced-precision kernels keep them packed).
pub fn forward_phases(
    (n, h, w): (usize, usize, usize),
    cout: usize,
    conv: impl Fn(usize, ConvGeometry) -> Vec<f32>,
) -> (Vec<f32>, usize, usize) {
    let phases: [Vec<f32>; 4] = std::array::from_fn(|p| conv(p, phase_geometry(p / 2, p % 2)));
    (interleave(&phases, n * cout, h, w), 2 * h, 2 * w)
}

/// Gradients of [`forward`]'s conv with respect to x, the 3x3 weight and the bias, each phase's
/// by `backward` (kernel, phase dy, geometry) -> (dx, dW (cout, cin, 2, 2)); dx and dW come
/// back empty where `need` says so.
pub fn backward(
    (n, cin, h, w): (usize, usize, usize, usize),
    weight: &[f32],
    cout: usize,
    dy: &[f32],
    (need_dx, need_dw): (bool, bool),
    backward: impl Fn(&[f32], &[f32], ConvGeometry) -> (Vec<f32>, Vec<f32>),
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let kernels = phase_weights(weight, cout, cin);
    let dys = deinterleave(dy, n * cout, h, w);
    let mut dx = vec![0f32; if need_dx { n * cin * h * w } else { 0 }];
    let mut dwc: [Vec<f32>; 4] = Default::default();
    for p in 0..4 {
        let (dxp, dwp) = backward(&kernels[p], &dys[p], phase_geometry(p / 2, p % 2));
        if need_dx {
            dx.par_iter_mut().zip(dxp).for_each(|(a, v)| *a += v);
        }
        dwc[p] = dwp;
    }
    let dw = if need_dw {
        fold_weight_grads(&dwc, cout, cin)
    } else {
        Vec::new()
    };
    let db = super::conv2d::bias_grad(dy, n, cout, 4 * h * w);
    (dx, dw, db)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::conv2d::conv2d_forward;

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104729) % 2003) as f32 / 1001.5) - 1.0)
            .collect()
    }

    #[test]
    fn four_phases_equal_the_upsampled_nine_tap_conv() {
        let g = ConvGeometry {
            stride: 1,
            pad: (1, 1, 1, 1),
            upsample: 2,
        };
        for (i, &(n, cin, h, w, cout)) in [(1, 3, 5, 4, 2), (2, 17, 9, 12, 20)].iter().enumerate() {
            let x = values(n * cin * h * w, i);
            let wt = values(cout * cin * 9, i + 7);
            let b = values(cout, i + 3);
            let (reference, oh, ow) =
                conv2d_forward(&x, (n, cin, h, w), &wt, (cout, 3, 3), &b, None, g);
            let (ours, sh, sw) = forward((n, cin, h, w), &wt, cout, |k, pg| {
                conv2d_forward(&x, (n, cin, h, w), k, (cout, 2, 2), &b, None, pg).0
            });
            assert_eq!((sh, sw), (oh, ow));
            let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = reference
                .iter()
                .zip(&ours)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max)
                / scale;
            // Only the rounding of the pre-summed weights differs: measured 1.4e-7.
            assert!(err < 2e-6, "{:?}: {err}", (n, cin, h, w, cout));
        }
    }

    #[test]
    fn weight_fold_is_the_adjoint_of_the_phase_kernels() {
        let (cout, cin) = (3, 4);
        let w = values(cout * cin * 9, 1);
        let g: [Vec<f32>; 4] = std::array::from_fn(|p| values(cout * cin * 4, p + 2));
        let kernels = phase_weights(&w, cout, cin);
        let lhs: f64 = (0..4)
            .map(|p| {
                kernels[p]
                    .iter()
                    .zip(&g[p])
                    .map(|(a, b)| (*a as f64) * (*b as f64))
                    .sum::<f64>()
            })
            .sum();
        let rhs: f64 = w
            .iter()
            .zip(fold_weight_grads(&g, cout, cin))
            .map(|(a, b)| (*a as f64) * (b as f64))
            .sum();
        assert!((lhs - rhs).abs() < 1e-5 * lhs.abs().max(1.0), "{lhs} {rhs}");
    }

    #[test]
    fn deinterleave_inverts_interleave() {
        let (planes, h, w) = (3, 4, 5);
        let x = values(planes * 4 * h * w, 9);
        let phases = deinterleave(&x, planes, h, w);
        assert_eq!(interleave(&phases, planes, h, w), x);
        // Phase (1, 0) holds the odd rows' even columns.
        assert_eq!(phases[2][0], x[2 * w]);
        assert_eq!(phases[2][1], x[2 * w + 2]);
    }
}
