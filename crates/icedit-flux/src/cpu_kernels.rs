//! f32 CPU kernels for the two elementwise ops that dominate a FLUX forward after the matmuls:
//! tanh-GELU and the attention softmax. candle runs both through scalar libm calls (GELU on one
//! thread); these use a branch-free exp that the compiler vectorises, rows in parallel, the
//! widest SIMD the CPU has, and work in place: the inputs are large temporaries (a 56 MB score
//! matrix per block at 1.5k tokens) whose fresh output buffers would cost more than the math.
//! Other devices and dtypes keep candle's ops.

use candle_core::{CpuStorage, InplaceOp1, Layout, Result, Tensor};
use rayon::prelude::*;

/// tanh-approximated GELU, as `torch.nn.GELU(approximate="tanh")`.
///
/// `x` must be a temporary that nothing else shares: on the CPU it is overwritten.
pub(crate) fn gelu_tanh(x: Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && x.is_contiguous() {
        x.inplace_op1(&GeluTanh)?;
        Ok(x)
    } else {
        x.gelu()
    }
}

/// Softmax over the last dimension.
///
/// `x` must be a temporary that nothing else shares: on the CPU it is overwritten.
pub(crate) fn softmax_last_dim(x: Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && x.is_contiguous() {
        x.inplace_op1(&SoftmaxLastDim)?;
        Ok(x)
    } else {
        candle_nn::ops::softmax_last_dim(&x)
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

#[inline(always)]
fn softmax_row(row: &mut [f32]) {
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
            c[i] = exp(c[i] - max);
            sum[i] += c[i];
        }
    }
    let mut total = 0f32;
    for v in chunks.into_remainder() {
        *v = exp(*v - max);
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
dispatch!(softmax_dispatch, softmax_row, (row: &mut [f32]));

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

struct SoftmaxLastDim;

impl InplaceOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "softmax-last-dim-f32"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let row = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        contiguous_f32(storage, layout, self.name())?
            .par_chunks_mut(row)
            .for_each(softmax_dispatch);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

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
    fn kernels_match_candle_reference_ops() {
        let dev = Device::Cpu;
        // Odd sizes exercise the remainders; large magnitudes the clamps.
        let x = (Tensor::randn(0f32, 4.0, (7, 1003), &dev).unwrap())
            .contiguous()
            .unwrap();
        let max_diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let fresh = |t: &Tensor| t.copy().unwrap();
        // candle's gelu is the same tanh approximation.
        assert!(max_diff(&gelu_tanh(fresh(&x)).unwrap(), &x.gelu().unwrap()) < 2e-6);
        let big = (&x * 30.0).unwrap();
        assert!(max_diff(&gelu_tanh(fresh(&big)).unwrap(), &big.gelu().unwrap()) < 1e-4);
        let soft = softmax_last_dim(fresh(&x)).unwrap();
        assert!(max_diff(&soft, &candle_nn::ops::softmax_last_dim(&x).unwrap()) < 1e-6);
        let sums = soft.sum(D::Minus1).unwrap().to_vec1::<f32>().unwrap();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
    }
}
