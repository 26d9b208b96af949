//! Fused GroupNorm (+ optional SiLU), the VAE's most frequent op.
//!
//! candle-nn's GroupNorm is a chain of a dozen tensor ops and was measured 18-84x slower than
//! PyTorch here; this is one pass for the statistics and one for the output, parallel over
//! (batch, group) blocks, which are contiguous in NCHW.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

/// Σ f(a[i], b[i]) over 16 interleaved lanes of whole 16-value chunks (then the remainder):
/// written so that the compiler keeps the lanes in one vector register (an iterator with an
/// `i & 7` lane index did not vectorise, and was most of GroupNorm's time).
#[inline(always)]
fn sum16(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut lanes = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for ((l, &u), &v) in lanes.iter_mut().zip(xa).zip(xb) {
            *l += f(u, v);
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(&u, &v)| f(u, v)).sum();
    lanes.iter().sum::<f32>() + tail
}

/// Mean and (biased) variance of a block: two passes with f64 totals over f32 partial sums of
/// 256 values, accurate to ~1e-7 relative (PyTorch accumulates similarly) and vectorisable.
#[inline(always)]
fn block_stats(x: &[f32]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x
        .chunks(256)
        .map(|c| sum16(c, c, |v, _| v) as f64)
        .sum::<f64>()
        / n;
    let m = mean as f32;
    let var = x
        .chunks(256)
        .map(|c| sum16(c, c, |v, _| (v - m) * (v - m)) as f64)
        .sum::<f64>()
        / n;
    (mean, var)
}

/// Normalise one (batch, group) block of `cpg` channels of `hw` values.
#[inline(always)]
fn normalize_block(
    o: &mut [f32],
    xi: &[f32],
    w: &[f32],
    b: &[f32],
    hw: usize,
    eps: f64,
    silu: bool,
) {
    let (mean, var) = block_stats(xi);
    let rstd = 1.0 / (var + eps).sqrt();
    for (ci, (oc, xc)) in o.chunks_mut(hw).zip(xi.chunks(hw)).enumerate() {
        let scale = (w[ci] as f64 * rstd) as f32;
        let shift = (b[ci] as f64 - mean * w[ci] as f64 * rstd) as f32;
        if silu {
            for (o, &v) in oc.iter_mut().zip(xc) {
                *o = super::simd::silu(v * scale + shift);
            }
        } else {
            for (o, &v) in oc.iter_mut().zip(xc) {
                *o = v * scale + shift;
            }
        }
    }
}

/// # Safety
/// The CPU must support AVX2 and FMA (the caller checks it); the body is the safe version.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn normalize_block_avx2(
    o: &mut [f32],
    xi: &[f32],
    w: &[f32],
    b: &[f32],
    hw: usize,
    eps: f64,
    silu: bool,
) {
    normalize_block(o, xi, w, b, hw, eps, silu)
}

/// The same with 16-lane vectors (twice the SiLU throughput of AVX2 where the CPU has AVX-512).
///
/// # Safety
/// The CPU must support AVX-512F, AVX2 and FMA (the caller checks it).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn normalize_block_avx512(
    o: &mut [f32],
    xi: &[f32],
    w: &[f32],
    b: &[f32],
    hw: usize,
    eps: f64,
    silu: bool,
) {
    normalize_block(o, xi, w, b, hw, eps, silu)
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "coda-group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let f = |s, l| super::f32_slice("coda-group-norm", s, l);
        let (x, w, b) = (f(xs, xl)?, f(ws, wl)?, f(bs, bl)?);
        let dims = xl.dims();
        let c = dims[1];
        let hw: usize = dims[2..].iter().product();
        let cpg = c / self.groups;
        let block = cpg * hw;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(block)
            .zip(x.par_chunks(block))
            .enumerate()
            .for_each(|(bg, (o, xi))| {
                let g = bg % self.groups;
                let (wg, bgc) = (&w[g * cpg..(g + 1) * cpg], &b[g * cpg..(g + 1) * cpg]);
                #[cfg(target_arch = "x86_64")]
                if super::simd::has_avx512() {
                    // SAFETY: the CPU has the features.
                    return unsafe {
                        normalize_block_avx512(o, xi, wg, bgc, hw, self.eps, self.silu)
                    };
                }
                #[cfg(target_arch = "x86_64")]
                if super::simd::has_avx2_fma() {
                    // SAFETY: the CPU has the features.
                    return unsafe {
                        normalize_block_avx2(o, xi, wg, bgc, hw, self.eps, self.silu)
                    };
                }
                normalize_block(o, xi, wg, bgc, hw, self.eps, self.silu)
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = x.dims().to_vec();
        let (n, c) = (dims[0], dims[1]);
        let (wv, bv) = (w.to_vec1::<f32>()?, b.to_vec1::<f32>()?);
        let hw = x.elem_count() / (n * c);
        let (x, grad) = (x.contiguous()?, grad.contiguous()?);
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (dx, dw, db) = group_norm_backward(
            super::cpu_f32("coda-group-norm", &xs, xl)?,
            &wv,
            &bv,
            super::cpu_f32("coda-group-norm", &gs, gl)?,
            (n, c, hw),
            self.groups,
            self.eps,
            self.silu,
        );
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, dims.as_slice(), dev)?),
            Some(Tensor::from_vec(dw, c, dev)?),
            Some(Tensor::from_vec(db, c, dev)?),
        ))
    }
}

/// One (batch, group) block of the backward pass: writes dx, returns the block's (dw, db) per
/// channel. f32 element math with f64 running sums, as the forward pass.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_block(
    dxb: &mut [f32],
    xb: &[f32],
    gb: &[f32],
    w: &[f32],
    b: &[f32],
    hw: usize,
    eps: f64,
    silu: bool,
) -> (Vec<f64>, Vec<f64>) {
    let cnt = xb.len() as f64;
    let (mean, var) = block_stats(xb);
    let m = mean as f32;
    let rstd = (1.0 / (var + eps).sqrt()) as f32;
    let cpg = w.len();
    let (mut dw, mut db) = (vec![0f64; cpg], vec![0f64; cpg]);
    let (mut sum_g, mut sum_gx) = (0f64, 0f64);
    for ci in 0..cpg {
        let (wc, bc) = (w[ci], b[ci]);
        let range = ci * hw..(ci + 1) * hw;
        let (xc, gc) = (&xb[range.clone()], &gb[range.clone()]);
        let dc = &mut dxb[range];
        // dy (through SiLU) into dx as scratch.
        for ((d, &xv), &go) in dc.iter_mut().zip(xc).zip(gc) {
            let xhat = (xv - m) * rstd;
            *d = if silu {
                let y = xhat * wc + bc;
                let sig = 1.0 / (1.0 + super::simd::exp(-y));
                go * sig * (1.0 + y * (1.0 - sig))
            } else {
                go
            };
        }
        let sdy = sum16(dc, dc, |d, _| d) as f64;
        let sdyx = sum16(dc, xc, |d, xv| d * (xv - m) * rstd) as f64;
        dw[ci] = sdyx;
        db[ci] = sdy;
        sum_g += sdy * wc as f64;
        sum_gx += sdyx * wc as f64;
        for d in dc.iter_mut() {
            *d *= wc;
        }
    }
    let (mg, mgx) = ((sum_g / cnt) as f32, (sum_gx / cnt) as f32);
    for (d, &xv) in dxb.iter_mut().zip(xb) {
        let xhat = (xv - m) * rstd;
        *d = rstd * (*d - mg - xhat * mgx);
    }
    (dw, db)
}

/// # Safety
/// The CPU must support AVX2 and FMA (the caller checks it); the body is the safe version.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn backward_block_avx2(
    dxb: &mut [f32],
    xb: &[f32],
    gb: &[f32],
    w: &[f32],
    b: &[f32],
    hw: usize,
    eps: f64,
    silu: bool,
) -> (Vec<f64>, Vec<f64>) {
    backward_block(dxb, xb, gb, w, b, hw, eps, silu)
}

/// Gradients of GroupNorm(+SiLU) with respect to input, weight and bias, given the output
/// gradient. Per (batch, group) block of N values, with x̂ = (x - μ)·rstd and g = dy·w:
/// dx = rstd·(g - mean(g) - x̂·mean(g·x̂)); dw_c = Σ dy·x̂; db_c = Σ dy; through SiLU,
/// dy = dout·σ(y)·(1 + y·(1 - σ(y))).
#[allow(clippy::too_many_arguments)]
pub fn group_norm_backward(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    dout: &[f32],
    (n, c, hw): (usize, usize, usize),
    groups: usize,
    eps: f64,
    silu: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let cpg = c / groups;
    let block = cpg * hw;
    let mut dx = vec![0f32; x.len()];
    // Per block: (dw, db) partials for its channels.
    let partials: Vec<(Vec<f64>, Vec<f64>)> = dx
        .par_chunks_mut(block)
        .zip(x.par_chunks(block).zip(dout.par_chunks(block)))
        .enumerate()
        .map(|(bg, (dxb, (xb, gb)))| {
            let g0 = (bg % groups) * cpg;
            let (wg, bgc) = (&w[g0..g0 + cpg], &b[g0..g0 + cpg]);
            #[cfg(target_arch = "x86_64")]
            if super::simd::has_avx2_fma() {
                // SAFETY: the CPU has the features.
                return unsafe { backward_block_avx2(dxb, xb, gb, wg, bgc, hw, eps, silu) };
            }
            backward_block(dxb, xb, gb, wg, bgc, hw, eps, silu)
        })
        .collect();
    let (mut dw, mut db) = (vec![0f64; c], vec![0f64; c]);
    for (bg, (pw, pb)) in partials.iter().enumerate() {
        let g0 = (bg % groups) * cpg;
        for ci in 0..cpg {
            dw[g0 + ci] += pw[ci];
            db[g0 + ci] += pb[ci];
        }
    }
    let _ = n;
    (
        dx,
        dw.into_iter().map(|v| v as f32).collect(),
        db.into_iter().map(|v| v as f32).collect(),
    )
}

/// GroupNorm over an (N, C, ...) tensor with per-channel affine weight and bias, optionally
/// followed by SiLU. Uses the fused kernel (forward and backward) for f32 tensors on the CPU,
/// and the composite version on other devices.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> candle_core::Result<Tensor> {
    let c = x.dim(1)?;
    if groups == 0 || c % groups != 0 {
        candle_core::bail!("group_norm: {c} channels not divisible into {groups} groups");
    }
    let fused = super::custom_ops(x.device()) && x.dtype() == DType::F32;
    if fused {
        let x = x.contiguous()?;
        let op = GroupNormOp { groups, eps, silu };
        if x.track_op() || weight.track_op() || bias.track_op() {
            x.apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
        } else {
            x.apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &op)
        }
    } else if x.track_op() || weight.track_op() || bias.track_op() {
        // Training off the kernels (CUDA): the same value, keeping only the input for backward.
        super::recompute::group_norm(x, weight, bias, groups, eps, silu)
    } else {
        group_norm_composite(x, weight, bias, groups, eps, silu)
    }
}

/// The same computation from candle tensor ops (differentiable, any device).
pub fn group_norm_composite(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let (n, c) = (dims[0], dims[1]);
    let xg = x.reshape((n, groups, ()))?;
    let mean = xg.mean_keepdim(2)?;
    let centred = xg.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(2)?;
    let normed = centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .reshape(dims.as_slice())?;
    let mut shape = vec![1usize; dims.len()];
    shape[1] = c;
    let y = normed
        .broadcast_mul(&weight.reshape(shape.as_slice())?)?
        .broadcast_add(&bias.reshape(shape.as_slice())?)?;
    if silu {
        candle_nn::ops::silu(&y)
    } else {
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn backward_matches_autograd_of_the_composite_version() -> candle_core::Result<()> {
        use candle_core::Var;
        let dev = Device::Cpu;
        for &(n, c, h, w, g) in &[(2, 8, 3, 5, 4), (1, 32, 4, 4, 32), (3, 6, 7, 2, 2)] {
            for silu in [false, true] {
                let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (n, c, h, w), &dev)? + 0.7)?)?;
                let wt = Var::from_tensor(&Tensor::randn(1f32, 0.5, c, &dev)?)?;
                let b = Var::from_tensor(&Tensor::randn(0f32, 0.5, c, &dev)?)?;
                let probe = Tensor::randn(0f32, 1.0, (n, c, h, w), &dev)?;
                let loss = |f: &dyn Fn() -> candle_core::Result<Tensor>| -> candle_core::Result<candle_core::backprop::GradStore> {
                    (f()? * &probe)?.sum_all()?.backward()
                };
                let ga = loss(&|| {
                    group_norm(x.as_tensor(), wt.as_tensor(), b.as_tensor(), g, 1e-6, silu)
                })?;
                let gb = loss(&|| {
                    group_norm_composite(
                        x.as_tensor(),
                        wt.as_tensor(),
                        b.as_tensor(),
                        g,
                        1e-6,
                        silu,
                    )
                })?;
                for (name, v) in [("x", &x), ("w", &wt), ("b", &b)] {
                    let (a, r) = (ga.get(v).unwrap(), gb.get(v).unwrap());
                    let err = (a - r)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    let scale = r.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
                    assert!(
                        err / scale < 1e-4,
                        "{name} {:?} silu {silu}: {err}",
                        (n, c, h, w, g)
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn backward_matches_finite_differences() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (n, c, hw, g) = (2usize, 4usize, 6usize, 2usize);
        let x: Vec<f32> = Tensor::randn(0f32, 1.5, n * c * hw, &dev)?.to_vec1()?;
        let w: Vec<f32> = Tensor::randn(1f32, 0.3, c, &dev)?.to_vec1()?;
        let b: Vec<f32> = Tensor::randn(0f32, 0.3, c, &dev)?.to_vec1()?;
        let probe: Vec<f32> = Tensor::randn(0f32, 1.0, n * c * hw, &dev)?.to_vec1()?;
        let f = |x: &[f32], w: &[f32], b: &[f32]| -> f64 {
            let t = Tensor::from_vec(x.to_vec(), (n, c, hw), &dev).unwrap();
            let y = group_norm(
                &t,
                &Tensor::new(w, &dev).unwrap(),
                &Tensor::new(b, &dev).unwrap(),
                g,
                1e-6,
                true,
            )
            .unwrap();
            y.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .zip(&probe)
                .map(|(a, p)| (*a as f64) * (*p as f64))
                .sum()
        };
        let (dx, dw, db) = group_norm_backward(&x, &w, &b, &probe, (n, c, hw), g, 1e-6, true);
        let h = 1e-2f32;
        let fd = |which: usize, i: usize| -> f64 {
            let (mut xp, mut wp, mut bp) = (x.clone(), w.clone(), b.clone());
            let (mut xm, mut wm, mut bm) = (x.clone(), w.clone(), b.clone());
            match which {
                0 => {
                    xp[i] += h;
                    xm[i] -= h;
                }
                1 => {
                    wp[i] += h;
                    wm[i] -= h;
                }
                _ => {
                    bp[i] += h;
                    bm[i] -= h;
                }
            }
            (f(&xp, &wp, &bp) - f(&xm, &wm, &bm)) / (2.0 * h as f64)
        };
        for i in [0, 7, 23, 47] {
            assert!(
                (fd(0, i) - dx[i] as f64).abs() < 2e-2,
                "dx[{i}]: {} vs {}",
                fd(0, i),
                dx[i]
            );
        }
        for i in 0..c {
            assert!(
                (fd(1, i) - dw[i] as f64).abs() < 2e-2,
                "dw[{i}]: {} vs {}",
                fd(1, i),
                dw[i]
            );
            assert!(
                (fd(2, i) - db[i] as f64).abs() < 2e-2,
                "db[{i}]: {} vs {}",
                fd(2, i),
                db[i]
            );
        }
        Ok(())
    }

    #[test]
    fn fused_matches_composite_on_odd_shapes() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for &(n, c, h, w, g) in &[(1, 32, 7, 5, 32), (3, 64, 4, 9, 32), (2, 12, 3, 3, 4)] {
            let x = (Tensor::randn(0f32, 3.0, (n, c, h, w), &dev)? + 1.5)?;
            let wt = Tensor::randn(1f32, 0.5, c, &dev)?;
            let b = Tensor::randn(0f32, 0.5, c, &dev)?;
            for silu in [false, true] {
                let a = group_norm(&x, &wt, &b, g, 1e-6, silu)?;
                let r = group_norm_composite(&x, &wt, &b, g, 1e-6, silu)?;
                let err = (a - r)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    err < 1e-5,
                    "shape {:?} silu {silu}: max err {err}",
                    (n, c, h, w)
                );
            }
        }
        Ok(())
    }
}
