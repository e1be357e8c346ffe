//! Rotary position embedding over (0, row, col) ids, and scaled dot-product attention that
//! never holds more than a bounded slice of the score matrix: tiled kernels on the CPU, query
//! chunks elsewhere, flash attention on CUDA with the `flash-attn` feature
//! ([`flash_attention`]).

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

/// Whether attention runs through the flash attention kernels: built with the `flash-attn`
/// feature, on a CUDA device of compute capability 8.0 or newer, in bf16 or f16, with head size
/// 128. `ICEDIT_FLASH_ATTN=0` in the environment turns them off (the GPU check times both).
pub fn flash_attention(device: &Device, dtype: DType, head_dim: usize) -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    icedit_flash_attn::supported(device, dtype, head_dim)
        && *ENABLED
            .get_or_init(|| std::env::var("ICEDIT_FLASH_ATTN").map_or(true, |v| v.trim() != "0"))
}

/// Upper bound on the f32 attention scores held at once by the generic path.
const SCORE_BYTES_BUDGET: usize = 256 << 20;

/// Softmax attention of `q`, `k`, `v` (`[B, H, S, D]`, no mask), returned as `[B, S, H*D]`:
/// flash attention where [`flash_attention`] says so, else [`chunked_attention`].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, h, s, d) = q.dims4()?;
    if flash_attention(q.device(), q.dtype(), d) {
        // Flash attention takes [B, S, H, D]; only the last dimension must be contiguous.
        let t = |x: &Tensor| x.transpose(1, 2);
        let out = icedit_flash_attn::flash_attn(&t(q)?, &t(k)?, &t(v)?, 1.0 / (d as f32).sqrt())?;
        return out.reshape((b, s, h * d));
    }
    let out = chunked_attention(q, k, v)?;
    out.transpose(1, 2)?.reshape((b, s, h * d))
}

/// Attention in query chunks (`[B, H, S, D]` in and out) so that the score matrix held at once
/// stays under [`SCORE_BYTES_BUDGET`].
///
/// In f32 everything is f32. Half-precision inputs go as flash attention (and PyTorch's CPU
/// kernel) take them: scores accumulated and kept in f32 (products of half values are exact in
/// f32; rounding the scores to bf16 before the softmax would add up to a few per cent to the
/// largest probabilities), the softmax in f32, then the probabilities rounded to the input's
/// dtype for a half-precision product with `v`, accumulated in f32 and rounded once.
pub fn chunked_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    chunked_attention_within(q, k, v, SCORE_BYTES_BUDGET)
}

pub(crate) fn chunked_attention_within(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    score_bytes: usize,
) -> Result<Tensor> {
    let (b, h, s_q, d) = q.dims4()?;
    let s_k = k.dim(2)?;
    let dtype = q.dtype();
    let scale = 1.0 / (d as f64).sqrt();
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let v = match dtype {
        DType::BF16 | DType::F16 => v,
        _ => v.to_dtype(DType::F32)?,
    };
    let scores = ScaledScores::new(&k, scale)?;
    let rows_per_chunk = (score_bytes / (b * h * s_k * 4)).clamp(1, s_q);
    let mut outs = Vec::with_capacity(s_q.div_ceil(rows_per_chunk));
    for start in (0..s_q).step_by(rows_per_chunk) {
        let len = rows_per_chunk.min(s_q - start);
        let probs = candle_nn::ops::softmax_last_dim(&scores.of(&q.narrow(2, start, len)?)?)?;
        outs.push(probs.to_dtype(v.dtype())?.matmul(&v)?);
    }
    let out = if outs.len() == 1 {
        outs.pop().expect("one chunk")
    } else {
        Tensor::cat(&outs, D::Minus2)?
    };
    out.to_dtype(dtype)
}

/// `scale * q k^T` in f32 for query chunks against one `k` (`[B, H, N, D]`).
enum ScaledScores {
    /// Half-precision `k` on CUDA: one cuBLAS call per chunk, half inputs, f32 output.
    #[cfg(feature = "cuda")]
    Cuda { k: Tensor, scale: f32 },
    /// `k^T` widened to f32 once; each chunk of q is widened and scaled, then multiplied.
    Widened { k_t: Tensor, scale: f64 },
}

impl ScaledScores {
    fn new(k: &Tensor, scale: f64) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if k.device().is_cuda() && matches!(k.dtype(), DType::BF16 | DType::F16) {
            return Ok(Self::Cuda {
                k: k.clone(),
                scale: scale as f32,
            });
        }
        Ok(Self::Widened {
            k_t: k.to_dtype(DType::F32)?.t()?,
            scale,
        })
    }

    /// `[B, H, M, N]` f32 scores of the query chunk `q` (`[B, H, M, D]`).
    fn of(&self, q: &Tensor) -> Result<Tensor> {
        match self {
            #[cfg(feature = "cuda")]
            Self::Cuda { k, scale } => crate::cuda_gemm::scaled_scores_f32(q, k, *scale),
            Self::Widened { k_t, scale } => (q.to_dtype(DType::F32)? * *scale)?
                .contiguous()?
                .matmul(k_t),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// softmax(q k^T / sqrt(d)) v on the host in f64, the probabilities rounded to `dtype`
    /// before the product (as the half-precision path does) and the result rounded to `dtype`.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, probs_dtype: DType) -> Tensor {
        let d = q.dim(3).unwrap();
        let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let scores = (f64s(q).matmul(&f64s(k).t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32).unwrap())
            .unwrap()
            .to_dtype(probs_dtype)
            .unwrap();
        f64s(&probs)
            .matmul(&f64s(v))
            .unwrap()
            .to_dtype(q.dtype())
            .unwrap()
    }

    fn inputs(dtype: DType) -> (Tensor, Tensor, Tensor) {
        // Scores up to about +-12, as FLUX's normed heads give: rounding them to bf16 would show.
        let x = |s: usize| {
            (icedit_test_support::randn(0f32, 1.0, (1, 3, s, 64)) * 1.8)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        (x(37), x(37), x(37))
    }

    #[test]
    fn half_precision_attention_keeps_scores_in_f32_and_rounds_the_probabilities() {
        for dtype in [DType::BF16, DType::F16] {
            let (q, k, v) = inputs(dtype);
            let out = chunked_attention(&q, &k, &v).unwrap();
            // Within two roundings of the output of the f64 computation with rounded
            // probabilities (one for the output, one where a probability rounds the other way);
            // far from it with scores rounded to the dtype first.
            let expected = reference(&q, &k, &v, dtype);
            let steps = crate::compare::max_diff_in_steps(&out, &expected, dtype).unwrap();
            assert!(steps <= 2.0, "{dtype:?}: {steps} steps of {dtype:?}");
            let rounded_scores = {
                let d = q.dim(3).unwrap();
                let s = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
                let p = candle_nn::ops::softmax_last_dim(&s.to_dtype(DType::F32).unwrap()).unwrap();
                p.to_dtype(dtype).unwrap().matmul(&v).unwrap()
            };
            if dtype == DType::BF16 {
                // Over all values (a max is one rounding either way): rounded scores err more.
                let rms = |x: &Tensor| crate::compare::rms_diff(x, &expected).unwrap();
                let (right, wrong) = (rms(&out), rms(&rounded_scores));
                assert!(
                    wrong > right * 2.0,
                    "rounded scores {wrong}, f32 scores {right}"
                );
            }
        }
    }

    #[test]
    fn query_chunks_equal_one_pass() {
        // The matmul's blocking may differ with the number of rows: a different f32 sum of 37
        // terms, or one step of bf16 where that tips a rounding (at the output's scale: bf16's
        // step is 1/64 above 2).
        for dtype in [DType::F32, DType::BF16] {
            let (q, k, v) = inputs(dtype);
            let whole = chunked_attention(&q, &k, &v).unwrap();
            // 3 heads x 37 keys x 4 bytes: 5 query rows per chunk, the last one short.
            let chunked = chunked_attention_within(&q, &k, &v, 5 * 3 * 37 * 4).unwrap();
            let steps = crate::compare::max_diff_in_steps(&whole, &chunked, dtype).unwrap();
            let limit = if dtype == DType::F32 { 32.0 } else { 1.0 };
            assert!(steps <= limit, "{dtype:?}: {steps} steps of {dtype:?}");
        }
    }
}
