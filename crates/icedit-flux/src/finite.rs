//! Cheap checks for NaN and infinite values: a NaN in a weight, or an overflow in half
//! precision, would otherwise run on silently and end as an all-black image.
//!
//! [`all_finite`] costs one pass over the tensor where it lies and reads back at most one
//! scalar: on the CPU a scan of the data in place (no copy, several threads for large tensors);
//! on a GPU one reduction there, `sum(t - t)`, which is 0 for finite values and NaN otherwise
//! whatever the dtype (no overflow, no rounding to worry about).

use candle_core::{CpuStorage, DType, Storage, Tensor};
use rayon::prelude::*;

use crate::error::{FluxError, Result};

/// Elements scanned per task on the CPU; smaller tensors are scanned on the calling thread.
const CHUNK: usize = 1 << 16;

/// Whether every element of `t` is finite (neither NaN nor infinite). Integer tensors are.
pub fn all_finite(t: &Tensor) -> candle_core::Result<bool> {
    if t.elem_count() == 0 {
        return Ok(true);
    }
    {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            // The exponent bits all set means infinite or NaN.
            let scanned = match cpu {
                CpuStorage::F32(v) => Some(scan(&v[start..end], |x| {
                    x.to_bits() & 0x7f80_0000 != 0x7f80_0000
                })),
                CpuStorage::BF16(v) => {
                    Some(scan(&v[start..end], |x| x.to_bits() & 0x7f80 != 0x7f80))
                }
                CpuStorage::F16(v) => {
                    Some(scan(&v[start..end], |x| x.to_bits() & 0x7c00 != 0x7c00))
                }
                CpuStorage::F64(v) => Some(scan(&v[start..end], |x| x.is_finite())),
                CpuStorage::U8(_)
                | CpuStorage::U32(_)
                | CpuStorage::I16(_)
                | CpuStorage::I32(_)
                | CpuStorage::I64(_) => Some(true),
                _ => None,
            };
            if let Some(finite) = scanned {
                return Ok(finite);
            }
        }
    }
    if t.dtype().is_int() {
        return Ok(true);
    }
    let probe = t
        .sub(t)?
        .sum_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    Ok(probe.is_finite())
}

fn scan<T: Copy + Send + Sync>(v: &[T], finite: impl Fn(T) -> bool + Send + Sync) -> bool {
    // A branch-free fold per chunk, so that the compiler can vectorise it.
    let chunk_ok = |c: &[T]| c.iter().fold(true, |ok, &x| ok & finite(x));
    if v.len() <= CHUNK {
        chunk_ok(v)
    } else {
        v.par_chunks(CHUNK).all(chunk_ok)
    }
}

/// Fails with [`FluxError::NonFiniteValues`] when `t`, computed in `dtype`, holds NaN or
/// infinite values; `stage` says where (e.g. "at denoising step 3 of 28"), and is only built
/// on failure.
pub fn check_finite(t: &Tensor, dtype: DType, stage: impl FnOnce() -> String) -> Result<()> {
    if all_finite(t)? {
        Ok(())
    } else {
        Err(FluxError::NonFiniteValues {
            stage: stage(),
            dtype,
        })
    }
}

/// The advice for values that left the range of `dtype`.
pub(crate) fn dtype_advice(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => {
            "float16 ran out of range; run with `--dtype bf16` (same memory, a wider range) or \
             `--dtype f32`"
        }
        DType::BF16 => {
            "bfloat16 ran out of range or precision; run with `--dtype f32`, and check the \
             adapters' scales"
        }
        _ => {
            "check the weights and adapters (a corrupt download? an adapter scale far too \
             large?)"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn with(value: f32, dtype: DType, len: usize) -> Tensor {
        let mut v = vec![0.5f32; len];
        v[len / 2] = value;
        Tensor::from_vec(v, len, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    #[test]
    fn finds_nan_and_inf_in_every_float_dtype() {
        for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
            for len in [1, 7, 3 * CHUNK + 5] {
                assert!(all_finite(&with(1.0, dtype, len)).unwrap(), "{dtype:?}");
                assert!(all_finite(&with(-65504.0, dtype, len)).unwrap());
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    assert!(
                        !all_finite(&with(bad, dtype, len)).unwrap(),
                        "{dtype:?} {bad}"
                    );
                }
            }
        }
        // Out of f16's range: infinite once converted.
        assert!(!all_finite(&with(1e5, DType::F16, 10)).unwrap());
        assert!(all_finite(&with(1e5, DType::BF16, 10)).unwrap());
    }

    #[test]
    fn strided_views_and_the_generic_path_agree() {
        let t = with(f32::NAN, DType::F32, 64).reshape((8, 8)).unwrap();
        // A transposed view is not contiguous: it takes the reduction path.
        assert!(!all_finite(&t.t().unwrap()).unwrap());
        assert!(all_finite(&t.narrow(0, 0, 2).unwrap().t().unwrap()).unwrap());
        let ints = Tensor::new(&[1u32, 2, 3], &Device::Cpu).unwrap();
        assert!(all_finite(&ints).unwrap());
    }

    #[test]
    fn the_error_names_the_stage_and_the_fix() {
        let err = check_finite(&with(f32::NAN, DType::F16, 4), DType::F16, || {
            "at denoising step 3 of 28".into()
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("overflowed at denoising step 3 of 28"),
            "{err}"
        );
        assert!(
            err.contains("--dtype bf16") && err.contains("--dtype f32"),
            "{err}"
        );
    }
}
