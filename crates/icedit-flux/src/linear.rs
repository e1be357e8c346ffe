//! The one linear layer type of the transformer. Every projection goes through it, so adapters
//! (merged LoRA, run-time LoRA, per-token mixtures of LoRA experts) hook in here and nowhere else.

use std::sync::Arc;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// Something that adds to a linear layer's output, computed from the layer's input.
///
/// `x` is the layer input, `[.., in_features]`; the result must be `[.., out_features]` in the
/// input's dtype. It is added to `x W^T + b`.
pub trait LinearAdapter: std::fmt::Debug + Send + Sync {
    fn forward_delta(&self, x: &Tensor) -> Result<Tensor>;
}

#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out_features, in_features]`.
    weight: Tensor,
    bias: Option<Tensor>,
    adapters: Vec<Arc<dyn LinearAdapter>>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
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
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn in_features(&self) -> usize {
        self.weight().dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight().dims()[0]
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
        self.weight = weight;
        Ok(())
    }

    /// Adds an adapter applied at run time, after those already attached.
    pub fn attach(&mut self, adapter: Arc<dyn LinearAdapter>) {
        self.adapters.push(adapter);
    }

    pub fn adapters(&self) -> &[Arc<dyn LinearAdapter>] {
        &self.adapters
    }

    pub fn detach_all(&mut self) -> Vec<Arc<dyn LinearAdapter>> {
        std::mem::take(&mut self.adapters)
    }
}

impl Linear {
    /// `x W^T + b` over the last dimension of `x`.
    fn forward_base(&self, x: &Tensor) -> Result<Tensor> {
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
        if let Some(b) = &b {
            y = y.broadcast_add(b)?;
        }
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank >= 1") = self.out_features();
        y.to_dtype(x.dtype())?.reshape(out_dims)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = self.forward_base(x)?;
        for adapter in &self.adapters {
            y = (y + adapter.forward_delta(x)?)?;
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
