//! LPIPS (VGG16, v0.1), as the `lpips` package and taming-transformers' `vgg_lpips` compute it
//! (coda-method.md §6.3): ScalingLayer, VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3,
//! relu5_3, each unit-normalised over channels, squared difference, a 1x1 "lin" layer without
//! bias, spatial mean, sum over the five layers. Inputs in [-1, 1].
//!
//! Weights: the `lpips` package's state dict names (`net.slice1.0.weight`, ...,
//! `lin0.model.1.weight`); scripts/convert_lpips.py writes them from torchvision's VGG16 and
//! the package's `vgg.pth`.

use std::collections::HashMap;

use candle_core::{DType, Result, Tensor};

use crate::kernels::{conv2d, ConvGeometry};

/// VGG16 feature layers: (torchvision index, slice, cin, cout); max pools at 4, 9, 16, 23.
const CONVS: [(usize, usize, usize, usize); 13] = [
    (0, 1, 3, 64),
    (2, 1, 64, 64),
    (5, 2, 64, 128),
    (7, 2, 128, 128),
    (10, 3, 128, 256),
    (12, 3, 256, 256),
    (14, 3, 256, 256),
    (17, 4, 256, 512),
    (19, 4, 512, 512),
    (21, 4, 512, 512),
    (24, 5, 512, 512),
    (26, 5, 512, 512),
    (28, 5, 512, 512),
];
const TAP_CHANNELS: [usize; 5] = [64, 128, 256, 512, 512];
const SHIFT: [f32; 3] = [-0.030, -0.088, -0.188];
const SCALE: [f32; 3] = [0.458, 0.448, 0.450];

/// Names and shapes of the tensors LPIPS needs.
pub fn parameter_shapes() -> Vec<(String, Vec<usize>)> {
    let mut p = Vec::new();
    for (i, s, cin, cout) in CONVS {
        p.push((format!("net.slice{s}.{i}.weight"), vec![cout, cin, 3, 3]));
        p.push((format!("net.slice{s}.{i}.bias"), vec![cout]));
    }
    for (k, c) in TAP_CHANNELS.iter().enumerate() {
        p.push((format!("lin{k}.model.1.weight"), vec![1, *c, 1, 1]));
    }
    p
}

/// 2x2 max pooling, stride 2 (floor on odd sizes). candle's `max_pool2d` backward multiplies the
/// gradient by the fraction of maxima in the window (1/4 for a unique maximum) instead of routing it
/// whole to the maximum; when gradients are tracked, pool as a max over a reshape instead, whose
/// backward sends the whole gradient to the maximum (to every one of exact ties).
fn max_pool2(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return x.max_pool2d(2);
    }
    let (b, c, h, w) = x.dims4()?;
    let (h2, w2) = (h / 2, w / 2);
    x.narrow(2, 0, 2 * h2)?
        .narrow(3, 0, 2 * w2)?
        .reshape((b, c, h2, 2, w2, 2))?
        .max(5)?
        .max(3)
}

pub struct Lpips {
    convs: Vec<(usize, usize, Tensor, Tensor)>,
    lins: Vec<Tensor>,
}

impl Lpips {
    /// Build from a state dict; extra tensors (`scaling_layer.*`, the `lins.*` aliases) are ignored.
    pub fn new(tensors: &HashMap<String, Tensor>, origin: &std::path::Path) -> crate::Result<Self> {
        let needed = parameter_shapes();
        let relevant: HashMap<String, Tensor> = needed
            .iter()
            .filter_map(|(k, _)| tensors.get(k).map(|t| (k.clone(), t.clone())))
            .collect();
        crate::io::check_tensor_shapes(&needed, &relevant, origin)?;
        let convs = CONVS
            .iter()
            .map(|&(i, s, _, _)| {
                let g = |t: &str| relevant[&format!("net.slice{s}.{i}.{t}")].to_dtype(DType::F32);
                Ok((i, s, g("weight")?, g("bias")?))
            })
            .collect::<Result<Vec<_>>>()?;
        let lins = (0..5)
            .map(|k| relevant[&format!("lin{k}.model.1.weight")].to_dtype(DType::F32))
            .collect::<Result<_>>()?;
        Ok(Self { convs, lins })
    }

    /// The five unit-normalised feature maps of images in [-1, 1].
    fn features(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let dev = x.device();
        let shift = Tensor::new(&SHIFT, dev)?.reshape((1, 3, 1, 1))?;
        let scale = Tensor::new(&SCALE, dev)?.reshape((1, 3, 1, 1))?;
        let mut h = x.broadcast_sub(&shift)?.broadcast_div(&scale)?;
        let mut taps = Vec::with_capacity(5);
        let mut slice = 1;
        for (_, s, w, b) in &self.convs {
            if *s != slice {
                taps.push(h.clone());
                h = max_pool2(&h)?;
                slice = *s;
            }
            h = conv2d(&h, w, b, ConvGeometry::same(1, 1))?.relu()?;
        }
        taps.push(h);
        taps.iter()
            .map(|t| {
                let norm = (t.sqr()?.sum_keepdim(1)?.sqrt()? + 1e-10)?;
                t.broadcast_div(&norm)
            })
            .collect()
    }

    /// LPIPS distance per image pair, (B,).
    pub fn distance(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (fa, fb) = (self.features(a)?, self.features(b)?);
        let mut total: Option<Tensor> = None;
        for ((x, y), lin) in fa.iter().zip(&fb).zip(&self.lins) {
            let d = (x - y)?.sqr()?;
            let v = conv2d(
                &d,
                lin,
                &Tensor::zeros(1, DType::F32, d.device())?,
                ConvGeometry::same(1, 0),
            )?
            .mean((1, 2, 3))?;
            total = Some(match total {
                None => v,
                Some(t) => (t + v)?,
            });
        }
        Ok(total.expect("five layers"))
    }
}
