//! The decoder: latent (B, z, h, w) -> image (B, out, h*f, w*f).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{AttnBlock, Conv2d, GroupNorm, MidBlock, NormSpec, ResnetBlock, Upsample};
use super::config::VaeConfig;

#[derive(Clone, Debug)]
struct UpLevel {
    blocks: Vec<ResnetBlock>,
    attns: Vec<AttnBlock>,
    upsample: Option<Upsample>,
}

#[derive(Clone, Debug)]
pub struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    /// Indexed by level (0 = full resolution), run from the coarsest level up.
    up: Vec<UpLevel>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let norm = NormSpec {
            groups: cfg.norm_groups,
            eps: cfg.norm_eps,
        };
        let ch = &cfg.block_channels;
        let last = *ch.last().unwrap();
        let conv_in = Conv2d::new(vb.pp("conv_in"), cfg.z_channels, last, 3, 1, 1)?;
        let mid = MidBlock::new(vb.pp("mid"), last, cfg.mid_attention, norm)?;
        let mut up: Vec<Option<UpLevel>> = vec![None; ch.len()];
        let mut cin = last;
        for i in (0..ch.len()).rev() {
            let vl = vb.pp("up").pp(i);
            let cout = ch[i];
            let mut blocks = Vec::new();
            let mut attns = Vec::new();
            for j in 0..cfg.num_res_blocks + 1 {
                blocks.push(ResnetBlock::new(vl.pp("block").pp(j), cin, cout, norm)?);
                cin = cout;
                if cfg.decoder_attention[i] {
                    attns.push(AttnBlock::new(vl.pp("attn").pp(j), cout, norm)?);
                }
            }
            let upsample = if i != 0 {
                Some(Upsample::new(vl.pp("upsample"), cout)?)
            } else {
                None
            };
            up[i] = Some(UpLevel {
                blocks,
                attns,
                upsample,
            });
        }
        Ok(Self {
            conv_in,
            mid,
            up: up
                .into_iter()
                .map(|l| l.expect("every level built"))
                .collect(),
            norm_out: norm.build(vb.pp("norm_out"), ch[0])?,
            conv_out: Conv2d::new(vb.pp("conv_out"), ch[0], cfg.out_channels, 3, 1, 1)?,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid.forward(&z.apply(&self.conv_in)?)?;
        for level in self.up.iter().rev() {
            for (j, block) in level.blocks.iter().enumerate() {
                h = block.forward(&h)?;
                if let Some(a) = level.attns.get(j) {
                    h = a.forward(&h)?;
                }
            }
            if let Some(u) = &level.upsample {
                h = u.forward(&h)?;
            }
        }
        self.norm_out.forward_silu(&h)?.apply(&self.conv_out)
    }
}
