//! Comparing an output with a reference: the measures the parity tests and benchmarks report.

use candle_core::{DType, Result, Tensor};

/// Both tensors as flat f32 vectors of one length (shapes may differ, e.g. a batch dim of 1).
fn flat_difference(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let a = a.to_dtype(DType::F32)?.flatten_all()?;
    let b = b.to_dtype(DType::F32)?.flatten_all()?;
    if a.elem_count() != b.elem_count() {
        candle_core::bail!(
            "cannot compare {} values with {}",
            a.elem_count(),
            b.elem_count()
        );
    }
    a - b
}

/// Largest absolute elementwise difference, computed in f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    flat_difference(a, b)?.abs()?.max(0)?.to_scalar::<f32>()
}

/// Root mean square of the elementwise difference, computed in f32.
pub fn rms_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok(flat_difference(a, b)?
        .sqr()?
        .mean_all()?
        .to_scalar::<f32>()?
        .sqrt())
}

/// Largest elementwise difference in steps of `dtype` at the tensors' scale: one step is the
/// spacing of `dtype`'s values at the largest magnitude in either tensor. A sum rounded to
/// `dtype` errs by steps of its terms' size, not its own (a near-zero result of large terms
/// keeps their absolute error), so the scale is the tensor's, not each value's; and unlike a
/// fixed absolute tolerance it holds above 2, where bf16's step is 1/64 rather than 1/128.
pub fn max_diff_in_steps(a: &Tensor, b: &Tensor, dtype: DType) -> Result<f32> {
    let (mantissa_bits, min_exponent) = match dtype {
        DType::BF16 => (7, -126),
        DType::F16 => (10, -14),
        DType::F32 => (23, -126),
        other => candle_core::bail!("no step of values for {other:?}"),
    };
    let largest = |t: &Tensor| -> Result<f32> {
        t.to_dtype(DType::F32)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()
    };
    let scale = largest(a)?.max(largest(b)?);
    let exponent = scale.log2().floor().max(min_exponent as f32);
    let step = (exponent - mantissa_bits as f32).exp2();
    Ok(max_abs_diff(a, b)? / step)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn steps_are_counted_at_the_largest_magnitude() {
        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
        let steps = |a: &[f32], b: &[f32], dtype| max_diff_in_steps(&t(a), &t(b), dtype).unwrap();
        // bf16's step is 1/128 in [1, 2) and 1/64 in [2, 4), for every value of the tensor.
        assert_eq!(
            steps(&[1.0, 0.0], &[1.0 + 1.0 / 128.0, 0.0], DType::BF16),
            1.0
        );
        assert_eq!(steps(&[3.0, 0.0], &[3.0, 2.0 / 64.0], DType::BF16), 2.0);
        assert_eq!(
            steps(&[-2.0, 0.5], &[-2.0, 0.5 + 1.0 / 128.0], DType::BF16),
            0.5
        );
        assert_eq!(steps(&[0.0], &[0.0], DType::BF16), 0.0);
        assert_eq!(steps(&[1.0], &[1.0 + 1.0 / 1024.0], DType::F16), 1.0);
        assert!(max_diff_in_steps(&t(&[1.0]), &t(&[1.0, 2.0]), DType::BF16).is_err());
    }
}
