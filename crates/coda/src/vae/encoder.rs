//! The encoder: image (B, in, H, W) -> moments (B, 2*z, H/f, W/f).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{AttnBlock, Conv2d, Downsample, GroupNorm, MidBlock, NormSpec, ResnetBlock};
use super::config::VaeConfig;

#[derive(Clone, Debug)]
struct DownLevel {
    blocks: Vec<ResnetBlock>,
    attns: Vec<AttnBlock>,
    downsample: Option<Downsample>,
}

#[derive(Clone, Debug)]
pub struct Encoder {
    conv_in: Conv2d,
    down: Vec<DownLevel>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let norm = NormSpec {
            groups: cfg.norm_groups,
            eps: cfg.norm_eps,
        };
        let ch = &cfg.block_channels;
        let conv_in = Conv2d::new(vb.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?;
        let mut down = Vec::with_capacity(ch.len());
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            let vl = vb.pp("down").pp(i);
            let mut blocks = Vec::new();
            let mut attns = Vec::new();
            for j in 0..cfg.num_res_blocks {
                blocks.push(ResnetBlock::new(vl.pp("block").pp(j), cin, cout, norm)?);
                cin = cout;
                if cfg.encoder_attention[i] {
                    attns.push(AttnBlock::new(vl.pp("attn").pp(j), cout, norm)?);
                }
            }
            let downsample = if i + 1 != ch.len() {
                Some(Downsample::new(vl.pp("downsample"), cout)?)
            } else {
                None
            };
            down.push(DownLevel {
                blocks,
                attns,
                downsample,
            });
        }
        let last = *ch.last().unwrap();
        Ok(Self {
            conv_in,
            down,
            mid: MidBlock::new(vb.pp("mid"), last, cfg.mid_attention, norm)?,
            norm_out: norm.build(vb.pp("norm_out"), last)?,
            conv_out: Conv2d::new(vb.pp("conv_out"), last, 2 * cfg.z_channels, 3, 1, 1)?,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.apply(&self.conv_in)?;
        for level in &self.down {
            for (j, block) in level.blocks.iter().enumerate() {
                h = block.forward(&h)?;
                if let Some(a) = level.attns.get(j) {
                    h = a.forward(&h)?;
                }
            }
            if let Some(d) = &level.downsample {
                h = d.forward(&h)?;
            }
        }
        let h = self.mid.forward(&h)?;
        self.norm_out.forward_silu(&h)?.apply(&self.conv_out)
    }
}
