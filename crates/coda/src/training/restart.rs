//! Dead-code restart for `adapt` (an option, not the reference's recipe): every N updates, the
//! codes that no token of the update's batch used are moved onto residuals of that batch,
//! sampled in proportion to the squared error of their own code or uniformly, as VQ trainers
//! restart expired codes (SoundStream, Jukebox). Under the nearest-value assignment rule a code
//! whose vector is never the nearest gets no gradient and would stay unused; this keeps the
//! whole codebook in use.
//!
//! A code vector is `to_v(E[n]) = W E[n] + b`, so moving code n to residual r sets
//! `E[n] ≈ W⁻¹ (r − b)` (ridge-regularised, so that a nearly singular W cannot give huge rows). The trained weights, the EMA copy and the code's AdamW moments change
//! together, so that the exported (EMA) model has the restarted codes and Adam starts them fresh.
//! Deterministic: the sample depends on the batch and the update number only (exact resume).

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};

use super::ema::Ema;
use super::optim::AdamW;
use crate::error::{Error, Result};

const CODEBOOK: &str = "quantizer.codebooks.weight";
const TO_V_W: &str = "quantizer.attn.to_v.weight";
const TO_V_B: &str = "quantizer.attn.to_v.bias";

/// Restart the unused codes; returns how many were moved. `ids` (B, h, w) and `residuals`
/// (B, C, h, w): per scale, what the quantizer saw in this update's batch.
pub fn restart_dead_codes(
    opt: &mut AdamW,
    ema: Option<&mut Ema>,
    ids: &[Tensor],
    residuals: &[Tensor],
    seed: u64,
    by_error: bool,
) -> Result<usize> {
    let index = |name: &str| {
        opt.params
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| {
                Error::Invalid(format!(
                "restart_dead_codes needs the trained parameter {name} (an attention quantizer)"
            ))
            })
    };
    let (ie, iw, ib) = (index(CODEBOOK)?, index(TO_V_W)?, index(TO_V_B)?);
    let codebook = opt.params[ie]
        .var
        .as_tensor()
        .to_dtype(DType::F64)?
        .to_vec2::<f64>()?;
    let w = opt.params[iw]
        .var
        .as_tensor()
        .to_dtype(DType::F64)?
        .to_vec2::<f64>()?;
    let b = opt.params[ib]
        .var
        .as_tensor()
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    let (v, c) = (codebook.len(), b.len());

    let mut used = vec![false; v];
    // Candidate rows: each token's residual and the squared error of its own code.
    let mut rows: Vec<(Vec<f64>, f64)> = Vec::new();
    let value = |n: usize| -> Vec<f64> {
        (0..c)
            .map(|i| b[i] + (0..c).map(|j| w[i][j] * codebook[n][j]).sum::<f64>())
            .collect()
    };
    for (idx, r) in ids.iter().zip(residuals) {
        let idx: Vec<u32> = idx.flatten_all()?.to_vec1()?;
        let r = r.permute((0, 2, 3, 1))?.to_dtype(DType::F64)?;
        let r = r.reshape((idx.len(), c))?.to_vec2::<f64>()?;
        for (id, row) in idx.iter().zip(r) {
            used[*id as usize] = true;
            let err = row
                .iter()
                .zip(value(*id as usize))
                .map(|(a, b)| (a - b).powi(2))
                .sum();
            rows.push((row, err));
        }
    }
    let dead: Vec<usize> = (0..v).filter(|&n| !used[n]).collect();
    if dead.is_empty() || rows.is_empty() {
        return Ok(0);
    }
    // E[n] from the ridge solution (WᵀW + λI)⁻¹ Wᵀ (r − b), λ = 1e-3 · mean(σ²): exact W⁻¹
    // would give huge rows where W is nearly singular (measured: rows of 5e5 after 500 updates,
    // then infinite gradients), and those rows feed back into W's gradient.
    let wm = nalgebra::DMatrix::from_fn(c, c, |i, j| w[i][j]);
    let gram = wm.transpose() * &wm;
    let lambda = 1e-3 * gram.trace() / c as f64;
    let regularised = &gram + nalgebra::DMatrix::identity(c, c) * lambda.max(1e-12);
    let Some(inv) = regularised.try_inverse() else {
        tracing::warn!("restart_dead_codes: to_v is degenerate, no restart");
        return Ok(0);
    };
    let w_inv = inv * wm.transpose();
    // A sample without replacement, weighted by the error (Efraimidis-Spirakis: the largest
    // u^(1/err)) or uniform (where residuals are dense, so the code is likely to stay in use).
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut keyed: Vec<(f64, usize)> = rows
        .iter()
        .enumerate()
        .map(|(i, (_, err))| {
            let u: f64 = rng.gen::<f64>().max(f64::MIN_POSITIVE);
            let weight = if by_error { err.max(1e-12) } else { 1.0 };
            (u.ln() / weight, i)
        })
        .collect();
    let take = dead.len().min(keyed.len());
    keyed.select_nth_unstable_by(take - 1, |a, b| b.0.total_cmp(&a.0));

    let mut new_rows = codebook.clone();
    for (&n, &(_, i)) in dead.iter().zip(&keyed[..take]) {
        let r = nalgebra::DVector::from_fn(c, |k, _| rows[i].0[k] - b[k]);
        let e = &w_inv * r;
        new_rows[n] = e.iter().copied().collect();
    }
    let dev = opt.params[ie].var.as_tensor().device().clone();
    let dtype = opt.params[ie].var.as_tensor().dtype();
    let flat: Vec<f64> = new_rows.iter().flatten().copied().collect();
    let moved: Vec<usize> = dead[..take].to_vec();
    let replace = |t: &Tensor, from: &Tensor| -> Result<Tensor> {
        // Rows of `moved` from `from`, the others from `t`.
        let mut mask = vec![0f32; v];
        for &n in &moved {
            mask[n] = 1.0;
        }
        let mask = Tensor::from_vec(mask, (v, 1), &dev)?.to_dtype(dtype)?;
        let keep = (1.0 - &mask)?;
        Ok((t.broadcast_mul(&keep)? + from.broadcast_mul(&mask)?)?)
    };
    let fresh = Tensor::from_vec(flat, (v, c), &dev)?.to_dtype(dtype)?;
    let live = replace(opt.params[ie].var.as_tensor(), &fresh)?;
    opt.params[ie].var.set(&live)?;
    if let Some(e) = ema {
        if let Some((_, t)) = e.weights.iter_mut().find(|(n, _)| n == CODEBOOK) {
            *t = replace(t, &fresh)?;
        }
    }
    opt.reset_moments(ie, &moved)?;
    Ok(moved.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::training::optim::{Group, Param};
    use candle_core::{Device, Var};

    fn setup() -> (AdamW, Ema) {
        let dev = Device::Cpu;
        let t = |v: &[f32], s: &[usize]| {
            Var::from_tensor(&Tensor::new(v, &dev).unwrap().reshape(s).unwrap()).unwrap()
        };
        let params = vec![
            Param {
                name: CODEBOOK.into(),
                var: t(&[0.1, 0.2, 5.0, 5.0, 6.0, 6.0, 7.0, 7.0], &[4, 2]),
                group: 1,
            },
            Param {
                name: TO_V_W.into(),
                var: t(&[2.0, 1.0, 0.5, 3.0], &[2, 2]),
                group: 1,
            },
            Param {
                name: TO_V_B.into(),
                var: t(&[0.3, -0.2], &[2]),
                group: 1,
            },
        ];
        let groups = vec![
            Group {
                lr: 1e-3,
                weight_decay: 0.0
            };
            2
        ];
        let mut opt = AdamW::new(params, groups, (0.9, 0.99), 1e-8).unwrap();
        // Non-zero moments, so that the reset is visible.
        let grads: Vec<Tensor> = opt
            .params
            .iter()
            .map(|p| p.var.as_tensor().ones_like().unwrap())
            .collect();
        opt.step(&grads, 1.0, 1.0).unwrap();
        let ema = Ema::new(&opt.params).unwrap();
        (opt, ema)
    }

    /// Every token used code 0: codes 1-3 move onto three of the four residuals (W e + b equal
    /// to the residual), in the trained weights and the EMA copy alike, their moments zeroed;
    /// code 0 and the projection stay; the same seed gives the same result.
    #[test]
    fn unused_codes_move_onto_residuals() {
        let dev = Device::Cpu;
        let residual_rows = [[1.0f32, 2.0], [-3.0, 0.5], [4.0, -1.0], [0.25, 0.75]];
        // (B=1, C=2, 2, 2) from rows in (y, x) order.
        let rows_bchw = Tensor::new(&residual_rows, &dev)
            .unwrap()
            .reshape((1, 2, 2, 2))
            .unwrap()
            .permute((0, 3, 1, 2))
            .unwrap();
        let ids = Tensor::zeros((1, 2, 2), DType::U32, &dev).unwrap();
        let mut results = Vec::new();
        for _ in 0..2 {
            let (mut opt, mut ema) = setup();
            let before = opt.params[0].var.as_tensor().to_vec2::<f32>().unwrap();
            let n = restart_dead_codes(
                &mut opt,
                Some(&mut ema),
                std::slice::from_ref(&ids),
                std::slice::from_ref(&rows_bchw),
                7,
                true,
            )
            .unwrap();
            assert_eq!(n, 3);
            let e = opt.params[0].var.as_tensor().to_vec2::<f32>().unwrap();
            assert_eq!(e[0], before[0], "a used code moved");
            // The projection after setup()'s Adam step, unchanged by the restart.
            let w = opt.params[1].var.as_tensor().to_vec2::<f32>().unwrap();
            let b = opt.params[2].var.as_tensor().to_vec1::<f32>().unwrap();
            assert!((w[0][0] - 2.0).abs() < 0.01 && (b[0] - 0.3).abs() < 0.01);
            let mut hit = Vec::new();
            for code in &e[1..] {
                let v: Vec<f32> = (0..2)
                    .map(|i| b[i] + w[i][0] * code[0] + w[i][1] * code[1])
                    .collect();
                let k = residual_rows
                    .iter()
                    // Within the ridge's shrinkage (λ = 1e-3 · mean σ², σ² ≈ 3-11 here).
                    .position(|r| (r[0] - v[0]).abs() < 1e-2 && (r[1] - v[1]).abs() < 1e-2)
                    .unwrap_or_else(|| panic!("code vector {v:?} is none of the residuals"));
                hit.push(k);
            }
            hit.sort();
            hit.dedup();
            assert_eq!(hit.len(), 3, "two codes on one residual");
            let ema_e = ema.weights[0].1.to_vec2::<f32>().unwrap();
            assert_eq!(ema_e, e);
            let m = opt.m_of(0).to_vec2::<f32>().unwrap();
            assert!(m[0].iter().all(|&x| x != 0.0) && m[1..].iter().flatten().all(|&x| x == 0.0));
            results.push(e);
        }
        assert_eq!(results[0], results[1]);
    }
}
