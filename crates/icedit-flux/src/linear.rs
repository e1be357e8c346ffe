//! The one linear layer type of the transformer. Every projection goes through it, so adapters
//! (merged LoRA, run-time LoRA, per-token mixtures of LoRA experts) hook in here and nowhere else.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// Something that adds to a linear layer's output, computed from the layer's input.
///
/// `x` is the layer input, `[.., in_features]`; the result must be `[.., out_features]` in the
/// input's dtype. It is added to `x W^T + b`.
pub trait LinearAdapter: std::fmt::Debug + Send + Sync {
    fn forward_delta(&self, x: &Tensor) -> Result<Tensor>;

    /// Rows `[k, in_features]` the adapter needs multiplied with the layer input (a router, say).
    /// The layer appends them to its own weight, so that the input is read once for both, and
    /// hands the product to [`LinearAdapter::forward_delta_with`].
    fn input_projection(&self) -> Option<&Tensor> {
        None
    }

    /// [`LinearAdapter::forward_delta`] given `projected`, `[tokens, k]`: the input (flattened
    /// to rows) times the rows of [`LinearAdapter::input_projection`], in the input's dtype.
    fn forward_delta_with(&self, x: &Tensor, projected: &Tensor) -> Result<Tensor> {
        let _ = projected;
        self.forward_delta(x)
    }
}

#[derive(Debug, Clone)]
struct Attached {
    adapter: Arc<dyn LinearAdapter>,
    /// Where its input projection sits among the weight's extra rows.
    projection: Option<Range<usize>>,
}

#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out_features + extra, in_features]`: the layer's weight, then the rows adapters asked
    /// to have projected (none unless such an adapter is attached).
    weight: Tensor,
    out_features: usize,
    bias: Option<Tensor>,
    adapters: Vec<Attached>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        let out_features = weight.dims()[0];
        Self {
            weight,
            out_features,
            bias,
            adapters: Vec::new(),
        }
    }

    /// Loads `{prefix}.weight` `[out, in]` and `{prefix}.bias` `[out]`.
    pub fn load(in_features: usize, out_features: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get((out_features, in_features), "weight")?;
        let bias = vb.get(out_features, "bias")?;
        Ok(Self::new(weight, Some(bias)))
    }

    /// `[out_features, in_features]`.
    pub fn weight(&self) -> Tensor {
        if self.extra_rows() == 0 {
            self.weight.clone()
        } else {
            self.weight
                .narrow(0, 0, self.out_features)
                .expect("the weight has its rows")
        }
    }

    pub fn dtype(&self) -> DType {
        self.weight.dtype()
    }

    pub fn device(&self) -> &candle_core::Device {
        self.weight.device()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    fn extra_rows(&self) -> usize {
        self.weight.dims()[0] - self.out_features
    }

    /// Replaces the weight, e.g. with a LoRA merged in. The shape and dtype must not change.
    pub fn set_weight(&mut self, weight: Tensor) -> Result<()> {
        let old = self.weight();
        if weight.shape() != old.shape() || weight.dtype() != old.dtype() {
            candle_core::bail!(
                "replacement weight is {:?} {:?}, the layer's is {:?} {:?}",
                weight.shape(),
                weight.dtype(),
                old.shape(),
                old.dtype()
            );
        }
        self.weight = match self.extra_rows() {
            0 => weight,
            extra => Tensor::cat(
                &[weight, self.weight.narrow(0, self.out_features, extra)?],
                0,
            )?,
        };
        Ok(())
    }

    /// Adds an adapter applied at run time, after those already attached.
    pub fn attach(&mut self, adapter: Arc<dyn LinearAdapter>) -> Result<()> {
        let mut projection = None;
        if let Some(rows) = adapter.input_projection() {
            let (k, width) = rows.dims2()?;
            if width != self.in_features() {
                candle_core::bail!(
                    "the adapter projects {width} input features, the layer has {}",
                    self.in_features()
                );
            }
            let rows = rows
                .to_device(self.weight.device())?
                .to_dtype(self.weight.dtype())?;
            let start = self.weight.dims()[0] - self.out_features;
            self.weight = Tensor::cat(&[&self.weight, &rows], 0)?;
            projection = Some(start..start + k);
        }
        self.adapters.push(Attached {
            adapter,
            projection,
        });
        Ok(())
    }

    pub fn adapters(&self) -> Vec<Arc<dyn LinearAdapter>> {
        self.adapters.iter().map(|a| a.adapter.clone()).collect()
    }

    pub fn detach_all(&mut self) -> Vec<Arc<dyn LinearAdapter>> {
        self.weight = self.weight();
        std::mem::take(&mut self.adapters)
            .into_iter()
            .map(|a| a.adapter)
            .collect()
    }
}

impl Linear {
    /// `x W^T + b` over the last dimension of `x`, and the adapters' input projections
    /// (`[tokens, extra]`), from one matmul.
    fn forward_base(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let dims = x.dims();
        let in_features = dims[dims.len() - 1];
        let x2 = x.reshape(((), in_features))?;
        let (mut w, mut b) = (self.weight.clone(), self.bias.clone());
        // candle widens bf16 matmuls to f32 on the CPU anyway; adding the bias before narrowing
        // rounds once, as PyTorch's fused addmm does.
        let widen = x.device().is_cpu() && x.dtype() == DType::BF16;
        let x2 = if widen {
            w = w.to_dtype(DType::F32)?;
            b = b.map(|b| b.to_dtype(DType::F32)).transpose()?;
            x2.to_dtype(DType::F32)?
        } else {
            x2
        };
        let mut y = x2.matmul(&w.t()?)?;
        let extra = self.extra_rows();
        let projected = if extra > 0 {
            let projected = y.narrow(1, self.out_features, extra)?;
            y = y.narrow(1, 0, self.out_features)?;
            Some(projected.to_dtype(x.dtype())?)
        } else {
            None
        };
        if let Some(b) = &b {
            y = y.broadcast_add(b)?;
        }
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank >= 1") = self.out_features;
        Ok((y.to_dtype(x.dtype())?.reshape(out_dims)?, projected))
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (mut y, projected) = self.forward_base(x)?;
        for attached in &self.adapters {
            let delta = match (&attached.projection, &projected) {
                (Some(range), Some(p)) => attached
                    .adapter
                    .forward_delta_with(x, &p.narrow(1, range.start, range.len())?)?,
                _ => attached.adapter.forward_delta(x)?,
            };
            y = (y + delta)?;
        }
        Ok(y)
    }
}

/// Walks every linear layer of a model with its module path in diffusers naming
/// (e.g. `transformer_blocks.0.attn.to_q`), the names PEFT LoRA keys use.
pub trait VisitLinears {
    fn visit_linears(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Linear));
}

pub(crate) fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::sync::Mutex;

    /// Records the projection it is handed and adds nothing.
    #[derive(Debug)]
    struct Probe {
        rows: Tensor,
        seen: Mutex<Option<Tensor>>,
    }

    impl LinearAdapter for Probe {
        fn forward_delta(&self, _x: &Tensor) -> Result<Tensor> {
            unreachable!("the layer hands over the projection")
        }
        fn input_projection(&self) -> Option<&Tensor> {
            Some(&self.rows)
        }
        fn forward_delta_with(&self, x: &Tensor, projected: &Tensor) -> Result<Tensor> {
            *self.seen.lock().unwrap() = Some(projected.clone());
            x.narrow(1, 0, 5)?.zeros_like()
        }
    }

    #[test]
    fn input_projections_ride_along_in_the_base_matmul() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 7), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 5, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 7), &dev).unwrap();
        let mut layer = Linear::new(w.clone(), Some(b));
        let plain = layer.forward(&x).unwrap();
        let probe = Arc::new(Probe {
            rows: Tensor::randn(0f32, 1.0, (2, 7), &dev).unwrap(),
            seen: Mutex::new(None),
        });
        layer.attach(probe.clone()).unwrap();
        assert_eq!(layer.weight().dims(), [5, 7]);
        let with_probe = layer.forward(&x).unwrap();
        let diff = |a: &Tensor, b: &Tensor| crate::compare::max_abs_diff(a, b).unwrap();
        assert!(diff(&plain, &with_probe) < 1e-6);
        let expected = x.matmul(&probe.rows.t().unwrap()).unwrap();
        assert!(diff(probe.seen.lock().unwrap().as_ref().unwrap(), &expected) < 1e-6);

        // Merging keeps the projection rows; detaching drops them.
        layer.set_weight((w.clone() * 2.0).unwrap()).unwrap();
        assert_eq!(layer.weight().dims(), [5, 7]);
        layer.forward(&x).unwrap();
        assert!(diff(probe.seen.lock().unwrap().as_ref().unwrap(), &expected) < 1e-6);
        layer.detach_all();
        assert!(diff(&layer.weight(), &(w * 2.0).unwrap()) < 1e-6);
    }
}
