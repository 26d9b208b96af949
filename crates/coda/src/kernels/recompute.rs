//! Device-generic ops with a hand-written backward, for the paths that run as candle ops (CUDA,
//! or the CPU with `CODA_GENERIC_OPS=1`).
//!
//! Candle's autograd keeps every intermediate of a composite op alive until the backward pass: a
//! composite GroupNorm+SiLU holds about six tensors of its input's size where our CPU kernel
//! holds one. Here the value is computed without a graph (intermediates freed at once), placed on
//! the device by a custom op that keeps only its inputs, and the backward recomputes what it
//! needs from them with candle ops on the same device.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};

type Backward3 =
    dyn Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<[Option<Tensor>; 3]> + Send + Sync;

/// An op whose value is `value` and whose backward is `backward(a, b, c, grad)`. The graph keeps
/// the op: the value is taken out by the forward pass, so that it is not held twice.
struct Attached3 {
    name: &'static str,
    value: std::sync::Mutex<Option<Tensor>>,
    backward: Box<Backward3>,
}

impl Attached3 {
    fn take_value(&self) -> Result<Tensor> {
        self.value
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{}: poisoned", self.name)))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: forward ran twice", self.name)))
    }
}

impl CustomOp3 for Attached3 {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let value = self.take_value()?;
        let (s, l) = value.storage_and_layout();
        match &*s {
            Storage::Cpu(c) => Ok((
                CpuStorage::F32(crate::kernels::f32_slice(self.name, c, l)?.to_vec()),
                value.shape().clone(),
            )),
            _ => candle_core::bail!("{}: value and inputs on different devices", self.name),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::cuda_backend::CudaStorage,
        _: &Layout,
        _: &candle_core::cuda_backend::CudaStorage,
        _: &Layout,
        _: &candle_core::cuda_backend::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::cuda_backend::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let value = self.take_value()?;
        let (s, l) = value.storage_and_layout();
        match &*s {
            // The value is contiguous from offset 0 (see `attach3`), so a clone is exact.
            Storage::Cuda(c) => Ok((c.try_clone(l)?, value.shape().clone())),
            _ => candle_core::bail!("{}: value and inputs on different devices", self.name),
        }
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [ga, gb, gc] = (self.backward)(&a.detach(), &b.detach(), &c.detach(), &grad.detach())?;
        Ok((ga, gb, gc))
    }
}

/// `value` (computed from a, b, c without a graph) as the output of an op on a, b, c whose
/// backward is `backward`. Only a, b and c are kept for the backward pass.
pub fn attach3(
    name: &'static str,
    value: Tensor,
    (a, b, c): (&Tensor, &Tensor, &Tensor),
    backward: impl Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<[Option<Tensor>; 3]>
        + Send
        + Sync
        + 'static,
) -> Result<Tensor> {
    let value = value.detach().contiguous()?;
    // A fresh contiguous buffer from offset 0, so that its storage is exactly the value.
    let value = if value.layout().start_offset() == 0 {
        value
    } else {
        value.copy()?
    };
    a.apply_op3(
        b,
        c,
        Attached3 {
            name,
            value: std::sync::Mutex::new(Some(value)),
            backward: Box::new(backward),
        },
    )
}

/// GroupNorm (+ SiLU) of x (N, C, ...) with a recomputing backward: the value of
/// [`group_norm_composite`](super::group_norm_composite), keeping only x, weight and bias.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let value = super::group_norm_composite(
        &x.detach(),
        &weight.detach(),
        &bias.detach(),
        groups,
        eps,
        silu,
    )?;
    attach3(
        "coda-group-norm-recompute",
        value,
        (x, weight, bias),
        move |x, w, b, g| {
            let [dx, dw, db] = group_norm_backward(x, w, b, g, groups, eps, silu)?;
            Ok([Some(dx), Some(dw), Some(db)])
        },
    )
}

/// Gradients of GroupNorm (+ SiLU) from the input and the output gradient.
fn group_norm_backward(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    grad: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<[Tensor; 3]> {
    let dims = x.dims().to_vec();
    let (n, c) = (dims[0], dims[1]);
    let mut cshape = vec![1usize; dims.len()];
    cshape[1] = c;
    let w = weight.reshape(cshape.as_slice())?;
    let xg = x.reshape((n, groups, ()))?;
    let mean = xg.mean_keepdim(2)?;
    let centred = xg.broadcast_sub(&mean)?;
    let rstd = (centred.sqr()?.mean_keepdim(2)? + eps)?.sqrt()?.recip()?;
    let xhat = centred.broadcast_mul(&rstd)?.reshape(dims.as_slice())?;
    drop(centred);
    // The gradient at the affine output y = xhat·w + b (through SiLU: s·(1 + y·(1 − s))).
    let g = if silu {
        let y = xhat
            .broadcast_mul(&w)?
            .broadcast_add(&bias.reshape(cshape.as_slice())?)?;
        let s = candle_nn::ops::sigmoid(&y)?;
        let ds = (&s * ((&y * (1.0 - &s)?)? + 1.0)?)?;
        (grad * ds)?
    } else {
        grad.clone()
    };
    let reduce = |t: &Tensor| -> Result<Tensor> {
        // Sum over every axis but the channels.
        let t = t.transpose(0, 1)?.contiguous()?.reshape((c, ()))?;
        t.sum(1)
    };
    let dw = reduce(&(&g * &xhat)?)?;
    let db = reduce(&g)?;
    // dx = rstd · (ĝ − mean(ĝ) − x̂ · mean(ĝ · x̂)) per group, with ĝ = g · w.
    let gh = g.broadcast_mul(&w)?.reshape((n, groups, ()))?;
    let xh = xhat.reshape((n, groups, ()))?;
    let m1 = gh.mean_keepdim(2)?;
    let m2 = (&gh * &xh)?.mean_keepdim(2)?;
    let dx = gh
        .broadcast_sub(&m1)?
        .sub(&xh.broadcast_mul(&m2)?)?
        .broadcast_mul(&rstd)?
        .reshape(dims.as_slice())?;
    Ok([dx, dw, db])
}

/// A convolution of any [`ConvGeometry`](super::ConvGeometry) with a backward that computes only
/// the gradients its inputs need (frozen VAE weights get none, where candle's autograd would
/// compute a weight gradient for every conv) and keeps only x, weight and bias: no nearest-2x
/// upsampled or padded copy of the input, no separate pre-bias output.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    g: super::ConvGeometry,
) -> Result<Tensor> {
    let value = super::conv2d_composite(&x.detach(), &weight.detach(), &bias.detach(), g)?;
    let need = [x.track_op(), weight.track_op(), bias.track_op()];
    attach3(
        "coda-conv2d-recompute",
        value,
        (x, weight, bias),
        move |x, w, _b, grad| conv2d_backward(x, w, grad, g, need),
    )
}

/// The conv's actual input (after upsampling and explicit asymmetric padding) and the padding
/// passed to candle's conv, as [`conv2d_composite`](super::conv2d_composite) builds them.
fn conv_input(x: &Tensor, g: super::ConvGeometry) -> Result<(Tensor, usize)> {
    let mut x = x.clone();
    if g.upsample > 1 {
        let (_, _, h, w) = x.dims4()?;
        x = x.upsample_nearest2d(h * g.upsample, w * g.upsample)?;
    }
    let (t, b, l, r) = g.pad;
    if t == b && l == r && t == l {
        Ok((x, t))
    } else {
        Ok((x.pad_with_zeros(2, t, b)?.pad_with_zeros(3, l, r)?, 0))
    }
}

fn conv2d_backward(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    g: super::ConvGeometry,
    [need_x, need_w, need_b]: [bool; 3],
) -> Result<[Option<Tensor>; 3]> {
    let (xin, padding) = conv_input(x, g)?;
    let (_, _, hi, wi) = xin.dims4()?;
    let dx = if need_x {
        // The full transposed conv covers the padded rows the windows reached; rows past the
        // last window have zero gradient. Then the conv's own padding is cropped (per axis: one
        // `output_padding` for both, as candle's backward uses, is wrong when their parity differs).
        let gx = grad.conv_transpose2d(w, 0, 0, g.stride, 1)?;
        let (_, _, gh, gw) = gx.dims4()?;
        let (ph, pw) = (hi + 2 * padding, wi + 2 * padding);
        let gx = gx
            .pad_with_zeros(2, 0, ph.saturating_sub(gh))?
            .pad_with_zeros(3, 0, pw.saturating_sub(gw))?
            .narrow(2, padding, hi)?
            .narrow(3, padding, wi)?;
        // Adjoint of the explicit padding, then of nearest upsampling (sum over each block).
        let (t, b, l, r) = g.pad;
        let gx = if padding == 0 && (t, b, l, r) != (0, 0, 0, 0) {
            gx.narrow(2, t, hi - t - b)?.narrow(3, l, wi - l - r)?
        } else {
            gx
        };
        let gx = if g.upsample > 1 {
            let (n, c, h, w) = x.dims4()?;
            let u = g.upsample;
            gx.reshape((n, c, h, u, w, u))?.sum(5)?.sum(3)?
        } else {
            gx
        };
        Some(gx)
    } else {
        None
    };
    let dw = if need_w {
        // As candle's own conv backward: the input correlated with the output gradient, the
        // stride acting as a dilation.
        let (_, _, kh, kw) = w.dims4()?;
        let gw = xin
            .transpose(0, 1)?
            .conv2d(&grad.transpose(0, 1)?, padding, 1, g.stride, 1)?
            .transpose(0, 1)?;
        Some(gw.narrow(2, 0, kh)?.narrow(3, 0, kw)?.contiguous()?)
    } else {
        None
    };
    let db = if need_b {
        Some(grad.sum(3)?.sum(2)?.sum(0)?)
    } else {
        None
    };
    Ok([dx, dw, db])
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// f's value and the gradients of sum(f · probe) with respect to `vars`.
    fn value_and_gradients(
        f: &dyn Fn() -> Result<Tensor>,
        probe: &Tensor,
        vars: [&Var; 3],
    ) -> Result<Vec<Tensor>> {
        let y = f()?;
        let gr = (&y * probe)?.sum_all()?.backward()?;
        let mut out = vec![y];
        for v in vars {
            out.push(gr.get(v.as_tensor()).expect("a gradient").clone());
        }
        Ok(out)
    }

    #[test]
    fn conv_gradients_match_the_composite_autograd() -> Result<()> {
        use super::super::ConvGeometry;
        let dev = Device::Cpu;
        let down = ConvGeometry {
            stride: 2,
            pad: (0, 1, 0, 1),
            upsample: 1,
        };
        let up = ConvGeometry {
            stride: 1,
            pad: (1, 1, 1, 1),
            upsample: 2,
        };
        let cases = [
            (2, 3, 9, 11, 5, 3, ConvGeometry::same(1, 1)),
            (1, 4, 8, 6, 3, 1, ConvGeometry::same(1, 0)),
            (2, 6, 10, 12, 5, 3, down),
            (1, 3, 7, 9, 4, 3, down),
            (1, 4, 5, 6, 3, 3, up),
            (1, 2, 9, 9, 3, 3, ConvGeometry::same(2, 1)),
        ];
        for &(n, ci, h, w, co, k, g) in &cases {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, ci, h, w), &dev)?)?;
            let wt = Var::from_tensor(&Tensor::randn(0f32, 0.3, (co, ci, k, k), &dev)?)?;
            let bs = Var::from_tensor(&Tensor::randn(0f32, 0.3, co, &dev)?)?;
            let shape =
                super::super::conv2d_composite(x.as_tensor(), wt.as_tensor(), bs.as_tensor(), g)?;
            let probe = Tensor::randn(0f32, 1.0, shape.shape(), &dev)?;
            let run =
                |f: &dyn Fn() -> Result<Tensor>| value_and_gradients(f, &probe, [&x, &wt, &bs]);
            let ours = run(&|| conv2d(x.as_tensor(), wt.as_tensor(), bs.as_tensor(), g))?;
            let want = run(&|| {
                super::super::conv2d_composite(x.as_tensor(), wt.as_tensor(), bs.as_tensor(), g)
            })?;
            for (i, (a, b)) in ours.iter().zip(&want).enumerate() {
                assert_eq!(a.dims(), b.dims(), "{g:?}: output {i}");
                let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-3);
                let err = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
                assert!(
                    err < 3e-6,
                    "{n}x{ci}x{h}x{w} k{k} {g:?}: output {i} off by {err}"
                );
            }
        }
        // Height and width of different parity at stride 2, where candle's own conv backward fails
        // (one output_padding for both axes): the loss is linear in x, so a unit step of one
        // input changes it by exactly that input's gradient.
        let g = ConvGeometry::same(2, 1);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 2, 9, 8), &dev)?)?;
        let wt = Tensor::randn(0f32, 0.3, (3, 2, 3, 3), &dev)?;
        let bs = Tensor::zeros(3, candle_core::DType::F32, &dev)?;
        let probe = Tensor::randn(0f32, 1.0, (1, 3, 5, 4), &dev)?;
        let loss = |x: &Tensor| -> Result<f32> {
            (super::super::conv2d_composite(x, &wt, &bs, g)? * &probe)?
                .sum_all()?
                .to_scalar::<f32>()
        };
        let gx = (conv2d(x.as_tensor(), &wt, &bs, g)? * &probe)?
            .sum_all()?
            .backward()?;
        let gx = gx
            .get(x.as_tensor())
            .expect("a gradient")
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(gx.len(), 2 * 9 * 8);
        let base = loss(x.as_tensor())?;
        for i in [0, 7, 8 * 8, 71, 143] {
            let mut e = vec![0f32; 144];
            e[i] = 1.0;
            let step = Tensor::from_vec(e, (1, 2, 9, 8), &dev)?;
            let d = loss(&(x.as_tensor() + step)?)? - base;
            assert!((d - gx[i]).abs() < 1e-4, "input {i}: {d} vs {}", gx[i]);
        }
        // A frozen weight gets no gradient and the input's is unchanged.
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 2, 5, 5), &dev)?)?;
        let wt = Tensor::randn(0f32, 0.3, (3, 2, 3, 3), &dev)?;
        let bs = Tensor::zeros(3, candle_core::DType::F32, &dev)?;
        let gr = conv2d(x.as_tensor(), &wt, &bs, ConvGeometry::same(1, 1))?
            .sum_all()?
            .backward()?;
        assert!(gr.get(&wt).is_none() && gr.get(x.as_tensor()).is_some());
        Ok(())
    }

    #[test]
    fn group_norm_gradients_match_the_composite_autograd() -> Result<()> {
        let dev = Device::Cpu;
        for &(n, c, h, w, g) in &[(2, 8, 3, 5, 4), (1, 32, 4, 4, 32), (3, 6, 7, 2, 2)] {
            for silu in [false, true] {
                let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (n, c, h, w), &dev)? + 0.7)?)?;
                let wt = Var::from_tensor(&Tensor::randn(1f32, 0.3, c, &dev)?)?;
                let bs = Var::from_tensor(&Tensor::randn(0f32, 0.3, c, &dev)?)?;
                let probe = Tensor::randn(0f32, 1.0, (n, c, h, w), &dev)?;
                let run =
                    |f: &dyn Fn() -> Result<Tensor>| value_and_gradients(f, &probe, [&x, &wt, &bs]);
                let ours = run(&|| {
                    group_norm(x.as_tensor(), wt.as_tensor(), bs.as_tensor(), g, 1e-6, silu)
                })?;
                let want = run(&|| {
                    super::super::group_norm_composite(
                        x.as_tensor(),
                        wt.as_tensor(),
                        bs.as_tensor(),
                        g,
                        1e-6,
                        silu,
                    )
                })?;
                for (i, (a, b)) in ours.iter().zip(&want).enumerate() {
                    let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-3);
                    let err = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
                    // Measured: <= 3e-7 relative (f32 summation order).
                    assert!(
                        err < 3e-6,
                        "{n}x{c}x{h}x{w} g{g} silu {silu}: output {i} off by {err}"
                    );
                }
            }
        }
        Ok(())
    }
}
