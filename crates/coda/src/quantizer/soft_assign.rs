//! CODA's training-time soft assignment without keeping (N, V) tensors for the backward pass.
//!
//! Per scale the reference builds logits = q kᵀ (N x V), softmax(logits) for the straight-through
//! estimator, and softmax(logits / τ) with its log for the entropy loss; autograd keeps about fifteen
//! such N x V tensors per scale until the backward pass (a `flux-65536` step at batch 1: 18 GB).
//! These two ops keep only their inputs (queries, keys, values) and recompute the logits row chunk
//! by row chunk in the backward pass, so memory is O(chunk · V) whatever the number of scales.
//!
//! - [`soft_codes`]: the straight-through term `p @ E_v − sg(p) @ E_v` (value 0); its backward
//!   is the gradient that flows through softmax(logits) to queries and keys.
//! - [`entropy`]: the entropy loss `H_sample − H_avg` of softmax(logits / τ), with the reference's
//!   eps in log(p̄ + 1e-5), and its analytic gradient.
//!
//! Both are device-generic: the chunked arithmetic is made of candle ops on the inputs' device
//! (CPU or CUDA), computed before the op (the forward value) or in its backward; the custom op
//! itself only places the known value on the device and routes the gradient.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

/// Rows of logits materialised at a time.
const ROW_CHUNK: usize = 256;

/// A value known in advance, as the output storage of a custom op on the inputs' device.
#[cfg(feature = "cuda")]
fn cuda_constant(
    like: &candle_core::cuda_backend::CudaStorage,
    value: &[f32],
    shape: Shape,
) -> Result<(candle_core::cuda_backend::CudaStorage, Shape)> {
    use candle_core::backend::BackendDevice;
    Ok((like.device.storage_from_slice(value)?, shape))
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

/// The straight-through term of queries (N, D), keys (V, D) and values (V, C): zeros (N, C)
/// whose gradient flows through p = softmax(q kᵀ) to queries and keys, values held constant.
pub fn soft_codes(queries: &Tensor, keys: &Tensor, values: &Tensor) -> Result<Tensor> {
    queries.apply_op3(keys, values, SoftCodes)
}

/// Value: zeros (N, C). Gradient: through p = softmax(q kᵀ) with the value table held constant.
struct SoftCodes;

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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::cuda_backend::CudaStorage,
        ql: &Layout,
        _k: &candle_core::cuda_backend::CudaStorage,
        _kl: &Layout,
        _v: &candle_core::cuda_backend::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::cuda_backend::CudaStorage, Shape)> {
        use candle_core::backend::BackendDevice;
        let (n, c) = (ql.dims()[0], vl.dims()[1]);
        let shape = Shape::from((n, c));
        Ok((q.device.zeros_impl(&shape, DType::F32)?, shape))
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

/// The entropy loss of softmax(queries keysᵀ / τ) (a scalar), its gradient recomputed chunk by
/// chunk in the backward pass.
pub fn entropy(queries: &Tensor, keys: &Tensor, tau: f64) -> Result<Tensor> {
    let (loss, mean_p) = entropy_forward(&queries.detach(), &keys.detach(), tau)?;
    queries.apply_op2(
        keys,
        Entropy {
            tau,
            loss: loss as f32,
            mean_p: Mutex::new(Some(mean_p)),
        },
    )
}

/// H_sample − H_avg and p̄ (V,), from chunks of rows: no (N, V) tensor.
fn entropy_forward(q: &Tensor, k: &Tensor, tau: f64) -> Result<(f64, Tensor)> {
    let n = q.dim(0)?;
    let mut sum_p = Tensor::zeros(k.dim(0)?, DType::F32, q.device())?;
    let mut h_sample = Tensor::zeros((), DType::F32, q.device())?;
    let mut r0 = 0;
    while r0 < n {
        let len = ROW_CHUNK.min(n - r0);
        let logits = (q.narrow(0, r0, len)?.matmul(&k.t()?)? / tau)?;
        let (p, logp) = softmax_rows(&logits)?;
        // Per-row sums stay on the device; one read at the end (no sync per chunk on a GPU).
        h_sample = (h_sample - (&p * &logp)?.sum_all()?)?;
        sum_p = (sum_p + p.sum(0)?)?;
        r0 += len;
    }
    let mean_p = (sum_p / n as f64)?;
    let h_avg = (&mean_p * (&mean_p + EPS_AVG)?.log()?)?.sum_all()?.neg()?;
    let [h_sample, h_avg] =
        [h_sample, h_avg].map(|t| t.to_dtype(DType::F64).and_then(|t| t.to_scalar::<f64>()));
    Ok((h_sample? / n as f64 - h_avg?, mean_p))
}

/// Value: the scalar entropy loss computed by [`entropy_forward`]; p̄ (V floats) is kept for the
/// backward pass.
struct Entropy {
    tau: f64,
    loss: f32,
    mean_p: Mutex<Option<Tensor>>,
}

const EPS_AVG: f64 = 1e-5;

impl CustomOp2 for Entropy {
    fn name(&self) -> &'static str {
        "coda-entropy"
    }

    fn cpu_fwd(
        &self,
        _qs: &CpuStorage,
        _ql: &Layout,
        _ks: &CpuStorage,
        _kl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![self.loss]), Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::cuda_backend::CudaStorage,
        _ql: &Layout,
        _k: &candle_core::cuda_backend::CudaStorage,
        _kl: &Layout,
    ) -> Result<(candle_core::cuda_backend::CudaStorage, Shape)> {
        cuda_constant(q, &[self.loss], Shape::from(()))
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
