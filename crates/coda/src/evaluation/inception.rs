//! pytorch-fid's Inception-v3 (the TF-FID graph: `FIDInceptionA/C/E_1/E_2` blocks, average pools
//! that exclude padding, max pool in the last block), up to the 2048-d pool3 features that FID
//! uses. Input: images in [0, 1], resized to 299x299 bilinearly (align_corners=False) and mapped
//! to [-1, 1], as `pytorch_fid.inception.InceptionV3` does by default. Weights: the state dict of
//! `pt_inception-2015-12-05-6726825d.pth` (torchvision names: `Mixed_5b.branch1x1.conv.weight`,
//! `...bn.running_var`, ...), with each BatchNorm (eps 0.001) folded into its conv.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};

use crate::kernels::{conv2d, ConvGeometry};
use crate::quantizer::resample::{Mode, Resize2d};

/// One `BasicConv2d` (conv without bias, BatchNorm, ReLU).
#[derive(Clone, Debug)]
pub struct ConvSpec {
    pub name: String,
    pub cin: usize,
    pub cout: usize,
    pub k: (usize, usize),
    pub stride: usize,
    pub pad: (usize, usize),
}

fn c(
    name: &str,
    cin: usize,
    cout: usize,
    k: (usize, usize),
    stride: usize,
    pad: (usize, usize),
) -> ConvSpec {
    ConvSpec {
        name: name.to_string(),
        cin,
        cout,
        k,
        stride,
        pad,
    }
}

/// Every conv of the network, with its shape.
pub fn conv_specs() -> Vec<ConvSpec> {
    let mut v = vec![
        c("Conv2d_1a_3x3", 3, 32, (3, 3), 2, (0, 0)),
        c("Conv2d_2a_3x3", 32, 32, (3, 3), 1, (0, 0)),
        c("Conv2d_2b_3x3", 32, 64, (3, 3), 1, (1, 1)),
        c("Conv2d_3b_1x1", 64, 80, (1, 1), 1, (0, 0)),
        c("Conv2d_4a_3x3", 80, 192, (3, 3), 1, (0, 0)),
    ];
    for (m, cin, pool) in [
        ("Mixed_5b", 192, 32),
        ("Mixed_5c", 256, 64),
        ("Mixed_5d", 288, 64),
    ] {
        v.extend([
            c(&format!("{m}.branch1x1"), cin, 64, (1, 1), 1, (0, 0)),
            c(&format!("{m}.branch5x5_1"), cin, 48, (1, 1), 1, (0, 0)),
            c(&format!("{m}.branch5x5_2"), 48, 64, (5, 5), 1, (2, 2)),
            c(&format!("{m}.branch3x3dbl_1"), cin, 64, (1, 1), 1, (0, 0)),
            c(&format!("{m}.branch3x3dbl_2"), 64, 96, (3, 3), 1, (1, 1)),
            c(&format!("{m}.branch3x3dbl_3"), 96, 96, (3, 3), 1, (1, 1)),
            c(&format!("{m}.branch_pool"), cin, pool, (1, 1), 1, (0, 0)),
        ]);
    }
    v.extend([
        c("Mixed_6a.branch3x3", 288, 384, (3, 3), 2, (0, 0)),
        c("Mixed_6a.branch3x3dbl_1", 288, 64, (1, 1), 1, (0, 0)),
        c("Mixed_6a.branch3x3dbl_2", 64, 96, (3, 3), 1, (1, 1)),
        c("Mixed_6a.branch3x3dbl_3", 96, 96, (3, 3), 2, (0, 0)),
    ]);
    for (m, c7) in [
        ("Mixed_6b", 128),
        ("Mixed_6c", 160),
        ("Mixed_6d", 160),
        ("Mixed_6e", 192),
    ] {
        v.extend([
            c(&format!("{m}.branch1x1"), 768, 192, (1, 1), 1, (0, 0)),
            c(&format!("{m}.branch7x7_1"), 768, c7, (1, 1), 1, (0, 0)),
            c(&format!("{m}.branch7x7_2"), c7, c7, (1, 7), 1, (0, 3)),
            c(&format!("{m}.branch7x7_3"), c7, 192, (7, 1), 1, (3, 0)),
            c(&format!("{m}.branch7x7dbl_1"), 768, c7, (1, 1), 1, (0, 0)),
            c(&format!("{m}.branch7x7dbl_2"), c7, c7, (7, 1), 1, (3, 0)),
            c(&format!("{m}.branch7x7dbl_3"), c7, c7, (1, 7), 1, (0, 3)),
            c(&format!("{m}.branch7x7dbl_4"), c7, c7, (7, 1), 1, (3, 0)),
            c(&format!("{m}.branch7x7dbl_5"), c7, 192, (1, 7), 1, (0, 3)),
            c(&format!("{m}.branch_pool"), 768, 192, (1, 1), 1, (0, 0)),
        ]);
    }
    v.extend([
        c("Mixed_7a.branch3x3_1", 768, 192, (1, 1), 1, (0, 0)),
        c("Mixed_7a.branch3x3_2", 192, 320, (3, 3), 2, (0, 0)),
        c("Mixed_7a.branch7x7x3_1", 768, 192, (1, 1), 1, (0, 0)),
        c("Mixed_7a.branch7x7x3_2", 192, 192, (1, 7), 1, (0, 3)),
        c("Mixed_7a.branch7x7x3_3", 192, 192, (7, 1), 1, (3, 0)),
        c("Mixed_7a.branch7x7x3_4", 192, 192, (3, 3), 2, (0, 0)),
    ]);
    for (m, cin) in [("Mixed_7b", 1280), ("Mixed_7c", 2048)] {
        v.extend([
            c(&format!("{m}.branch1x1"), cin, 320, (1, 1), 1, (0, 0)),
            c(&format!("{m}.branch3x3_1"), cin, 384, (1, 1), 1, (0, 0)),
            c(&format!("{m}.branch3x3_2a"), 384, 384, (1, 3), 1, (0, 1)),
            c(&format!("{m}.branch3x3_2b"), 384, 384, (3, 1), 1, (1, 0)),
            c(&format!("{m}.branch3x3dbl_1"), cin, 448, (1, 1), 1, (0, 0)),
            c(&format!("{m}.branch3x3dbl_2"), 448, 384, (3, 3), 1, (1, 1)),
            c(&format!("{m}.branch3x3dbl_3a"), 384, 384, (1, 3), 1, (0, 1)),
            c(&format!("{m}.branch3x3dbl_3b"), 384, 384, (3, 1), 1, (1, 0)),
            c(&format!("{m}.branch_pool"), cin, 192, (1, 1), 1, (0, 0)),
        ]);
    }
    v
}

/// Names and shapes of the whole state dict (including the unused `fc` and the BatchNorm
/// counters), in the order PyTorch's `state_dict()` sorts to.
pub fn state_dict_shapes() -> Vec<(String, Vec<usize>)> {
    let mut p = Vec::new();
    for s in conv_specs() {
        p.push((
            format!("{}.conv.weight", s.name),
            vec![s.cout, s.cin, s.k.0, s.k.1],
        ));
        for t in ["weight", "bias", "running_mean", "running_var"] {
            p.push((format!("{}.bn.{t}", s.name), vec![s.cout]));
        }
        p.push((format!("{}.bn.num_batches_tracked", s.name), vec![]));
    }
    p.push(("fc.weight".into(), vec![1008, 2048]));
    p.push(("fc.bias".into(), vec![1008]));
    p.sort_by(|a, b| a.0.cmp(&b.0));
    p
}

/// Uniform [-1, 1) values from splitmix64 over (seed, index); the same stream as
/// `det_uniform` in scripts/make_fixtures.py.
pub fn det_uniform(n: usize, seed: u64) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let mut z = seed.wrapping_add((i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = (z >> 40) as f64 / (1u64 << 24) as f64;
            (2.0 * u - 1.0) as f32
        })
        .collect()
}

/// Deterministic random weights (He-uniform convs, BatchNorm near identity), identical to the
/// ones the parity fixture was computed with: tests need no 95 MB weight file.
pub fn deterministic_weights(device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (idx, (name, shape)) in state_dict_shapes().into_iter().enumerate() {
        if name.ends_with("num_batches_tracked") {
            continue;
        }
        let n: usize = shape.iter().product();
        let u = det_uniform(n, 1_000_003 * (idx as u64 + 1));
        let v: Vec<f32> = if name.ends_with("conv.weight") || name == "fc.weight" {
            let fan_in: usize = shape[1..].iter().product();
            let bound = (6.0 / fan_in as f64).sqrt() as f32;
            u.iter().map(|x| x * bound).collect()
        } else if name.ends_with("bn.weight") {
            u.iter().map(|x| 1.0 + 0.1 * x).collect()
        } else if name.ends_with("running_var") {
            u.iter().map(|x| 1.0 + 0.25 * (x + 1.0)).collect()
        } else {
            u.iter().map(|x| 0.1 * x).collect()
        };
        out.insert(name, Tensor::from_vec(v, shape, device)?);
    }
    Ok(out)
}

/// A conv with its BatchNorm folded in: relu(conv(x, w·s) + (β − μ·s)), s = γ / sqrt(σ² + 0.001).
#[derive(Clone, Debug)]
struct FoldedConv {
    weight: Tensor,
    bias: Tensor,
    geometry: ConvGeometry,
}

pub struct FidInception {
    convs: HashMap<String, FoldedConv>,
    resize: Option<(usize, usize, Resize2d)>,
}

impl FidInception {
    /// Build from a state dict (the .pth's names). Missing or mis-shaped tensors are reported by
    /// name with both shapes; `fc.*` and the BatchNorm counters are not needed.
    pub fn new(tensors: &HashMap<String, Tensor>, origin: &std::path::Path) -> crate::Result<Self> {
        let needed: Vec<(String, Vec<usize>)> = state_dict_shapes()
            .into_iter()
            .filter(|(k, _)| !k.ends_with("num_batches_tracked") && !k.starts_with("fc."))
            .collect();
        let relevant: HashMap<String, Tensor> = tensors
            .iter()
            .filter(|(k, _)| !k.ends_with("num_batches_tracked") && !k.starts_with("fc."))
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        crate::io::check_tensor_shapes(&needed, &relevant, origin)?;
        let mut convs = HashMap::new();
        for s in conv_specs() {
            let g = |t: &str| relevant[&format!("{}.{t}", s.name)].to_dtype(DType::F32);
            let (gamma, beta, mean, var) = (
                g("bn.weight")?,
                g("bn.bias")?,
                g("bn.running_mean")?,
                g("bn.running_var")?,
            );
            let scale = (gamma / (var + 0.001)?.sqrt()?)?;
            let weight = g("conv.weight")?.broadcast_mul(&scale.reshape((s.cout, 1, 1, 1))?)?;
            let bias = (beta - mean.mul(&scale)?)?;
            let (ph, pw) = s.pad;
            convs.insert(
                s.name.clone(),
                FoldedConv {
                    weight,
                    bias,
                    geometry: ConvGeometry {
                        stride: s.stride,
                        pad: (ph, ph, pw, pw),
                        upsample: 1,
                    },
                },
            );
        }
        Ok(Self {
            convs,
            resize: None,
        })
    }

    fn conv(&self, name: &str, x: &Tensor) -> Result<Tensor> {
        let c = &self.convs[name];
        conv2d(x, &c.weight, &c.bias, c.geometry)?.relu()
    }

    fn block_a(&self, m: &str, x: &Tensor) -> Result<Tensor> {
        let b1 = self.conv(&format!("{m}.branch1x1"), x)?;
        let b5 = self.conv(
            &format!("{m}.branch5x5_2"),
            &self.conv(&format!("{m}.branch5x5_1"), x)?,
        )?;
        let mut b3 = self.conv(&format!("{m}.branch3x3dbl_1"), x)?;
        b3 = self.conv(
            &format!("{m}.branch3x3dbl_3"),
            &self.conv(&format!("{m}.branch3x3dbl_2"), &b3)?,
        )?;
        let bp = self.conv(
            &format!("{m}.branch_pool"),
            &pool3x3_same(x, Pool::AvgExcludePad)?,
        )?;
        Tensor::cat(&[b1, b5, b3, bp], 1)
    }

    fn block_c(&self, m: &str, x: &Tensor) -> Result<Tensor> {
        let b1 = self.conv(&format!("{m}.branch1x1"), x)?;
        let mut b7 = self.conv(&format!("{m}.branch7x7_1"), x)?;
        for i in 2..=3 {
            b7 = self.conv(&format!("{m}.branch7x7_{i}"), &b7)?;
        }
        let mut bd = self.conv(&format!("{m}.branch7x7dbl_1"), x)?;
        for i in 2..=5 {
            bd = self.conv(&format!("{m}.branch7x7dbl_{i}"), &bd)?;
        }
        let bp = self.conv(
            &format!("{m}.branch_pool"),
            &pool3x3_same(x, Pool::AvgExcludePad)?,
        )?;
        Tensor::cat(&[b1, b7, bd, bp], 1)
    }

    fn block_e(&self, m: &str, x: &Tensor, pool: Pool) -> Result<Tensor> {
        let b1 = self.conv(&format!("{m}.branch1x1"), x)?;
        let b3 = self.conv(&format!("{m}.branch3x3_1"), x)?;
        let b3 = Tensor::cat(
            &[
                self.conv(&format!("{m}.branch3x3_2a"), &b3)?,
                self.conv(&format!("{m}.branch3x3_2b"), &b3)?,
            ],
            1,
        )?;
        let bd = self.conv(
            &format!("{m}.branch3x3dbl_2"),
            &self.conv(&format!("{m}.branch3x3dbl_1"), x)?,
        )?;
        let bd = Tensor::cat(
            &[
                self.conv(&format!("{m}.branch3x3dbl_3a"), &bd)?,
                self.conv(&format!("{m}.branch3x3dbl_3b"), &bd)?,
            ],
            1,
        )?;
        let bp = self.conv(&format!("{m}.branch_pool"), &pool3x3_same(x, pool)?)?;
        Tensor::cat(&[b1, b3, bd, bp], 1)
    }

    /// Images in [0, 1], (B, 3, H, W) -> pool3 features (B, 2048).
    pub fn features(&mut self, images: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = images.dims4()?;
        if self.resize.as_ref().map(|r| (r.0, r.1)) != Some((h, w)) {
            self.resize = Some((
                h,
                w,
                Resize2d::new(Mode::Bilinear, (h, w), (299, 299), images.device())?,
            ));
        }
        let x = self.resize.as_ref().expect("just set").2.apply(images)?;
        let x = ((x * 2.0)? - 1.0)?;
        let mut x = self.conv("Conv2d_1a_3x3", &x)?;
        x = self.conv("Conv2d_2a_3x3", &x)?;
        x = self.conv("Conv2d_2b_3x3", &x)?;
        x = x.max_pool2d_with_stride(3, 2)?;
        x = self.conv("Conv2d_3b_1x1", &x)?;
        x = self.conv("Conv2d_4a_3x3", &x)?;
        x = x.max_pool2d_with_stride(3, 2)?;
        for m in ["Mixed_5b", "Mixed_5c", "Mixed_5d"] {
            x = self.block_a(m, &x)?;
        }
        // Mixed_6a (InceptionB).
        let b3 = self.conv("Mixed_6a.branch3x3", &x)?;
        let mut bd = self.conv("Mixed_6a.branch3x3dbl_1", &x)?;
        bd = self.conv(
            "Mixed_6a.branch3x3dbl_3",
            &self.conv("Mixed_6a.branch3x3dbl_2", &bd)?,
        )?;
        x = Tensor::cat(&[b3, bd, x.max_pool2d_with_stride(3, 2)?], 1)?;
        for m in ["Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"] {
            x = self.block_c(m, &x)?;
        }
        // Mixed_7a (InceptionD).
        let b3 = self.conv(
            "Mixed_7a.branch3x3_2",
            &self.conv("Mixed_7a.branch3x3_1", &x)?,
        )?;
        let mut b7 = self.conv("Mixed_7a.branch7x7x3_1", &x)?;
        for i in 2..=4 {
            b7 = self.conv(&format!("Mixed_7a.branch7x7x3_{i}"), &b7)?;
        }
        x = Tensor::cat(&[b3, b7, x.max_pool2d_with_stride(3, 2)?], 1)?;
        x = self.block_e("Mixed_7b", &x, Pool::AvgExcludePad)?;
        x = self.block_e("Mixed_7c", &x, Pool::Max)?;
        x.mean((2, 3))?.reshape((b, 2048))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pool {
    /// `avg_pool2d(3, stride 1, padding 1, count_include_pad=False)`.
    AvgExcludePad,
    /// `max_pool2d(3, stride 1, padding 1)`.
    Max,
}

/// 3x3, stride 1, padding 1 pooling (the window shrinks at the border).
fn pool3x3_same(x: &Tensor, kind: Pool) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let data = x.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; data.len()];
    for p in 0..b * c {
        let src = &data[p * h * w..(p + 1) * h * w];
        let dst = &mut out[p * h * w..(p + 1) * h * w];
        for y in 0..h {
            for xx in 0..w {
                let (y0, y1, x0, x1) = (
                    y.saturating_sub(1),
                    (y + 2).min(h),
                    xx.saturating_sub(1),
                    (xx + 2).min(w),
                );
                let mut acc = if kind == Pool::Max {
                    f32::NEG_INFINITY
                } else {
                    0.0
                };
                for yy in y0..y1 {
                    for v in &src[yy * w + x0..yy * w + x1] {
                        acc = if kind == Pool::Max {
                            acc.max(*v)
                        } else {
                            acc + v
                        };
                    }
                }
                dst[y * w + xx] = if kind == Pool::Max {
                    acc
                } else {
                    acc / ((y1 - y0) * (x1 - x0)) as f32
                };
            }
        }
    }
    Tensor::from_vec(out, (b, c, h, w), x.device())
}
