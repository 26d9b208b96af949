//! Token ids of a batch of images: one (B, h_k, w_k) map per scale, coarse to fine.

use candle_core::{DType, Device, Result, Tensor};

#[derive(Clone, Debug)]
pub struct Tokens {
    /// (h_k, w_k) of each scale; the last one is the latent size.
    pub scales: Vec<(usize, usize)>,
    /// One u32 tensor (B, h_k, w_k) per scale.
    pub ids: Vec<Tensor>,
}

impl Tokens {
    pub fn batch(&self) -> usize {
        self.ids.first().map(|t| t.dim(0).unwrap_or(0)).unwrap_or(0)
    }

    /// Tokens per image: sum of h_k · w_k.
    pub fn len_per_image(&self) -> usize {
        self.scales.iter().map(|(h, w)| h * w).sum()
    }

    pub fn latent_size(&self) -> (usize, usize) {
        *self.scales.last().expect("at least one scale")
    }

    /// (B, L) u32: scale-major, row-major within a scale (the order an AR model consumes).
    pub fn flat(&self) -> Result<Tensor> {
        let b = self.batch();
        let parts: Vec<Tensor> = self
            .ids
            .iter()
            .map(|t| t.reshape((b, ())))
            .collect::<Result<_>>()?;
        Tensor::cat(&parts, 1)
    }

    /// Inverse of [`flat`](Self::flat).
    pub fn from_flat(flat: &Tensor, scales: &[(usize, usize)]) -> Result<Self> {
        let (b, l) = flat.dims2()?;
        let total: usize = scales.iter().map(|(h, w)| h * w).sum();
        if l != total {
            candle_core::bail!("{l} tokens per image, but the scales {scales:?} need {total}");
        }
        let mut off = 0;
        let mut ids = Vec::with_capacity(scales.len());
        for &(h, w) in scales {
            ids.push(flat.narrow(1, off, h * w)?.reshape((b, h, w))?);
            off += h * w;
        }
        Ok(Self {
            scales: scales.to_vec(),
            ids,
        })
    }

    /// Rows `start..start+len` of the batch.
    pub fn slice(&self, start: usize, len: usize) -> Result<Self> {
        Ok(Self {
            scales: self.scales.clone(),
            ids: self
                .ids
                .iter()
                .map(|t| t.narrow(0, start, len))
                .collect::<Result<_>>()?,
        })
    }

    /// Concatenate batches with the same scales.
    pub fn cat(parts: &[Tokens]) -> Result<Self> {
        let first = parts
            .first()
            .ok_or_else(|| candle_core::Error::Msg("no tokens to concatenate".into()))?;
        let ids = (0..first.scales.len())
            .map(|k| {
                Tensor::cat(
                    &parts.iter().map(|p| p.ids[k].clone()).collect::<Vec<_>>(),
                    0,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            scales: first.scales.clone(),
            ids,
        })
    }

    /// Per-scale ids as plain vectors (row-major), for writing and counting.
    pub fn to_vecs(&self) -> Result<Vec<Vec<u32>>> {
        self.ids
            .iter()
            .map(|t| {
                t.to_device(&Device::Cpu)?
                    .to_dtype(DType::U32)?
                    .flatten_all()?
                    .to_vec1::<u32>()
            })
            .collect()
    }
}
