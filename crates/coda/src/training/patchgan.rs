//! The PatchGAN discriminator (taming-transformers' `NLayerDiscriminator`): 4x4 convs with
//! stride 2, BatchNorm in training mode (batch statistics), LeakyReLU(0.2); logits per patch.
//! Parameter names follow taming's `main.<i>` so that its checkpoints would load.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};

use crate::kernels::{conv2d, ConvGeometry};

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PatchGanConfig {
    /// Channels of the first layer (taming: 64).
    pub ndf: usize,
    /// Stride-2 layers (taming: 3).
    pub layers: usize,
}

enum Layer {
    Conv {
        key: String,
        stride: usize,
        bias: bool,
    },
    Norm {
        key: String,
    },
    LeakyRelu,
}

pub struct PatchGan {
    layers: Vec<Layer>,
    /// (name, shape) of every parameter.
    shapes: Vec<(String, Vec<usize>)>,
}

impl PatchGan {
    pub fn new(cfg: PatchGanConfig) -> Self {
        let mut layers = Vec::new();
        let mut shapes = Vec::new();
        let mut i = 0;
        let mut conv = |layers: &mut Vec<Layer>,
                        cin: usize,
                        cout: usize,
                        stride: usize,
                        bias: bool,
                        i: &mut usize| {
            let key = format!("main.{i}");
            shapes.push((format!("{key}.weight"), vec![cout, cin, 4, 4]));
            if bias {
                shapes.push((format!("{key}.bias"), vec![cout]));
            }
            layers.push(Layer::Conv { key, stride, bias });
            *i += 1;
        };
        let mut norm_shapes = Vec::new();
        let mut norm = |layers: &mut Vec<Layer>, c: usize, i: &mut usize| {
            let key = format!("main.{i}");
            norm_shapes.push((format!("{key}.weight"), vec![c]));
            norm_shapes.push((format!("{key}.bias"), vec![c]));
            layers.push(Layer::Norm { key });
            *i += 1;
        };
        conv(&mut layers, 3, cfg.ndf, 2, true, &mut i);
        layers.push(Layer::LeakyRelu);
        i += 1;
        let mut mult = 1;
        for n in 1..=cfg.layers {
            let prev = mult;
            mult = (1 << n).min(8);
            let stride = if n == cfg.layers { 1 } else { 2 };
            conv(
                &mut layers,
                cfg.ndf * prev,
                cfg.ndf * mult,
                stride,
                false,
                &mut i,
            );
            norm(&mut layers, cfg.ndf * mult, &mut i);
            layers.push(Layer::LeakyRelu);
            i += 1;
        }
        conv(&mut layers, cfg.ndf * mult, 1, 1, true, &mut i);
        shapes.extend(norm_shapes);
        shapes.sort_by(|a, b| a.0.cmp(&b.0));
        Self { layers, shapes }
    }

    pub fn parameter_shapes(&self) -> &[(String, Vec<usize>)] {
        &self.shapes
    }

    /// taming's `weights_init`: conv weights N(0, 0.02), conv biases 0, BatchNorm weights
    /// N(1, 0.02) and biases 0.
    pub fn init(&self, seed: u64, device: &Device) -> Result<Vec<(String, Tensor)>> {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let normal = rand_distr::Normal::new(0f32, 0.02).expect("valid");
        self.shapes
            .iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let data: Vec<f32> = if name.ends_with(".bias") {
                    vec![0.0; n]
                } else if shape.len() == 4 {
                    (0..n).map(|_| normal.sample(&mut rng)).collect()
                } else {
                    (0..n).map(|_| 1.0 + normal.sample(&mut rng)).collect()
                };
                Ok((name.clone(), Tensor::from_vec(data, shape.clone(), device)?))
            })
            .collect()
    }

    /// Patch logits (B, 1, h, w) of images in [-1, 1].
    pub fn forward(&self, params: &HashMap<String, Tensor>, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for layer in &self.layers {
            h = match layer {
                Layer::Conv { key, stride, bias } => {
                    let w = &params[&format!("{key}.weight")];
                    let b = if *bias {
                        params[&format!("{key}.bias")].clone()
                    } else {
                        Tensor::zeros(w.dim(0)?, DType::F32, w.device())?
                    };
                    conv2d(&h, w, &b, ConvGeometry::same(*stride, 1))?
                }
                Layer::Norm { key } => batch_norm_train(
                    &h,
                    &params[&format!("{key}.weight")],
                    &params[&format!("{key}.bias")],
                )?,
                Layer::LeakyRelu => {
                    // leaky_relu(x) = max(x, 0.2 x)
                    h.maximum(&(&h * 0.2)?)?
                }
            };
        }
        Ok(h)
    }
}

/// BatchNorm2d in training mode: batch statistics (biased variance), eps 1e-5; composite ops so
/// that it is differentiable.
pub fn batch_norm_train(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    batch_norm_train_eps(x, weight, bias, 1e-5)
}

/// [`batch_norm_train`] with a given eps, over (B, C, H, W).
pub fn batch_norm_train_eps(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let c = x.dim(1)?;
    let mean = x.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred
        .sqr()?
        .mean_keepdim(0)?
        .mean_keepdim(2)?
        .mean_keepdim(3)?;
    let y = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    y.broadcast_mul(&weight.reshape((1, c, 1, 1))?)?
        .broadcast_add(&bias.reshape((1, c, 1, 1))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taming_layout_and_output_size() {
        let d = PatchGan::new(PatchGanConfig { ndf: 8, layers: 3 });
        let names: Vec<&str> = d
            .parameter_shapes()
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        // taming's Sequential indices: conv 0, lrelu 1, (conv, bn, lrelu) x3 at 2..10, conv 11.
        for k in [
            "main.0.weight",
            "main.0.bias",
            "main.2.weight",
            "main.3.weight",
            "main.8.weight",
            "main.9.bias",
            "main.11.weight",
            "main.11.bias",
        ] {
            assert!(names.contains(&k), "{k} missing from {names:?}");
        }
        assert!(!names.contains(&"main.2.bias"));
        let params: HashMap<String, Tensor> =
            d.init(0, &Device::Cpu).unwrap().into_iter().collect();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 64, 64), &Device::Cpu).unwrap();
        let y = d.forward(&params, &x).unwrap();
        // 64 -> 32 -> 16 -> 8 -> 7 -> 6, as taming's 256 -> 30 pattern.
        assert_eq!(y.dims(), &[2, 1, 6, 6]);
    }
}
