//! Building blocks shared by the two encoders, written to round where PyTorch rounds.

use candle_core::{DType, Device, Tensor};
use candle_nn::Module;
use icedit_flux::norms::LayerNorm;
use icedit_flux::Linear;

use crate::error::{Result, TextError};
use crate::weights::ModelWeights;

/// Reads `{prefix}.weight` (`[out, in]`) and, with `bias`, `{prefix}.bias` as a linear layer:
/// the transformer's one `Linear`, so a weight stored quantized (a GGUF T5) stays quantized in
/// memory and is dequantized for each product.
pub(crate) fn linear(
    weights: &ModelWeights,
    prefix: &str,
    (in_dim, out_dim): (usize, usize),
    bias: bool,
    dtype: DType,
    device: &Device,
) -> Result<Linear> {
    let name = format!("{prefix}.weight");
    let bias = if bias {
        Some(weights.tensor(&format!("{prefix}.bias"), &[out_dim], dtype, device)?)
    } else {
        None
    };
    if let Some(blocks) = weights.quantized(&name, &[out_dim, in_dim], device)? {
        return Ok(Linear::quantized(blocks, bias, dtype)?);
    }
    let weight = weights.tensor(&name, &[out_dim, in_dim], dtype, device)?;
    Ok(Linear::new(weight, bias))
}

/// `nn.LayerNorm` `prefix.weight`, `prefix.bias` (computed as PyTorch rounds it).
pub(crate) fn layer_norm(
    weights: &ModelWeights,
    prefix: &str,
    dim: usize,
    eps: f64,
    device: &Device,
) -> Result<LayerNorm> {
    let read = |p: &str| weights.tensor(&format!("{prefix}.{p}"), &[dim], DType::F32, device);
    Ok(LayerNorm::new(read("weight")?, read("bias")?, eps)?)
}

/// The activations transformers' `ACT2FN` names that these encoders use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `quick_gelu`: `x * sigmoid(1.702 x)` (CLIP).
    QuickGelu,
    /// `gelu`: the exact, erf-based GELU.
    Gelu,
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation (T5 v1.1).
    GeluTanh,
    Relu,
    /// `silu` / `swish`.
    Silu,
}

impl Activation {
    /// Parses a transformers activation name; `None` for names not supported here.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "quick_gelu" => Self::QuickGelu,
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            _ => return None,
        })
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::QuickGelu => (xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?)?,
            Self::Gelu => xs.gelu_erf()?,
            // transformers' NewGELUActivation term by term:
            // 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))
            Self::GeluTanh => {
                let cube = (xs.sqr()? * xs)?; // torch's pow(x, 3) is x * x * x
                let inner = (xs + (cube * 0.044715)?)?;
                let tanh = (inner * (2.0 / std::f64::consts::PI).sqrt())?.tanh()?;
                ((xs * 0.5)? * (tanh + 1.0)?)?
            }
            Self::Relu => xs.relu()?,
            Self::Silu => xs.silu()?,
        })
    }
}

/// Softmax over the last dimension in f32, returned in `dtype` (PyTorch's
/// `softmax(x, dim=-1, dtype=torch.float32).to(dtype)`).
pub(crate) fn softmax_f32(scores: &Tensor, dtype: DType) -> Result<Tensor> {
    let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?;
    Ok(probs.to_dtype(dtype)?)
}

/// Multi-head layout: `[b, s, heads * d]` -> contiguous `[b, heads, s, d]`.
pub(crate) fn split_heads(xs: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, s, hd) = xs.dims3()?;
    Ok(xs
        .reshape((b, s, heads, hd / heads))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// `[b, heads, s, d]` -> `[b, s, heads * d]`.
pub(crate) fn merge_heads(xs: &Tensor) -> Result<Tensor> {
    let (b, h, s, d) = xs.dims4()?;
    Ok(xs.transpose(1, 2)?.reshape((b, s, h * d))?)
}

pub(crate) fn apply(layer: &Linear, xs: &Tensor) -> Result<Tensor> {
    Ok(layer.forward(xs)?)
}

/// Token ids as a `[batch, seq]` u32 tensor's rows, checked against the vocabulary size (an
/// out-of-range id would otherwise fail deep inside the embedding lookup).
pub(crate) fn checked_ids(input_ids: &Tensor, vocab_size: usize) -> Result<Vec<Vec<u32>>> {
    let rows = input_ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    if let Some(bad) = rows.iter().flatten().find(|&&id| id as usize >= vocab_size) {
        return Err(TextError::Input(format!(
            "token id {bad} is outside the model's vocabulary of {vocab_size} (tokenizer and encoder from different models?)"
        )));
    }
    Ok(rows)
}
