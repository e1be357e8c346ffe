//! transformers' `T5EncoderModel` (5.23): the last hidden state FLUX attends to.
//!
//! Written here rather than taken from candle-transformers, whose T5 has no float16
//! safeguards (transformers keeps `wo` in f32 and clamps infinities), runs the softmax in
//! half precision, needs `&mut self` to run (for its decoder cache), and reports missing or
//! misshapen weights without naming the file.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use icedit_flux::norms::{RmsNorm, RmsRounding};
use icedit_flux::Linear;
use serde::Deserialize;

use crate::error::{read_json, Result, TextError};
use crate::layers::{
    apply, checked_ids, linear, merge_heads, softmax_f32, split_heads, Activation,
};
use crate::weights::ModelWeights;

const MODEL: &str = "T5 encoder";

/// The fields of transformers' `T5Config` the encoder uses (defaults are transformers').
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    pub layer_norm_epsilon: f64,
    /// `"{act}"` or `"gated-{act}"`; transformers derives the activation from this alone
    /// (`dense_act_fn` in the file is ignored), with `gated-gelu` meaning `gelu_new`.
    pub feed_forward_proj: String,
}

impl Default for T5Config {
    fn default() -> Self {
        Self {
            vocab_size: 32128,
            d_model: 512,
            d_kv: 64,
            d_ff: 2048,
            num_layers: 6,
            num_heads: 8,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "relu".into(),
        }
    }
}

impl T5Config {
    pub fn from_file(path: &Path) -> Result<Self> {
        let value: serde_json::Value = read_json(path)?;
        let config: Self = serde_json::from_value(value).map_err(|e| TextError::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let invalid = |message: String| TextError::Config {
            path: path.to_path_buf(),
            message,
        };
        config.feed_forward().map_err(invalid)?;
        use icedit_flux::files::{
            check_config_sizes, MAX_CONFIG_LAYERS, MAX_CONFIG_VOCAB, MAX_CONFIG_WIDTH,
        };
        let inner = config
            .num_heads
            .checked_mul(config.d_kv)
            .unwrap_or(usize::MAX);
        check_config_sizes(&[
            ("vocab_size", config.vocab_size, MAX_CONFIG_VOCAB),
            ("d_model", config.d_model, MAX_CONFIG_WIDTH),
            ("d_ff", config.d_ff, MAX_CONFIG_WIDTH),
            ("num_layers", config.num_layers, MAX_CONFIG_LAYERS),
            ("num_heads x d_kv", inner, MAX_CONFIG_WIDTH),
            (
                "relative_attention_num_buckets",
                config.relative_attention_num_buckets,
                1 << 12,
            ),
        ])
        .and_then(|()| crate::clip::check_epsilon("layer_norm_epsilon", config.layer_norm_epsilon))
        .map_err(invalid)?;
        if config.num_heads == 0 || config.d_kv == 0 {
            return Err(invalid("num_heads and d_kv must be positive".into()));
        }
        if config.relative_attention_num_buckets < 4 {
            return Err(invalid(format!(
                "relative_attention_num_buckets {} is too small",
                config.relative_attention_num_buckets
            )));
        }
        Ok(config)
    }

    /// `(gated, activation)` from `feed_forward_proj`, as `T5Config.__post_init__` reads it.
    pub fn feed_forward(&self) -> std::result::Result<(bool, Activation), String> {
        let gated = self.feed_forward_proj.starts_with("gated-");
        let name = match self.feed_forward_proj.as_str() {
            "gated-gelu" => "gelu_new",
            other => other.rsplit('-').next().unwrap_or(other),
        };
        match Activation::from_name(name) {
            Some(act) => Ok((gated, act)),
            None => Err(format!(
                "feed_forward_proj `{}` is not supported (`relu`, `gelu`, `gated-gelu`, `gated-silu`, ... are)",
                self.feed_forward_proj
            )),
        }
    }
}

/// T5's layer norm: RMS only, no bias; statistics in f32, and back to the weight's dtype when
/// that is half precision (else the result stays f32).
fn rms_norm(
    weights: &ModelWeights,
    prefix: &str,
    cfg: &T5Config,
    dtype: DType,
    device: &Device,
) -> Result<RmsNorm> {
    let weight = weights.tensor(&format!("{prefix}.weight"), &[cfg.d_model], dtype, device)?;
    Ok(RmsNorm::new(
        weight,
        cfg.layer_norm_epsilon,
        RmsRounding::HalfWeight,
    ))
}

enum FeedForward {
    Gated {
        wi_0: Linear,
        wi_1: Linear,
        wo: Linear,
    },
    Plain {
        wi: Linear,
        wo: Linear,
    },
}

struct Block {
    attention_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ff_norm: RmsNorm,
    ff: FeedForward,
}

/// The T5 encoder stack (`T5EncoderModel`), without attention mask: FLUX feeds it the padded
/// ids and lets every position attend to the padding, as diffusers does.
pub struct T5Encoder {
    config: T5Config,
    activation: Activation,
    embed_tokens: Tensor,
    /// `[buckets, heads]`, from the first block (shared by all blocks).
    relative_attention_bias: Tensor,
    blocks: Vec<Block>,
    final_layer_norm: RmsNorm,
    dtype: DType,
}

impl T5Encoder {
    /// Loads a transformers `T5EncoderModel` folder (diffusers' `text_encoder_2/`), single
    /// file or sharded; weights stored in any float dtype are converted to `dtype`.
    ///
    /// In f16, the feed-forward output projections `wo` stay f32, as transformers keeps them
    /// (`_keep_in_fp32_modules`): T5's activations overflow f16 otherwise.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let (config_path, weights) = ModelWeights::open(dir, MODEL)?;
        Self::from_weights(&config_path, &weights, dtype, device)
    }

    /// Loads the encoder's weights from one file: a GGUF in llama.cpp's T5 naming (as
    /// city96/t5-v1_1-xxl-encoder-gguf publishes T5-XXL) or a `.safetensors` in transformers'
    /// naming, with the config of the pipeline's `text_encoder_2/config.json`. GGUF blocks are
    /// dequantized at load (as transformers' GGUF loader does): the encoder is freed before the
    /// transformer loads, so it never adds to the transformer's peak.
    pub fn load_file(
        config_path: &Path,
        file: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let weights = ModelWeights::open_file(file, MODEL, llama_cpp_name)?;
        if let Some(architecture) = weights
            .files()
            .gguf_metadata()
            .and_then(|m| m.get("general.architecture"))
        {
            if !matches!(architecture.as_str(), Some("t5encoder" | "t5")) {
                return Err(TextError::Config {
                    path: file.to_path_buf(),
                    message: format!(
                        "this GGUF's `general.architecture` is {architecture:?}, not `t5encoder`: \
                         it holds another model than a T5 encoder"
                    ),
                });
            }
        }
        Self::from_weights(config_path, &weights, dtype, device)
    }

    fn from_weights(
        config_path: &Path,
        weights: &ModelWeights,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let config = T5Config::from_file(config_path)?;
        let (gated, activation) = config.feed_forward().map_err(|message| TextError::Config {
            path: config_path.to_path_buf(),
            message,
        })?;
        let (d, inner, heads) = (
            config.d_model,
            config.num_heads * config.d_kv,
            config.num_heads,
        );

        // T5EncoderModel saves the embedding as `shared`; a full T5 checkpoint may only have
        // the encoder's tied copy.
        let embed_name = ["shared.weight", "encoder.embed_tokens.weight"]
            .into_iter()
            .find(|n| weights.contains(n))
            .unwrap_or("shared.weight");
        let embed_tokens = weights.tensor(embed_name, &[config.vocab_size, d], dtype, device)?;
        let relative_attention_bias = weights.tensor(
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            &[config.relative_attention_num_buckets, heads],
            dtype,
            device,
        )?;
        let wo_dtype = if dtype == DType::F16 {
            DType::F32
        } else {
            dtype
        };
        let blocks = (0..config.num_layers)
            .map(|i| {
                let attn = format!("encoder.block.{i}.layer.0");
                let ff = format!("encoder.block.{i}.layer.1");
                let lin =
                    |name: String, dims, dtype| linear(&weights, &name, dims, false, dtype, device);
                let dense = format!("{ff}.DenseReluDense");
                let feed_forward = if gated {
                    FeedForward::Gated {
                        wi_0: lin(format!("{dense}.wi_0"), (d, config.d_ff), dtype)?,
                        wi_1: lin(format!("{dense}.wi_1"), (d, config.d_ff), dtype)?,
                        wo: lin(format!("{dense}.wo"), (config.d_ff, d), wo_dtype)?,
                    }
                } else {
                    FeedForward::Plain {
                        wi: lin(format!("{dense}.wi"), (d, config.d_ff), dtype)?,
                        wo: lin(format!("{dense}.wo"), (config.d_ff, d), wo_dtype)?,
                    }
                };
                Ok(Block {
                    attention_norm: rms_norm(
                        &weights,
                        &format!("{attn}.layer_norm"),
                        &config,
                        dtype,
                        device,
                    )?,
                    q: lin(format!("{attn}.SelfAttention.q"), (d, inner), dtype)?,
                    k: lin(format!("{attn}.SelfAttention.k"), (d, inner), dtype)?,
                    v: lin(format!("{attn}.SelfAttention.v"), (d, inner), dtype)?,
                    o: lin(format!("{attn}.SelfAttention.o"), (inner, d), dtype)?,
                    ff_norm: rms_norm(
                        &weights,
                        &format!("{ff}.layer_norm"),
                        &config,
                        dtype,
                        device,
                    )?,
                    ff: feed_forward,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm =
            rms_norm(&weights, "encoder.final_layer_norm", &config, dtype, device)?;
        Ok(Self {
            config,
            activation,
            embed_tokens,
            relative_attention_bias,
            blocks,
            final_layer_norm,
            dtype,
        })
    }

    pub fn config(&self) -> &T5Config {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// Token ids `[batch, seq]` -> last hidden state `[batch, seq, d_model]` in the model dtype.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (batch, seq) = input_ids.dims2()?;
        if seq == 0 {
            return Err(TextError::Input("T5 needs at least one token".into()));
        }
        checked_ids(input_ids, self.config.vocab_size)?;
        let device = self.device();
        let ids = input_ids
            .to_dtype(DType::U32)?
            .to_device(device)?
            .flatten_all()?;
        let mut xs =
            self.embed_tokens
                .index_select(&ids, 0)?
                .reshape((batch, seq, self.config.d_model))?;
        let position_bias = self.position_bias(seq)?;
        for block in &self.blocks {
            xs = self.block_forward(block, &xs, &position_bias)?;
        }
        let out = self.final_layer_norm.forward(&xs)?;
        Ok(out.to_dtype(self.dtype)?)
    }

    fn block_forward(&self, block: &Block, xs: &Tensor, position_bias: &Tensor) -> Result<Tensor> {
        let heads = self.config.num_heads;
        let normed = block.attention_norm.forward(xs)?;
        let q = split_heads(&apply(&block.q, &normed)?, heads)?;
        let k = split_heads(&apply(&block.k, &normed)?, heads)?;
        let v = split_heads(&apply(&block.v, &normed)?, heads)?;
        // No 1/sqrt(d) scaling: T5 folds it into its initialisation.
        let scores = q.matmul(&k.t()?.contiguous()?)?;
        let scores = scores.to_dtype(DType::F32)?.broadcast_add(position_bias)?;
        let probs = softmax_f32(&scores, v.dtype())?;
        let attended = merge_heads(&probs.matmul(&v)?)?;
        let xs = clamp_f16(&add_promoted(xs, &apply(&block.o, &attended)?)?)?;

        let normed = block.ff_norm.forward(&xs)?;
        let ff = match &block.ff {
            FeedForward::Gated { wi_0, wi_1, wo } => {
                let gate = self.activation.forward(&apply(wi_0, &normed)?)?;
                let hidden = (gate * apply(wi_1, &normed)?)?;
                apply(wo, &hidden.to_dtype(wo.dtype())?)?
            }
            FeedForward::Plain { wi, wo } => {
                let hidden = self.activation.forward(&apply(wi, &normed)?)?;
                apply(wo, &hidden.to_dtype(wo.dtype())?)?
            }
        };
        clamp_f16(&add_promoted(&xs, &ff)?)
    }

    /// The relative position bias `[1, heads, seq, seq]` in f32 (rounded through the model
    /// dtype first, as transformers computes it in the embedding's dtype).
    fn position_bias(&self, seq: usize) -> Result<Tensor> {
        let cfg = &self.config;
        let buckets: Vec<u32> = (0..seq as i64)
            .flat_map(|query| {
                (0..seq as i64).map(move |key| {
                    relative_position_bucket(
                        key - query,
                        cfg.relative_attention_num_buckets,
                        cfg.relative_attention_max_distance,
                    )
                })
            })
            .collect();
        let buckets = Tensor::from_vec(buckets, seq * seq, self.device())?;
        let bias = self
            .relative_attention_bias
            .index_select(&buckets, 0)?
            .reshape((seq, seq, cfg.num_heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?;
        Ok(bias.to_dtype(DType::F32)?.contiguous()?)
    }
}

/// transformers' bidirectional `T5Attention._relative_position_bucket` for
/// `relative_position = key - query`, with its float rounding: the log ratio in f32, the
/// divisor `log(max_distance / max_exact)` computed in f64 and used as f32, then truncated.
pub(crate) fn relative_position_bucket(
    relative_position: i64,
    num_buckets: usize,
    max_distance: usize,
) -> u32 {
    let half = num_buckets / 2;
    let offset = if relative_position > 0 { half } else { 0 };
    let distance = relative_position.unsigned_abs() as usize;
    let max_exact = half / 2;
    let bucket = if distance < max_exact {
        distance
    } else {
        let divisor = (max_distance as f64 / max_exact as f64).ln() as f32;
        let log_ratio = (distance as f32 / max_exact as f32).ln() / divisor;
        let large = max_exact + (log_ratio * (half - max_exact) as f32) as usize;
        large.min(half - 1)
    };
    (offset + bucket) as u32
}

/// `a + b` with PyTorch's type promotion for the dtypes met here: f32 wins over half precision
/// (in f16, the f32 `wo` output turns the residual stream to f32, as in transformers).
fn add_promoted(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dtype() == b.dtype() {
        return Ok((a + b)?);
    }
    Ok((a.to_dtype(DType::F32)? + b.to_dtype(DType::F32)?)?)
}

const F16_MAX: f64 = 65504.0;

/// transformers' f16 guard in `T5Block`: when the hidden states hold infinities, clamp them to
/// the largest f16 value less 1000.
fn clamp_f16(xs: &Tensor) -> Result<Tensor> {
    if xs.dtype() != DType::F16 {
        return Ok(xs.clone());
    }
    let max_abs = xs
        .abs()?
        .max_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    if max_abs.is_infinite() {
        let limit = F16_MAX - 1000.0;
        return Ok(xs.clamp(-limit, limit)?);
    }
    Ok(xs.clone())
}

#[cfg(test)]
mod tests {
    use super::relative_position_bucket;

    /// transformers' `_relative_position_bucket(arange(-520, 521), True, 32, 128)`, as
    /// (first relative position, bucket) runs: the boundaries at 16, 32 and 64 are where float
    /// rounding could move them.
    const TORCH_RUNS: &[(i64, u32)] = &[
        (-520, 15),
        (-90, 14),
        (-63, 13),
        (-45, 12),
        (-31, 11),
        (-22, 10),
        (-15, 9),
        (-11, 8),
        (-7, 7),
        (-6, 6),
        (-5, 5),
        (-4, 4),
        (-3, 3),
        (-2, 2),
        (-1, 1),
        (0, 0),
        (1, 17),
        (2, 18),
        (3, 19),
        (4, 20),
        (5, 21),
        (6, 22),
        (7, 23),
        (8, 24),
        (12, 25),
        (16, 26),
        (23, 27),
        (32, 28),
        (46, 29),
        (64, 30),
        (91, 31),
    ];

    #[test]
    fn buckets_match_torch() {
        for position in -520..=520i64 {
            let expected = TORCH_RUNS
                .iter()
                .rev()
                .find(|(start, _)| *start <= position)
                .map(|(_, bucket)| *bucket)
                .unwrap();
            assert_eq!(
                relative_position_bucket(position, 32, 128),
                expected,
                "position {position}"
            );
        }
    }
}

/// llama.cpp's name (gguf-py `MODEL_ARCH.T5ENCODER`) of a transformers T5 encoder tensor; names
/// already in that form, or unknown, pass through.
fn llama_cpp_name(name: &str) -> Option<String> {
    match name {
        "shared.weight" | "encoder.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "encoder.final_layer_norm.weight" => return Some("enc.output_norm.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("encoder.block.")?;
    let (block, rest) = rest.split_once('.')?;
    let part = match rest {
        "layer.0.SelfAttention.q.weight" => "attn_q",
        "layer.0.SelfAttention.k.weight" => "attn_k",
        "layer.0.SelfAttention.v.weight" => "attn_v",
        "layer.0.SelfAttention.o.weight" => "attn_o",
        "layer.0.SelfAttention.relative_attention_bias.weight" => "attn_rel_b",
        "layer.0.layer_norm.weight" => "attn_norm",
        "layer.1.DenseReluDense.wi_0.weight" => "ffn_gate",
        "layer.1.DenseReluDense.wi_1.weight" | "layer.1.DenseReluDense.wi.weight" => "ffn_up",
        "layer.1.DenseReluDense.wo.weight" => "ffn_down",
        "layer.1.layer_norm.weight" => "ffn_norm",
        _ => return None,
    };
    Some(format!("enc.blk.{block}.{part}.weight"))
}
