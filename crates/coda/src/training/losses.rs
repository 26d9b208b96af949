//! Reconstruction, KL and GAN losses, all means over elements (coda-method.md §6).

use candle_core::{Result, Tensor};

pub fn l1(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    (a - b)?.abs()?.mean_all()
}

pub fn mse(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    (a - b)?.sqr()?.mean_all()
}

/// Mean squared chroma error: the part of the per-pixel RGB error that is not grey (the error
/// minus its mean over the three channels), averaged over elements. Gradient descent fits the
/// high-variance directions of the data first, and in photos luminance carries several times
/// the variance of chroma, so an autoencoder learns colour last; weighting this term speeds it up.
pub fn chroma_mse(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let e = (a - b)?;
    let grey = e.mean_keepdim(1)?;
    e.broadcast_sub(&grey)?.sqr()?.mean_all()
}

/// KL(q(z|x) || N(0, I)) summed over the latent and divided by the number of image values
/// (3·H·W), averaged over the batch: with per-pixel means for the reconstruction terms, a KL
/// weight w here weighs the KL exactly as LDM's `kl_weight = w` does against its per-pixel sums.
pub fn kl(mean: &Tensor, logvar: &Tensor, image_values: usize) -> Result<Tensor> {
    let b = mean.dim(0)?;
    let per = ((mean.sqr()? + logvar.exp()?)? - 1.0)?.sub(logvar)?;
    per.sum_all()? * (0.5 / (b * image_values) as f64)
}

/// Hinge loss of the discriminator: 0.5 · (mean relu(1 − D(x)) + mean relu(1 + D(x̂))).
pub fn hinge_d(logits_real: &Tensor, logits_fake: &Tensor) -> Result<Tensor> {
    let real = (1.0 - logits_real)?.relu()?.mean_all()?;
    let fake = (logits_fake + 1.0)?.relu()?.mean_all()?;
    (real + fake)? * 0.5
}

/// The generator's adversarial loss: −mean D(x̂).
pub fn hinge_g(logits_fake: &Tensor) -> Result<Tensor> {
    logits_fake.mean_all()?.neg()
}

/// The adaptive GAN weight: clamp(|∇W L_nll| / (|∇W L_G| + 1e-6), 0, 1e4) · weight.
pub fn adaptive_weight(grad_nll: &Tensor, grad_g: &Tensor, weight: f64) -> Result<f64> {
    let n = grad_nll.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
    let g = grad_g.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
    Ok((n / (g + 1e-6)).clamp(0.0, 1e4) * weight)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn hinge_and_kl_values() {
        let d = Device::Cpu;
        let real = Tensor::new(&[2f32, 0.0], &d).unwrap();
        let fake = Tensor::new(&[-2f32, 0.5], &d).unwrap();
        // real: relu(1-2)=0, relu(1-0)=1 -> 0.5; fake: relu(-1)=0, relu(1.5)=1.5 -> 0.75
        let v = hinge_d(&real, &fake).unwrap().to_scalar::<f32>().unwrap();
        assert!((v - 0.625).abs() < 1e-6);
        // −mean(−2, 0.5) = 0.75
        assert!((hinge_g(&fake).unwrap().to_scalar::<f32>().unwrap() - 0.75).abs() < 1e-6);
        // A grey error has no chroma; (+1, -1, 0) has chroma (1, -1, 0): mean of squares 2/3.
        let x = Tensor::zeros((1, 3, 1, 1), candle_core::DType::F32, &d).unwrap();
        let grey = Tensor::new(&[0.5f32, 0.5, 0.5], &d)
            .unwrap()
            .reshape((1, 3, 1, 1))
            .unwrap();
        assert_eq!(
            chroma_mse(&x, &grey).unwrap().to_scalar::<f32>().unwrap(),
            0.0
        );
        let pm = Tensor::new(&[1f32, -1.0, 0.0], &d)
            .unwrap()
            .reshape((1, 3, 1, 1))
            .unwrap();
        let v = chroma_mse(&x, &pm).unwrap().to_scalar::<f32>().unwrap();
        assert!((v - 2.0 / 3.0).abs() < 1e-6, "{v}");
        // N(0, 1) posterior has zero KL; mean 1 -> 0.5 per element.
        let z = Tensor::zeros((2, 3, 1, 1), candle_core::DType::F32, &d).unwrap();
        assert_eq!(kl(&z, &z, 3).unwrap().to_scalar::<f32>().unwrap(), 0.0);
        let one = z.ones_like().unwrap();
        let v = kl(&one, &z, 3).unwrap().to_scalar::<f32>().unwrap();
        assert!((v - 0.5).abs() < 1e-6, "{v}");
    }
}
