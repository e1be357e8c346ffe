//! f32 CPU kernels for what dominates a FLUX forward besides the linear layers: attention,
//! rotary embeddings and tanh-GELU; and a product of selected rows for adapters that route
//! tokens (mixtures of LoRA experts).
//!
//! Attention is tiled per (batch, head, query block) so that a tile's scores stay in L2 (the
//! whole score matrix is 56 MB per block at 1.5k tokens), reads q, k, v and writes its output
//! in the `[B, S, H*D]` layout the linear layers use (no transposes), and spreads tiles over
//! threads with single-threaded gemm calls. Elementwise kernels use a branch-free exp that the
//! compiler vectorises, the widest SIMD the CPU has, and work in place on temporaries.
//! Other devices and dtypes keep candle's ops.

use std::sync::OnceLock;

use candle_core::{CpuStorage, Device, InplaceOp1, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

/// Whether the CPU-only kernels may run for tensors on `device`. `ICEDIT_CPU_FAST_PATHS=0` in
/// the environment turns them off, so that the device-generic code CUDA and Metal run runs on
/// the CPU too: that is how the GPU's code paths are tested without a GPU.
pub fn cpu_fast_paths(device: &Device) -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    device.is_cpu()
        && *ENABLED.get_or_init(|| {
            std::env::var("ICEDIT_CPU_FAST_PATHS").map_or(true, |v| v.trim() != "0")
        })
}

/// tanh-approximated GELU, as `torch.nn.GELU(approximate="tanh")`.
///
/// `x` must be a temporary that nothing else shares: on the CPU it is overwritten.
pub(crate) fn gelu_tanh(x: Tensor) -> Result<Tensor> {
    if cpu_fast_paths(x.device()) && x.dtype() == candle_core::DType::F32 && x.is_contiguous() {
        x.inplace_op1(&GeluTanh)?;
        Ok(x)
    } else {
        x.gelu()
    }
}

/// e^x to about 2 ulp for x in [-86, 88] (below, e^-86) (Cephes' polynomial), without branches or libm calls
/// so that loops over it vectorise.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding then subtracting 1.5 * 2^23 rounds to the nearest integer with plain SSE2 adds.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-86.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5e-1;
    let e = p * r * r + r + 1.0;
    // Scale by 2^n through the exponent bits; n is in [-124, 127] after the clamp, so the
    // result stays a normal number.
    f32::from_bits(e.to_bits().wrapping_add(((n as i32) << 23) as u32))
}

const LANES: usize = 16;

#[inline(always)]
fn gelu_slice(xs: &mut [f32]) {
    // 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3).
    const TWO_SQRT_2_OVER_PI: f32 = 2.0 * 0.797_884_6;
    for x in xs.iter_mut() {
        let two_u = TWO_SQRT_2_OVER_PI * (*x + 0.044_715 * *x * *x * *x);
        *x /= 1.0 + exp(-two_u);
    }
}

/// `softmax(scale * row)` in place (`scale > 0`).
#[inline(always)]
fn softmax_row(row: &mut [f32], scale: f32) {
    // Lane-wise max and sum so that the reductions vectorise.
    let mut max = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail_max = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    for c in chunks {
        for i in 0..LANES {
            max[i] = if c[i] > max[i] { c[i] } else { max[i] };
        }
    }
    let max = max.iter().fold(tail_max, |m, &v| if v > m { v } else { m });

    let mut sum = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            c[i] = exp((c[i] - max) * scale);
            sum[i] += c[i];
        }
    }
    let mut total = 0f32;
    for v in chunks.into_remainder() {
        *v = exp((*v - max) * scale);
        total += *v;
    }
    let inv = 1.0 / (total + sum.iter().sum::<f32>());
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// Runs `body` compiled for AVX-512 or AVX2+FMA when the CPU has them, else for the baseline.
macro_rules! dispatch {
    ($name:ident, $body:ident, ($($arg:ident: $ty:ty),*)) => {
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn widest($($arg: $ty),*) {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($arg: $ty),*) {
                    $body($($arg),*)
                }
                if is_x86_feature_detected!("avx512f") {
                    // SAFETY: the feature was just detected.
                    return unsafe { widest($($arg),*) };
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: the features were just detected.
                    return unsafe { wide($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

dispatch!(gelu_dispatch, gelu_slice, (xs: &mut [f32]));
dispatch!(selected_rows_dispatch16, selected_rows16, (x: &[f32], d: usize, rows: &[u32], w_t: &[f32], out: &mut [f32]));
dispatch!(selected_rows_dispatch32, selected_rows32, (x: &[f32], d: usize, rows: &[u32], w_t: &[f32], out: &mut [f32]));
dispatch!(selected_rows_dispatch48, selected_rows48, (x: &[f32], d: usize, rows: &[u32], w_t: &[f32], out: &mut [f32]));
dispatch!(selected_rows_dispatch64, selected_rows64, (x: &[f32], d: usize, rows: &[u32], w_t: &[f32], out: &mut [f32]));
dispatch!(softmax_dispatch, softmax_row, (row: &mut [f32], scale: f32));
dispatch!(rope_dispatch, rope_row, (row: &mut [f32], cos: &[f32], sin: &[f32]));

/// `x[rows] · w_t` for `x` `[n, in]` and a narrow `w_t` `[in, r]`: `[rows.len(), r]`.
///
/// Mixture-of-experts layers send each token to its own expert; gathering the tokens into a
/// copy first would read and write the whole layer input once more. On the CPU in f32 (r up to
/// 64) the selected rows are read in place by a tiled kernel (4 rows x r outputs, r padded to 16
/// lanes); elsewhere this is `index_select` + `matmul`.
pub fn matmul_selected_rows(x: &Tensor, rows: &[u32], w_t: &Tensor) -> Result<Tensor> {
    let (n, d) = x.dims2()?;
    let (d_w, r) = w_t.dims2()?;
    if d != d_w {
        candle_core::bail!("matmul_selected_rows: x has {d} columns, w_t {d_w} rows");
    }
    if let Some(&bad) = rows.iter().find(|&&i| i as usize >= n) {
        candle_core::bail!("matmul_selected_rows: row {bad} of {n}");
    }
    let fast = cpu_fast_paths(x.device())
        && x.dtype() == candle_core::DType::F32
        && w_t.dtype() == candle_core::DType::F32
        && r <= 64
        && x.is_contiguous();
    if !fast || rows.is_empty() {
        let idx = Tensor::new(rows, x.device())?;
        return x.index_select(&idx, 0)?.matmul(w_t);
    }
    let rp = r.next_multiple_of(16);
    let w_t = w_t.contiguous()?;
    let out = with_f32_slice(x, |x_data| {
        with_f32_slice(&w_t, |w_data| {
            // Columns padded to whole SIMD lanes; ranks that are multiples of 16 (ICEdit's 32)
            // are read in place.
            let padded: std::borrow::Cow<[f32]> = if rp == r {
                w_data.into()
            } else {
                w_data
                    .chunks_exact(r)
                    .flat_map(|row| row.iter().copied().chain(std::iter::repeat_n(0.0, rp - r)))
                    .collect::<Vec<f32>>()
                    .into()
            };
            let mut out = vec![0f32; rows.len() * rp];
            const ROWS_PER_TASK: usize = 64;
            out.par_chunks_mut(ROWS_PER_TASK * rp)
                .zip(rows.par_chunks(ROWS_PER_TASK))
                .for_each(|(out, rows)| match rp {
                    16 => selected_rows_dispatch16(x_data, d, rows, &padded, out),
                    32 => selected_rows_dispatch32(x_data, d, rows, &padded, out),
                    48 => selected_rows_dispatch48(x_data, d, rows, &padded, out),
                    _ => selected_rows_dispatch64(x_data, d, rows, &padded, out),
                });
            out
        })
    })??;
    let out = Tensor::from_vec(out, (rows.len(), rp), x.device())?;
    if rp == r {
        Ok(out)
    } else {
        out.narrow(1, 0, r)?.contiguous()
    }
}

/// Runs `f` on the samples of a contiguous f32 CPU tensor, without copying them.
fn with_f32_slice<T>(t: &Tensor, f: impl FnOnce(&[f32]) -> T) -> Result<T> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        candle_core::bail!("expected an f32 CPU tensor");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("expected a contiguous tensor");
    };
    Ok(f(&data[start..end]))
}

/// `out[i, :] = x[rows[i], :] · w_t` for `RP` output columns, four rows at a time so that each
/// `w_t` row loaded serves four FMAs per lane.
#[inline(always)]
fn selected_rows<const RP: usize>(x: &[f32], d: usize, rows: &[u32], w_t: &[f32], out: &mut [f32]) {
    for (tile, out) in rows.chunks(4).zip(out.chunks_mut(4 * RP)) {
        let row = |i: usize| {
            let r = tile[i.min(tile.len() - 1)] as usize;
            &x[r * d..(r + 1) * d]
        };
        let (x0, x1, x2, x3) = (row(0), row(1), row(2), row(3));
        let mut acc = [[0f32; RP]; 4];
        for (k, w) in w_t.chunks_exact(RP).enumerate() {
            let xs = [x0[k], x1[k], x2[k], x3[k]];
            for (acc, &xv) in acc.iter_mut().zip(&xs) {
                for (a, &wv) in acc.iter_mut().zip(w) {
                    *a = xv.mul_add(wv, *a);
                }
            }
        }
        for (o, acc) in out.chunks_exact_mut(RP).zip(&acc) {
            o.copy_from_slice(acc);
        }
    }
}

#[inline(always)]
fn selected_rows16(x: &[f32], d: usize, rows: &[u32], w_t: &[f32], out: &mut [f32]) {
    selected_rows::<16>(x, d, rows, w_t, out)
}
#[inline(always)]
fn selected_rows32(x: &[f32], d: usize, rows: &[u32], w_t: &[f32], out: &mut [f32]) {
    selected_rows::<32>(x, d, rows, w_t, out)
}
#[inline(always)]
fn selected_rows48(x: &[f32], d: usize, rows: &[u32], w_t: &[f32], out: &mut [f32]) {
    selected_rows::<48>(x, d, rows, w_t, out)
}
#[inline(always)]
fn selected_rows64(x: &[f32], d: usize, rows: &[u32], w_t: &[f32], out: &mut [f32]) {
    selected_rows::<64>(x, d, rows, w_t, out)
}

/// Rotates the interleaved pairs of every head in one `[H*D]` row by the position's angles
/// (`cos`, `sin`: `[D/2]`).
#[inline(always)]
fn rope_row(row: &mut [f32], cos: &[f32], sin: &[f32]) {
    for head in row.chunks_exact_mut(2 * cos.len()) {
        for ((pair, &c), &s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
            let (x0, x1) = (pair[0], pair[1]);
            pair[0] = x0 * c - x1 * s;
            pair[1] = x1 * c + x0 * s;
        }
    }
}

fn contiguous_f32<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: expected f32 storage");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: expected a contiguous tensor");
    };
    Ok(&mut data[start..end])
}

struct GeluTanh;

impl InplaceOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "gelu-tanh-f32"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        const BLOCK: usize = 1 << 14;
        contiguous_f32(storage, layout, self.name())?
            .par_chunks_mut(BLOCK)
            .for_each(gelu_dispatch);
        Ok(())
    }
}

/// Applies rotary embeddings in place to `x`, `[B, S, H*D]` f32, with `cos`/`sin` `[S, D/2]`.
///
/// `x` must be a temporary that nothing else shares.
pub(crate) fn rope_bshd_inplace(x: &Tensor, cos: &[f32], sin: &[f32]) -> Result<()> {
    x.inplace_op1(&RopeBshd { cos, sin })
}

struct RopeBshd<'a> {
    cos: &'a [f32],
    sin: &'a [f32],
}

impl InplaceOp1 for RopeBshd<'_> {
    fn name(&self) -> &'static str {
        "rope-bshd-f32"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let dims = layout.shape().dims();
        let (seq, row) = (dims[1], dims[2]);
        let half = self.cos.len() / seq;
        contiguous_f32(storage, layout, self.name())?
            .par_chunks_mut(row)
            .enumerate()
            .for_each(|(i, r)| {
                let p = (i % seq) * half;
                rope_dispatch(r, &self.cos[p..p + half], &self.sin[p..p + half])
            });
        Ok(())
    }
}

/// Bytes of scores a tile may hold: within a core's L2 and the shared L3 with its packed K and V,
/// and large enough that repacking K and V per tile stays cheap.
const TILE_SCORE_BYTES: usize = 1536 << 10;

/// Softmax attention (no mask) of `q` `[B, Sq, H*D]` over `k`, `v` `[B, Sk, H*D]`, all
/// contiguous f32 on the CPU; returns `[B, Sq, H*D]`.
pub(crate) fn attention_bshd(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, s_q, hd) = q.dims3()?;
    let s_k = k.dim(1)?;
    let d = hd / heads;
    let scale = 1.0 / (d as f32).sqrt();
    let (q_s, q_l) = q.storage_and_layout();
    let (k_s, k_l) = k.storage_and_layout();
    let (v_s, v_l) = v.storage_and_layout();
    let data = |s: &Storage, l: &Layout| -> Result<*const f32> {
        match (s, l.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((start, _))) => Ok(v[start..].as_ptr()),
            _ => candle_core::bail!("attention_bshd: expected contiguous f32 CPU tensors"),
        }
    };
    let (q_ptr, k_ptr, v_ptr) = (
        SendPtr(data(&q_s, q_l)? as *mut f32),
        SendPtr(data(&k_s, k_l)? as *mut f32),
        SendPtr(data(&v_s, v_l)? as *mut f32),
    );
    let mut out = vec![0f32; b * s_q * hd];
    let out_ptr = SendPtr(out.as_mut_ptr());

    let block = (TILE_SCORE_BYTES / (4 * s_k) / 16 * 16)
        .clamp(16, 256)
        .min(s_q);
    let tiles: Vec<(usize, usize, usize)> = (0..b)
        .flat_map(|bi| {
            (0..heads).flat_map(move |h| (0..s_q).step_by(block).map(move |r| (bi, h, r)))
        })
        .collect();
    let hd_i = hd as isize;
    tiles.par_iter().for_each_init(
        || vec![0f32; block * s_k],
        |scores, &(bi, h, r0)| {
            let rows = block.min(s_q - r0);
            let scores = &mut scores[..rows * s_k];
            // SAFETY: every pointer below stays inside its tensor: rows r0..r0+rows < Sq (or
            // 0..Sk) of batch bi, columns h*D..(h+1)*D of H*D. Tiles write disjoint (rows, head)
            // blocks of `out`, which outlives the loop; the inputs are only read.
            unsafe {
                let q_tile = q_ptr.at((bi * s_q + r0) * hd + h * d);
                let k_head = k_ptr.at(bi * s_k * hd + h * d);
                let v_head = v_ptr.at(bi * s_k * hd + h * d);
                let out_tile = out_ptr.at((bi * s_q + r0) * hd + h * d);
                // scores[rows, Sk] = q_tile[rows, D] . k_head[Sk, D]^T
                gemm::gemm(
                    rows,
                    s_k,
                    d,
                    scores.as_mut_ptr(),
                    1,
                    s_k as isize,
                    false,
                    q_tile,
                    1,
                    hd_i,
                    k_head,
                    hd_i,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
                for row in scores.chunks_exact_mut(s_k) {
                    softmax_dispatch(row, scale);
                }
                // out_tile[rows, D] = scores[rows, Sk] . v_head[Sk, D]
                gemm::gemm(
                    rows,
                    d,
                    s_k,
                    out_tile,
                    1,
                    hd_i,
                    false,
                    scores.as_ptr(),
                    1,
                    s_k as isize,
                    v_head,
                    1,
                    hd_i,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        },
    );
    drop((q_s, k_s, v_s));
    Tensor::from_vec(out, (b, s_q, hd), q.device())
}

/// A raw pointer that may cross threads: the tiles that share it touch disjoint elements.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// # Safety
    /// `offset` must be within the allocation.
    unsafe fn at(self, offset: usize) -> *mut f32 {
        unsafe { self.0.add(offset) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selected_rows_match_index_select_and_matmul() {
        let dev = candle_core::Device::Cpu;
        let x = icedit_test_support::randn(0f32, 1.0, (23, 37));
        let rows: Vec<u32> = vec![22, 0, 5, 5, 17, 3, 9];
        for r in [1, 4, 16, 32, 40, 64, 65] {
            let w_t = icedit_test_support::randn(0f32, 1.0, (37, r));
            let ours = super::matmul_selected_rows(&x, &rows, &w_t).unwrap();
            let idx = Tensor::new(rows.as_slice(), &dev).unwrap();
            let reference = x.index_select(&idx, 0).unwrap().matmul(&w_t).unwrap();
            assert_eq!(ours.dims(), [rows.len(), r]);
            let err = crate::compare::max_abs_diff(&ours, &reference).unwrap();
            assert!(err < 1e-4, "r {r}: {err}");
        }
        let w_t = icedit_test_support::randn(0f32, 1.0, (37, 4));
        assert!(super::matmul_selected_rows(&x, &[23], &w_t).is_err());
    }

    #[test]
    fn exp_is_accurate_over_the_range_used() {
        let mut worst = 0f64;
        let mut x = -86.0f32;
        while x < 88.0 {
            let rel = ((exp(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            worst = worst.max(rel);
            x += 0.001_3;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(-200.0), exp(-86.0));
    }

    #[test]
    fn kernels_match_plain_candle_ops() {
        let max_diff = |a: &Tensor, b: &Tensor| crate::compare::max_abs_diff(a, b).unwrap();
        // Odd sizes exercise the remainders; large magnitudes the clamps.
        let x = icedit_test_support::randn(0f32, 4.0, (7, 1003));
        let fresh = |t: &Tensor| t.copy().unwrap();
        // candle's gelu is the same tanh approximation.
        assert!(max_diff(&gelu_tanh(fresh(&x)).unwrap(), &x.gelu().unwrap()) < 2e-6);
        let big = (&x * 30.0).unwrap();
        assert!(max_diff(&gelu_tanh(fresh(&big)).unwrap(), &big.gelu().unwrap()) < 1e-4);

        // Attention: 2 batches, 3 heads of 8, 37 queries over 300 keys (several query blocks).
        let (b, h, d, sq, sk) = (2, 3, 8, 37, 300);
        let q = icedit_test_support::randn(0f32, 2.0, (b, sq, h * d));
        let k = icedit_test_support::randn(0f32, 2.0, (b, sk, h * d));
        let v = icedit_test_support::randn(0f32, 1.0, (b, sk, h * d));
        let ours = attention_bshd(&q, &k, &v, h).unwrap();
        let heads_first = |x: &Tensor, s| {
            x.reshape((b, s, h, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let scores = (heads_first(&q, sq)
            .matmul(&heads_first(&k, sk).t().unwrap())
            .unwrap()
            / (d as f64).sqrt())
        .unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        let plain = probs
            .matmul(&heads_first(&v, sk))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, sq, h * d))
            .unwrap();
        assert!(
            max_diff(&ours, &plain) < 1e-5,
            "{}",
            max_diff(&ours, &plain)
        );

        // RoPE in [B, S, H*D] equals candle's rope_i in [B, H, S, D].
        let cos = icedit_test_support::randn(0f32, 1.0, (sq, d / 2));
        let sin = icedit_test_support::randn(0f32, 1.0, (sq, d / 2));
        let rotated = fresh(&q);
        rope_bshd_inplace(
            &rotated,
            &cos.flatten_all().unwrap().to_vec1().unwrap(),
            &sin.flatten_all().unwrap().to_vec1().unwrap(),
        )
        .unwrap();
        let plain = candle_nn::rotary_emb::rope_i(&heads_first(&q, sq), &cos, &sin).unwrap();
        let plain = plain
            .transpose(1, 2)
            .unwrap()
            .reshape((b, sq, h * d))
            .unwrap();
        assert!(max_diff(&rotated, &plain) < 1e-6);
    }
}
