//! CODA's training-time soft assignment without keeping (N, V) tensors for the backward pass.
//!
//! Per scale the reference builds logits = q kᵀ (N x V), softmax(logits) for the straight-through
//! estimator, and softmax(logits / τ) with its log for the entropy loss; autograd keeps about fifteen
//! such N x V tensors per scale until the backward pass (a `flux-65536` step at batch 1: 18 GB).
//! These two ops keep only their inputs (queries, keys, values) and recompute the logits row chunk
//! by row chunk in the backward pass, so memory is O(chunk · V) whatever the number of scales.
//!
//! - [`SoftCodes`]: the straight-through term `p @ E_v − sg(p) @ E_v` (value 0); its backward
//!   is the gradient that flows through softmax(logits) to queries and keys.
//! - [`Entropy`]: the entropy loss `H_sample − H_avg` of softmax(logits / τ), with the reference's
//!   eps in log(p̄ + 1e-5), and its analytic gradient.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

/// Rows of logits materialised at a time.
const ROW_CHUNK: usize = 256;

fn tensor(s: &CpuStorage, l: &Layout) -> Result<Tensor> {
    let data = crate::kernels::f32_slice("coda-soft-assign", s, l)?;
    Tensor::from_slice(data, l.dims(), &candle_core::Device::Cpu)
}

/// Row-wise softmax and log-softmax of a chunk of logits.
fn softmax_rows(logits: &Tensor) -> Result<(Tensor, Tensor)> {
    let shifted = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?)?;
    let e = shifted.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok((e.broadcast_div(&s)?, shifted.broadcast_sub(&s.log()?)?))
}

/// dQ and dK from dlogits, chunk by chunk: dQ_chunk = dl · K, dK += dlᵀ · Q_chunk.
fn chunked_backward(
    q: &Tensor,
    k: &Tensor,
    mut dlogits: impl FnMut(usize, usize, &Tensor) -> Result<Tensor>,
) -> Result<(Tensor, Tensor)> {
    let n = q.dim(0)?;
    let mut dq = Vec::new();
    let mut dk = k.zeros_like()?;
    let mut r0 = 0;
    while r0 < n {
        let len = ROW_CHUNK.min(n - r0);
        let qc = q.narrow(0, r0, len)?;
        let logits = qc.matmul(&k.t()?)?;
        let dl = dlogits(r0, len, &logits)?;
        dq.push(dl.matmul(k)?);
        dk = (dk + dl.t()?.matmul(&qc)?)?;
        r0 += len;
    }
    Ok((Tensor::cat(&dq, 0)?, dk))
}

/// Value: zeros (N, C). Gradient: through p = softmax(q kᵀ) with the value table held constant.
pub struct SoftCodes;

impl CustomOp3 for SoftCodes {
    fn name(&self) -> &'static str {
        "coda-soft-codes"
    }

    fn cpu_fwd(
        &self,
        _q: &CpuStorage,
        ql: &Layout,
        _k: &CpuStorage,
        _kl: &Layout,
        _v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c) = (ql.dims()[0], vl.dims()[1]);
        Ok((CpuStorage::F32(vec![0.0; n * c]), Shape::from((n, c))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        values: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, values, grad) = (q.detach(), k.detach(), values.detach(), grad.detach());
        let (dq, dk) = chunked_backward(&q, &k, |r0, len, logits| {
            let (p, _) = softmax_rows(logits)?;
            let dp = grad.narrow(0, r0, len)?.matmul(&values.t()?)?;
            let inner = (&p * &dp)?.sum_keepdim(1)?;
            p * dp.broadcast_sub(&inner)?
        })?;
        Ok((Some(dq), Some(dk), None))
    }
}

/// Value: the scalar entropy loss of softmax(q kᵀ / τ). p̄ is kept from the forward pass (V floats).
pub struct Entropy {
    pub tau: f64,
    mean_p: Mutex<Option<Tensor>>,
}

impl Entropy {
    pub fn new(tau: f64) -> Self {
        Self {
            tau,
            mean_p: Mutex::new(None),
        }
    }
}

const EPS_AVG: f64 = 1e-5;

impl CustomOp2 for Entropy {
    fn name(&self) -> &'static str {
        "coda-entropy"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k) = (tensor(qs, ql)?, tensor(ks, kl)?);
        let n = q.dim(0)?;
        let mut sum_p = Tensor::zeros(k.dim(0)?, DType::F32, q.device())?;
        let mut h_sample = 0f64;
        let mut r0 = 0;
        while r0 < n {
            let len = ROW_CHUNK.min(n - r0);
            let logits = (q.narrow(0, r0, len)?.matmul(&k.t()?)? / self.tau)?;
            let (p, logp) = softmax_rows(&logits)?;
            h_sample -= (&p * &logp)?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            sum_p = (sum_p + p.sum(0)?)?;
            r0 += len;
        }
        let mean_p = (sum_p / n as f64)?;
        let h_avg = -(&mean_p * (&mean_p + EPS_AVG)?.log()?)?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        *self.mean_p.lock().expect("not poisoned") = Some(mean_p);
        let loss = h_sample / n as f64 - h_avg;
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (q, k) = (q.detach(), k.detach());
        let g = grad.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let n = q.dim(0)? as f64;
        let mean_p = self
            .mean_p
            .lock()
            .expect("not poisoned")
            .clone()
            .ok_or_else(|| {
                candle_core::Error::Msg("coda-entropy: backward before forward".into())
            })?;
        // a_v = dH_avg / dp̄_v = −log(p̄_v + eps) − p̄_v / (p̄_v + eps)
        let shifted = (&mean_p + EPS_AVG)?;
        let a = (shifted.log()?.neg()? - mean_p.div(&shifted)?)?.unsqueeze(0)?;
        let scale = g / (n * self.tau);
        chunked_backward(&q, &k, |_, _, logits| {
            let (p, logp) = softmax_rows(&(logits / self.tau)?)?;
            // dH_sample/dℓ = −p (log p + H_row);  dH_avg/dℓ = p (a − Σ_v a_v p_v)
            let h_row = (&p * &logp)?.sum_keepdim(1)?.neg()?;
            let d_sample = (&p * logp.broadcast_add(&h_row)?)?.neg()?;
            let a_bar = p.broadcast_mul(&a)?.sum_keepdim(1)?;
            let d_avg = (&p * a.broadcast_sub(&a_bar)?)?;
            (d_sample - d_avg)? * scale
        })
        .map(|(dq, dk)| (Some(dq), Some(dk)))
    }
}
