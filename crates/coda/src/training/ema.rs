//! Exponential moving average of the trained weights (coda-method.md §9): decay
//! `min(0.9999, (g//2 + 1) / (g//2 + 10))` where g is the number of updates done *before* the
//! current one (the official `train_scripts/train_mar.py` passes `global_step`, which it
//! increments after the EMA call), a plain copy before the start step. Evaluation and export use
//! the EMA weights.

use candle_core::{Result, Tensor};

use super::optim::Param;

/// The decay of the EMA update that follows `done` earlier updates.
pub fn ema_decay(done: u64) -> f64 {
    let h = (done / 2) as f64;
    ((h + 1.0) / (h + 10.0)).min(0.9999)
}

pub struct Ema {
    /// (name, averaged weights), in the optimizer's parameter order.
    pub weights: Vec<(String, Tensor)>,
}

impl Ema {
    pub fn new(params: &[Param]) -> Result<Self> {
        Ok(Self {
            weights: params
                .iter()
                .map(|p| Ok((p.name.clone(), p.var.as_tensor().copy()?)))
                .collect::<Result<_>>()?,
        })
    }

    /// After an optimizer update that followed `done` earlier ones: copy the weights while
    /// `copy` is set (before the start step), else blend them in with the decay rule.
    pub fn update(&mut self, params: &[Param], done: u64, copy: bool) -> Result<()> {
        let d = ema_decay(done);
        for ((_, e), p) in self.weights.iter_mut().zip(params) {
            let w = p.var.as_tensor().detach();
            if copy {
                *e = w.copy()?;
            } else if !crate::kernels::optimizer::ema_blend(e, &w, d as f32)? {
                *e = ((&*e * d)? + (w * (1.0 - d))?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decay_rule() {
        assert!((ema_decay(0) - 0.1).abs() < 1e-12);
        assert!((ema_decay(3) - 2.0 / 11.0).abs() < 1e-12);
        assert_eq!(ema_decay(10_000_000), 0.9999);
    }
}
