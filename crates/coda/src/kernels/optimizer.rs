//! The optimizer's arithmetic in place, in one pass per parameter: AdamW's update, the EMA blend
//! and the squared norm for clipping, on contiguous f32 CPU tensors. Written as candle ops,
//! each of AdamW's ~12 steps allocated a new tensor and made its own pass over every
//! parameter (with the EMA and the clipping ~20 passes and as many fresh, page-faulting
//! buffers per update); `training::optim` keeps that form for other devices and as the
//! reference the tests compare against.

use candle_core::{CpuStorage, DType, Layout, Tensor};
use rayon::prelude::*;
use std::cell::RefCell;

/// Elements per parallel task; smaller tensors run on the calling thread.
const CHUNK: usize = 32 * 1024;

/// Run `f` on the f32 data of `t`, in place, when `t` is a contiguous f32 tensor on the CPU;
/// `Ok(None)` (and `f` not called) otherwise. Every tensor sharing `t`'s storage sees the change,
/// as with `Var::set`.
pub(crate) fn with_f32_mut<R>(
    t: &Tensor,
    f: impl FnOnce(&mut [f32]) -> R,
) -> candle_core::Result<Option<R>> {
    if !t.device().is_cpu() || t.dtype() != DType::F32 || !t.is_contiguous() {
        return Ok(None);
    }
    struct Op<F, R>(RefCell<Option<F>>, RefCell<Option<R>>);
    impl<F: FnOnce(&mut [f32]) -> R, R> candle_core::InplaceOp1 for Op<F, R> {
        fn name(&self) -> &'static str {
            "coda-in-place-f32"
        }
        fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
            let (CpuStorage::F32(d), Some((a, b))) = (s, l.contiguous_offsets()) else {
                candle_core::bail!("coda-in-place-f32: contiguous f32 only")
            };
            let f = self.0.borrow_mut().take().expect("called once");
            *self.1.borrow_mut() = Some(f(&mut d[a..b]));
            Ok(())
        }
    }
    let op = Op(RefCell::new(Some(f)), RefCell::new(None));
    t.inplace_op1(&op)?;
    Ok(op.1.into_inner())
}

/// Run `f` on the f32 data of `t` (read only) when it is a contiguous f32 CPU tensor.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if !t.device().is_cpu() || t.dtype() != DType::F32 || !t.is_contiguous() {
        return None;
    }
    let (s, l) = t.storage_and_layout();
    super::cpu_f32("coda-read-f32", &s, l).ok().map(f)
}

/// The coefficients of one AdamW update of one parameter, as f32 (the tensor form also rounds
/// its f64 scalars to the tensor's f32).
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    /// The gradient's clipping factor (1 when not clipped).
    pub grad_scale: f32,
    /// `1 - lr · weight_decay`.
    pub decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    /// `sqrt(1 - beta2^t)`.
    pub bc2_sqrt: f32,
    pub eps: f32,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f32,
}

/// One element of PyTorch's single-tensor AdamW (`torch/optim/adamw.py`), in its order:
/// `p *= decay; m = m·b1 + g·(1-b1); v = v·b2 + g²·(1-b2); p -= step · m / (sqrt(v)/bc2 + eps)`.
#[inline(always)]
fn adamw_one(s: &AdamWStep, p: &mut f32, g: f32, m: &mut f32, v: &mut f32) {
    let g = g * s.grad_scale;
    *m = *m * s.beta1 + g * (1.0 - s.beta1);
    *v = *v * s.beta2 + g * g * (1.0 - s.beta2);
    let denom = v.sqrt() / s.bc2_sqrt + s.eps;
    *p = *p * s.decay - s.step_size * (*m / denom);
}

/// AdamW on slices of equal length, in place.
pub fn adamw_slices(s: &AdamWStep, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    assert!(p.len() == g.len() && p.len() == m.len() && p.len() == v.len());
    let run = |p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]| {
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            adamw_one(s, p, g, m, v);
        }
    };
    if p.len() <= CHUNK {
        return run(p, g, m, v);
    }
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| run(p, g, m, v));
}

/// AdamW on the tensors of one parameter, in place, when all four are contiguous f32 CPU
/// tensors of the same size; `Ok(false)` (nothing changed) otherwise.
pub fn adamw_tensors(
    s: &AdamWStep,
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
) -> candle_core::Result<bool> {
    let n = p.elem_count();
    if [g, m, v].iter().any(|t| t.elem_count() != n) || !super::custom_ops(p.device()) {
        return Ok(false);
    }
    let done = with_f32(g, |g| {
        with_f32_mut(p, |p| {
            with_f32_mut(m, |m| with_f32_mut(v, |v| adamw_slices(s, p, g, m, v)))
        })
    });
    Ok(matches!(done, Some(Ok(Some(Ok(Some(Ok(Some(())))))))))
}

/// `e = e·d + w·(1-d)` in place (the EMA blend), when both are contiguous f32 CPU tensors of the
/// same size; `Ok(false)` otherwise.
pub fn ema_blend(e: &Tensor, w: &Tensor, d: f32) -> candle_core::Result<bool> {
    if e.elem_count() != w.elem_count() || !super::custom_ops(e.device()) {
        return Ok(false);
    }
    let blend = |e: &mut [f32], w: &[f32]| {
        for (e, &w) in e.iter_mut().zip(w) {
            *e = *e * d + w * (1.0 - d);
        }
    };
    let done = with_f32(w, |w| {
        with_f32_mut(e, |e| {
            if e.len() <= CHUNK {
                blend(e, w)
            } else {
                e.par_chunks_mut(CHUNK)
                    .zip(w.par_chunks(CHUNK))
                    .for_each(|(e, w)| blend(e, w))
            }
        })
    });
    Ok(matches!(done, Some(Ok(Some(())))))
}

/// The sum of squares of a contiguous f32 CPU tensor, accumulated in f64 (`None` elsewhere).
pub fn sum_squares(t: &Tensor) -> Option<f64> {
    if !super::custom_ops(t.device()) {
        return None;
    }
    let part = |x: &[f32]| x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>();
    with_f32(t, |x| {
        if x.len() <= CHUNK {
            part(x)
        } else {
            // Fixed chunks summed in order: the same value on any thread count.
            let parts: Vec<f64> = x.par_chunks(CHUNK).map(part).collect();
            parts.iter().sum()
        }
    })
}
