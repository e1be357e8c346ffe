//! The run-time adapters hooked into the transformer's linear layers: a plain LoRA, and a
//! mixture of LoRA experts with a per-token router.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Result, Tensor};
use icedit_flux::{matmul_selected_rows, LinearAdapter};

/// `scale * (B A x + b)`, as PEFT computes a LoRA layer's contribution.
#[derive(Debug, Clone)]
pub struct LoraDelta {
    /// `[rank, in]`.
    pub down: Tensor,
    /// `[out, rank]`.
    pub up: Tensor,
    /// `[out]` (PEFT's `lora_bias`).
    pub up_bias: Option<Tensor>,
    pub scale: f64,
}

impl LoraDelta {
    /// `scale * B A` `[out, in]`, computed in f32, for merging into the layer's weight.
    pub fn weight_delta(&self) -> Result<Tensor> {
        let up = self.up.to_dtype(DType::F32)?;
        let down = self.down.to_dtype(DType::F32)?;
        up.matmul(&down)?.affine(self.scale, 0.0)
    }
}

impl LinearAdapter for LoraDelta {
    fn forward_delta(&self, x: &Tensor) -> Result<Tensor> {
        let x2 = rows(x)?;
        let mut y = x2.matmul(&self.down.t()?)?.matmul(&self.up.t()?)?;
        if let Some(b) = &self.up_bias {
            y = y.broadcast_add(b)?;
        }
        restore(y.affine(self.scale, 0.0)?, x)
    }
}

/// Tokens routed to each expert, summed over every forward pass since the last reset.
#[derive(Debug)]
pub struct RoutingStats {
    counts: Vec<AtomicU64>,
}

impl RoutingStats {
    fn new(experts: usize) -> Self {
        Self {
            counts: (0..experts).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// (token, expert) selections per expert.
    pub fn counts(&self) -> Vec<u64> {
        self.counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    pub fn reset(&self) {
        for c in &self.counts {
            c.store(0, Ordering::Relaxed);
        }
    }
}

/// ICEdit's mixture of LoRA experts on one linear layer (../shared/SPEC.md section 4): per
/// token, the router's top-k logits are softmaxed (over those k only) into expert weights, and
/// `sum_e w_e * scale * B_e A_e x` is added. Only the selected experts are computed: tokens are
/// grouped by expert, each group goes through its expert, and the results are put back in order.
#[derive(Debug)]
pub struct MoeLoraLayer {
    /// `[experts, in]`.
    pub route: Tensor,
    pub route_bias: Option<Tensor>,
    /// `(down [rank, in], up [out, rank])` per expert.
    pub experts: Vec<(Tensor, Tensor)>,
    pub scale: f64,
    pub top_k: usize,
    pub stats: Arc<RoutingStats>,
    /// Each expert's down matrix transposed, `[in, rank]`, as the row-selecting matmul takes it.
    downs_t: Vec<Tensor>,
}

impl MoeLoraLayer {
    pub fn new(
        route: Tensor,
        route_bias: Option<Tensor>,
        experts: Vec<(Tensor, Tensor)>,
        scale: f64,
        top_k: usize,
    ) -> Result<Self> {
        let stats = Arc::new(RoutingStats::new(experts.len()));
        let downs_t = experts
            .iter()
            .map(|(down, _)| down.t()?.contiguous())
            .collect::<Result<_>>()?;
        Ok(Self {
            route,
            route_bias,
            experts,
            scale,
            top_k,
            stats,
            downs_t,
        })
    }

    /// For each of the `top_k` ranks, every token's (expert, weight), from the router logits
    /// `[tokens, experts]` (without the router bias).
    fn route_tokens(&self, logits: &Tensor) -> Result<Vec<Vec<(usize, f32)>>> {
        let logits = match &self.route_bias {
            Some(b) => logits.broadcast_add(b)?,
            None => logits.clone(),
        };
        let (tokens, experts) = logits.dims2()?;
        let logits: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let k = self.top_k;
        let mut ranks = vec![Vec::with_capacity(tokens); k];
        let mut order: Vec<usize> = Vec::with_capacity(experts);
        for row in logits.chunks_exact(experts) {
            order.clear();
            order.extend(0..experts);
            // Highest logit first; ties go to the lower index, as torch.topk does on CPU.
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let top = &order[..k];
            let max = row[top[0]];
            let exp: Vec<f32> = top.iter().map(|&e| (row[e] - max).exp()).collect();
            let sum: f32 = exp.iter().sum();
            for (rank, (&e, w)) in top.iter().zip(&exp).enumerate() {
                ranks[rank].push((e, w / sum));
                self.stats.counts[e].fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(ranks)
    }

    /// The experts' contribution for tokens `x2` `[tokens, in]` routed by `logits`.
    fn experts_delta(&self, x2: &Tensor, logits: &Tensor) -> Result<Tensor> {
        let device = x2.device();
        let mut total: Option<Tensor> = None;
        for choices in self.route_tokens(logits)? {
            // Tokens sorted by expert (stable): each expert takes one slice of the order, reads
            // its tokens' rows in place, and the results are put back in token order.
            let mut order: Vec<u32> = (0..choices.len() as u32).collect();
            order.sort_by_key(|&t| choices[t as usize].0);
            // Routing weight times scale, applied in the rank space where it is cheapest.
            let weights: Vec<f32> = order
                .iter()
                .map(|&t| choices[t as usize].1 * self.scale as f32)
                .collect();
            let weights =
                Tensor::from_vec(weights, (order.len(), 1), device)?.to_dtype(x2.dtype())?;
            let mut outputs = Vec::with_capacity(self.experts.len());
            let mut start = 0;
            for (e, ((_, up), down_t)) in self.experts.iter().zip(&self.downs_t).enumerate() {
                let count = order[start..]
                    .iter()
                    .take_while(|&&t| choices[t as usize].0 == e)
                    .count();
                if count > 0 {
                    let h = matmul_selected_rows(x2, &order[start..start + count], down_t)?;
                    let h = h.broadcast_mul(&weights.narrow(0, start, count)?)?;
                    outputs.push(h.matmul(&up.t()?)?);
                    start += count;
                }
            }
            let mut inverse = vec![0u32; order.len()];
            for (position, &t) in order.iter().enumerate() {
                inverse[t as usize] = position as u32;
            }
            let y = Tensor::cat(&outputs, 0)?
                .index_select(&Tensor::new(inverse.as_slice(), device)?, 0)?;
            total = Some(match total {
                None => y,
                Some(t) => (t + y)?,
            });
        }
        Ok(total.expect("top_k >= 1"))
    }
}

impl LinearAdapter for MoeLoraLayer {
    fn forward_delta(&self, x: &Tensor) -> Result<Tensor> {
        let x2 = rows(x)?;
        let logits = x2.matmul(&self.route.t()?)?;
        restore(self.experts_delta(&x2, &logits)?, x)
    }

    /// The router rides along in the base layer's matmul: one pass over the input, not two.
    fn input_projection(&self) -> Option<&Tensor> {
        Some(&self.route)
    }

    fn forward_delta_with(&self, x: &Tensor, logits: &Tensor) -> Result<Tensor> {
        let x2 = rows(x)?;
        restore(self.experts_delta(&x2, logits)?, x)
    }
}

/// `[.., in]` -> `[tokens, in]`.
fn rows(x: &Tensor) -> Result<Tensor> {
    let in_features = *x.dims().last().expect("rank >= 1");
    x.reshape(((), in_features))
}

/// `[tokens, out]` -> `[.., out]` with the leading dims of `like`.
fn restore(y: Tensor, like: &Tensor) -> Result<Tensor> {
    let mut dims = like.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = y.dim(1)?;
    y.reshape(dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn dense_reference(layer: &MoeLoraLayer, x: &Tensor) -> Tensor {
        // Every expert on every token, weighted by the (mostly zero) routing weights.
        let logits: Vec<Vec<f32>> = x
            .matmul(&layer.route.t().unwrap())
            .unwrap()
            .to_vec2()
            .unwrap();
        let mut y = Tensor::zeros(
            (x.dim(0).unwrap(), layer.experts[0].1.dim(0).unwrap()),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        for (e, (down, up)) in layer.experts.iter().enumerate() {
            let w: Vec<f32> = logits
                .iter()
                .map(|row| {
                    let mut idx: Vec<usize> = (0..row.len()).collect();
                    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                    let top = &idx[..layer.top_k];
                    if !top.contains(&e) {
                        return 0.0;
                    }
                    let max = row[top[0]];
                    let sum: f32 = top.iter().map(|&i| (row[i] - max).exp()).sum();
                    (row[e] - max).exp() / sum
                })
                .collect();
            let w = Tensor::from_vec(w, (x.dim(0).unwrap(), 1), &Device::Cpu).unwrap();
            let h = x
                .matmul(&down.t().unwrap())
                .unwrap()
                .matmul(&up.t().unwrap())
                .unwrap();
            y = (y + h
                .broadcast_mul(&w)
                .unwrap()
                .affine(layer.scale, 0.0)
                .unwrap())
            .unwrap();
        }
        y
    }

    #[test]
    fn sparse_routing_equals_the_dense_formula() {
        let dev = Device::Cpu;
        let (tokens, d_in, d_out, rank, experts) = (37, 12, 10, 3, 4);
        let x = Tensor::randn(0f32, 1.0, (tokens, d_in), &dev).unwrap();
        let experts_w: Vec<(Tensor, Tensor)> = (0..experts)
            .map(|_| {
                (
                    Tensor::randn(0f32, 1.0, (rank, d_in), &dev).unwrap(),
                    Tensor::randn(0f32, 1.0, (d_out, rank), &dev).unwrap(),
                )
            })
            .collect();
        let route = Tensor::randn(0f32, 1.0, (experts, d_in), &dev).unwrap();
        for top_k in 1..=experts {
            let layer =
                MoeLoraLayer::new(route.clone(), None, experts_w.clone(), 0.5, top_k).unwrap();
            let y = layer
                .forward_delta(&x.unsqueeze(0).unwrap())
                .unwrap()
                .squeeze(0)
                .unwrap();
            let reference = dense_reference(&layer, &x);
            let err = icedit_flux::compare::max_abs_diff(&y, &reference).unwrap();
            assert!(err < 1e-5, "top_k {top_k}: {err}");
            let counts = layer.stats.counts();
            assert_eq!(counts.iter().sum::<u64>(), (tokens * top_k) as u64);
            if top_k == 1 {
                assert!(counts.iter().filter(|&&c| c > 0).count() >= 2, "{counts:?}");
            }
        }
    }

    #[test]
    fn lora_delta_runtime_equals_merged_weight() {
        let dev = Device::Cpu;
        let delta = LoraDelta {
            down: Tensor::randn(0f32, 1.0, (2, 6), &dev).unwrap(),
            up: Tensor::randn(0f32, 1.0, (5, 2), &dev).unwrap(),
            up_bias: None,
            scale: 1.5,
        };
        let x = Tensor::randn(0f32, 1.0, (2, 3, 6), &dev).unwrap();
        let runtime = delta.forward_delta(&x).unwrap();
        let merged = x
            .broadcast_matmul(&delta.weight_delta().unwrap().t().unwrap())
            .unwrap();
        assert!(icedit_flux::compare::max_abs_diff(&runtime, &merged).unwrap() < 1e-5);
    }
}
