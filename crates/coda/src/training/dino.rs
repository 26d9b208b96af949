//! The DINO feature discriminator of VAR / CODA (coda-method.md §6.4): a frozen DINO ViT-S/16
//! (`dino_deitsmall16_pretrain.pth`) whose token features, taken after the position embedding and
//! after blocks 2, 5, 8 and 11 (patch tokens + CLS token), feed five trainable heads of
//! spectral-norm Conv1d + BatchNorm (batch statistics) + LeakyReLU(0.2) with a circular k=9
//! residual. Logits: (B, 5 · 196). The ViT has tanh-GELU, LayerNorm eps 1e-6, no final
//! LayerNorm, and its k-bias zeroed at load (no effect on the softmax).

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor, D};

use super::patchgan::batch_norm_train_eps;
use crate::kernels::{conv2d, ConvGeometry};
use crate::quantizer::attention::softmax;
use crate::quantizer::resample::{Mode, Resize2d};

const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

#[derive(Clone, Debug, PartialEq)]
pub struct DinoConfig {
    pub image: usize,
    pub patch: usize,
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub mlp: usize,
    /// Blocks after which features are tapped (besides the position embedding).
    pub taps: Vec<usize>,
}

impl DinoConfig {
    /// DINO ViT-S/16 at 224 px, as the reference uses it.
    pub fn vit_s16() -> Self {
        Self {
            image: 224,
            patch: 16,
            dim: 384,
            depth: 12,
            heads: 6,
            mlp: 1536,
            taps: vec![2, 5, 8, 11],
        }
    }

    pub fn tokens(&self) -> usize {
        (self.image / self.patch).pow(2)
    }

    /// The frozen ViT's parameters, named as in DINO's checkpoints (timm names).
    pub fn vit_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (c, m) = (self.dim, self.mlp);
        let mut p = vec![
            ("cls_token".to_string(), vec![1, 1, c]),
            ("pos_embed".into(), vec![1, self.tokens() + 1, c]),
            (
                "patch_embed.proj.weight".into(),
                vec![c, 3, self.patch, self.patch],
            ),
            ("patch_embed.proj.bias".into(), vec![c]),
        ];
        for i in 0..self.depth {
            let b = format!("blocks.{i}");
            for (n, s) in [
                ("norm1.weight", vec![c]),
                ("norm1.bias", vec![c]),
                ("attn.qkv.weight", vec![3 * c, c]),
                ("attn.qkv.bias", vec![3 * c]),
                ("attn.proj.weight", vec![c, c]),
                ("attn.proj.bias", vec![c]),
                ("norm2.weight", vec![c]),
                ("norm2.bias", vec![c]),
                ("mlp.fc1.weight", vec![m, c]),
                ("mlp.fc1.bias", vec![m]),
                ("mlp.fc2.weight", vec![c, m]),
                ("mlp.fc2.bias", vec![c]),
            ] {
                p.push((format!("{b}.{n}"), s));
            }
        }
        p
    }

    /// The trainable heads' parameters (spectral norm keeps `weight_orig`, as PyTorch names it).
    pub fn head_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let c = self.dim;
        let mut p = Vec::new();
        for h in 0..self.taps.len() + 1 {
            for (n, s) in [
                ("conv_in.weight_orig", vec![c, c, 1]),
                ("conv_in.bias", vec![c]),
                ("bn_in.weight", vec![c]),
                ("bn_in.bias", vec![c]),
                ("res_conv.weight_orig", vec![c, c, 9]),
                ("res_conv.bias", vec![c]),
                ("res_bn.weight", vec![c]),
                ("res_bn.bias", vec![c]),
                ("conv_out.weight_orig", vec![1, c, 1]),
                ("conv_out.bias", vec![1]),
            ] {
                p.push((format!("heads.{h}.{n}"), s));
            }
        }
        p
    }

    /// The spectral-norm convs: (key prefix, rows, columns of the weight matrix).
    fn sn_convs(&self) -> Vec<(String, usize, usize)> {
        let c = self.dim;
        (0..self.taps.len() + 1)
            .flat_map(|h| {
                [
                    (format!("heads.{h}.conv_in"), c, c),
                    (format!("heads.{h}.res_conv"), c, 9 * c),
                    (format!("heads.{h}.conv_out"), 1, c),
                ]
            })
            .collect()
    }
}

pub struct DinoDisc {
    cfg: DinoConfig,
    vit: HashMap<String, Tensor>,
    /// Spectral norm's power-iteration vectors (u, v) per conv, updated at every forward pass as
    /// PyTorch does in training mode; saved in checkpoints so that a resume is exact.
    sn: RefCell<HashMap<String, (Tensor, Tensor)>>,
}

fn normalize(v: &Tensor) -> Result<Tensor> {
    let n = v.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?.max(1e-12);
    v / n as f64
}

fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let c = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let y = c.broadcast_div(&(c.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?.sqrt()?)?;
    y.broadcast_mul(w)?.broadcast_add(b)
}

fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.broadcast_matmul(&w.t()?)?.broadcast_add(b)
}

fn leaky(x: &Tensor) -> Result<Tensor> {
    x.maximum(&(x * 0.2)?)
}

impl DinoDisc {
    /// From ViT weights (DINO's checkpoint names; extra keys such as the final `norm.*` are
    /// ignored) and the spectral-norm vectors drawn from `seed`.
    pub fn new(
        cfg: DinoConfig,
        weights: &HashMap<String, Tensor>,
        origin: &std::path::Path,
        seed: u64,
    ) -> crate::Result<Self> {
        let shapes = cfg.vit_shapes();
        let mut vit: HashMap<String, Tensor> = shapes
            .iter()
            .filter_map(|(k, _)| weights.get(k).map(|t| (k.clone(), t.clone())))
            .collect();
        crate::io::check_tensor_shapes(&shapes, &vit, origin)?;
        for t in vit.values_mut() {
            *t = t.to_dtype(DType::F32)?.detach();
        }
        for i in 0..cfg.depth {
            // The reference zeroes the k part of the qkv bias at load.
            let key = format!("blocks.{i}.attn.qkv.bias");
            let b = &vit[&key];
            let c = cfg.dim;
            let zeroed = Tensor::cat(
                &[
                    b.narrow(0, 0, c)?,
                    b.narrow(0, c, c)?.zeros_like()?,
                    b.narrow(0, 2 * c, c)?,
                ],
                0,
            )?;
            vit.insert(key, zeroed);
        }
        let d = Self {
            sn: RefCell::new(HashMap::new()),
            cfg,
            vit,
        };
        d.reset_spectral_state(seed)?;
        Ok(d)
    }

    pub fn config(&self) -> &DinoConfig {
        &self.cfg
    }

    /// u, v ~ normalise(N(0, 1)), as PyTorch's `spectral_norm` starts.
    pub fn reset_spectral_state(&self, seed: u64) -> Result<()> {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut draw = |n: usize| -> Result<Tensor> {
            let v: Vec<f32> = (0..n)
                .map(|_| rand_distr::StandardNormal.sample(&mut rng))
                .collect();
            normalize(&Tensor::from_vec(v, n, &Device::Cpu)?)
        };
        let mut sn = self.sn.borrow_mut();
        for (k, rows, cols) in self.cfg.sn_convs() {
            let u = draw(rows)?;
            let v = draw(cols)?;
            sn.insert(k, (u, v));
        }
        Ok(())
    }

    /// Heads as the reference initialises them (`disc_init` 0.02): conv weights trunc-normal
    /// (std 0.02, cut at ±2), biases 0, BatchNorm weight 1 and bias 0.
    pub fn init_heads(&self, seed: u64) -> Result<Vec<(String, Tensor)>> {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let normal = rand_distr::Normal::new(0f32, 0.02).expect("valid");
        self.cfg
            .head_shapes()
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let data: Vec<f32> = if name.ends_with("weight_orig") {
                    (0..n)
                        .map(|_| loop {
                            let v = normal.sample(&mut rng);
                            if v.abs() <= 2.0 {
                                break v;
                            }
                        })
                        .collect()
                } else if name.contains("bn") && name.ends_with("weight") {
                    vec![1.0; n]
                } else {
                    vec![0.0; n]
                };
                Ok((name, Tensor::from_vec(data, shape, &Device::Cpu)?))
            })
            .collect()
    }

    /// The spectral-norm state, keyed `<conv>.weight_u` / `<conv>.weight_v` (PyTorch's names).
    pub fn spectral_state(&self) -> Vec<(String, Tensor)> {
        let sn = self.sn.borrow();
        let mut v: Vec<(String, Tensor)> = sn
            .iter()
            .flat_map(|(k, (u, v))| {
                [
                    (format!("{k}.weight_u"), u.clone()),
                    (format!("{k}.weight_v"), v.clone()),
                ]
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn load_spectral_state(
        &self,
        get: &dyn Fn(&str) -> Option<Tensor>,
    ) -> std::result::Result<(), String> {
        let mut sn = self.sn.borrow_mut();
        for (k, (u, v)) in sn.iter_mut() {
            *u = get(&format!("{k}.weight_u")).ok_or_else(|| format!("missing {k}.weight_u"))?;
            *v = get(&format!("{k}.weight_v")).ok_or_else(|| format!("missing {k}.weight_v"))?;
        }
        Ok(())
    }

    /// W / σ(W) with one power iteration (PyTorch's training-mode `spectral_norm`): u and v are
    /// updated without gradient; σ = uᵀ W v carries the gradient to W.
    fn spectral(&self, key: &str, w: &Tensor) -> Result<Tensor> {
        let rows = w.dim(0)?;
        let mat = w.reshape((rows, ()))?;
        let (u, _) = self.sn.borrow()[key].clone();
        let m = mat.detach();
        let v = normalize(&m.t()?.matmul(&u.unsqueeze(1)?)?.squeeze(1)?)?;
        let u = normalize(&m.matmul(&v.unsqueeze(1)?)?.squeeze(1)?)?;
        let sigma = u
            .unsqueeze(0)?
            .matmul(&mat.matmul(&v.unsqueeze(1)?)?)?
            .reshape(())?;
        self.sn.borrow_mut().insert(key.to_string(), (u, v));
        w.broadcast_div(&sigma)
    }

    fn conv1d(
        &self,
        heads: &HashMap<String, Tensor>,
        key: &str,
        x: &Tensor,
        circular_pad: usize,
    ) -> Result<Tensor> {
        let w = self.spectral(key, &heads[&format!("{key}.weight_orig")])?;
        let (o, i, k) = w.dims3()?;
        let x = if circular_pad > 0 {
            let l = x.dim(2)?;
            Tensor::cat(
                &[
                    x.narrow(2, l - circular_pad, circular_pad)?,
                    x.clone(),
                    x.narrow(2, 0, circular_pad)?,
                ],
                2,
            )?
        } else {
            x.clone()
        };
        let (b, c, l) = x.dims3()?;
        let y = conv2d(
            &x.reshape((b, c, 1, l))?,
            &w.reshape((o, i, 1, k))?,
            &heads[&format!("{key}.bias")],
            ConvGeometry::same(1, 0),
        )?;
        y.squeeze(2)
    }

    fn head(&self, heads: &HashMap<String, Tensor>, h: usize, x: &Tensor) -> Result<Tensor> {
        let p = |n: &str| heads[&format!("heads.{h}.{n}")].clone();
        let bn = |x: &Tensor, n: &str| -> Result<Tensor> {
            let y = batch_norm_train_eps(
                &x.unsqueeze(3)?,
                &p(&format!("{n}.weight")),
                &p(&format!("{n}.bias")),
                1e-6,
            )?;
            y.squeeze(3)
        };
        let x = leaky(&bn(
            &self.conv1d(heads, &format!("heads.{h}.conv_in"), x, 0)?,
            "bn_in",
        )?)?;
        let r = leaky(&bn(
            &self.conv1d(heads, &format!("heads.{h}.res_conv"), &x, 4)?,
            "res_bn",
        )?)?;
        let x = ((r + &x)? / std::f64::consts::SQRT_2)?;
        self.conv1d(heads, &format!("heads.{h}.conv_out"), &x, 0)
    }

    /// Images in [-1, 1] -> ImageNet-normalised, then either the `image`-sized crop at
    /// (top, left) or a resize to `image` (area when larger, bicubic otherwise).
    fn prepare(&self, x: &Tensor, crop: Option<(usize, usize)>) -> Result<Tensor> {
        let dev = x.device();
        let scale: Vec<f32> = STD.iter().map(|s| 0.5 / s).collect();
        let shift: Vec<f32> = MEAN.iter().zip(STD).map(|(m, s)| (0.5 - m) / s).collect();
        let x = x
            .broadcast_mul(&Tensor::from_vec(scale, (1, 3, 1, 1), dev)?)?
            .broadcast_add(&Tensor::from_vec(shift, (1, 3, 1, 1), dev)?)?;
        let s = self.cfg.image;
        let (_, _, h, w) = x.dims4()?;
        match crop {
            Some((top, left)) => x.narrow(2, top, s)?.narrow(3, left, s),
            None if (h, w) == (s, s) => Ok(x),
            None => {
                let mode = if w > s { Mode::Area } else { Mode::Bicubic };
                Resize2d::new(mode, (h, w), (s, s), dev)?.apply(&x)
            }
        }
    }

    /// Whether an input of this size takes the random-crop branch when the coin says so.
    pub fn can_crop(&self, h: usize, w: usize) -> bool {
        h > self.cfg.image && w > self.cfg.image
    }

    pub fn image_size(&self) -> usize {
        self.cfg.image
    }

    /// Logits (B, (taps + 1) · tokens).
    pub fn forward(
        &self,
        heads: &HashMap<String, Tensor>,
        x: &Tensor,
        crop: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let v = |k: &str| &self.vit[k];
        let x = self.prepare(x, crop)?;
        let b = x.dim(0)?;
        let patches = conv2d(
            &x,
            v("patch_embed.proj.weight"),
            v("patch_embed.proj.bias"),
            ConvGeometry::same(c.patch, 0),
        )?;
        let tokens = patches.flatten_from(2)?.transpose(1, 2)?; // (B, N, C)
        let cls = v("cls_token").broadcast_as((b, 1, c.dim))?;
        let mut t = Tensor::cat(&[&cls, &tokens], 1)?.broadcast_add(v("pos_embed"))?;
        let mut acts = vec![t.clone()];
        let (hd, nh) = (c.dim / c.heads, c.heads);
        for i in 0..c.depth {
            let p = |n: &str| v(&format!("blocks.{i}.{n}")).clone();
            let n = t.dim(1)?;
            let y = layer_norm(&t, &p("norm1.weight"), &p("norm1.bias"))?;
            let qkv = linear(&y, &p("attn.qkv.weight"), &p("attn.qkv.bias"))?
                .reshape((b, n, 3, nh, hd))?
                .permute((2, 0, 3, 1, 4))?;
            let (q, k, vv) = (
                qkv.get(0)?.contiguous()?,
                qkv.get(1)?.contiguous()?,
                qkv.get(2)?.contiguous()?,
            );
            let attn = softmax(&(q.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?, 3)?;
            let o = attn.matmul(&vv)?.transpose(1, 2)?.reshape((b, n, c.dim))?;
            t = (t + linear(&o, &p("attn.proj.weight"), &p("attn.proj.bias"))?)?;
            let y = layer_norm(&t, &p("norm2.weight"), &p("norm2.bias"))?;
            let y = linear(
                &linear(&y, &p("mlp.fc1.weight"), &p("mlp.fc1.bias"))?.gelu()?,
                &p("mlp.fc2.weight"),
                &p("mlp.fc2.bias"),
            )?;
            t = (t + y)?;
            if c.taps.contains(&i) {
                acts.push(t.clone());
            }
        }
        let mut outs = Vec::with_capacity(acts.len());
        for (h, a) in acts.iter().enumerate() {
            let n = a.dim(1)?;
            let feat = a
                .narrow(1, 1, n - 1)?
                .broadcast_add(&a.narrow(1, 0, 1)?)?
                .transpose(1, 2)?
                .contiguous()?;
            outs.push(self.head(heads, h, &feat)?.flatten_from(1)?);
        }
        Tensor::cat(&outs, 1)
    }
}

/// Random frozen ViT weights (for tests and smoke runs without the DINO checkpoint).
pub fn random_vit(cfg: &DinoConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let normal = rand_distr::Normal::new(0f32, 0.02).expect("valid");
    cfg.vit_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.contains("norm") && name.ends_with("weight") {
                vec![1.0; n]
            } else if name.ends_with("bias") {
                vec![0.0; n]
            } else {
                (0..n).map(|_| normal.sample(&mut rng)).collect()
            };
            Ok((name, Tensor::from_vec(data, shape, &Device::Cpu)?))
        })
        .collect()
}
