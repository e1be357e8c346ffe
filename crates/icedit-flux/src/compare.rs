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
