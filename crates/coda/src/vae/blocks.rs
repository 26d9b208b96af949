//! The VAE's building blocks. Module paths (`norm1`, `conv1`, `nin_shortcut`, `attn.q`, ...)
//! mirror the LDM checkpoint keys, so the weights file and this code read the same.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::kernels::{self, ConvGeometry};

/// A LoRA adapter on a conv (coda-method.md §7): `down` has the wrapped conv's kernel, stride
/// and padding, `up` is 1x1; both without bias, scale 1.
#[derive(Clone, Debug)]
pub struct Lora {
    /// (r, cin, k, k)
    pub down: Tensor,
    /// (cout, r, 1, 1)
    pub up: Tensor,
}

/// A 2-D convolution with bias, and a LoRA adapter where the weights carry one
/// (`<path>.lora_layer.down.weight`, `<path>.lora_layer.up.weight`).
#[derive(Clone, Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub stride: usize,
    pub padding: usize,
    pub lora: Option<Lora>,
    /// `weight` converted for the AMX kernels, made at the first bf16-mode call.
    packed: std::sync::Arc<kernels::amx::WeightCache>,
}

impl Conv2d {
    pub fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        // Which convs carry LoRA was checked against the config before building.
        let lora = if vb.contains_tensor("lora_layer.down.weight") {
            let l = vb.pp("lora_layer");
            let r = l.pp("down").get_unchecked("weight")?.dim(0)?;
            Some(Lora {
                down: l.pp("down").get((r, cin, k, k), "weight")?,
                up: l.pp("up").get((cout, r, 1, 1), "weight")?,
            })
        } else {
            None
        };
        Ok(Self {
            weight: vb.get((cout, cin, k, k), "weight")?,
            bias: vb.get(cout, "bias")?,
            stride,
            padding,
            lora,
            packed: Default::default(),
        })
    }
}

impl Conv2d {
    /// The conv on an input that is first upsampled and/or padded as `g` says (the samplers'
    /// geometry); the LoRA adapter sees the same upsampled, padded input, as in the reference.
    pub fn forward_geometry(&self, x: &Tensor, g: ConvGeometry) -> Result<Tensor> {
        self.forward_full(x, None, g)
    }

    /// conv(x) + residual, the add done inside the kernel.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.forward_full(
            x,
            Some(residual),
            ConvGeometry::same(self.stride, self.padding),
        )
    }

    fn forward_full(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        g: ConvGeometry,
    ) -> Result<Tensor> {
        let y = kernels::conv2d::conv2d_residual_cached(
            x,
            &self.weight,
            &self.bias,
            residual,
            g,
            Some(&self.packed),
        )?;
        match &self.lora {
            None => Ok(y),
            Some(l) => {
                let zero = self.bias.zeros_like()?;
                let down_bias = Tensor::zeros(l.down.dim(0)?, l.down.dtype(), l.down.device())?;
                let h = kernels::conv2d(x, &l.down, &down_bias, g)?;
                y + kernels::conv2d(&h, &l.up, &zero, ConvGeometry::same(1, 0))?
            }
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_geometry(x, ConvGeometry::same(self.stride, self.padding))
    }
}

/// GroupNorm with affine parameters; `forward_silu` fuses the SiLU that follows it in every block.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(vb: VarBuilder, c: usize, groups: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(c, "weight")?,
            bias: vb.get(c, "bias")?,
            groups,
            eps,
        })
    }

    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        kernels::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, true)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        kernels::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, false)
    }
}

/// Norms are created with the config's groups and eps everywhere in the model.
#[derive(Clone, Copy, Debug)]
pub struct NormSpec {
    pub groups: usize,
    pub eps: f64,
}

impl NormSpec {
    pub fn build(&self, vb: VarBuilder, c: usize) -> Result<GroupNorm> {
        GroupNorm::new(vb, c, self.groups, self.eps)
    }
}

/// GN-SiLU-conv3x3, GN-SiLU-conv3x3, plus a 1x1 shortcut when the channel count changes.
#[derive(Clone, Debug)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    nin_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    pub fn new(vb: VarBuilder, cin: usize, cout: usize, norm: NormSpec) -> Result<Self> {
        Ok(Self {
            norm1: norm.build(vb.pp("norm1"), cin)?,
            conv1: Conv2d::new(vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            norm2: norm.build(vb.pp("norm2"), cout)?,
            conv2: Conv2d::new(vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            nin_shortcut: if cin != cout {
                Some(Conv2d::new(vb.pp("nin_shortcut"), cin, cout, 1, 1, 0)?)
            } else {
                None
            },
        })
    }
}

impl Module for ResnetBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward_silu(x)?.apply(&self.conv1)?;
        let shortcut = match &self.nin_shortcut {
            Some(s) => x.apply(s)?,
            None => x.clone(),
        };
        self.conv2
            .forward_residual(&self.norm2.forward_silu(&h)?, &shortcut)
    }
}

/// Single-head spatial self-attention with a residual connection (LDM `AttnBlock`,
/// diffusers `Attention` with one head). q, k, v, proj_out are 1x1 convs = per-pixel linears.
#[derive(Clone, Debug)]
pub struct AttnBlock {
    norm: GroupNorm,
    q: Conv2d,
    k: Conv2d,
    v: Conv2d,
    proj_out: Conv2d,
}

/// A 1x1 conv applied to tokens (B, L, C) as a matmul.
fn linear_tokens(x: &Tensor, conv: &Conv2d) -> Result<Tensor> {
    let (cout, cin) = (conv.weight.dim(0)?, conv.weight.dim(1)?);
    let w = conv.weight.reshape((cout, cin))?;
    x.broadcast_matmul(&w.t()?)?.broadcast_add(&conv.bias)
}

impl AttnBlock {
    pub fn new(vb: VarBuilder, c: usize, norm: NormSpec) -> Result<Self> {
        Ok(Self {
            norm: norm.build(vb.pp("norm"), c)?,
            q: Conv2d::new(vb.pp("q"), c, c, 1, 1, 0)?,
            k: Conv2d::new(vb.pp("k"), c, c, 1, 1, 0)?,
            v: Conv2d::new(vb.pp("v"), c, c, 1, 1, 0)?,
            proj_out: Conv2d::new(vb.pp("proj_out"), c, c, 1, 1, 0)?,
        })
    }
}

impl Module for AttnBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self
            .norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = linear_tokens(&tokens, &self.q)?;
        let k = linear_tokens(&tokens, &self.k)?;
        let v = linear_tokens(&tokens, &self.v)?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (c as f64).sqrt()))?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let out = linear_tokens(&probs.matmul(&v)?, &self.proj_out)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        x + out
    }
}

/// Pad (0,1,0,1) then a 3x3 stride-2 conv without padding (LDM and diffusers alike).
#[derive(Clone, Debug)]
pub struct Downsample {
    conv: Conv2d,
}

impl Downsample {
    pub fn new(vb: VarBuilder, c: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(vb.pp("conv"), c, c, 3, 2, 0)?,
        })
    }
}

impl Module for Downsample {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = ConvGeometry {
            stride: 2,
            pad: (0, 1, 0, 1),
            upsample: 1,
        };
        self.conv.forward_geometry(x, g)
    }
}

/// Nearest-neighbour 2x, then a 3x3 conv.
#[derive(Clone, Debug)]
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    pub fn new(vb: VarBuilder, c: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(vb.pp("conv"), c, c, 3, 1, 1)?,
        })
    }
}

impl Module for Upsample {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // The 2x nearest upsampling is folded into the conv's gather: no 4x-sized copy.
        let g = ConvGeometry {
            stride: 1,
            pad: (1, 1, 1, 1),
            upsample: 2,
        };
        self.conv.forward_geometry(x, g)
    }
}

/// Middle of encoder and decoder: res-block, optional attention, res-block.
#[derive(Clone, Debug)]
pub struct MidBlock {
    block_1: ResnetBlock,
    attn_1: Option<AttnBlock>,
    block_2: ResnetBlock,
}

impl MidBlock {
    pub fn new(vb: VarBuilder, c: usize, attention: bool, norm: NormSpec) -> Result<Self> {
        Ok(Self {
            block_1: ResnetBlock::new(vb.pp("block_1"), c, c, norm)?,
            attn_1: if attention {
                Some(AttnBlock::new(vb.pp("attn_1"), c, norm)?)
            } else {
                None
            },
            block_2: ResnetBlock::new(vb.pp("block_2"), c, c, norm)?,
        })
    }
}

impl Module for MidBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.block_1.forward(x)?;
        if let Some(a) = &self.attn_1 {
            h = a.forward(&h)?;
        }
        self.block_2.forward(&h)
    }
}
