//! The FLUX.1 diffusion transformer (dev and Fill), computing what diffusers'
//! `FluxTransformer2DModel` computes. Tensor and module names are diffusers'; every projection
//! is a [`Linear`], the single place adapters hook in.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use candle_core::TensorId;
use candle_core::{DType, Device, Module, Tensor, D};

use crate::attention::{rope_attention, Rope};
use crate::config::FluxConfig;
use crate::cpu_kernels::gelu_tanh;
use crate::error::{FluxError, Result};
use crate::linear::{JointLinears, Linear, VisitLinears};
use crate::norms::{RmsNorm, RmsRounding};
use crate::step_cache::{StepCache, TaylorSeerCache};
use crate::weights::{check_model_dtype, Checkpoint, WeightSource};

type CResult<T> = candle_core::Result<T>;

const NORM_EPS: f32 = 1e-6;
const TIMESTEP_CHANNELS: usize = 256;

/// LayerNorm without affine parameters, as FLUX's AdaLN layers use it.
#[derive(Debug, Clone)]
struct PlainLayerNorm {
    ones: Tensor,
    zeros: Tensor,
}

impl PlainLayerNorm {
    fn new(dim: usize, dtype: DType, device: &Device) -> CResult<Self> {
        Ok(Self {
            ones: Tensor::ones(dim, dtype, device)?,
            zeros: Tensor::zeros(dim, dtype, device)?,
        })
    }

    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        candle_nn::ops::layer_norm(&x.contiguous()?, &self.ones, &self.zeros, NORM_EPS)
    }

    /// `norm(x) * (1 + scale) + shift`, with `scale` and `shift` of shape `[B, C]`.
    fn modulate(&self, x: &Tensor, shift: &Tensor, scale: &Tensor) -> CResult<Tensor> {
        self.forward(x)?
            .broadcast_mul(&(scale + 1.0)?.unsqueeze(1)?)?
            .broadcast_add(&shift.unsqueeze(1)?)
    }
}

/// `linear_2(silu(linear_1(x)))`: diffusers' `TimestepEmbedding` and the pooled-text projection.
#[derive(Debug, Clone)]
struct MlpEmbedder {
    linear_1: Linear,
    linear_2: Linear,
}

impl MlpEmbedder {
    fn new(in_dim: usize, hidden: usize, vb: WeightSource) -> CResult<Self> {
        Ok(Self {
            linear_1: Linear::load(in_dim, hidden, vb.pp("linear_1"))?,
            linear_2: Linear::load(hidden, hidden, vb.pp("linear_2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

impl VisitLinears for MlpEmbedder {
    fn visit_linears(&mut self, f: &mut dyn FnMut(&mut Linear)) {
        f(&mut self.linear_1);
        f(&mut self.linear_2);
    }
}

/// Sinusoidal embedding of `t` (already multiplied by 1000), 256 channels, cos half first;
/// computed in f32 like diffusers' `Timesteps(256, flip_sin_to_cos=True, shift=0)`.
fn timestep_features(t: &Tensor) -> CResult<Tensor> {
    let half = TIMESTEP_CHANNELS / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10_000f32.ln()) * i as f32 / half as f32).exp())
        .collect();
    let ts = t.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let mut out = Vec::with_capacity(ts.len() * TIMESTEP_CHANNELS);
    for &t in &ts {
        out.extend(freqs.iter().map(|f| (t * f).cos()));
        out.extend(freqs.iter().map(|f| (t * f).sin()));
    }
    Tensor::from_vec(out, (ts.len(), TIMESTEP_CHANNELS), t.device())
}

/// diffusers' `CombinedTimestep[Guidance]TextProjEmbeddings`.
#[derive(Debug, Clone)]
struct TimeTextEmbed {
    timestep_embedder: MlpEmbedder,
    guidance_embedder: Option<MlpEmbedder>,
    text_embedder: MlpEmbedder,
}

impl TimeTextEmbed {
    fn new(cfg: &FluxConfig, vb: WeightSource) -> CResult<Self> {
        let hidden = cfg.hidden_size();
        Ok(Self {
            timestep_embedder: MlpEmbedder::new(
                TIMESTEP_CHANNELS,
                hidden,
                vb.pp("timestep_embedder"),
            )?,
            guidance_embedder: cfg
                .guidance_embeds
                .then(|| MlpEmbedder::new(TIMESTEP_CHANNELS, hidden, vb.pp("guidance_embedder")))
                .transpose()?,
            text_embedder: MlpEmbedder::new(
                cfg.pooled_projection_dim,
                hidden,
                vb.pp("text_embedder"),
            )?,
        })
    }

    /// `timestep` and `guidance` are already scaled by 1000.
    fn forward(
        &self,
        timestep: &Tensor,
        guidance: Option<&Tensor>,
        pooled: &Tensor,
    ) -> CResult<Tensor> {
        let dtype = pooled.dtype();
        let embed =
            |t: &Tensor, mlp: &MlpEmbedder| mlp.forward(&timestep_features(t)?.to_dtype(dtype)?);
        let mut temb = embed(timestep, &self.timestep_embedder)?;
        if let (Some(g), Some(mlp)) = (guidance, &self.guidance_embedder) {
            temb = (temb + embed(g, mlp)?)?;
        }
        temb + self.text_embedder.forward(pooled)?
    }
}

impl VisitLinears for TimeTextEmbed {
    fn visit_linears(&mut self, f: &mut dyn FnMut(&mut Linear)) {
        self.timestep_embedder.visit_linears(f);
        if let Some(g) = &mut self.guidance_embedder {
            g.visit_linears(f);
        }
        self.text_embedder.visit_linears(f);
    }
}

/// `torch.nn.RMSNorm` over the head dimension, with its learned scale (in the model's dtype).
fn head_rms_norm(head_dim: usize, vb: WeightSource) -> CResult<RmsNorm> {
    Ok(RmsNorm::new(
        vb.get(head_dim, "weight")?,
        NORM_EPS as f64,
        RmsRounding::Input,
    ))
}

/// Query, key and value projections of one stream, with per-head RMSNorm on q and k, as one
/// matmul; in a single block the MLP's input projection joins them.
#[derive(Debug, Clone)]
struct QkvProjection {
    /// q, k, v, then any other projection of the same input.
    linears: JointLinears,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    heads: usize,
}

impl QkvProjection {
    /// `names`: the q, k, v linear and q, k norm module names under `vb`; `others`, linears
    /// computed from the same input.
    fn new(
        cfg: &FluxConfig,
        vb: &WeightSource,
        names: [&str; 5],
        others: Vec<Linear>,
    ) -> CResult<Self> {
        let hidden = cfg.hidden_size();
        let head_dim = cfg.attention_head_dim;
        let mut linears = names[..3]
            .iter()
            .map(|name| Linear::load(hidden, hidden, vb.pp(name)))
            .collect::<CResult<Vec<_>>>()?;
        linears.extend(others);
        Ok(Self {
            linears: JointLinears::new(linears)?,
            norm_q: head_rms_norm(head_dim, vb.pp(names[3]))?,
            norm_k: head_rms_norm(head_dim, vb.pp(names[4]))?,
            heads: cfg.num_attention_heads,
        })
    }

    /// Returns q, k, v as `[B, S, H*D]`, q and k normalised per head, then the other
    /// projections' outputs.
    fn forward(&self, x: &Tensor) -> CResult<((Tensor, Tensor, Tensor), Vec<Tensor>)> {
        let (b, s, _) = x.dims3()?;
        let per_head = |y: Tensor, norm: &RmsNorm| {
            norm.forward(&y.reshape((b, s, self.heads, ()))?)?
                .reshape((b, s, ()))
        };
        let mut outs = self.linears.forward(x)?.into_iter();
        let mut next = || outs.next().expect("q, k and v");
        let q = per_head(next(), &self.norm_q)?;
        let k = per_head(next(), &self.norm_k)?;
        let v = next();
        Ok(((q, k, v), outs.collect()))
    }

    /// The `i`-th other projection alone (q, k and v not needed).
    fn other(&self, i: usize, x: &Tensor) -> CResult<Tensor> {
        self.linears.parts()[3 + i].forward(x)
    }

    fn norms_to(&mut self, device: &Device) -> CResult<()> {
        for norm in [&mut self.norm_q, &mut self.norm_k] {
            *norm = norm.to_device(device)?;
        }
        Ok(())
    }

    fn visit_linears(&mut self, f: &mut dyn FnMut(&mut Linear)) {
        self.linears.visit(f)
    }
}

const IMG_QKV: [&str; 5] = ["to_q", "to_k", "to_v", "norm_q", "norm_k"];
const TXT_QKV: [&str; 5] = [
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "norm_added_q",
    "norm_added_k",
];

/// Joint attention over the streams' `(q, k, v)` joined along the sequence (text first), with
/// rotary embeddings; returns `[B, S, hidden]`.
fn joint_attention(
    rope: &Rope,
    heads: usize,
    streams: Vec<(Tensor, Tensor, Tensor)>,
) -> CResult<Tensor> {
    let join = |pick: fn(&(Tensor, Tensor, Tensor)) -> &Tensor| -> CResult<Tensor> {
        match streams.as_slice() {
            [one] => Ok(pick(one).clone()),
            many => Tensor::cat(&many.iter().map(pick).collect::<Vec<_>>(), 1),
        }
    };
    let (q, k, v) = (join(|p| &p.0)?, join(|p| &p.1)?, join(|p| &p.2)?);
    drop(streams); // q and k must be unshared: the CPU path rotates them in place.
    rope_attention(q, k, v, heads, rope)
}

/// diffusers' `FeedForward(dim, activation_fn="gelu-approximate")`: `net.2(gelu_tanh(net.0.proj(x)))`.
#[derive(Debug, Clone)]
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn new(cfg: &FluxConfig, vb: WeightSource) -> CResult<Self> {
        let (hidden, mlp) = (cfg.hidden_size(), cfg.mlp_hidden_size());
        Ok(Self {
            proj_in: Linear::load(hidden, mlp, vb.pp("net.0.proj"))?,
            proj_out: Linear::load(mlp, hidden, vb.pp("net.2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        self.proj_out.forward(&gelu_tanh(self.proj_in.forward(x)?)?)
    }
}

impl VisitLinears for FeedForward {
    fn visit_linears(&mut self, f: &mut dyn FnMut(&mut Linear)) {
        f(&mut self.proj_in);
        f(&mut self.proj_out);
    }
}

/// One stream's half of a double-stream block.
#[derive(Debug, Clone)]
struct StreamParts {
    /// AdaLN-Zero modulation: shift, scale, gate (attention), shift, scale, gate (MLP).
    modulation: Linear,
    qkv: QkvProjection,
    attn_out: Linear,
    ff: FeedForward,
}

/// diffusers' `FluxTransformerBlock`: image and text streams with their own weights, joined in
/// attention.
#[derive(Debug, Clone)]
struct DoubleStreamBlock {
    img: StreamParts,
    txt: StreamParts,
    norm: PlainLayerNorm,
}

impl DoubleStreamBlock {
    fn new(cfg: &FluxConfig, norm: PlainLayerNorm, vb: WeightSource) -> CResult<Self> {
        let hidden = cfg.hidden_size();
        let attn = vb.pp("attn");
        Ok(Self {
            img: StreamParts {
                modulation: Linear::load(hidden, 6 * hidden, vb.pp("norm1.linear"))?,
                qkv: QkvProjection::new(cfg, &attn, IMG_QKV, Vec::new())?,
                attn_out: Linear::load(hidden, hidden, attn.pp("to_out.0"))?,
                ff: FeedForward::new(cfg, vb.pp("ff"))?,
            },
            txt: StreamParts {
                modulation: Linear::load(hidden, 6 * hidden, vb.pp("norm1_context.linear"))?,
                qkv: QkvProjection::new(cfg, &attn, TXT_QKV, Vec::new())?,
                attn_out: Linear::load(hidden, hidden, attn.pp("to_add_out"))?,
                ff: FeedForward::new(cfg, vb.pp("ff_context"))?,
            },
            norm,
        })
    }

    /// `temb_act` is `silu(temb)`, shared by every modulation layer. With a TaylorSeer slot,
    /// the attention's output (projected: image, text) is computed and recorded, or predicted.
    fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb_act: &Tensor,
        rope: &Rope,
        taylor: Option<TaylorSlot>,
    ) -> CResult<(Tensor, Tensor)> {
        let img_mod = self.img.modulation.forward(temb_act)?.chunk(6, 1)?;
        let txt_mod = self.txt.modulation.forward(temb_act)?.chunk(6, 1)?;
        let attention = || -> CResult<Vec<Tensor>> {
            let img_normed = self.norm.modulate(img, &img_mod[0], &img_mod[1])?;
            let txt_normed = self.norm.modulate(txt, &txt_mod[0], &txt_mod[1])?;
            let (img_qkv, _) = self.img.qkv.forward(&img_normed)?;
            let (txt_qkv, _) = self.txt.qkv.forward(&txt_normed)?;
            let attn = joint_attention(rope, self.img.qkv.heads, vec![txt_qkv, img_qkv])?;
            let txt_len = txt.dim(1)?;
            let txt_attn = attn.narrow(1, 0, txt_len)?.contiguous()?;
            let img_attn = attn.narrow(1, txt_len, img.dim(1)?)?.contiguous()?;
            Ok(vec![
                self.img.attn_out.forward(&img_attn)?,
                self.txt.attn_out.forward(&txt_attn)?,
            ])
        };
        let outs = TaylorSlot::run(taylor, img.dtype(), attention)?;
        let (img_attn, txt_attn) = (outs[0].clone(), outs[1].clone());

        let finish = |x: &Tensor, attn_out: Tensor, parts: &StreamParts, m: &[Tensor]| {
            let gated = |gate: &Tensor, y: Tensor| gate.unsqueeze(1)?.broadcast_mul(&y);
            let x = (x + gated(&m[2], attn_out)?)?;
            let ff_in = self.norm.modulate(&x, &m[3], &m[4])?;
            x + gated(&m[5], parts.ff.forward(&ff_in)?)?
        };
        let img = finish(img, img_attn, &self.img, &img_mod)?;
        let mut txt = finish(txt, txt_attn, &self.txt, &txt_mod)?;
        if txt.dtype() == DType::F16 {
            txt = txt.clamp(-65504f32, 65504f32)?;
        }
        Ok((img, txt))
    }
}

impl DoubleStreamBlock {
    /// The norms (not the linears) on `norm`'s device.
    fn norms_to(&mut self, norm: &PlainLayerNorm) -> CResult<()> {
        self.norm = norm.clone();
        self.img.qkv.norms_to(norm.ones.device())?;
        self.txt.qkv.norms_to(norm.ones.device())
    }
}

impl VisitLinears for DoubleStreamBlock {
    fn visit_linears(&mut self, f: &mut dyn FnMut(&mut Linear)) {
        f(&mut self.img.modulation);
        f(&mut self.txt.modulation);
        self.img.qkv.visit_linears(f);
        self.txt.qkv.visit_linears(f);
        f(&mut self.img.attn_out);
        f(&mut self.txt.attn_out);
        self.img.ff.visit_linears(f);
        self.txt.ff.visit_linears(f);
    }

    fn visit_joints(&mut self, f: &mut dyn FnMut(&mut JointLinears)) {
        f(&mut self.img.qkv.linears);
        f(&mut self.txt.qkv.linears);
    }
}

/// One attention module's place in a TaylorSeer cache during an evaluation.
struct TaylorSlot<'a> {
    cache: &'a mut TaylorSeerCache,
    index: usize,
    compute: bool,
}

impl<'a> TaylorSlot<'a> {
    /// Module `index`'s slot in this evaluation's cache, if TaylorSeer is on.
    fn of(taylor: &'a mut Option<(&mut TaylorSeerCache, bool)>, index: usize) -> Option<Self> {
        taylor.as_mut().map(|(cache, compute)| TaylorSlot {
            cache: &mut **cache,
            index,
            compute: *compute,
        })
    }

    /// The attention's outputs: computed (and recorded, with a slot), or predicted.
    fn run(
        slot: Option<TaylorSlot>,
        dtype: DType,
        compute: impl FnOnce() -> CResult<Vec<Tensor>>,
    ) -> CResult<Vec<Tensor>> {
        match slot {
            None => compute(),
            Some(slot) if slot.compute => {
                let outs = compute()?;
                slot.cache.update(slot.index, &outs)?;
                Ok(outs)
            }
            Some(slot) => slot.cache.predict(slot.index, dtype),
        }
    }
}

/// diffusers' `FluxSingleTransformerBlock`: one set of weights over the joint sequence, the
/// attention and MLP run in parallel and are projected out together.
#[derive(Debug, Clone)]
struct SingleStreamBlock {
    /// Modulation: shift, scale, gate.
    modulation: Linear,
    /// q, k, v and `proj_mlp`, from the same input (BFL's `linear1`).
    qkv: QkvProjection,
    proj_out: Linear,
    norm: PlainLayerNorm,
}

impl SingleStreamBlock {
    fn new(cfg: &FluxConfig, norm: PlainLayerNorm, vb: WeightSource) -> CResult<Self> {
        let (hidden, mlp) = (cfg.hidden_size(), cfg.mlp_hidden_size());
        Ok(Self {
            modulation: Linear::load(hidden, 3 * hidden, vb.pp("norm.linear"))?,
            qkv: QkvProjection::new(
                cfg,
                &vb.pp("attn"),
                IMG_QKV,
                vec![Linear::load(hidden, mlp, vb.pp("proj_mlp"))?],
            )?,
            proj_out: Linear::load(hidden + mlp, hidden, vb.pp("proj_out"))?,
            norm,
        })
    }

    /// `x` is the joint `[text; image]` sequence. With a TaylorSeer slot, the attention's
    /// output (before `proj_out`) is computed and recorded, or predicted.
    fn forward(
        &self,
        x: &Tensor,
        temb_act: &Tensor,
        rope: &Rope,
        taylor: Option<TaylorSlot>,
    ) -> CResult<Tensor> {
        let m = self.modulation.forward(temb_act)?.chunk(3, 1)?;
        let normed = self.norm.modulate(x, &m[0], &m[1])?;
        // q, k, v and the MLP's input in one product, unless the attention is predicted.
        let (qkv, mlp_in) = if taylor.as_ref().is_none_or(|slot| slot.compute) {
            let (qkv, mut others) = self.qkv.forward(&normed)?;
            (Some(qkv), others.remove(0))
        } else {
            (None, self.qkv.other(0, &normed)?)
        };
        let mlp = gelu_tanh(mlp_in)?;
        let attention = || -> CResult<Vec<Tensor>> {
            let qkv = qkv.expect("computed when the attention is");
            Ok(vec![joint_attention(rope, self.qkv.heads, vec![qkv])?])
        };
        let attn = TaylorSlot::run(taylor, x.dtype(), attention)?.remove(0);
        let out = self
            .proj_out
            .forward(&Tensor::cat(&[attn, mlp], D::Minus1)?)?;
        let x = (x + m[2].unsqueeze(1)?.broadcast_mul(&out)?)?;
        if x.dtype() == DType::F16 {
            return x.clamp(-65504f32, 65504f32);
        }
        Ok(x)
    }
}

impl SingleStreamBlock {
    /// The norms (not the linears) on `norm`'s device.
    fn norms_to(&mut self, norm: &PlainLayerNorm) -> CResult<()> {
        self.norm = norm.clone();
        self.qkv.norms_to(norm.ones.device())
    }
}

impl VisitLinears for SingleStreamBlock {
    fn visit_linears(&mut self, f: &mut dyn FnMut(&mut Linear)) {
        f(&mut self.modulation);
        self.qkv.visit_linears(f);
        f(&mut self.proj_out);
    }

    fn visit_joints(&mut self, f: &mut dyn FnMut(&mut JointLinears)) {
        f(&mut self.qkv.linears);
    }
}

/// Places every linear of `module` ([`Linear::kept_on`] the `(home, compute)` devices `place`
/// gives its path), each joint group's weight moved once.
fn place_linears<'d, M: VisitLinears>(
    module: &mut M,
    place: &dyn Fn(&str) -> (&'d Device, &'d Device),
) -> candle_core::Result<()> {
    let mut failed = None;
    module.visit_joints(&mut |joint| {
        // A group lies where its first part's path says.
        let (home, compute) = place(joint.parts()[0].path());
        match joint.kept_on(home, compute) {
            Ok(placed) => *joint = placed,
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    });
    // The joint groups' parts are where they belong by now: nothing more is copied for them.
    module.visit_linears(&mut |linear| {
        let (home, compute) = place(linear.path());
        match linear.kept_on(home, compute) {
            Ok(placed) => *linear = placed,
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    });
    failed.map_or(Ok(()), Err)
}

/// Inputs of one transformer evaluation, with diffusers' meaning and shapes.
#[derive(Debug, Clone, Copy)]
pub struct FluxInput<'a> {
    /// Packed image latents `[B, N, in_channels]` (Fill: noise | masked image | mask).
    pub img: &'a Tensor,
    /// `[N, 3]` position ids `(0, row, col)` of the packed grid.
    pub img_ids: &'a Tensor,
    /// T5 hidden states `[B, L, joint_attention_dim]`.
    pub txt: &'a Tensor,
    /// `[L, 3]`, zeros for FLUX.
    pub txt_ids: &'a Tensor,
    /// CLIP pooled output `[B, pooled_projection_dim]`.
    pub pooled: &'a Tensor,
    /// `[B]`, the scheduler's timestep divided by 1000 (i.e. sigma).
    pub timestep: &'a Tensor,
    /// `[B]`, the guidance scale as diffusers' pipeline passes it (e.g. 30.0); the model scales it
    /// by 1000 as it does the timestep. Required by guidance-distilled models.
    pub guidance: Option<&'a Tensor>,
}

impl<'a> FluxInput<'a> {
    /// The inputs from tensors named after the fields (`img`, `img_ids`, `txt`, `txt_ids`,
    /// `pooled`, `timestep`, optional `guidance`), or after diffusers' keyword arguments
    /// (`hidden_states`, `encoder_hidden_states`, `pooled_projections`), as saved inputs
    /// (fixtures, benchmarks) hold them.
    pub fn from_named(tensors: &'a std::collections::HashMap<String, Tensor>) -> Result<Self> {
        let find = |ours: &str, theirs: &str| tensors.get(ours).or_else(|| tensors.get(theirs));
        let get = |ours: &str, theirs: &str| {
            find(ours, theirs).ok_or_else(|| {
                FluxError::Input(format!(
                    "no tensor named `{ours}` (or `{theirs}`) among the saved inputs"
                ))
            })
        };
        Ok(Self {
            img: get("img", "hidden_states")?,
            img_ids: get("img_ids", "img_ids")?,
            txt: get("txt", "encoder_hidden_states")?,
            txt_ids: get("txt_ids", "txt_ids")?,
            pooled: get("pooled", "pooled_projections")?,
            timestep: get("timestep", "timestep")?,
            guidance: find("guidance", "guidance"),
        })
    }
}

/// The FLUX.1 transformer. Build it with [`FluxTransformer::new`] from any `VarBuilder`, or
/// [`FluxTransformer::load`] from a checkpoint.
#[derive(Debug, Clone)]
pub struct FluxTransformer {
    config: FluxConfig,
    x_embedder: Linear,
    context_embedder: Linear,
    time_text_embed: TimeTextEmbed,
    transformer_blocks: Vec<DoubleStreamBlock>,
    single_transformer_blocks: Vec<SingleStreamBlock>,
    /// `AdaLayerNormContinuous`'s linear: scale, then shift.
    norm_out: Linear,
    norm: PlainLayerNorm,
    proj_out: Linear,
    /// RoPE tables of the position ids seen last, by the ids tensors' identity: the steps of a
    /// run pass the same ids, so the tables are built once per run (and per candidate of a
    /// search), not at every step.
    rope_cache: Arc<Mutex<Vec<(RopeKey, Rope)>>>,
    /// The blocks' weights are kept in host memory, each block copied to the device as its turn
    /// comes ([`FluxTransformer::placed`]).
    blocks_offloaded: bool,
}

/// [`FluxTransformer::parameters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParameterCounts {
    pub blocks: u64,
    pub largest_block: u64,
    /// Embedders and the final layer.
    pub rest: u64,
}

/// The identity of a (text ids, image ids) pair.
type RopeKey = (TensorId, TensorId);

/// Runs whose tables are kept: the candidates of a batched search share one.
const ROPE_CACHE_ENTRIES: usize = 4;

impl FluxTransformer {
    pub fn new<'a>(config: &FluxConfig, vb: impl Into<WeightSource<'a>>) -> Result<Self> {
        let vb = vb.into();
        config.validate()?;
        check_model_dtype(vb.dtype())?;
        let hidden = config.hidden_size();
        let norm = PlainLayerNorm::new(hidden, vb.dtype(), vb.device())?;
        let transformer_blocks = (0..config.num_layers)
            .map(|i| {
                DoubleStreamBlock::new(
                    config,
                    norm.clone(),
                    vb.pp(format!("transformer_blocks.{i}")),
                )
            })
            .collect::<CResult<_>>()?;
        let single_transformer_blocks = (0..config.num_single_layers)
            .map(|i| {
                SingleStreamBlock::new(
                    config,
                    norm.clone(),
                    vb.pp(format!("single_transformer_blocks.{i}")),
                )
            })
            .collect::<CResult<_>>()?;
        Ok(Self {
            x_embedder: Linear::load(config.in_channels, hidden, vb.pp("x_embedder"))?,
            context_embedder: Linear::load(
                config.joint_attention_dim,
                hidden,
                vb.pp("context_embedder"),
            )?,
            time_text_embed: TimeTextEmbed::new(config, vb.pp("time_text_embed"))?,
            transformer_blocks,
            single_transformer_blocks,
            norm_out: Linear::load(hidden, 2 * hidden, vb.pp("norm_out.linear"))?,
            norm,
            proj_out: Linear::load(hidden, config.out_channels(), vb.pp("proj_out"))?,
            config: config.clone(),
            rope_cache: Arc::default(),
            blocks_offloaded: false,
        })
    }

    /// This transformer computing on `device`. With `offload_blocks`, the blocks' weights stay
    /// in host memory and each block is copied to the device when its turn comes, the next one
    /// while the current one computes: the device holds two blocks' weights instead of all
    /// (diffusers' group offloading by block). The rest (embedders, norms, final layer,
    /// adapters) lives on the device.
    /// On the CPU the blocks still stream (copies of themselves), which is how the code a GPU
    /// runs is tested here.
    pub fn placed(&self, device: &Device, offload_blocks: bool) -> Result<Self> {
        let host = Device::Cpu;
        let mut model = self.clone();
        model.norm = PlainLayerNorm {
            ones: self.norm.ones.to_device(device)?,
            zeros: self.norm.zeros.to_device(device)?,
        };
        place_linears(&mut model, &|path| {
            let in_block = path.starts_with("transformer_blocks.")
                || path.starts_with("single_transformer_blocks.");
            match in_block && offload_blocks {
                true => (&host, device),
                false => (device, device),
            }
        })?;
        let norm = model.norm.clone();
        for block in &mut model.transformer_blocks {
            block.norms_to(&norm)?;
        }
        for block in &mut model.single_transformer_blocks {
            block.norms_to(&norm)?;
        }
        model.rope_cache = Arc::default();
        model.blocks_offloaded = offload_blocks;
        Ok(model)
    }

    /// Whether the blocks' weights are kept in host memory ([`FluxTransformer::placed`]).
    pub fn blocks_offloaded(&self) -> bool {
        self.blocks_offloaded
    }

    /// Bytes of the linear layers' weights: (on the device for the whole run, kept in host
    /// memory and copied block by block).
    pub fn weight_bytes(&mut self) -> (usize, usize) {
        let (mut resident, mut offloaded) = (0, 0);
        let blocks = self.blocks_offloaded;
        self.visit_linears(&mut |path, linear| {
            let in_block = path.starts_with("transformer_blocks.")
                || path.starts_with("single_transformer_blocks.");
            if in_block && blocks {
                offloaded += linear.weight_bytes();
            } else {
                resident += linear.weight_bytes();
            }
        });
        (resident, offloaded)
    }

    /// `blocks` as they compute, in order: themselves, or when offloaded, a copy of each placed
    /// on the device by a thread of its own, which copies the next block while the current one
    /// computes (and waits for it to be taken: at most two blocks are on the device).
    fn resident<'a, B, R>(
        &self,
        blocks: &'a [B],
        run: impl FnOnce(&mut dyn Iterator<Item = CResult<Cow<'a, B>>>) -> R,
    ) -> R
    where
        B: Clone + VisitLinears + Send + Sync,
    {
        if !self.blocks_offloaded {
            return run(&mut blocks.iter().map(|b| Ok(Cow::Borrowed(b))));
        }
        let device = self.device();
        std::thread::scope(|scope| {
            let (sender, receiver) = std::sync::mpsc::sync_channel(0);
            scope.spawn(move || {
                for block in blocks {
                    let mut copy = block.clone();
                    let placed =
                        place_linears(&mut copy, &|_| (device, device)).map(|()| Cow::Owned(copy));
                    if sender.send(placed).is_err() {
                        break; // the forward stopped early
                    }
                }
            });
            run(&mut receiver.into_iter())
        })
    }

    /// The transformer's layers with every weight a broadcast zero: their shapes and module
    /// paths without their memory (for matching an adapter to a model that is not loaded).
    pub fn shapes_only(config: &FluxConfig) -> Result<Self> {
        Self::new(
            config,
            candle_nn::VarBuilder::from_backend(Box::new(BroadcastZeros), DType::F32, Device::Cpu),
        )
    }

    /// Parameters of the linear layers of a transformer of this config, counted on its
    /// shapes-only model (no memory): in all the blocks, in the largest block, and elsewhere.
    pub fn parameters(config: &FluxConfig) -> Result<ParameterCounts> {
        let mut model = Self::shapes_only(config)?;
        let mut counts = ParameterCounts::default();
        let mut per_block = std::collections::BTreeMap::<String, u64>::new();
        model.visit_linears(&mut |path, linear| {
            let n = (linear.in_features() * linear.out_features() + linear.out_features()) as u64;
            match path.split_once("blocks.") {
                Some((kind, rest)) => {
                    let index = rest.split('.').next().unwrap_or_default();
                    *per_block.entry(format!("{kind}{index}")).or_default() += n;
                    counts.blocks += n;
                }
                None => counts.rest += n,
            }
        });
        counts.largest_block = per_block.into_values().max().unwrap_or(0);
        Ok(counts)
    }

    /// Loads the weights of `checkpoint` onto `device` as `dtype` (f32, bf16 or f16).
    pub fn load(checkpoint: &Checkpoint, dtype: DType, device: &Device) -> Result<Self> {
        check_model_dtype(dtype)?;
        Self::new(
            checkpoint.config(),
            WeightSource::checkpoint(checkpoint, dtype, device),
        )
    }

    pub fn config(&self) -> &FluxConfig {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.norm.ones.dtype()
    }

    pub fn device(&self) -> &Device {
        self.norm.ones.device()
    }

    /// Every linear layer, with its diffusers module path (`transformer_blocks.0.attn.to_q`, ...).
    pub fn visit_linears(&mut self, f: &mut dyn FnMut(&str, &mut Linear)) {
        VisitLinears::visit_linears(self, &mut |linear| {
            let path = linear.shared_path();
            f(&path, linear)
        })
    }

    /// The RoPE tables of these ids, from the cache when the same ids were seen before.
    fn rope(&self, txt_ids: &Tensor, img_ids: &Tensor) -> Result<Rope> {
        let key = (txt_ids.id(), img_ids.id());
        let mut cache = self.rope_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, rope)) = cache.iter().find(|(k, _)| *k == key) {
            return Ok(rope.clone());
        }
        let device = self.device();
        let ids = Tensor::cat(&[txt_ids.to_device(device)?, img_ids.to_device(device)?], 0)?;
        let rope = Rope::new(&ids, &self.config.axes_dims_rope, device)?;
        if cache.len() == ROPE_CACHE_ENTRIES {
            cache.remove(0);
        }
        cache.push((key, rope.clone()));
        Ok(rope)
    }

    /// Predicts the flow-matching velocity for the image tokens, `[B, N, out_channels]`.
    pub fn forward(&self, input: &FluxInput) -> Result<Tensor> {
        self.forward_cached(input, None)
    }

    /// [`FluxTransformer::forward`] with a step cache (see [`crate::step_cache`]): what it
    /// computes, skips or predicts follows diffusers' hooks; the cache records its decisions.
    pub fn forward_cached(
        &self,
        input: &FluxInput,
        cache: Option<&mut StepCache>,
    ) -> Result<Tensor> {
        let (b, n_img, n_txt) = self.check_input(input)?;
        let dtype = self.dtype();
        let device = self.device();
        let rope = self.rope(input.txt_ids, input.img_ids)?;

        // diffusers scales t/1000 back up in the model dtype, rounding included.
        let scale_up = |t: &Tensor| -> CResult<Tensor> {
            t.to_device(device)?.to_dtype(dtype)?.reshape(b)? * 1000.0
        };
        let timestep = scale_up(input.timestep)?;
        let guidance = input.guidance.map(scale_up).transpose()?;
        let pooled = input.pooled.to_device(device)?.to_dtype(dtype)?;
        let temb = self
            .time_text_embed
            .forward(&timestep, guidance.as_ref(), &pooled)?;
        let temb_act = temb.silu()?;

        let mut img = self
            .x_embedder
            .forward(&input.img.to_device(device)?.to_dtype(dtype)?)?;
        let mut txt = self
            .context_embedder
            .forward(&input.txt.to_device(device)?.to_dtype(dtype)?)?;
        let (mut first_block, mut taylor) = (None, None);
        match cache {
            Some(StepCache::FirstBlock(c)) => first_block = Some(c),
            Some(StepCache::TaylorSeer(c)) => {
                let compute = c.begin();
                taylor = Some((c, compute));
            }
            None => {}
        }
        let mut head = None;
        let skipped = self.resident(
            &self.transformer_blocks,
            |blocks| -> Result<Option<Tensor>> {
                let mut blocks = blocks.enumerate();
                if let Some(fbc) = first_block.as_deref_mut() {
                    // First Block Cache: the first block always runs; its image residual decides.
                    let (_, block) = blocks.next().expect("FLUX has double blocks");
                    let (img1, txt1) = block?.forward(&img, &txt, &temb_act, &rope, None)?;
                    let residual = (&img1 - &img)?;
                    if !fbc.should_compute(&residual)? {
                        let (tail_img, _) = fbc.tail_residuals.as_ref().expect("set when computed");
                        return Ok(Some((tail_img + &img1)?));
                    }
                    head = Some((residual, img1.clone(), txt1.clone()));
                    (img, txt) = (img1, txt1);
                }
                for (i, block) in blocks {
                    let slot = TaylorSlot::of(&mut taylor, i);
                    (img, txt) = block?.forward(&img, &txt, &temb_act, &rope, slot)?;
                }
                Ok(None)
            },
        )?;
        if let Some(img) = skipped {
            return self.final_layer(&img, &temb_act);
        }
        // Single-stream blocks see one joint sequence; diffusers splits and re-joins it around
        // each block, which changes nothing.
        let mut joint = Tensor::cat(&[txt, img], 1)?;
        let doubles = self.transformer_blocks.len();
        self.resident(&self.single_transformer_blocks, |blocks| -> CResult<()> {
            for (i, block) in blocks.enumerate() {
                let slot = TaylorSlot::of(&mut taylor, doubles + i);
                joint = block?.forward(&joint, &temb_act, &rope, slot)?;
            }
            Ok(())
        })?;
        let img = joint.narrow(1, n_txt, n_img)?;
        if let (Some(fbc), Some((residual, img1, txt1))) = (first_block, head) {
            let txt = joint.narrow(1, 0, n_txt)?;
            fbc.store(residual, ((&img - img1)?, (txt - txt1)?));
        }
        self.final_layer(&img, &temb_act)
    }

    /// `norm_out` and `proj_out` on the image tokens.
    fn final_layer(&self, img: &Tensor, temb_act: &Tensor) -> Result<Tensor> {
        let m = self.norm_out.forward(temb_act)?.chunk(2, 1)?;
        let img = self.norm.modulate(img, &m[1], &m[0])?;
        Ok(self.proj_out.forward(&img)?)
    }

    /// Checks the input shapes; returns (batch, image tokens, text tokens).
    fn check_input(&self, input: &FluxInput) -> Result<(usize, usize, usize)> {
        let c = &self.config;
        let bad = |msg: String| Err(FluxError::Input(msg));
        let dims3 = |t: &Tensor, what: &str, last: usize| -> Result<(usize, usize)> {
            match t.dims() {
                &[b, n, l] if l == last => Ok((b, n)),
                d => Err(FluxError::Input(format!(
                    "{what} must be [batch, tokens, {last}], got {d:?}"
                ))),
            }
        };
        let (b, n_img) = dims3(input.img, "packed image latents", c.in_channels)?;
        let (b_txt, n_txt) = dims3(input.txt, "text embeddings", c.joint_attention_dim)?;
        let ids_len = |t: &Tensor, what: &str| -> Result<usize> {
            match t.dims() {
                &[n, 3] | &[1, n, 3] => Ok(n),
                d => Err(FluxError::Input(format!(
                    "{what} must be [tokens, 3], got {d:?}"
                ))),
            }
        };
        if ids_len(input.img_ids, "img_ids")? != n_img {
            return bad(format!(
                "img_ids has {} positions for {n_img} image tokens",
                ids_len(input.img_ids, "img_ids")?
            ));
        }
        if ids_len(input.txt_ids, "txt_ids")? != n_txt {
            return bad(format!(
                "txt_ids has {} positions for {n_txt} text tokens",
                ids_len(input.txt_ids, "txt_ids")?
            ));
        }
        if b_txt != b || input.pooled.dims() != [b, c.pooled_projection_dim] {
            return bad(format!(
                "batch sizes disagree: image {:?}, text {:?}, pooled {:?} (pooled must be [batch, {}])",
                input.img.dims(),
                input.txt.dims(),
                input.pooled.dims(),
                c.pooled_projection_dim
            ));
        }
        for (what, t) in [
            ("timestep", Some(input.timestep)),
            ("guidance", input.guidance),
        ] {
            if let Some(t) = t {
                if t.elem_count() != b {
                    return bad(format!(
                        "{what} must hold one value per batch item ({b}), got {:?}",
                        t.dims()
                    ));
                }
            }
        }
        match (c.guidance_embeds, input.guidance.is_some()) {
            (true, false) => bad(
                "this model is guidance-distilled (FLUX.1-dev/Fill): pass a guidance value".into(),
            ),
            (false, true) => bad("this model has no guidance embedding: pass no guidance".into()),
            _ => Ok((b, n_img, n_txt)),
        }
    }
}

/// Every tensor asked for is one zero broadcast to its shape: no memory.
struct BroadcastZeros;

impl candle_nn::var_builder::SimpleBackend for BroadcastZeros {
    fn get(
        &self,
        shape: candle_core::Shape,
        _: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> CResult<Tensor> {
        Tensor::zeros(1, dtype, device)?.broadcast_as(shape)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> CResult<Tensor> {
        candle_core::bail!("`{name}` has no known shape here")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

impl VisitLinears for FluxTransformer {
    fn visit_linears(&mut self, f: &mut dyn FnMut(&mut Linear)) {
        f(&mut self.x_embedder);
        f(&mut self.context_embedder);
        self.time_text_embed.visit_linears(f);
        for block in &mut self.transformer_blocks {
            block.visit_linears(f);
        }
        for block in &mut self.single_transformer_blocks {
            block.visit_linears(f);
        }
        f(&mut self.norm_out);
        f(&mut self.proj_out);
    }

    fn visit_joints(&mut self, f: &mut dyn FnMut(&mut JointLinears)) {
        for block in &mut self.transformer_blocks {
            block.visit_joints(f);
        }
        for block in &mut self.single_transformer_blocks {
            block.visit_joints(f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The paths recorded as the layers load are diffusers' module paths (PEFT's LoRA keys).
    #[test]
    fn linears_know_their_module_paths() {
        let config = FluxConfig {
            num_layers: 1,
            num_single_layers: 1,
            ..FluxConfig::fill()
        };
        let mut model = FluxTransformer::shapes_only(&config).unwrap();
        let mut paths = Vec::new();
        model.visit_linears(&mut |path, _| paths.push(path.to_string()));
        let want = [
            "x_embedder",
            "context_embedder",
            "time_text_embed.timestep_embedder.linear_1",
            "time_text_embed.timestep_embedder.linear_2",
            "time_text_embed.guidance_embedder.linear_1",
            "time_text_embed.guidance_embedder.linear_2",
            "time_text_embed.text_embedder.linear_1",
            "time_text_embed.text_embedder.linear_2",
            "transformer_blocks.0.norm1.linear",
            "transformer_blocks.0.norm1_context.linear",
            "transformer_blocks.0.attn.to_q",
            "transformer_blocks.0.attn.to_k",
            "transformer_blocks.0.attn.to_v",
            "transformer_blocks.0.attn.add_q_proj",
            "transformer_blocks.0.attn.add_k_proj",
            "transformer_blocks.0.attn.add_v_proj",
            "transformer_blocks.0.attn.to_out.0",
            "transformer_blocks.0.attn.to_add_out",
            "transformer_blocks.0.ff.net.0.proj",
            "transformer_blocks.0.ff.net.2",
            "transformer_blocks.0.ff_context.net.0.proj",
            "transformer_blocks.0.ff_context.net.2",
            "single_transformer_blocks.0.norm.linear",
            "single_transformer_blocks.0.attn.to_q",
            "single_transformer_blocks.0.attn.to_k",
            "single_transformer_blocks.0.attn.to_v",
            "single_transformer_blocks.0.proj_mlp",
            "single_transformer_blocks.0.proj_out",
            "norm_out.linear",
            "proj_out",
        ];
        assert_eq!(paths, want);
    }

    #[test]
    fn rope_tables_are_built_once_per_ids() {
        let config = FluxConfig {
            num_layers: 1,
            num_single_layers: 1,
            attention_head_dim: 16,
            num_attention_heads: 2,
            joint_attention_dim: 8,
            pooled_projection_dim: 8,
            axes_dims_rope: vec![4, 6, 6],
            ..FluxConfig::fill()
        };
        let device = Device::Cpu;
        let model =
            FluxTransformer::new(&config, candle_nn::VarBuilder::zeros(DType::F32, &device))
                .unwrap();
        let ids = |n: usize| Tensor::zeros((n, 3), DType::F32, &device).unwrap();
        let (txt, img) = (ids(2), ids(4));
        let first = model.rope(&txt, &img).unwrap();
        let again = model.rope(&txt, &img).unwrap();
        assert_eq!(format!("{first:?}"), format!("{again:?}"));
        assert_eq!(model.rope_cache.lock().unwrap().len(), 1);
        // Other ids (another run, another candidate) get their own tables, a bounded number.
        for _ in 0..10 {
            model.rope(&ids(2), &ids(4)).unwrap();
        }
        assert_eq!(model.rope_cache.lock().unwrap().len(), ROPE_CACHE_ENTRIES);
    }
}
