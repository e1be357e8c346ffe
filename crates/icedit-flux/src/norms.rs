//! Normalisations rounded as PyTorch rounds them, shared by every model here (FLUX, T5, CLIP,
//! Qwen3-VL): statistics in f32 whatever the dtype, and the result rounded where PyTorch's
//! module rounds it.

use candle_core::{DType, Device, Result, Tensor, D};

/// `nn.LayerNorm` with weight and bias. In f32 with the mean subtracted first (candle-nn's fused
/// kernel uses E[x²] − E[x]², which loses digits when the mean is large); the affine in f32 too,
/// and one rounding to the input's dtype at the end, as PyTorch's half-precision kernels do.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: weight.to_dtype(DType::F32)?,
            bias: bias.to_dtype(DType::F32)?,
            eps,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let xs = xs.to_dtype(DType::F32)?;
        let centered = xs.broadcast_sub(&xs.mean_keepdim(D::Minus1)?)?;
        let variance = centered.sqr()?.mean_keepdim(D::Minus1)?;
        centered
            .broadcast_mul(&(variance + self.eps)?.sqrt()?.recip()?)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?
            .to_dtype(dtype)
    }
}

/// Where an [`RmsNorm`] rounds its normalised f32 values before the weight multiplies them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RmsRounding {
    /// To the input's dtype (Qwen3's `RMSNorm`; diffusers' and `torch.nn.RMSNorm` when the
    /// weight has the input's dtype, as in FLUX).
    Input,
    /// To the weight's dtype when that is half precision, else kept in f32 (T5's `T5LayerNorm`).
    HalfWeight,
}

/// RMSNorm: `x / sqrt(mean(x²) + eps)` in f32, rounded as `rounding` says, times the weight.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
    rounding: RmsRounding,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64, rounding: RmsRounding) -> Self {
        Self {
            weight,
            eps,
            rounding,
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        if dtype == DType::F32 && self.weight.dtype() == DType::F32 {
            // Nothing to round: candle's fused kernel computes the same in one pass.
            return candle_nn::ops::rms_norm(&xs.contiguous()?, &self.weight, self.eps as f32);
        }
        let xs = xs.to_dtype(DType::F32)?;
        let inv_rms = (xs.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        let normed = xs.broadcast_mul(&inv_rms)?;
        let normed = match (self.rounding, self.weight.dtype()) {
            (RmsRounding::Input, _) => normed.to_dtype(dtype)?,
            (RmsRounding::HalfWeight, w @ (DType::F16 | DType::BF16)) => normed.to_dtype(w)?,
            (RmsRounding::HalfWeight, _) => normed,
        };
        normed.broadcast_mul(&self.weight)
    }

    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            weight: self.weight.to_device(device)?,
            ..self.clone()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Tensor {
        // A large mean, where E[x²] − E[x]² would lose the variance's digits.
        Tensor::new(
            &[[1000.0f32, 1000.5, 999.25, 1001.0], [0.5, -2.0, 3.0, 0.25]],
            &Device::Cpu,
        )
        .unwrap()
    }

    fn f64_rows() -> Vec<Vec<f64>> {
        rows()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap()
    }

    #[test]
    fn layer_norm_keeps_the_variance_of_rows_with_a_large_mean() {
        let (weight, bias) = ([1.5f32, 0.5, 2.0, 1.0], [0.1f32, 0.0, -0.2, 0.3]);
        let norm = LayerNorm::new(
            Tensor::new(&weight, &Device::Cpu).unwrap(),
            Tensor::new(&bias, &Device::Cpu).unwrap(),
            1e-5,
        )
        .unwrap();
        let ours = norm.forward(&rows()).unwrap().to_vec2::<f32>().unwrap();
        for (row, got) in f64_rows().iter().zip(&ours) {
            let mean = row.iter().sum::<f64>() / 4.0;
            let var = row.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 4.0;
            for i in 0..4 {
                let want =
                    (row[i] - mean) / (var + 1e-5).sqrt() * weight[i] as f64 + bias[i] as f64;
                assert!((got[i] as f64 - want).abs() < 1e-4, "{} vs {want}", got[i]);
            }
        }
        // Half precision: one rounding of the f32 result.
        let half = norm
            .forward(&rows().to_dtype(DType::BF16).unwrap())
            .unwrap();
        assert_eq!(half.dtype(), DType::BF16);
    }

    #[test]
    fn rms_norm_rounds_where_its_module_does() {
        let weight = Tensor::new(&[1.5f32, 0.5, 2.0, 1.0], &Device::Cpu).unwrap();
        let x = rows().to_dtype(DType::BF16).unwrap();
        let unrounded = {
            let norm = RmsNorm::new(weight.clone(), 1e-6, RmsRounding::Input);
            norm.forward(&rows()).unwrap()
        };
        // T5 with f32 weights keeps f32; Qwen3 and FLUX round to the input's dtype.
        let t5 = RmsNorm::new(weight.clone(), 1e-6, RmsRounding::HalfWeight);
        assert_eq!(t5.forward(&x).unwrap().dtype(), DType::F32);
        let qwen = RmsNorm::new(
            weight.to_dtype(DType::BF16).unwrap(),
            1e-6,
            RmsRounding::Input,
        );
        let rounded = qwen.forward(&x).unwrap();
        assert_eq!(rounded.dtype(), DType::BF16);
        let err = crate::compare::max_abs_diff(&rounded.to_dtype(DType::F32).unwrap(), &unrounded)
            .unwrap();
        assert!(err > 0.0 && err < 2e-2, "{err}");
    }
}
