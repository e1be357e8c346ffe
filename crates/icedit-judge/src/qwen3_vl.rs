//! Qwen3-VL (transformers' `Qwen3VLForConditionalGeneration`, 5.23) for one prefill pass:
//! images and a prompt in, the next token's logits out. That is all a pairwise judge needs.
//!
//! Written here rather than taken from candle-transformers 0.11, whose Qwen3-VL runs the
//! prompt without a causal mask and with 1-D rotary positions instead of the 3-D
//! (time, row, column) ones, so it does not compute what the model was trained for.
//!
//! The vision tower embeds each image's 16x16 patches (two identical frames), adds a learned
//! position table resampled to the image's grid, and runs ViT blocks with 2-D rotary
//! attention; a merger turns each 2x2 window into one token for the language model, and
//! "deepstack" mergers of early blocks are added to the first decoder layers' outputs at the
//! image tokens. The decoder is Qwen3 (q/k RMS-normed per head) with interleaved multimodal
//! rotary positions.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use icedit_flux::norms::{LayerNorm, RmsNorm, RmsRounding};
use serde_json::Value;

use crate::{JudgeError, Result};

#[derive(Debug, Clone)]
pub struct VisionConfig {
    pub depth: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub spatial_merge_size: usize,
    pub out_hidden_size: usize,
    pub num_position_embeddings: usize,
    pub deepstack_visual_indexes: Vec<usize>,
    pub rope_theta: f64,
}

#[derive(Debug, Clone)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Frequencies given to the (time, row, column) positions.
    pub mrope_section: [usize; 3],
}

#[derive(Debug, Clone)]
pub struct Qwen3VlConfig {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub image_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
    pub tie_word_embeddings: bool,
}

impl Qwen3VlConfig {
    /// Reads config.json; both the Hub's layout (`rope_scaling` + `rope_theta`) and
    /// transformers 5's (`rope_parameters`) are understood.
    pub fn from_value(value: &Value) -> std::result::Result<Self, String> {
        let section = |name: &str| value.get(name).ok_or(format!("`{name}` is missing"));
        let (text, vision) = (section("text_config")?, section("vision_config")?);
        let int = |v: &Value, key: &str| -> std::result::Result<usize, String> {
            v.get(key)
                .and_then(Value::as_u64)
                .map(|n| n as usize)
                .ok_or(format!("`{key}` is missing or not a number"))
        };
        let float = |v: &Value, key: &str, default: f64| -> f64 {
            v.get(key).and_then(Value::as_f64).unwrap_or(default)
        };
        let rope = text
            .get("rope_parameters")
            .or_else(|| text.get("rope_scaling"))
            .ok_or("text_config has neither rope_parameters nor rope_scaling")?;
        let mrope: Vec<usize> = rope
            .get("mrope_section")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .ok_or("the rope settings have no mrope_section")?;
        let mrope_section: [usize; 3] = mrope
            .try_into()
            .map_err(|_| "mrope_section needs three numbers".to_string())?;
        let hidden_size = int(text, "hidden_size")?;
        let num_attention_heads = int(text, "num_attention_heads")?;
        let head_dim = text
            .get("head_dim")
            .and_then(Value::as_u64)
            .map(|n| n as usize)
            .unwrap_or(hidden_size / num_attention_heads.max(1));
        let text = TextConfig {
            vocab_size: int(text, "vocab_size")?,
            hidden_size,
            intermediate_size: int(text, "intermediate_size")?,
            num_hidden_layers: int(text, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: int(text, "num_key_value_heads")?,
            head_dim,
            rms_norm_eps: float(text, "rms_norm_eps", 1e-6),
            rope_theta: rope
                .get("rope_theta")
                .and_then(Value::as_f64)
                .unwrap_or_else(|| float(text, "rope_theta", 5_000_000.0)),
            mrope_section,
        };
        let vision_rope = vision
            .get("rope_parameters")
            .and_then(|r| r.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10_000.0);
        let vision = VisionConfig {
            depth: int(vision, "depth")?,
            hidden_size: int(vision, "hidden_size")?,
            intermediate_size: int(vision, "intermediate_size")?,
            num_heads: int(vision, "num_heads")?,
            in_channels: int(vision, "in_channels").unwrap_or(3),
            patch_size: int(vision, "patch_size")?,
            temporal_patch_size: int(vision, "temporal_patch_size")?,
            spatial_merge_size: int(vision, "spatial_merge_size")?,
            out_hidden_size: int(vision, "out_hidden_size")?,
            num_position_embeddings: int(vision, "num_position_embeddings")?,
            deepstack_visual_indexes: vision
                .get("deepstack_visual_indexes")
                .and_then(|v| serde_json::from_value(v.clone()).ok())
                .unwrap_or_default(),
            rope_theta: vision_rope,
        };
        for (what, act, expected) in [
            ("vision_config", vision_act(value), "gelu_pytorch_tanh"),
            (
                "text_config",
                value["text_config"]["hidden_act"]
                    .as_str()
                    .unwrap_or("silu"),
                "silu",
            ),
        ] {
            if act != expected {
                return Err(format!(
                    "{what}.hidden_act `{act}` is not supported ({expected} is)"
                ));
            }
        }
        let token = |key: &str| -> std::result::Result<u32, String> { Ok(int(value, key)? as u32) };
        let config = Self {
            image_token_id: token("image_token_id")?,
            vision_start_token_id: token("vision_start_token_id")?,
            vision_end_token_id: token("vision_end_token_id")?,
            tie_word_embeddings: value
                .get("tie_word_embeddings")
                .or_else(|| value["text_config"].get("tie_word_embeddings"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
            text,
            vision,
        };
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> std::result::Result<(), String> {
        let (t, v) = (&self.text, &self.vision);
        use icedit_flux::files::{
            check_config_sizes, MAX_CONFIG_LAYERS, MAX_CONFIG_VOCAB, MAX_CONFIG_WIDTH,
        };
        let heads_width = |heads: usize, dim: usize| heads.checked_mul(dim).unwrap_or(usize::MAX);
        check_config_sizes(&[
            ("text vocab_size", t.vocab_size, MAX_CONFIG_VOCAB),
            ("text hidden_size", t.hidden_size, MAX_CONFIG_WIDTH),
            (
                "text intermediate_size",
                t.intermediate_size,
                MAX_CONFIG_WIDTH,
            ),
            (
                "text num_hidden_layers",
                t.num_hidden_layers,
                MAX_CONFIG_LAYERS,
            ),
            ("text head_dim", t.head_dim, 1024),
            (
                "text attention width (heads x head_dim)",
                heads_width(t.num_attention_heads, t.head_dim),
                MAX_CONFIG_WIDTH,
            ),
            ("vision depth", v.depth, MAX_CONFIG_LAYERS),
            ("vision hidden_size", v.hidden_size, MAX_CONFIG_WIDTH),
            (
                "vision intermediate_size",
                v.intermediate_size,
                MAX_CONFIG_WIDTH,
            ),
            ("vision in_channels", v.in_channels, 16),
            ("vision patch_size", v.patch_size, 1024),
            ("vision temporal_patch_size", v.temporal_patch_size, 16),
            ("vision spatial_merge_size", v.spatial_merge_size, 16),
            (
                "vision num_position_embeddings",
                v.num_position_embeddings,
                1 << 20,
            ),
        ])?;
        let side = (v.num_position_embeddings as f64).sqrt() as usize;
        let problems = [
            (
                t.num_attention_heads == 0
                    || t.num_key_value_heads == 0
                    || t.num_attention_heads % t.num_key_value_heads != 0,
                "num_attention_heads must be a multiple of num_key_value_heads",
            ),
            (
                t.mrope_section.iter().sum::<usize>() != t.head_dim / 2,
                "mrope_section must add up to head_dim / 2",
            ),
            (
                v.num_heads == 0
                    || v.hidden_size % v.num_heads != 0
                    || (v.hidden_size / v.num_heads) % 4 != 0,
                "the vision head size must be a multiple of 4",
            ),
            (
                side * side != v.num_position_embeddings,
                "num_position_embeddings must be a square",
            ),
            (
                v.deepstack_visual_indexes.iter().any(|&i| i >= v.depth)
                    || v.deepstack_visual_indexes.len() > t.num_hidden_layers,
                "deepstack_visual_indexes do not fit the vision depth or the decoder",
            ),
            (
                v.out_hidden_size != t.hidden_size,
                "vision out_hidden_size must equal the text hidden_size",
            ),
        ];
        match problems.iter().find(|(bad, _)| *bad) {
            Some((_, message)) => Err(message.to_string()),
            None => Ok(()),
        }
    }
}

fn vision_act(value: &Value) -> &str {
    value["vision_config"]["hidden_act"]
        .as_str()
        .unwrap_or("gelu_pytorch_tanh")
}

/// `nn.LayerNorm` `weight` and `bias` under `vb`.
fn layer_norm(dim: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<LayerNorm> {
    LayerNorm::new(vb.get(dim, "weight")?, vb.get(dim, "bias")?, eps)
}

/// Qwen3's RMSNorm: computed in f32, the weight applied after rounding back to the input's dtype.
fn rms_norm(dim: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<RmsNorm> {
    Ok(RmsNorm::new(
        vb.get(dim, "weight")?,
        eps,
        RmsRounding::Input,
    ))
}

/// `x * cos + rotate_half(x) * sin`, rotate_half(x) = cat(-x[half:], x[:half]).
fn apply_rotary(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let half = xs.dim(D::Minus1)? / 2;
    let rotated = Tensor::cat(
        &[
            &xs.narrow(D::Minus1, half, half)?.neg()?,
            &xs.narrow(D::Minus1, 0, half)?,
        ],
        D::Minus1,
    )?;
    xs.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// Softmax attention of `q` `[heads, n, d]` over `k`, `v` `[heads, m, d]`, scores in f32.
fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let scale = (q.dim(D::Minus1)? as f64).powf(-0.5);
    let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?.to_dtype(DType::F32)?;
    let scores = match mask {
        Some(mask) => scores.broadcast_add(mask)?,
        None => scores,
    };
    candle_nn::ops::softmax_last_dim(&scores)?
        .to_dtype(v.dtype())?
        .matmul(v)
}

struct VisionBlock {
    norm1: LayerNorm,
    norm2: LayerNorm,
    qkv: Linear,
    proj: Linear,
    fc1: Linear,
    fc2: Linear,
}

/// A 2x2 window of patches into one language-model token: LayerNorm before the windows are
/// gathered (the final merger) or after (the deepstack mergers), then an MLP with exact GELU.
struct PatchMerger {
    norm: LayerNorm,
    norm_after_shuffle: bool,
    fc1: Linear,
    fc2: Linear,
}

impl PatchMerger {
    fn load(
        cfg: &VisionConfig,
        norm_after_shuffle: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let window = cfg.hidden_size * cfg.spatial_merge_size.pow(2);
        let norm_dim = if norm_after_shuffle {
            window
        } else {
            cfg.hidden_size
        };
        Ok(Self {
            norm: layer_norm(norm_dim, 1e-6, vb.pp("norm"))?,
            norm_after_shuffle,
            fc1: candle_nn::linear(window, window, vb.pp("linear_fc1"))?,
            fc2: candle_nn::linear(window, cfg.out_hidden_size, vb.pp("linear_fc2"))?,
        })
    }

    fn forward(&self, xs: &Tensor, window: usize) -> candle_core::Result<Tensor> {
        let n = xs.dim(0)?;
        let gathered = if self.norm_after_shuffle {
            self.norm.forward(&xs.reshape((n / window, ()))?)?
        } else {
            self.norm.forward(xs)?.reshape((n / window, ()))?
        };
        self.fc2.forward(&self.fc1.forward(&gathered)?.gelu_erf()?)
    }
}

struct VisionModel {
    cfg: VisionConfig,
    /// The Conv3d as a matrix over the flattened (channel, frame, y, x) patch, with its bias.
    patch_embed: Linear,
    pos_embed: Tensor,
    blocks: Vec<VisionBlock>,
    merger: PatchMerger,
    deepstack_mergers: Vec<PatchMerger>,
}

/// Where each patch of a `rows x cols` grid sits, in the processor's order: 2x2 merge
/// windows in raster order, raster order inside each window.
pub(crate) fn patch_positions(rows: usize, cols: usize, merge: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::with_capacity(rows * cols);
    for block_row in 0..rows / merge {
        for block_col in 0..cols / merge {
            for in_row in 0..merge {
                for in_col in 0..merge {
                    out.push((block_row * merge + in_row, block_col * merge + in_col));
                }
            }
        }
    }
    out
}

impl VisionModel {
    fn load(cfg: &VisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let v = cfg.hidden_size;
        let patch = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size * cfg.patch_size;
        let conv = vb.pp("patch_embed").pp("proj");
        let weight = conv
            .get(
                (
                    v,
                    cfg.in_channels,
                    cfg.temporal_patch_size,
                    cfg.patch_size,
                    cfg.patch_size,
                ),
                "weight",
            )?
            .reshape((v, patch))?;
        let patch_embed = Linear::new(weight, Some(conv.get(v, "bias")?));
        let blocks = (0..cfg.depth)
            .map(|i| {
                let b = vb.pp("blocks").pp(i);
                Ok(VisionBlock {
                    norm1: layer_norm(v, 1e-6, b.pp("norm1"))?,
                    norm2: layer_norm(v, 1e-6, b.pp("norm2"))?,
                    qkv: candle_nn::linear(v, 3 * v, b.pp("attn").pp("qkv"))?,
                    proj: candle_nn::linear(v, v, b.pp("attn").pp("proj"))?,
                    fc1: candle_nn::linear(v, cfg.intermediate_size, b.pp("mlp").pp("linear_fc1"))?,
                    fc2: candle_nn::linear(cfg.intermediate_size, v, b.pp("mlp").pp("linear_fc2"))?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let deepstack_mergers = (0..cfg.deepstack_visual_indexes.len())
            .map(|j| PatchMerger::load(cfg, true, vb.pp("deepstack_merger_list").pp(j)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            patch_embed,
            pos_embed: vb
                .pp("pos_embed")
                .get((cfg.num_position_embeddings, v), "weight")?,
            blocks,
            merger: PatchMerger::load(cfg, false, vb.pp("merger"))?,
            deepstack_mergers,
        })
    }

    /// The position table resampled (bilinear, corners aligned) to a `rows x cols` grid, in
    /// patch order `[rows * cols, hidden]`.
    fn position_embedding(
        &self,
        positions: &[(usize, usize)],
        rows: usize,
        cols: usize,
    ) -> candle_core::Result<Tensor> {
        let side = (self.cfg.num_position_embeddings as f64).sqrt() as usize;
        // Computed in f32, as transformers does.
        let taps = |index: usize, size: usize| -> [(usize, f32); 2] {
            let src = index as f32 * (side - 1) as f32 / (size.max(2) - 1) as f32;
            let src = if size == 1 { 0.0 } else { src };
            let floor = src.floor();
            let frac = src - floor;
            let f = floor as usize;
            [(f, 1.0 - frac), ((f + 1).min(side - 1), frac)]
        };
        let mut indices = [const { Vec::new() }; 4];
        let mut weights = [const { Vec::new() }; 4];
        for &(row, col) in positions {
            let (r, c) = (taps(row, rows), taps(col, cols));
            for (k, ((ri, rw), (ci, cw))) in
                [(r[0], c[0]), (r[0], c[1]), (r[1], c[0]), (r[1], c[1])]
                    .into_iter()
                    .enumerate()
            {
                indices[k].push((ri * side + ci) as u32);
                weights[k].push(rw * cw);
            }
        }
        let device = self.pos_embed.device();
        let n = positions.len();
        let mut sum: Option<Tensor> = None;
        for k in 0..4 {
            let rows = self
                .pos_embed
                .index_select(&Tensor::new(indices[k].as_slice(), device)?, 0)?;
            let w = Tensor::from_vec(std::mem::take(&mut weights[k]), (n, 1), device)?
                .to_dtype(rows.dtype())?;
            let term = rows.broadcast_mul(&w)?;
            sum = Some(match sum {
                Some(s) => (s + term)?,
                None => term,
            });
        }
        Ok(sum.expect("four taps"))
    }

    /// cos and sin `[n, head_dim]` of the 2-D rotary positions: the first quarter of each
    /// half turns with the row, the second with the column.
    fn rotary(
        &self,
        positions: &[(usize, usize)],
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let head_dim = self.cfg.hidden_size / self.cfg.num_heads;
        let quarter = head_dim / 4;
        let inv: Vec<f32> = (0..quarter)
            .map(|i| {
                1.0 / (self.cfg.rope_theta as f32).powf((2 * i) as f32 / (head_dim / 2) as f32)
            })
            .collect();
        let mut angles = Vec::with_capacity(positions.len() * head_dim);
        for &(row, col) in positions {
            let half: Vec<f32> = inv
                .iter()
                .map(|f| row as f32 * f)
                .chain(inv.iter().map(|f| col as f32 * f))
                .collect();
            angles.extend_from_slice(&half);
            angles.extend_from_slice(&half);
        }
        let angles = Tensor::from_vec(angles, (positions.len(), head_dim), device)?;
        Ok((angles.cos()?, angles.sin()?))
    }

    /// One image's patches `[rows * cols, channels * frames * patch^2]` (processor order)
    /// -> (merged tokens `[rows * cols / 4, out]`, the deepstack features of the same shape).
    fn forward_image(
        &self,
        patches: &Tensor,
        rows: usize,
        cols: usize,
    ) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
        let cfg = &self.cfg;
        let positions = patch_positions(rows, cols, cfg.spatial_merge_size);
        let dtype = self.pos_embed.dtype();
        let mut xs = self.patch_embed.forward(&patches.to_dtype(dtype)?)?;
        xs = (xs + self.position_embedding(&positions, rows, cols)?)?;
        let (cos, sin) = self.rotary(&positions, xs.device())?;
        let (n, heads) = (positions.len(), cfg.num_heads);
        let head_dim = cfg.hidden_size / heads;
        let window = cfg.spatial_merge_size.pow(2);
        let mut deepstack = Vec::new();
        for (i, block) in self.blocks.iter().enumerate() {
            let qkv = block
                .qkv
                .forward(&block.norm1.forward(&xs)?)?
                .reshape((n, 3, heads, head_dim))?;
            let part = |k: usize| -> candle_core::Result<Tensor> {
                qkv.i((.., k))?.transpose(0, 1)?.contiguous() // [heads, n, d]
            };
            let rope = |t: Tensor| -> candle_core::Result<Tensor> {
                apply_rotary(&t.to_dtype(DType::F32)?, &cos, &sin)?.to_dtype(dtype)
            };
            let (q, k, v) = (rope(part(0)?)?, rope(part(1)?)?, part(2)?);
            let attended = attention(&q, &k, &v, None)?
                .transpose(0, 1)?
                .reshape((n, cfg.hidden_size))?;
            xs = (xs + block.proj.forward(&attended)?)?;
            let mlp = block
                .fc2
                .forward(&block.fc1.forward(&block.norm2.forward(&xs)?)?.gelu()?)?; // gelu_pytorch_tanh
            xs = (xs + mlp)?;
            if let Some(j) = cfg.deepstack_visual_indexes.iter().position(|&d| d == i) {
                deepstack.push(self.deepstack_mergers[j].forward(&xs, window)?);
            }
        }
        Ok((self.merger.forward(&xs, window)?, deepstack))
    }
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl DecoderLayer {
    fn load(cfg: &TextConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let attn = vb.pp("self_attn");
        let mlp = vb.pp("mlp");
        let eps = cfg.rms_norm_eps;
        Ok(Self {
            input_layernorm: rms_norm(h, eps, vb.pp("input_layernorm"))?,
            q_proj: candle_nn::linear_no_bias(h, cfg.num_attention_heads * d, attn.pp("q_proj"))?,
            k_proj: candle_nn::linear_no_bias(h, cfg.num_key_value_heads * d, attn.pp("k_proj"))?,
            v_proj: candle_nn::linear_no_bias(h, cfg.num_key_value_heads * d, attn.pp("v_proj"))?,
            o_proj: candle_nn::linear_no_bias(cfg.num_attention_heads * d, h, attn.pp("o_proj"))?,
            q_norm: rms_norm(d, eps, attn.pp("q_norm"))?,
            k_norm: rms_norm(d, eps, attn.pp("k_norm"))?,
            post_attention_layernorm: rms_norm(h, eps, vb.pp("post_attention_layernorm"))?,
            gate_proj: candle_nn::linear_no_bias(h, cfg.intermediate_size, mlp.pp("gate_proj"))?,
            up_proj: candle_nn::linear_no_bias(h, cfg.intermediate_size, mlp.pp("up_proj"))?,
            down_proj: candle_nn::linear_no_bias(cfg.intermediate_size, h, mlp.pp("down_proj"))?,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        cfg: &TextConfig,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let l = xs.dim(0)?;
        let d = cfg.head_dim;
        let normed = self.input_layernorm.forward(xs)?;
        // [L, heads * d] -> [heads, L, d], per-head RMSNorm, rotary.
        let heads =
            |proj: &Linear, n: usize, norm: Option<&RmsNorm>| -> candle_core::Result<Tensor> {
                let t = proj.forward(&normed)?.reshape((l, n, d))?;
                let t = match norm {
                    Some(norm) => {
                        apply_rotary(&norm.forward(&t)?.transpose(0, 1)?.contiguous()?, cos, sin)?
                    }
                    None => t.transpose(0, 1)?.contiguous()?,
                };
                Ok(t)
            };
        let q = heads(&self.q_proj, cfg.num_attention_heads, Some(&self.q_norm))?;
        let k = heads(&self.k_proj, cfg.num_key_value_heads, Some(&self.k_norm))?;
        let v = heads(&self.v_proj, cfg.num_key_value_heads, None)?;
        // Grouped-query attention: query head i reads key/value head i / group.
        let group = cfg.num_attention_heads / cfg.num_key_value_heads;
        let repeat = |t: Tensor| -> candle_core::Result<Tensor> {
            if group == 1 {
                return Ok(t);
            }
            let (kv, len, d) = t.dims3()?;
            t.unsqueeze(1)?
                .broadcast_as((kv, group, len, d))?
                .reshape((kv * group, len, d))
        };
        let attended = attention(&q, &repeat(k)?, &repeat(v)?, Some(mask))?
            .transpose(0, 1)?
            .reshape((l, cfg.num_attention_heads * d))?;
        let xs = (xs + self.o_proj.forward(&attended)?)?;
        let normed = self.post_attention_layernorm.forward(&xs)?;
        let mlp = self.down_proj.forward(
            &(self.gate_proj.forward(&normed)?.silu()? * self.up_proj.forward(&normed)?)?,
        )?;
        xs + mlp
    }
}

/// A prompt ready for the model: token ids with each image's pad tokens, and the images'
/// patches with their grids (in patches).
pub struct Prompt {
    pub input_ids: Vec<u32>,
    pub images: Vec<(Tensor, usize, usize)>,
}

pub struct Qwen3VlModel {
    cfg: Qwen3VlConfig,
    vision: VisionModel,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Tensor,
}

impl Qwen3VlModel {
    /// `vb` over the checkpoint's tensors (`model.visual.*`, `model.language_model.*`,
    /// `lm_head.weight` unless tied).
    pub fn load(cfg: &Qwen3VlConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let t = &cfg.text;
        let text = vb.pp("model").pp("language_model");
        let embed_tokens = text
            .pp("embed_tokens")
            .get((t.vocab_size, t.hidden_size), "weight")?;
        let lm_head = if cfg.tie_word_embeddings && !vb.contains_tensor("lm_head.weight") {
            embed_tokens.clone()
        } else {
            vb.pp("lm_head")
                .get((t.vocab_size, t.hidden_size), "weight")?
        };
        Ok(Self {
            vision: VisionModel::load(&cfg.vision, vb.pp("model").pp("visual"))?,
            layers: (0..t.num_hidden_layers)
                .map(|i| DecoderLayer::load(t, text.pp("layers").pp(i)))
                .collect::<candle_core::Result<Vec<_>>>()?,
            norm: rms_norm(t.hidden_size, t.rms_norm_eps, text.pp("norm"))?,
            embed_tokens,
            lm_head,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &Qwen3VlConfig {
        &self.cfg
    }

    /// The (time, row, column) rotary positions of every token (`get_rope_index`): text
    /// tokens count up on all three; an image's tokens share its start on time and spread
    /// over rows and columns, and the text after it starts past its larger side.
    pub fn rope_positions(&self, prompt: &Prompt) -> Result<[Vec<u32>; 3]> {
        let merge = self.cfg.vision.spatial_merge_size;
        let mut out: [Vec<u32>; 3] = Default::default();
        let mut images = prompt.images.iter();
        let mut next = 0u32;
        let mut i = 0;
        let ids = &prompt.input_ids;
        while i < ids.len() {
            if ids[i] != self.cfg.image_token_id {
                for stream in &mut out {
                    stream.push(next);
                }
                next += 1;
                i += 1;
                continue;
            }
            let Some(&(_, rows, cols)) = images.next() else {
                return Err(model_error("more image tokens than images"));
            };
            let (lh, lw) = (rows / merge, cols / merge);
            if ids.len() < i + lh * lw
                || ids[i..i + lh * lw]
                    .iter()
                    .any(|&t| t != self.cfg.image_token_id)
            {
                return Err(model_error("an image's pad tokens do not match its grid"));
            }
            for a in 0..lh {
                for b in 0..lw {
                    out[0].push(next);
                    out[1].push(next + a as u32);
                    out[2].push(next + b as u32);
                }
            }
            next += lh.max(lw) as u32;
            i += lh * lw;
        }
        if images.next().is_some() {
            return Err(model_error("more images than image tokens"));
        }
        Ok(out)
    }

    /// cos and sin `[L, head_dim]` of the interleaved multimodal rotary embedding: frequency
    /// j follows the row if j % 3 == 1, the column if j % 3 == 2 (within their sections),
    /// else time.
    fn text_rotary(
        &self,
        positions: &[Vec<u32>; 3],
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let t = &self.cfg.text;
        let half = t.head_dim / 2;
        let [_, h_section, w_section] = t.mrope_section;
        let inv: Vec<f32> = (0..half)
            .map(|j| 1.0 / (t.rope_theta as f32).powf((2 * j) as f32 / t.head_dim as f32))
            .collect();
        let stream = |j: usize| {
            if j % 3 == 1 && j < 3 * h_section {
                1
            } else if j % 3 == 2 && j < 3 * w_section {
                2
            } else {
                0
            }
        };
        let len = positions[0].len();
        let mut angles = Vec::with_capacity(len * t.head_dim);
        for p in 0..len {
            let row: Vec<f32> = (0..half)
                .map(|j| positions[stream(j)][p] as f32 * inv[j])
                .collect();
            angles.extend_from_slice(&row);
            angles.extend_from_slice(&row);
        }
        let angles = Tensor::from_vec(angles, (len, t.head_dim), device)?;
        Ok((angles.cos()?, angles.sin()?))
    }

    /// The merged image tokens of every image, in order, and the deepstack features.
    pub fn image_features(&self, prompt: &Prompt) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
        let mut tokens = Vec::new();
        let mut levels: Vec<Vec<Tensor>> =
            vec![Vec::new(); self.cfg.vision.deepstack_visual_indexes.len()];
        for (patches, rows, cols) in &prompt.images {
            let (merged, deepstack) = self.vision.forward_image(patches, *rows, *cols)?;
            tokens.push(merged);
            for (level, features) in levels.iter_mut().zip(deepstack) {
                level.push(features);
            }
        }
        let levels = levels
            .iter()
            .map(|l| Tensor::cat(l, 0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((Tensor::cat(&tokens, 0)?, levels))
    }

    /// The next token's logits `[vocab]` after the prompt (f32), and the last hidden state.
    pub fn next_token_logits(&self, prompt: &Prompt) -> Result<(Tensor, Tensor)> {
        let positions = self.rope_positions(prompt)?;
        let device = self.embed_tokens.device();
        let ids = &prompt.input_ids;
        let l = ids.len();
        let image_rows: Vec<u32> = (0..l as u32)
            .filter(|&i| ids[i as usize] == self.cfg.image_token_id)
            .collect();
        let mut xs = self
            .embed_tokens
            .index_select(&Tensor::new(ids.as_slice(), device)?, 0)?;
        let mut deepstack = Vec::new();
        let image_index = Tensor::new(image_rows.as_slice(), device)?;
        if !image_rows.is_empty() {
            let (tokens, levels) = self.image_features(prompt)?;
            if tokens.dim(0)? != image_rows.len() {
                return Err(model_error(
                    "image tokens and image features differ in number",
                ));
            }
            // Replace the pad tokens' embeddings by the image tokens.
            let keep: Vec<f32> = ids
                .iter()
                .map(|&t| {
                    if t == self.cfg.image_token_id {
                        0.0
                    } else {
                        1.0
                    }
                })
                .collect();
            let keep = Tensor::from_vec(keep, (l, 1), device)?.to_dtype(xs.dtype())?;
            xs = xs.broadcast_mul(&keep)?.index_add(
                &image_index,
                &tokens.to_dtype(xs.dtype())?,
                0,
            )?;
            deepstack = levels;
        }
        let (cos, sin) = self.text_rotary(&positions, device)?;
        let (cos, sin) = (cos.to_dtype(xs.dtype())?, sin.to_dtype(xs.dtype())?);
        let mask: Vec<f32> = (0..l)
            .flat_map(|i| (0..l).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (1, l, l), device)?;
        for (i, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs, &self.cfg.text, &cos, &sin, &mask)?;
            if let Some(features) = deepstack.get(i) {
                xs = xs.index_add(&image_index, &features.to_dtype(xs.dtype())?, 0)?;
            }
        }
        let last = self.norm.forward(&xs.i(l - 1..l)?)?;
        let logits = last
            .matmul(&self.lm_head.t()?)?
            .squeeze(0)?
            .to_dtype(DType::F32)?;
        Ok((logits, last.squeeze(0)?))
    }
}

fn model_error(message: &str) -> JudgeError {
    JudgeError::Failed {
        judge: "qwen3-vl".into(),
        message: message.into(),
    }
}

/// The safetensors files of a model folder: `model.safetensors`, or the shards its
/// `model.safetensors.index.json` names.
pub(crate) fn weight_files(dir: &Path) -> std::result::Result<Vec<std::path::PathBuf>, String> {
    icedit_flux::SafetensorsSet::open(dir, "model", icedit_flux::Sharding::SingleFirst)
        .map(|set| set.files)
        .map_err(|e| e.to_string())
}
