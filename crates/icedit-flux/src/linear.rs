//! The one linear layer type of the transformer. Every projection goes through it, so adapters
//! (merged LoRA, run-time LoRA, per-token mixtures of LoRA experts) hook in here and nowhere else.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor, D};

use crate::weights::WeightSource;

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
    /// Off: the adapter adds nothing (a server choosing adapters per request).
    switch: Option<Arc<AtomicBool>>,
}

impl Attached {
    fn is_on(&self) -> bool {
        self.switch
            .as_ref()
            .is_none_or(|s| s.load(Ordering::Relaxed))
    }
}

/// How a layer's weight is held.
#[derive(Debug, Clone)]
enum Weight {
    /// `[out_features + extra, in_features]`: the weight, then the rows adapters asked to have
    /// projected (none unless such an adapter is attached), read by one matmul.
    Dense(Tensor),
    /// GGUF blocks `[out_features, in_features]`, dequantized for each product as diffusers'
    /// and ComfyUI's GGUF layers do; adapters' extra rows `[extra, in_features]` beside them.
    Quantized {
        blocks: Arc<QTensor>,
        extra: Option<Tensor>,
    },
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    /// The dtype the layer computes in (a quantized weight is dequantized to it).
    dtype: DType,
    out_features: usize,
    in_features: usize,
    /// `[out_features + extra]`: the layer's bias, then zeros for the adapters' extra rows of the
    /// weight, so that each product adds it as it is.
    bias: Option<Tensor>,
    adapters: Vec<Attached>,
    /// Where the layer computes when its weight and bias are kept elsewhere (offloaded to host
    /// memory): they are copied there for each product, unless a copy of the layer already
    /// placed there ([`Linear::to_device`]) computes instead. Adapters live here.
    compute: Option<Device>,
    /// Changes whenever the weight does (loaded, replaced, rows added, moved), so that a
    /// [`JointLinears`] knows when its joint weight is stale.
    revision: u64,
    /// The dense weight is a window of a [`JointLinears`]' joint weight. candle moves a view's
    /// whole storage, so a window moved on its own is made compact first.
    window: bool,
    /// The module path it was loaded from, in diffusers naming (`transformer_blocks.0.attn.to_q`):
    /// recorded as it loads, so that nothing lists the names a second time.
    path: Arc<str>,
}

/// A revision no layer had before.
fn fresh_revision() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        let (out_features, in_features) = (weight.dims()[0], weight.dims()[1]);
        Self {
            dtype: weight.dtype(),
            weight: Weight::Dense(weight),
            out_features,
            in_features,
            bias,
            adapters: Vec::new(),
            compute: None,
            revision: fresh_revision(),
            window: false,
            path: Arc::from(""),
        }
    }

    /// A layer over quantized blocks `[out, in]`, computing in `dtype`.
    pub fn quantized(blocks: QTensor, bias: Option<Tensor>, dtype: DType) -> Result<Self> {
        let (out_features, in_features) = blocks.shape().dims2()?;
        Ok(Self {
            weight: Weight::Quantized {
                blocks: Arc::new(blocks),
                extra: None,
            },
            dtype,
            out_features,
            in_features,
            bias,
            adapters: Vec::new(),
            compute: None,
            revision: fresh_revision(),
            window: false,
            path: Arc::from(""),
        })
    }

    /// Loads `{prefix}.weight` `[out, in]` and `{prefix}.bias` `[out]`; a weight the checkpoint
    /// stores quantized stays quantized, and one the source is asked to quantize at load is
    /// quantized as `icedit quantize` would write it.
    pub fn load<'a>(
        in_features: usize,
        out_features: usize,
        source: impl Into<WeightSource<'a>>,
    ) -> Result<Self> {
        let source = source.into();
        let bias = source.get(out_features, "bias")?;
        let layer = match source.quantized_weight(out_features, in_features)? {
            Some(blocks) => Self::quantized(blocks, Some(bias), source.dtype())?,
            None => Self::new(source.dense_weight(out_features, in_features)?, Some(bias)),
        };
        Ok(Self {
            path: Arc::from(source.path()),
            ..layer
        })
    }

    /// The module path the layer was loaded from (empty for one built with [`Linear::new`]).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// [`Linear::path`], shared: handed out while the layer itself is borrowed mutably.
    pub(crate) fn shared_path(&self) -> Arc<str> {
        Arc::clone(&self.path)
    }

    /// This layer with its weight and bias on `device`, where it then computes; adapters are
    /// shared, not copied (they live where the layer computes).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        self.kept_on(device, device)
    }

    /// This layer with its weight and bias kept on `home` (host memory, say), computing on
    /// `compute`: [`Linear::to_device`] places a copy there when it is needed (or, called in
    /// place, the weight comes over for each product).
    pub fn kept_on(&self, home: &Device, compute: &Device) -> Result<Self> {
        let moved = !self.weight_device().same_device(home);
        let weight = match &self.weight {
            Weight::Dense(w) if moved && self.window => {
                Weight::Dense(w.force_contiguous()?.to_device(home)?)
            }
            Weight::Dense(w) => Weight::Dense(w.to_device(home)?),
            Weight::Quantized { blocks, extra } => Weight::Quantized {
                blocks: move_blocks(blocks, home)?,
                extra: extra.as_ref().map(|e| e.to_device(home)).transpose()?,
            },
        };
        Ok(Self {
            weight,
            bias: self.bias.as_ref().map(|b| b.to_device(home)).transpose()?,
            compute: (!compute.same_device(home)).then(|| compute.clone()),
            revision: if moved {
                fresh_revision()
            } else {
                self.revision
            },
            window: self.window && !moved,
            ..self.clone()
        })
    }

    /// The ggml type of a quantized weight (`None`: dense).
    pub fn quantization(&self) -> Option<GgmlDType> {
        match &self.weight {
            Weight::Dense(_) => None,
            Weight::Quantized { blocks, .. } => Some(blocks.dtype()),
        }
    }

    /// `[out_features, in_features]` in the layer's dtype (dequantized if stored quantized), on
    /// the device the layer computes on.
    pub fn weight(&self) -> Result<Tensor> {
        let weight = match &self.weight {
            Weight::Dense(w) if self.extra_rows() == 0 => w.clone(),
            Weight::Dense(w) => w.narrow(0, 0, self.out_features)?,
            Weight::Quantized { blocks, .. } => self.dequantize(blocks)?,
        };
        weight.to_device(&self.device())
    }

    fn dequantize(&self, blocks: &QTensor) -> Result<Tensor> {
        blocks.dequantize(&blocks.device())?.to_dtype(self.dtype)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the layer computes on (its adapters' device).
    pub fn device(&self) -> Device {
        self.compute.clone().unwrap_or_else(|| self.weight_device())
    }

    /// Where the weight is kept (host memory when offloaded).
    fn weight_device(&self) -> Device {
        match &self.weight {
            Weight::Dense(w) => w.device().clone(),
            Weight::Quantized { blocks, .. } => blocks.device(),
        }
    }

    /// Bytes the weight, bias and adapters' extra rows take where they are kept.
    pub fn weight_bytes(&self) -> usize {
        let dense = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let weight = match &self.weight {
            Weight::Dense(w) => dense(w),
            Weight::Quantized { blocks, extra } => {
                blocks.storage_size_in_bytes() + extra.as_ref().map_or(0, dense)
            }
        };
        weight + self.bias.as_ref().map_or(0, dense)
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    fn extra_rows(&self) -> usize {
        match &self.weight {
            Weight::Dense(w) => w.dims()[0] - self.out_features,
            Weight::Quantized { extra, .. } => extra.as_ref().map_or(0, |e| e.dims()[0]),
        }
    }

    /// Replaces the weight, e.g. with a LoRA merged in. The shape and dtype must not change.
    /// A quantized layer re-quantizes it to its own type (lossy: the merged change is rounded
    /// to the type's steps), and returns that type.
    pub fn set_weight(&mut self, weight: Tensor) -> Result<Option<GgmlDType>> {
        let (out, inp) = (self.out_features, self.in_features);
        if weight.dims() != [out, inp] || weight.dtype() != self.dtype {
            candle_core::bail!(
                "replacement weight is {:?} {:?}, the layer's is [{out}, {inp}] {:?}",
                weight.shape(),
                weight.dtype(),
                self.dtype
            );
        }
        let extra = self.extra_rows();
        let weight = weight.to_device(&self.weight_device())?;
        self.revision = fresh_revision();
        self.window = false;
        match &mut self.weight {
            Weight::Dense(w) => {
                *w = match extra {
                    0 => weight,
                    extra => Tensor::cat(&[weight, w.narrow(0, out, extra)?], 0)?,
                };
                Ok(None)
            }
            Weight::Quantized { blocks, .. } => {
                let dtype = blocks.dtype();
                *blocks = Arc::new(QTensor::quantize(&weight, dtype)?);
                Ok(Some(dtype))
            }
        }
    }

    /// Adds an adapter applied at run time, after those already attached.
    pub fn attach(&mut self, adapter: Arc<dyn LinearAdapter>) -> Result<()> {
        self.attach_switched(adapter, None)
    }

    /// [`Linear::attach`], the adapter counted only while `switch` is on.
    pub fn attach_switched(
        &mut self,
        adapter: Arc<dyn LinearAdapter>,
        switch: Option<Arc<AtomicBool>>,
    ) -> Result<()> {
        let mut projection = None;
        if let Some(rows) = adapter.input_projection() {
            let (k, width) = rows.dims2()?;
            if width != self.in_features {
                candle_core::bail!(
                    "the adapter projects {width} input features, the layer has {}",
                    self.in_features
                );
            }
            let rows = rows
                .to_device(&self.weight_device())?
                .to_dtype(self.dtype)?;
            let start = self.extra_rows();
            self.revision = fresh_revision();
            self.window = false;
            if let Some(bias) = &mut self.bias {
                *bias = Tensor::cat(
                    &[&*bias, &Tensor::zeros(k, bias.dtype(), bias.device())?],
                    0,
                )?;
            }
            match &mut self.weight {
                Weight::Dense(w) => *w = Tensor::cat(&[&*w, &rows], 0)?,
                Weight::Quantized { extra, .. } => {
                    *extra = Some(match extra.take() {
                        None => rows,
                        Some(e) => Tensor::cat(&[e, rows], 0)?,
                    })
                }
            }
            projection = Some(start..start + k);
        }
        self.adapters.push(Attached {
            adapter,
            projection,
            switch,
        });
        Ok(())
    }

    pub fn adapters(&self) -> Vec<Arc<dyn LinearAdapter>> {
        self.adapters.iter().map(|a| a.adapter.clone()).collect()
    }

    pub fn detach_all(&mut self) -> Vec<Arc<dyn LinearAdapter>> {
        self.revision = fresh_revision();
        if let Some(bias) = &mut self.bias {
            *bias = bias
                .narrow(0, 0, self.out_features)
                .expect("the bias has its rows");
        }
        match &mut self.weight {
            Weight::Dense(w) => {
                *w = w
                    .narrow(0, 0, self.out_features)
                    .expect("the weight has its rows")
            }
            Weight::Quantized { extra, .. } => *extra = None,
        }
        std::mem::take(&mut self.adapters)
            .into_iter()
            .map(|a| a.adapter)
            .collect()
    }
}

impl Linear {
    /// The weight and the adapters' extra rows as one dense `[out + extra, in]` matrix.
    fn matmul_weight(&self) -> Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => Ok(w.clone()),
            Weight::Quantized { blocks, extra } => {
                let w = self.dequantize(blocks)?;
                match extra {
                    None => Ok(w),
                    Some(extra) => Tensor::cat(&[&w, extra], 0),
                }
            }
        }
    }

    /// The bias of each product row where the layer computes: its own, then zeros for its
    /// adapters' extra rows.
    fn product_bias(&self) -> Result<Option<Tensor>> {
        let device = self.device();
        self.bias.as_ref().map(|b| b.to_device(&device)).transpose()
    }

    /// Rows of the weight (with adapters' extra rows) a product with the input gives.
    fn product_rows(&self) -> usize {
        self.out_features + self.extra_rows()
    }

    /// The layer's output from `product`, its input `x` (flattened to rows) times its weight
    /// rows plus its bias ([`biased_product`]): the adapters' input projections split off, one
    /// rounding to the input's dtype, then the adapters' deltas.
    fn from_product(&self, x: &Tensor, product: Tensor) -> Result<Tensor> {
        let (mut y, extra) = (product, self.extra_rows());
        let projected = if extra > 0 {
            let projected = y.narrow(1, self.out_features, extra)?;
            y = y.narrow(1, 0, self.out_features)?;
            Some(projected.to_dtype(x.dtype())?)
        } else {
            None
        };
        let mut out_dims = x.dims().to_vec();
        *out_dims.last_mut().expect("rank >= 1") = self.out_features;
        let mut y = y.to_dtype(x.dtype())?.reshape(out_dims)?;
        for attached in self.adapters.iter().filter(|a| a.is_on()) {
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

/// `x` (flattened to rows, `[tokens, in]`) times `weight^T` (`weight`: `[rows, in]`), plus
/// `bias` (`[rows]`). The bias is added before the product is rounded to a half dtype, as
/// PyTorch's fused addmm does: on the CPU by widening bf16 to f32 (candle widens bf16 matmuls
/// there anyway), on CUDA inside cuBLAS's f32 accumulation, as PyTorch's bias epilogue does.
fn biased_product(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let x2 = x.reshape(((), x.dim(D::Minus1)?))?;
    let weight = weight.to_device(x.device())?;
    #[cfg(feature = "cuda")]
    if let Some(bias) = bias {
        if x.device().is_cuda() && matches!(x.dtype(), DType::BF16 | DType::F16) {
            return crate::cuda_gemm::biased_linear(&x2, &weight, bias);
        }
    }
    let y = if x.device().is_cpu() && x.dtype() == DType::BF16 {
        x2.to_dtype(DType::F32)?
            .matmul(&weight.to_dtype(DType::F32)?.t()?)?
    } else {
        x2.matmul(&weight.t()?)?
    };
    match bias {
        Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
        None => Ok(y),
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Offloaded and called in place, the weight comes over for this product only (a
        // window alone, not its joint weight).
        let mut weight = self.matmul_weight()?;
        if self.window && !weight.device().same_device(x.device()) {
            weight = weight.force_contiguous()?;
        }
        let bias = self.product_bias()?;
        let product = biased_product(x, &weight, bias.as_ref())?;
        self.from_product(x, product)
    }
}

/// Linear layers that read the same input (q, k and v; in a single block also the MLP's input),
/// multiplied as one matmul over their rows joined, as BFL's checkpoints store them (`qkv`,
/// `linear1`). Each part stays a [`Linear`] with its own module path, bias and adapters; its
/// weight is a window of the joint one. Parts that cannot be joined (quantized, of different
/// dtypes or devices) compute one by one.
#[derive(Debug, Clone)]
pub struct JointLinears {
    parts: Vec<Linear>,
    joint: Option<JointWeight>,
}

#[derive(Debug, Clone)]
struct JointWeight {
    /// The parts' weights (adapters' extra rows included), one after the other.
    weight: Tensor,
    /// The parts' biases the same way (zeros for a part without one or for adapters' extra
    /// rows), joined once rather than at every product.
    bias: Option<Tensor>,
    /// Each part's revision when its weight became a window of `weight`.
    revisions: Vec<u64>,
}

impl JointLinears {
    pub fn new(parts: Vec<Linear>) -> Result<Self> {
        let mut joint = Self { parts, joint: None };
        joint.rejoin()?;
        Ok(joint)
    }

    pub fn parts(&self) -> &[Linear] {
        &self.parts
    }

    /// Whether the parts are multiplied as one.
    pub fn is_joined(&self) -> bool {
        self.joint.is_some()
    }

    /// Visits each part, then joins the weights again if any changed.
    pub fn visit(&mut self, f: &mut dyn FnMut(&mut Linear)) {
        for part in &mut self.parts {
            f(part);
        }
        if self.rejoin().is_err() {
            // Unjoined, each part still holds its own weight.
            self.joint = None;
        }
    }

    /// Joins the parts' weights if they can be and any changed since they were joined.
    fn rejoin(&mut self) -> Result<()> {
        let revisions: Vec<u64> = self.parts.iter().map(|p| p.revision).collect();
        if self
            .joint
            .as_ref()
            .is_some_and(|j| j.revisions == revisions)
        {
            return Ok(());
        }
        self.joint = None;
        let dense: Vec<&Tensor> = self
            .parts
            .iter()
            .filter_map(|p| match &p.weight {
                Weight::Dense(w) if w.is_contiguous() => Some(w),
                _ => None,
            })
            .collect();
        let joinable = dense.len() == self.parts.len()
            && dense.len() > 1
            && dense.windows(2).all(|w| {
                w[0].dtype() == w[1].dtype()
                    && w[0].dim(1).ok() == w[1].dim(1).ok()
                    && w[0].device().same_device(w[1].device())
            })
            && self
                .parts
                .windows(2)
                .all(|p| match (&p[0].compute, &p[1].compute) {
                    (None, None) => true,
                    (Some(a), Some(b)) => a.same_device(b),
                    _ => false,
                });
        if !joinable {
            return Ok(());
        }
        let weight = Tensor::cat(&dense, 0)?;
        self.set_windows(&weight)?;
        let bias = self.joint_bias()?;
        self.joint = Some(JointWeight {
            weight,
            bias,
            revisions,
        });
        Ok(())
    }

    /// Makes each part's weight its window of `weight`.
    fn set_windows(&mut self, weight: &Tensor) -> Result<()> {
        let mut start = 0;
        for part in &mut self.parts {
            let rows = part.product_rows();
            part.weight = Weight::Dense(weight.narrow(0, start, rows)?);
            part.window = true;
            start += rows;
        }
        Ok(())
    }

    /// [`Linear::kept_on`] for every part, a joint weight moved once.
    pub fn kept_on(&self, home: &Device, compute: &Device) -> Result<Self> {
        let Some(joint) = &self.joint else {
            let parts = self.parts.iter().map(|p| p.kept_on(home, compute));
            return Self::new(parts.collect::<Result<_>>()?);
        };
        let weight = joint.weight.to_device(home)?;
        let mut placed = self.clone();
        placed.set_windows(&weight)?;
        for part in &mut placed.parts {
            // Its window is already on `home`: nothing more is copied.
            *part = part.kept_on(home, compute)?;
        }
        placed.joint = Some(JointWeight {
            weight,
            bias: joint.bias.as_ref().map(|b| b.to_device(home)).transpose()?,
            revisions: placed.parts.iter().map(|p| p.revision).collect(),
        });
        Ok(placed)
    }

    /// [`JointLinears::kept_on`] the same device.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        self.kept_on(device, device)
    }

    /// Each part's output for the input `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let Some(joint) = &self.joint else {
            return self.parts.iter().map(|p| p.forward(x)).collect();
        };
        let bias = joint
            .bias
            .as_ref()
            .map(|b| b.to_device(x.device()))
            .transpose()?;
        let product = biased_product(x, &joint.weight, bias.as_ref())?;
        let mut start = 0;
        let mut outs = Vec::with_capacity(self.parts.len());
        for part in &self.parts {
            let rows = part.product_rows();
            outs.push(part.from_product(x, product.narrow(1, start, rows)?)?);
            start += rows;
        }
        Ok(outs)
    }

    /// The parts' product biases one after the other (zeros for a part without one).
    fn joint_bias(&self) -> Result<Option<Tensor>> {
        let biases = self
            .parts
            .iter()
            .map(|p| p.product_bias())
            .collect::<Result<Vec<_>>>()?;
        let Some(like) = biases.iter().flatten().next() else {
            return Ok(None);
        };
        let rows = self
            .parts
            .iter()
            .zip(&biases)
            .map(|(part, bias)| match bias {
                Some(b) => Ok(b.clone()),
                None => Tensor::zeros(part.product_rows(), like.dtype(), like.device()),
            });
        Ok(Some(Tensor::cat(&rows.collect::<Result<Vec<_>>>()?, 0)?))
    }
}

/// Quantized blocks copied to `device` as they are (no re-quantization).
fn move_blocks(blocks: &Arc<QTensor>, device: &Device) -> Result<Arc<QTensor>> {
    if blocks.device().same_device(device) {
        return Ok(blocks.clone());
    }
    let storage = QStorage::from_data(blocks.data()?, device, blocks.dtype())?;
    Ok(Arc::new(QTensor::new(storage, blocks.shape().clone())?))
}

/// Walks every linear layer of a model; each knows its module path in diffusers naming
/// ([`Linear::path`], e.g. `transformer_blocks.0.attn.to_q`), the names PEFT LoRA keys use.
pub trait VisitLinears {
    fn visit_linears(&mut self, f: &mut dyn FnMut(&mut Linear));

    /// Every group of linears multiplied as one. Moving a model moves these first, so that their
    /// joint weights move once.
    fn visit_joints(&mut self, f: &mut dyn FnMut(&mut JointLinears)) {
        let _ = f;
    }
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
        let w = icedit_test_support::randn(0f32, 1.0, (5, 7));
        let b = icedit_test_support::randn(0f32, 1.0, 5);
        let x = icedit_test_support::randn(0f32, 1.0, (3, 7));
        let mut layer = Linear::new(w.clone(), Some(b.clone()));
        let plain = layer.forward(&x).unwrap();
        let probe = Arc::new(Probe {
            rows: icedit_test_support::randn(0f32, 1.0, (2, 7)),
            seen: Mutex::new(None),
        });
        layer.attach(probe.clone()).unwrap();
        assert_eq!(layer.weight().unwrap().dims(), [5, 7]);
        let with_probe = layer.forward(&x).unwrap();
        let diff = |a: &Tensor, b: &Tensor| crate::compare::max_abs_diff(a, b).unwrap();
        assert!(diff(&plain, &with_probe) < 1e-6);
        let expected = x.matmul(&probe.rows.t().unwrap()).unwrap();
        assert!(diff(probe.seen.lock().unwrap().as_ref().unwrap(), &expected) < 1e-6);

        // Merging keeps the projection rows; detaching drops them.
        layer.set_weight((w.clone() * 2.0).unwrap()).unwrap();
        assert_eq!(layer.weight().unwrap().dims(), [5, 7]);
        layer.forward(&x).unwrap();
        assert!(diff(probe.seen.lock().unwrap().as_ref().unwrap(), &expected) < 1e-6);
        layer.detach_all();
        let doubled = (w * 2.0).unwrap();
        assert!(diff(&layer.weight().unwrap(), &doubled) < 1e-6);
        // The bias is the layer's own again, as long as its rows.
        let expected = Linear::new(doubled, Some(b.clone())).forward(&x).unwrap();
        assert!(diff(&layer.forward(&x).unwrap(), &expected) < 1e-6);

        // Quantized blocks keep the extra rows beside them; the bias pads the same way.
        let w = icedit_test_support::randn(0f32, 1.0, (5, 256));
        let x = icedit_test_support::randn(0f32, 1.0, (3, 256));
        let blocks = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let mut layer = Linear::quantized(blocks, Some(b), DType::F32).unwrap();
        let plain = layer.forward(&x).unwrap();
        let rows = icedit_test_support::randn(0f32, 1.0, (2, 256));
        let probe = Arc::new(Probe {
            rows: rows.clone(),
            seen: Mutex::new(None),
        });
        layer.attach(probe.clone()).unwrap();
        assert!(diff(&plain, &layer.forward(&x).unwrap()) < 1e-5);
        let expected = x.matmul(&rows.t().unwrap()).unwrap();
        assert!(diff(probe.seen.lock().unwrap().as_ref().unwrap(), &expected) < 1e-4);
        layer.detach_all();
        assert_eq!(diff(&plain, &layer.forward(&x).unwrap()), 0.0);
    }

    /// Adds `x` times a fixed matrix.
    #[derive(Debug)]
    struct Lora(Tensor);

    impl LinearAdapter for Lora {
        fn forward_delta(&self, x: &Tensor) -> Result<Tensor> {
            x.broadcast_matmul(&self.0.t()?)
        }
    }

    #[test]
    fn joint_linears_equal_their_parts_and_rejoin_when_a_part_changes() {
        let dev = Device::Cpu;
        let randn = |shape: (usize, usize)| icedit_test_support::randn(0f32, 1.0, shape);
        let part =
            |out: usize| Linear::new(randn((out, 7)), Some(randn((1, out)).squeeze(0).unwrap()));
        let parts = vec![part(5), part(5), part(3)];
        // Rows of tokens: the probe's delta is shaped for them.
        let x = icedit_test_support::randn(0f32, 1.0, (8, 7));
        let diff = |a: &Tensor, b: &Tensor| crate::compare::max_abs_diff(a, b).unwrap();
        let check = |joint: &JointLinears| {
            let outs = joint.forward(&x).unwrap();
            for (part, out) in joint.parts().iter().zip(&outs) {
                assert_eq!(out.dims(), [8, part.out_features()]);
                assert!(diff(out, &part.forward(&x).unwrap()) < 1e-5);
            }
        };
        let mut joint = JointLinears::new(parts).unwrap();
        assert!(joint.is_joined());
        check(&joint);

        // An adapter with extra rows on one part, a plain one on another, a merge into a third.
        let probe = Arc::new(Probe {
            rows: randn((2, 7)),
            seen: Mutex::new(None),
        });
        let merged = randn((3, 7));
        // Parts are visited in order: q, k, then the MLP's input.
        let mut part_index = 0;
        joint.visit(&mut |linear| {
            match part_index {
                0 => linear.attach(probe.clone()).unwrap(),
                1 => linear.attach(Arc::new(Lora(randn((5, 7))))).unwrap(),
                _ => {
                    linear.set_weight(merged.clone()).unwrap();
                }
            }
            part_index += 1;
        });
        assert!(joint.is_joined());
        assert!(diff(&joint.parts()[2].weight().unwrap(), &merged) < 1e-6);
        check(&joint);
        let expected = x
            .reshape((8, 7))
            .unwrap()
            .matmul(&probe.rows.t().unwrap())
            .unwrap();
        assert!(diff(probe.seen.lock().unwrap().as_ref().unwrap(), &expected) < 1e-5);

        let placed = joint.to_device(&dev).unwrap();
        assert!(placed.is_joined());
        check(&placed);
        assert!(placed.parts().iter().all(|p| p.window));
        // A merged part's weight is its own again; the group joins it back in.
        let mut rejoined = placed.clone();
        let mut part_index = 0;
        rejoined.visit(&mut |linear| {
            if part_index == 1 {
                linear.set_weight(randn((5, 7))).unwrap();
                assert!(!linear.window);
            }
            part_index += 1;
        });
        assert!(rejoined.is_joined() && rejoined.parts().iter().all(|p| p.window));
        check(&rejoined);

        // Parts that cannot be joined compute one by one.
        let blocks = QTensor::quantize(&randn((5, 256)), GgmlDType::Q8_0).unwrap();
        let quantized = Linear::quantized(blocks, None, DType::F32).unwrap();
        let dense = Linear::new(randn((5, 256)), None);
        let mixed = JointLinears::new(vec![quantized, dense]).unwrap();
        assert!(!mixed.is_joined());
        let x = icedit_test_support::randn(0f32, 1.0, (3, 256));
        for (part, out) in mixed.parts().iter().zip(mixed.forward(&x).unwrap()) {
            assert_eq!(diff(&out, &part.forward(&x).unwrap()), 0.0);
        }
    }
}
