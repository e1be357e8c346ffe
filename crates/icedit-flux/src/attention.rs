//! Rotary position embedding over (0, row, col) ids, and scaled dot-product attention that
//! never holds more than a bounded slice of the score matrix: tiled kernels on the CPU, query
//! chunks elsewhere, flash attention on CUDA with the `flash-attn` feature.

use candle_core::{DType, Device, Result, Tensor, D};

use crate::config::ROPE_THETA;
use crate::cpu_kernels::{attention_bshd, cpu_fast_paths, rope_bshd_inplace};

/// Cos/sin tables for every position of the joint (text, then image) sequence, `[S, head_dim/2]`
/// in f32. Angles are computed on the host in f64, as diffusers does, so that large positions
/// lose no precision.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// The same tables on the host, for the CPU kernel.
    cos_host: Vec<f32>,
    sin_host: Vec<f32>,
}

impl Rope {
    /// `ids` is `[S, 3]` (or `[1, S, 3]`); `axes_dims` gives each id axis's share of the head dim.
    pub(crate) fn new(ids: &Tensor, axes_dims: &[usize], device: &Device) -> Result<Self> {
        let ids = match ids.rank() {
            3 => ids.get(0)?,
            _ => ids.clone(),
        };
        let (seq_len, n_axes) = ids.dims2()?;
        if n_axes != axes_dims.len() {
            candle_core::bail!(
                "position ids have {n_axes} axes, the model's RoPE has {}",
                axes_dims.len()
            );
        }
        // diffusers casts ids to f32 before widening to f64: do the same.
        let ids = ids.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let half: usize = axes_dims.iter().sum::<usize>() / 2;
        let mut cos = Vec::with_capacity(seq_len * half);
        let mut sin = Vec::with_capacity(seq_len * half);
        for pos in &ids {
            for (&p, &dim) in pos.iter().zip(axes_dims) {
                for k in 0..dim / 2 {
                    let freq = 1.0 / ROPE_THETA.powf((2 * k) as f64 / dim as f64);
                    let angle = p as f64 * freq;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        Ok(Self {
            cos: Tensor::from_slice(&cos, (seq_len, half), device)?,
            sin: Tensor::from_slice(&sin, (seq_len, half), device)?,
            cos_host: cos,
            sin_host: sin,
        })
    }

    /// Rotates interleaved pairs of `x` (`[B, H, S, D]`), in f32 like the reference.
    fn apply_heads_first(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        candle_nn::rotary_emb::rope_i(&x, &self.cos, &self.sin)?.to_dtype(dtype)
    }
}

/// Attention over the joint sequence with rotary embeddings on q and k. `q`, `k`, `v` are
/// `[B, S, H*D]` as the projections produce them (q and k already RMS-normed per head); returns
/// `[B, S, H*D]`. On the CPU `q` and `k` are rotated in place, so they must not be shared.
pub(crate) fn rope_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: usize,
    rope: &Rope,
) -> Result<Tensor> {
    let dtype = q.dtype();
    if cpu_fast_paths(q.device()) {
        // The reference rotates in f32 and rounds back to the model dtype before attention.
        let rotate = |x: Tensor| -> Result<Tensor> {
            let x = x.to_dtype(DType::F32)?.contiguous()?;
            rope_bshd_inplace(&x, &rope.cos_host, &rope.sin_host)?;
            if dtype == DType::F32 {
                Ok(x)
            } else {
                x.to_dtype(dtype)?.to_dtype(DType::F32)
            }
        };
        let v = v.to_dtype(DType::F32)?.contiguous()?;
        return attention_bshd(&rotate(q)?, &rotate(k)?, &v, heads)?.to_dtype(dtype);
    }
    let (b, s, hd) = q.dims3()?;
    let heads_first = |x: &Tensor| x.reshape((b, s, heads, hd / heads))?.transpose(1, 2);
    let q = rope.apply_heads_first(&heads_first(&q)?)?;
    let k = rope.apply_heads_first(&heads_first(&k)?)?;
    attention(&q, &k, &heads_first(&v)?)
}

/// Upper bound on the f32 attention scores held at once by the generic path.
const SCORE_BYTES_BUDGET: usize = 256 << 20;

/// Softmax attention of `q`, `k`, `v` (`[B, H, S, D]`, no mask), returned as `[B, S, H*D]`.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, h, s, d) = q.dims4()?;
    #[cfg(feature = "flash-attn")]
    if q.device().is_cuda() && matches!(q.dtype(), DType::F16 | DType::BF16) {
        // flash-attn takes [B, S, H, D].
        let t = |x: &Tensor| x.transpose(1, 2)?.contiguous();
        let out =
            candle_flash_attn::flash_attn(&t(q)?, &t(k)?, &t(v)?, 1.0 / (d as f32).sqrt(), false)?;
        return out.reshape((b, s, h * d));
    }
    let out = chunked_attention(q, k, v)?;
    out.transpose(1, 2)?.reshape((b, s, h * d))
}

/// Attention in query chunks so that the score matrix held at once stays under
/// [`SCORE_BYTES_BUDGET`]. Half-precision inputs are computed in f32 and rounded once at the
/// end, as flash attention and PyTorch's CPU kernel do: rounding scores to bf16 before the
/// softmax would double the error.
fn chunked_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, h, s_q, d) = q.dims4()?;
    let s_k = k.dim(2)?;
    let dtype = q.dtype();
    let q = (q.to_dtype(DType::F32)? * (1.0 / (d as f64).sqrt()))?;
    let k_t = k.to_dtype(DType::F32)?.t()?;
    let v = v.to_dtype(DType::F32)?.contiguous()?;
    let rows_per_chunk = (SCORE_BYTES_BUDGET / (b * h * s_k * 4)).clamp(1, s_q);
    let mut outs = Vec::with_capacity(s_q.div_ceil(rows_per_chunk));
    for start in (0..s_q).step_by(rows_per_chunk) {
        let len = rows_per_chunk.min(s_q - start);
        let q_chunk = q.narrow(2, start, len)?.contiguous()?;
        let probs = candle_nn::ops::softmax_last_dim(&q_chunk.matmul(&k_t)?)?;
        outs.push(probs.matmul(&v)?);
    }
    let out = if outs.len() == 1 {
        outs.pop().expect("one chunk")
    } else {
        Tensor::cat(&outs, D::Minus2)?
    };
    out.to_dtype(dtype)
}
