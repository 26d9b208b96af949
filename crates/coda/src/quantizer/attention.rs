//! CODA's attention-based code assignment and its multi-scale residual quantizer
//! (coda-method.md §4-6). One codebook E (V x C) and one q/k/v projection set serve all scales;
//! a code's vector is `to_v(E[n])`, not `E[n]`.

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::resample::{Mode, Resize2d};

/// The normalisation on queries and keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    RmsNorm,
    LayerNorm,
    None,
}

/// How a query picks its code.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantizerKind {
    /// CODA: argmax of attention logits between normalised to_q(query) and to_k(E); the code
    /// vector is `to_v(E[n])`.
    #[default]
    Attention,
    /// The VQ-VAE / VAR baseline: the nearest code in Euclidean distance, code vector `E[n]`.
    Nearest,
    /// As `Nearest` on l2-normalised queries and codes (ViT-VQGAN): the code vector is `E[n] / |E[n]|`.
    NearestL2,
}

/// How the attention quantizer picks a code for a residual (the tokens it writes); the code
/// vectors, the residual loop and decoding are the same either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AssignRule {
    /// The reference's rule: argmax of the attention logits (LeapLabTHU/CODA,
    /// `tokenizer/coda/models/quantizer`: the hard one-hot of the softmax).
    #[default]
    Attention,
    /// The code whose vector `to_v(E[n])` is nearest the residual in Euclidean distance: what
    /// the decoder actually receives is then as close to the latent as the codebook allows. Not
    /// the reference's; an option of this implementation (README, Results).
    NearestValue,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantizerConfig {
    /// Attention (CODA) or nearest-neighbour (the baselines); absent in older configs = attention.
    #[serde(default)]
    pub kind: QuantizerKind,
    /// The attention kind's assignment rule; absent in older configs = the reference's.
    #[serde(default, skip_serializing_if = "is_attention_rule")]
    pub assign: AssignRule,
    /// V: the number of codes.
    pub codebook_size: usize,
    /// C: the latent channels.
    pub dim: usize,
    /// d_a: the attention dimension of queries and keys (32 in both paper configs).
    pub attn_dim: usize,
    pub norm: NormKind,
    /// eps of the q/k norms (1e-5, PyTorch's RMSNorm/LayerNorm default).
    pub norm_eps: f64,
    /// β of the quantization loss (0.05 in both paper configs).
    pub beta: f64,
    /// τ of the entropy loss (0.01, hard-coded in the reference).
    pub entropy_temperature: f64,
}

fn is_attention_rule(r: &AssignRule) -> bool {
    *r == AssignRule::Attention
}

impl QuantizerConfig {
    pub fn new(codebook_size: usize, dim: usize) -> Self {
        Self {
            kind: QuantizerKind::Attention,
            assign: AssignRule::Attention,
            codebook_size,
            dim,
            attn_dim: 32,
            norm: NormKind::RmsNorm,
            norm_eps: 1e-5,
            beta: 0.05,
            entropy_temperature: 0.01,
        }
    }

    /// Parameter names (reference state-dict names) and shapes.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (v, c, d) = (self.codebook_size, self.dim, self.attn_dim);
        if self.kind != QuantizerKind::Attention {
            return vec![("codebooks.weight".to_string(), vec![v, c])];
        }
        let mut p = vec![
            ("codebooks.weight".to_string(), vec![v, c]),
            ("attn.to_q.weight".into(), vec![d, c]),
            ("attn.to_q.bias".into(), vec![d]),
            ("attn.to_k.weight".into(), vec![d, c]),
            ("attn.to_k.bias".into(), vec![d]),
            ("attn.to_v.weight".into(), vec![c, c]),
            ("attn.to_v.bias".into(), vec![c]),
        ];
        for n in ["norm_q", "norm_k"] {
            match self.norm {
                NormKind::RmsNorm => p.push((format!("attn.{n}.weight"), vec![d])),
                NormKind::LayerNorm => {
                    p.push((format!("attn.{n}.weight"), vec![d]));
                    p.push((format!("attn.{n}.bias"), vec![d]));
                }
                NormKind::None => {}
            }
        }
        p
    }
}

/// Softmax with the max subtracted as a constant: differentiable and stable (candle's fused
/// `softmax_last_dim` has no gradient).
pub fn softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    let e = x.broadcast_sub(&x.max_keepdim(dim)?.detach())?.exp()?;
    e.broadcast_div(&e.sum_keepdim(dim)?)
}

pub fn log_softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    let shifted = x.broadcast_sub(&x.max_keepdim(dim)?.detach())?;
    shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(dim)?.log()?)
}

#[derive(Clone, Debug)]
struct Norm {
    kind: NormKind,
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    eps: f64,
}

impl Norm {
    fn new(vb: VarBuilder, kind: NormKind, d: usize, eps: f64) -> Result<Self> {
        let (weight, bias) = match kind {
            NormKind::RmsNorm => (Some(vb.get(d, "weight")?), None),
            NormKind::LayerNorm => (Some(vb.get(d, "weight")?), Some(vb.get(d, "bias")?)),
            NormKind::None => (None, None),
        };
        Ok(Self {
            kind,
            weight,
            bias,
            eps,
        })
    }

    /// Composite ops over the last dim, so that the gains are trainable.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match self.kind {
            NormKind::None => return Ok(x.clone()),
            NormKind::RmsNorm => x.broadcast_mul(
                &(x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
                    .sqrt()?
                    .recip()?,
            )?,
            NormKind::LayerNorm => {
                let c = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
                c.broadcast_div(&(c.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?)?
            }
        };
        let y = match &self.weight {
            Some(w) => y.broadcast_mul(w)?,
            None => y,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.broadcast_matmul(&w.t()?)?.broadcast_add(b)
}

/// What inference needs: normalised, pre-scaled keys and the value table, both (V, ·).
#[derive(Clone, Debug)]
pub struct CodeTables {
    /// Normalised keys scaled by 1/sqrt(d_a), (V, d_a).
    keys: Tensor,
    /// Codes compared per step.
    chunk: usize,
    /// The keys prepared for the CPU assignment kernel, built at the first CPU assignment.
    codebook: std::sync::OnceLock<std::sync::Arc<crate::kernels::assign::Codebook>>,
    /// `to_v(E)`: the vector each code decodes to, (V, C).
    pub values: Tensor,
}

/// Codes are compared in chunks of this many, so that no (N, V) logits buffer is ever built.
pub const ASSIGN_CHUNK: usize = 4096;

/// The outputs of a training-mode forward pass (coda-method.md §4-6).
#[derive(Debug)]
pub struct TrainOutput {
    /// Token ids per scale, (B, h_k, w_k), u32.
    pub ids: Vec<Tensor>,
    /// The quantized latent: sum of the upsampled straight-through code maps.
    pub f_hat: Tensor,
    /// Quantization loss, mean over scales.
    pub loss_q: Tensor,
    /// Entropy loss (sample minus batch-mean entropy), mean over scales.
    pub loss_entropy: Tensor,
    /// What each scale quantized: the residual resampled to the scale, (B, C, h_k, w_k),
    /// detached (for dead-code restarts).
    pub residuals: Vec<Tensor>,
}

/// What one scale of the residual loop produces.
struct ScaleStep {
    /// (B, h, w) u32.
    ids: Tensor,
    /// The code map (B, C, h, w) added to f̂; straight-through in training.
    z: Tensor,
    loss_q: Option<Tensor>,
    loss_entropy: Option<Tensor>,
}

impl ScaleStep {
    fn inference(ids: Tensor, z: Tensor) -> Self {
        Self {
            ids,
            z,
            loss_q: None,
            loss_entropy: None,
        }
    }

    fn training(ids: Tensor, z: Tensor, loss_q: Tensor, loss_entropy: Option<Tensor>) -> Self {
        Self {
            ids,
            z,
            loss_q: Some(loss_q),
            loss_entropy,
        }
    }
}

/// The residual loop's outputs over all scales.
#[derive(Default)]
struct LoopOutput {
    ids: Vec<Tensor>,
    residuals: Vec<Tensor>,
    f_hat: Option<Tensor>,
    loss_q: Vec<Tensor>,
    loss_entropy: Vec<Tensor>,
}

/// The attention projections; absent for the nearest-neighbour kinds.
#[derive(Clone, Debug)]
struct Projections {
    to_q: (Tensor, Tensor),
    to_k: (Tensor, Tensor),
    to_v: (Tensor, Tensor),
    norm_q: Norm,
    norm_k: Norm,
}

#[derive(Clone, Debug)]
pub struct CodaQuantizer {
    config: QuantizerConfig,
    codebook: Tensor,
    attn: Option<Projections>,
}

/// Rows scaled to unit l2 norm (eps as F.normalize).
fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    x.broadcast_div(&(x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()? + 1e-12)?)
}

impl CodaQuantizer {
    /// `vb` points at the quantizer's root (its keys are `codebooks.weight`, `attn.to_q.weight`, ...).
    pub fn new(config: QuantizerConfig, vb: VarBuilder) -> Result<Self> {
        let (v, c, d) = (config.codebook_size, config.dim, config.attn_dim);
        let a = vb.pp("attn");
        let lin = |name: &str, o: usize, i: usize| -> Result<(Tensor, Tensor)> {
            Ok((
                a.pp(name).get((o, i), "weight")?,
                a.pp(name).get(o, "bias")?,
            ))
        };
        let attn = if config.kind == QuantizerKind::Attention {
            Some(Projections {
                to_q: lin("to_q", d, c)?,
                to_k: lin("to_k", d, c)?,
                to_v: lin("to_v", c, c)?,
                norm_q: Norm::new(a.pp("norm_q"), config.norm, d, config.norm_eps)?,
                norm_k: Norm::new(a.pp("norm_k"), config.norm, d, config.norm_eps)?,
            })
        } else {
            None
        };
        Ok(Self {
            codebook: vb.pp("codebooks").get((v, c), "weight")?,
            attn,
            config,
        })
    }

    pub fn config(&self) -> &QuantizerConfig {
        &self.config
    }

    fn scale(&self) -> f64 {
        1.0 / (self.config.attn_dim as f64).sqrt()
    }

    /// Precompute keys and values from the current parameters.
    pub fn tables(&self) -> Result<CodeTables> {
        self.tables_chunked(ASSIGN_CHUNK)
    }

    /// As [`tables`](Self::tables), comparing codes `chunk` at a time.
    pub fn tables_chunked(&self, chunk: usize) -> Result<CodeTables> {
        let (keys, values) = self.keys_values()?;
        let keys = self.assignment_keys(keys, &values)?.detach();
        let (keys, values) = (keys.contiguous()?, values.detach().contiguous()?);
        Ok(CodeTables {
            keys,
            chunk: chunk.max(1),
            values,
            codebook: Default::default(),
        })
    }

    /// Keys (pre-scaled so that a plain dot product with a query is the logit) and code
    /// vectors, both (V, ·), differentiable in the parameters.
    /// For `Nearest` the key of code e is [e, -|e|²/2] and the query [q, 1], so that the
    /// largest dot product is the smallest Euclidean distance.
    fn keys_values(&self) -> Result<(Tensor, Tensor)> {
        match (&self.attn, self.config.kind) {
            (Some(a), _) => {
                let keys = a
                    .norm_k
                    .forward(&linear(&self.codebook, &a.to_k.0, &a.to_k.1)?)?;
                let values = linear(&self.codebook, &a.to_v.0, &a.to_v.1)?;
                Ok(((keys * self.scale())?, values))
            }
            (None, QuantizerKind::NearestL2) => {
                let e = l2_normalize(&self.codebook)?;
                Ok((e.clone(), e))
            }
            (None, _) => {
                let half_sq = (self.codebook.sqr()?.sum_keepdim(1)? * -0.5)?;
                Ok((
                    Tensor::cat(&[&self.codebook, &half_sq], 1)?,
                    self.codebook.clone(),
                ))
            }
        }
    }

    fn nearest_value(&self) -> bool {
        self.config.kind == QuantizerKind::Attention
            && self.config.assign == AssignRule::NearestValue
    }

    /// The keys the hard assignment compares queries with: the attention keys, or under
    /// [`AssignRule::NearestValue`] `[v, -|v|²/2]` per code vector v (with queries `[r, 1]`, the
    /// largest dot product is the nearest code vector, as for the `Nearest` kind).
    /// Differentiable in `values` (the entropy loss of this rule moves the code vectors).
    fn assignment_keys(&self, keys: Tensor, values: &Tensor) -> Result<Tensor> {
        if !self.nearest_value() {
            return Ok(keys);
        }
        let half_sq = (values.sqr()?.sum_keepdim(1)? * -0.5)?;
        Tensor::cat(&[values, &half_sq], 1)
    }

    /// Queries (N, ·) for the hard assignment of a (B, C, h, w) residual map (see
    /// [`assignment_keys`](Self::assignment_keys)).
    fn assignment_queries(&self, q: &Tensor) -> Result<Tensor> {
        if !self.nearest_value() {
            return self.queries(q);
        }
        let tokens = Self::tokens(&q.detach())?;
        let ones = Tensor::ones((tokens.dim(0)?, 1), tokens.dtype(), tokens.device())?;
        Tensor::cat(&[&tokens, &ones], 1)
    }

    /// (N, C) tokens of a (B, C, h, w) feature map, in (b, y, x) order.
    fn tokens(q: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = q.dims4()?;
        q.permute((0, 2, 3, 1))?.reshape((b * h * w, c))
    }

    /// What is compared with the keys: normalised to_q(q) for attention, the (normalised)
    /// features themselves for nearest-neighbour kinds.
    fn queries_of_tokens(&self, tokens: &Tensor) -> Result<Tensor> {
        match (&self.attn, self.config.kind) {
            (Some(a), _) => a.norm_q.forward(&linear(tokens, &a.to_q.0, &a.to_q.1)?),
            (None, QuantizerKind::NearestL2) => l2_normalize(tokens),
            (None, _) => {
                let ones = Tensor::ones((tokens.dim(0)?, 1), tokens.dtype(), tokens.device())?;
                Tensor::cat(&[tokens, &ones], 1)
            }
        }
    }

    /// Queries (N, ·) of a (B, C, h, w) feature map, in (b, y, x) order.
    fn queries(&self, q: &Tensor) -> Result<Tensor> {
        self.queries_of_tokens(&Self::tokens(q)?)
    }

    /// Hard assignment: argmax over codes of the attention logits, (B, h, w) u32. Runs over
    /// chunks of codes with a running max, so memory is O(N · chunk), never O(N · V). Ties go to
    /// the lowest index, as `torch.argmax`.
    pub fn assign(&self, tables: &CodeTables, q: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = q.dims4()?;
        self.assign_queries(tables, &self.assignment_queries(q)?, (b, h, w))
    }

    /// [`assign`](Self::assign) from queries already computed, (B·h·w, ·) -> (B, h, w) ids.
    fn assign_queries(
        &self,
        tables: &CodeTables,
        queries: &Tensor,
        (b, h, w): (usize, usize, usize),
    ) -> Result<Tensor> {
        let queries = queries.detach().contiguous()?;
        if crate::kernels::custom_ops(queries.device()) && queries.dtype() == DType::F32 {
            // The fused GEMM + running argmax kernel.
            let (n, d) = queries.dims2()?;
            let codebook = match tables.codebook.get() {
                Some(c) => c.clone(),
                None => {
                    let c = crate::kernels::assign::Codebook::new(
                        tables.keys.flatten_all()?.to_vec1::<f32>()?,
                        tables.keys.dim(0)?,
                        d,
                    );
                    tables
                        .codebook
                        .get_or_init(|| std::sync::Arc::new(c))
                        .clone()
                }
            };
            let ids = codebook.argmax(&queries.flatten_all()?.to_vec1::<f32>()?, n, tables.chunk);
            return Tensor::from_vec(ids, (b, h, w), queries.device());
        }
        self.argmax_chunked(tables, &queries)?.reshape((b, h, w))
    }

    /// The same assignment from candle ops, chunk by chunk (other devices; and the reference
    /// the kernel is tested against).
    pub fn assign_composite(&self, tables: &CodeTables, q: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = q.dims4()?;
        let queries = self.assignment_queries(q)?.contiguous()?;
        self.argmax_chunked(tables, &queries)?.reshape((b, h, w))
    }

    /// Chunked argmax of `queries · keysᵀ` over codes from candle ops, (N,) u32.
    fn argmax_chunked(&self, tables: &CodeTables, queries: &Tensor) -> Result<Tensor> {
        let v = tables.keys.dim(0)?;
        let mut best: Option<(Tensor, Tensor)> = None;
        let mut start = 0;
        while start < v {
            let n = tables.chunk.min(v - start);
            let logits = queries.matmul(&tables.keys.narrow(0, start, n)?.t()?)?;
            let m = logits.max_keepdim(1)?;
            let i = (logits.argmax_keepdim(1)?.to_dtype(DType::U32)? + start as f64)?;
            best = Some(match best {
                None => (m, i),
                Some((bm, bi)) => {
                    let better = m.gt(&bm)?;
                    (better.where_cond(&m, &bm)?, better.where_cond(&i, &bi)?)
                }
            });
            start += n;
        }
        let (_, ids) = best.expect("a codebook has at least one code");
        ids.flatten_all()
    }

    /// Code vectors of ids (B, h, w) -> (B, C, h, w).
    pub fn lookup(&self, tables: &CodeTables, ids: &Tensor) -> Result<Tensor> {
        let (b, h, w) = ids.dims3()?;
        let v = tables.values.index_select(&ids.flatten_all()?, 0)?;
        v.reshape((b, h, w, self.config.dim))?
            .permute((0, 3, 1, 2))?
            .contiguous()
    }

    /// The multi-scale residual loop (coda-method.md §5), shared by inference and every training
    /// forward: at each scale (h, w), the residual is area-downsampled to q, `step` assigns codes
    /// to q and returns the code map z (straight-through in training), which is bicubic-upsampled,
    /// added to f̂ and subtracted from the residual. The residual is never detached.
    fn residual_loop(
        &self,
        f: &Tensor,
        scales: &[(usize, usize)],
        mut step: impl FnMut(&Tensor, (usize, usize)) -> Result<ScaleStep>,
    ) -> Result<LoopOutput> {
        let (_, _, hh, ww) = f.dims4()?;
        let mut residual = f.clone();
        let mut f_hat = f.zeros_like()?;
        let mut out = LoopOutput::default();
        for &s in scales {
            let q = Resize2d::new(Mode::Area, (hh, ww), s, f.device())?.apply(&residual)?;
            let ScaleStep {
                ids,
                z,
                loss_q,
                loss_entropy,
            } = step(&q, s)?;
            let up = Resize2d::new(Mode::Bicubic, s, (hh, ww), f.device())?.apply(&z)?;
            f_hat = (f_hat + &up)?;
            residual = (residual - up)?;
            out.ids.push(ids);
            out.residuals.push(q.detach());
            out.loss_q.extend(loss_q);
            out.loss_entropy.extend(loss_entropy);
        }
        out.f_hat = Some(f_hat);
        Ok(out)
    }

    /// Multi-scale residual encoding of a normalised latent f (B, C, H, W): ids per scale and f̂.
    pub fn encode(
        &self,
        tables: &CodeTables,
        f: &Tensor,
        scales: &[(usize, usize)],
    ) -> Result<(Vec<Tensor>, Tensor)> {
        let out = self.residual_loop(f, scales, |q, _| {
            let ids = self.assign(tables, q)?;
            let z = self.lookup(tables, &ids)?;
            Ok(ScaleStep::inference(ids, z))
        })?;
        Ok((out.ids, out.f_hat.expect("the loop sets f_hat")))
    }

    /// f̂ from ids of the first `ids.len()` scales, at latent size (H, W).
    pub fn decode(
        &self,
        tables: &CodeTables,
        ids: &[Tensor],
        (hh, ww): (usize, usize),
    ) -> Result<Tensor> {
        let mut f_hat: Option<Tensor> = None;
        for idx in ids {
            let (_, h, w) = idx.dims3()?;
            let z = self.lookup(tables, idx)?;
            let up = Resize2d::new(Mode::Bicubic, (h, w), (hh, ww), idx.device())?.apply(&z)?;
            f_hat = Some(match f_hat {
                None => up,
                Some(acc) => (acc + up)?,
            });
        }
        f_hat.ok_or_else(|| candle_core::Error::Msg("decode needs at least one scale".into()))
    }

    /// Training forward: straight-through soft one-hot, quantization and entropy losses, with
    /// gradients across scales (the residual is not detached). In f32, on any device, the soft
    /// assignment and the entropy loss are recomputing ops (no (N, V) tensor is kept for the
    /// backward pass); in other dtypes plain candle ops (`composite`). The nearest-neighbour
    /// baselines have their own assignment and loss.
    pub fn forward_train(&self, f: &Tensor, scales: &[(usize, usize)]) -> Result<TrainOutput> {
        let fused = f.dtype() == DType::F32;
        self.forward_train_with(f, scales, fused)
    }

    /// [`forward_train`](Self::forward_train) with the recomputing ops: the same values and
    /// gradients as [`forward_train_composite`](Self::forward_train_composite).
    pub fn forward_train_fused(
        &self,
        f: &Tensor,
        scales: &[(usize, usize)],
    ) -> Result<TrainOutput> {
        self.forward_train_with(f, scales, true)
    }

    /// The training forward from candle ops, materialising (N, V) per scale: other devices, and
    /// the reference the fused path is tested against.
    pub fn forward_train_composite(
        &self,
        f: &Tensor,
        scales: &[(usize, usize)],
    ) -> Result<TrainOutput> {
        self.forward_train_with(f, scales, false)
    }

    fn forward_train_with(
        &self,
        f: &Tensor,
        scales: &[(usize, usize)],
        fused: bool,
    ) -> Result<TrainOutput> {
        let (b, c, _, _) = f.dims4()?;
        let (keys, values) = self.keys_values()?;
        // (N, C) rows of scale (h, w) -> (B, C, h, w) maps.
        let to_map = |t: Tensor, (h, w): (usize, usize)| -> Result<Tensor> {
            t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()
        };
        let out = if self.attn.is_none() {
            let tables = CodeTables {
                keys: keys.detach().contiguous()?,
                chunk: ASSIGN_CHUNK,
                values: values.detach(),
                codebook: Default::default(),
            };
            self.residual_loop(f, scales, |q, s| {
                self.nearest_step(q, s, &tables, &values, to_map)
            })?
        } else if fused {
            use super::soft_assign::{entropy, soft_codes};
            let (keys, values) = (keys.contiguous()?, values.contiguous()?);
            // The keys the rule compares with, built once: the attention keys, or under the
            // nearest-value rule [v, -|v|²/2], differentiable in v for its entropy term.
            let rule_keys = self.assignment_keys(keys.clone(), &values)?.contiguous()?;
            let tables = CodeTables {
                keys: rule_keys.detach(),
                chunk: ASSIGN_CHUNK,
                values: values.detach(),
                codebook: Default::default(),
            };
            self.residual_loop(f, scales, |q, (h, w)| {
                let queries = self.queries(q)?.contiguous()?;
                let rule_queries = if self.nearest_value() {
                    self.assignment_queries(q)?.contiguous()?
                } else {
                    queries.clone()
                };
                let idx = self.assign_queries(&tables, &rule_queries, (b, h, w))?;
                let hard = values.index_select(&idx.flatten_all()?, 0)?; // (N, C): grads to E_v
                let soft = soft_codes(&queries, &keys, &values)?; // 0, grads to q and k
                let z = to_map((&hard + soft)?, (h, w))?;
                let z_hat = to_map(hard, (h, w))?;
                // Under the nearest-value rule the entropy acts on softmax(-|r - v|²/2τ), the
                // soft version of the rule itself, so that it spreads the codes that rule uses.
                let entropy = entropy(&rule_queries, &rule_keys, self.config.entropy_temperature)?;
                let loss_q = self.quantization_loss(&z, &z_hat, q)?;
                Ok(ScaleStep::training(idx, z, loss_q, Some(entropy)))
            })?
        } else {
            let v = self.config.codebook_size;
            let codes = Tensor::arange(0u32, v as u32, f.device())?.unsqueeze(0)?;
            let rule_keys = self.assignment_keys(keys.clone(), &values)?;
            self.residual_loop(f, scales, |q, (h, w)| {
                let logits = self.queries(q)?.matmul(&keys.t()?)?; // (N, V), keys pre-scaled
                let p = softmax(&logits, 1)?;
                let rule_logits = if self.nearest_value() {
                    self.assignment_queries(q)?.matmul(&rule_keys.t()?)?
                } else {
                    logits.clone()
                };
                let idx = rule_logits.argmax_keepdim(1)?.to_dtype(DType::U32)?; // (N, 1)
                let hard = idx.broadcast_eq(&codes)?.to_dtype(DType::F32)?;
                let st = ((&hard - p.detach())? + &p)?;
                let z = to_map(st.matmul(&values)?, (h, w))?;
                let z_hat = to_map(hard.matmul(&values)?, (h, w))?;
                let entropy = self.entropy_loss(&rule_logits)?;
                let loss_q = self.quantization_loss(&z, &z_hat, q)?;
                Ok(ScaleStep::training(
                    idx.reshape((b, h, w))?,
                    z,
                    loss_q,
                    Some(entropy),
                ))
            })?
        };
        let k = scales.len() as f64;
        let mean = |l: Vec<Tensor>| -> Result<Tensor> {
            if l.is_empty() {
                Tensor::zeros((), f.dtype(), f.device())
            } else {
                Tensor::stack(&l, 0)?.sum_all()? / k
            }
        };
        Ok(TrainOutput {
            ids: out.ids,
            f_hat: out.f_hat.expect("the loop sets f_hat"),
            loss_q: mean(out.loss_q)?,
            loss_entropy: mean(out.loss_entropy)?,
            residuals: out.residuals,
        })
    }

    /// One scale of the baselines (VQ-VAE; VAR-style when there are several scales): nearest
    /// code, straight-through identity estimator, codebook + β·commitment loss, the residual
    /// taken from the straight-through map. No entropy loss.
    fn nearest_step(
        &self,
        q: &Tensor,
        (h, w): (usize, usize),
        tables: &CodeTables,
        values: &Tensor,
        to_map: impl Fn(Tensor, (usize, usize)) -> Result<Tensor>,
    ) -> Result<ScaleStep> {
        let idx = self.assign(tables, &q.detach())?; // (B, h, w)
        let tokens = Self::tokens(q)?;
        let tokens = match self.config.kind {
            QuantizerKind::NearestL2 => l2_normalize(&tokens)?,
            _ => tokens,
        };
        let zq = values.index_select(&idx.flatten_all()?, 0)?; // (N, C), grad to E
        let st = (&tokens + (&zq - &tokens)?.detach())?;
        let loss_q = ((tokens.detach() - &zq)?.sqr()?.mean_all()?
            + ((&tokens - zq.detach())?.sqr()?.mean_all()? * self.config.beta)?)?;
        Ok(ScaleStep::training(idx, to_map(st, (h, w))?, loss_q, None))
    }

    /// L_q = mean (z − q)² + mean (sg[ẑ] − q)² + β · mean (ẑ − sg[q])² (coda-method.md §6.1).
    fn quantization_loss(&self, z: &Tensor, z_hat: &Tensor, q: &Tensor) -> Result<Tensor> {
        ((z - q)?.sqr()?.mean_all()? + (z_hat.detach() - q)?.sqr()?.mean_all()?)?
            .add(&((z_hat - q.detach())?.sqr()?.mean_all()? * self.config.beta)?)
    }

    /// MAGVIT-v2 style entropy loss on (N, V) logits, as the reference computes it (including the
    /// no-op +1e-5 inside the log-softmax).
    fn entropy_loss(&self, logits: &Tensor) -> Result<Tensor> {
        let x = (logits / self.config.entropy_temperature)?;
        let p = softmax(&x, 1)?;
        let logp = log_softmax(&(&x + 1e-5)?, 1)?;
        let h_sample = (p.mul(&logp)?.sum(1)?.neg()?).mean_all()?;
        let p_avg = p.mean(0)?;
        let h_avg = p_avg.mul(&(&p_avg + 1e-5)?.log()?)?.sum_all()?.neg()?;
        h_sample - h_avg
    }
}

/// A fresh quantizer's parameters, initialised as the reference does: codebook N(0, 1) (U(±1/V)
/// for the nearest-neighbour baselines, as taming's VQGAN), linears
/// U(±1/sqrt(C)) for weights and biases (PyTorch's default), norm gains 1 (and biases 0).
pub fn init_parameters(
    config: &QuantizerConfig,
    seed: u64,
    device: &Device,
) -> Result<Vec<(String, Tensor)>> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let bound = 1.0 / (config.dim as f32).sqrt();
    let uniform = rand_distr::Uniform::new(-bound, bound);
    config
        .parameter_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> =
                if name == "codebooks.weight" && config.kind != QuantizerKind::Attention {
                    // The baselines start as taming's VQGAN does: U(-1/V, 1/V).
                    let b = 1.0 / config.codebook_size as f32;
                    let u = rand_distr::Uniform::new(-b, b);
                    (0..n).map(|_| u.sample(&mut rng)).collect()
                } else if name == "codebooks.weight" {
                    (0..n)
                        .map(|_| rand_distr::StandardNormal.sample(&mut rng))
                        .collect()
                } else if name.contains("norm_") {
                    vec![if name.ends_with("weight") { 1.0 } else { 0.0 }; n]
                } else {
                    (0..n).map(|_| uniform.sample(&mut rng)).collect()
                };
            Ok((name, Tensor::from_vec(data, shape, device)?))
        })
        .collect()
}
