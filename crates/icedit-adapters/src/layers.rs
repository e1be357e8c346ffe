//! The run-time adapters hooked into the transformer's linear layers: a plain LoRA, and a
//! mixture of LoRA experts with a per-token router.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Result, Tensor};
use icedit_flux::{cpu_fast_paths, matmul_selected_rows, LinearAdapter};

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
    /// The device path's counts, `[experts]` f32, summed on the device and read only when
    /// asked for: routing never waits for the host.
    on_device: Mutex<Option<Tensor>>,
}

impl RoutingStats {
    fn new(experts: usize) -> Self {
        Self {
            counts: (0..experts).map(|_| AtomicU64::new(0)).collect(),
            on_device: Mutex::new(None),
        }
    }

    /// (token, expert) selections per expert.
    pub fn counts(&self) -> Vec<u64> {
        let on_device = self.on_device.lock().unwrap_or_else(|e| e.into_inner());
        let device: Vec<f32> = on_device
            .as_ref()
            .and_then(|t| t.to_vec1().ok())
            .unwrap_or_default();
        self.counts
            .iter()
            .enumerate()
            .map(|(e, c)| c.load(Ordering::Relaxed) + device.get(e).map_or(0, |&n| n as u64))
            .collect()
    }

    pub fn reset(&self) {
        for c in &self.counts {
            c.store(0, Ordering::Relaxed);
        }
        *self.on_device.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn add_on_device(&self, selected: &Tensor) -> Result<()> {
        let counts = selected.sum(0)?;
        let mut on_device = self.on_device.lock().unwrap_or_else(|e| e.into_inner());
        *on_device = Some(match on_device.take() {
            Some(sum) => (sum + counts)?,
            None => counts,
        });
        Ok(())
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
    /// The dense device path: every expert's down matrix side by side `[in, total rank]`, the
    /// up matrices stacked `[total rank, out]`, and `[experts, total rank]` ones spreading each
    /// expert's routing weight over its rank columns.
    dense: DenseExperts,
}

#[derive(Debug)]
struct DenseExperts {
    downs_t: Tensor,
    ups_t: Tensor,
    spread: Tensor,
}

impl DenseExperts {
    fn new(experts: &[(Tensor, Tensor)]) -> Result<Self> {
        let downs: Vec<&Tensor> = experts.iter().map(|(down, _)| down).collect();
        let ups: Vec<&Tensor> = experts.iter().map(|(_, up)| up).collect();
        let ranks: Vec<usize> = downs.iter().map(|d| d.dim(0)).collect::<Result<_>>()?;
        let total: usize = ranks.iter().sum();
        let mut spread = vec![0f32; experts.len() * total];
        let mut start = 0;
        for (e, rank) in ranks.iter().enumerate() {
            spread[e * total + start..e * total + start + rank].fill(1.0);
            start += rank;
        }
        let like = &downs[0];
        Ok(Self {
            downs_t: Tensor::cat(&downs, 0)?.t()?.contiguous()?,
            ups_t: Tensor::cat(&ups, 1)?.t()?.contiguous()?,
            spread: Tensor::from_vec(spread, (experts.len(), total), like.device())?
                .to_dtype(like.dtype())?,
        })
    }
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
        let dense = DenseExperts::new(&experts)?;
        Ok(Self {
            route,
            route_bias,
            experts,
            scale,
            top_k,
            stats,
            downs_t,
            dense,
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

    /// Every token's routing weight per expert, `[tokens, experts]` f32: the softmax of its
    /// top-k logits, zero elsewhere; computed on the device (no host round trip). Ties go to the
    /// lower index, as torch.topk does on the CPU.
    fn device_routing(&self, logits: &Tensor) -> Result<Tensor> {
        let mut logits = logits.to_dtype(DType::F32)?;
        if let Some(b) = &self.route_bias {
            logits = logits.broadcast_add(&b.to_dtype(DType::F32)?)?;
        }
        let experts = logits.dim(1)?;
        let index = Tensor::arange(0u32, experts as u32, logits.device())?.reshape((1, experts))?;
        let excluded = Tensor::full(f32::NEG_INFINITY, logits.shape(), logits.device())?;
        let (mut remaining, mut selected) = (logits.clone(), logits.zeros_like()?);
        for _ in 0..self.top_k {
            let best = remaining.argmax_keepdim(1)?.broadcast_eq(&index)?;
            selected = (selected + best.to_dtype(DType::F32)?)?;
            remaining = best.where_cond(&excluded, &remaining)?;
        }
        let max = logits.max_keepdim(1)?;
        let exp = (logits.broadcast_sub(&max)?.exp()? * &selected)?;
        self.stats.add_on_device(&selected)?;
        exp.broadcast_div(&exp.sum_keepdim(1)?)
    }

    /// The experts' contribution on any device: every expert on every token, weighted by the
    /// routing (zero for unselected experts). With 4 experts of rank 32 that is one
    /// `[tokens, 128]` product each way, cheap on a GPU, and nothing waits for the host.
    fn experts_delta_dense(&self, x2: &Tensor, logits: &Tensor) -> Result<Tensor> {
        let weights = (self.device_routing(logits)? * self.scale)?.to_dtype(x2.dtype())?;
        let h = x2.matmul(&self.dense.downs_t)?;
        let spread = weights.matmul(&self.dense.spread)?;
        (h * spread)?.matmul(&self.dense.ups_t)
    }

    /// The experts' contribution for tokens `x2` `[tokens, in]` routed by `logits`. The CPU
    /// routes on the host and computes only the selected experts; other devices (and the CPU
    /// with `ICEDIT_CPU_FAST_PATHS=0`) take the dense device path.
    fn experts_delta(&self, x2: &Tensor, logits: &Tensor) -> Result<Tensor> {
        if !cpu_fast_paths(x2.device()) {
            return self.experts_delta_dense(x2, logits);
        }
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
        let (tokens, d_in, d_out, rank, experts) = (37, 12, 10, 3, 4);
        let x = icedit_test_support::randn(0f32, 1.0, (tokens, d_in));
        let experts_w: Vec<(Tensor, Tensor)> = (0..experts)
            .map(|_| {
                (
                    icedit_test_support::randn(0f32, 1.0, (rank, d_in)),
                    icedit_test_support::randn(0f32, 1.0, (d_out, rank)),
                )
            })
            .collect();
        let route = icedit_test_support::randn(0f32, 1.0, (experts, d_in));
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
    fn device_routing_equals_host_routing() {
        let dev = Device::Cpu;
        let (tokens, d_in, d_out, rank, experts) = (41, 16, 8, 4, 4);
        let x = icedit_test_support::randn(0f32, 1.0, (tokens, d_in));
        let experts_w: Vec<(Tensor, Tensor)> = (0..experts)
            .map(|_| {
                (
                    icedit_test_support::randn(0f32, 1.0, (rank, d_in)),
                    icedit_test_support::randn(0f32, 1.0, (d_out, rank)),
                )
            })
            .collect();
        let route = icedit_test_support::randn(0f32, 1.0, (experts, d_in));
        let bias = icedit_test_support::randn(0f32, 1.0, experts);
        for top_k in 1..=experts {
            let layer = MoeLoraLayer::new(
                route.clone(),
                Some(bias.clone()),
                experts_w.clone(),
                0.7,
                top_k,
            )
            .unwrap();
            let logits = x.matmul(&route.t().unwrap()).unwrap();
            let host = layer.experts_delta(&x, &logits).unwrap();
            let host_counts = layer.stats.counts();
            layer.stats.reset();
            let device = layer.experts_delta_dense(&x, &logits).unwrap();
            let err = icedit_flux::compare::max_abs_diff(&host, &device).unwrap();
            assert!(err < 1e-4, "top_k {top_k}: {err}");
            assert_eq!(layer.stats.counts(), host_counts, "top_k {top_k}");
        }
        // Ties go to the lower index on both paths.
        let layer =
            MoeLoraLayer::new(route.zeros_like().unwrap(), None, experts_w, 1.0, 1).unwrap();
        let logits = Tensor::zeros((3, experts), DType::F32, &dev).unwrap();
        let x3 = x.narrow(0, 0, 3).unwrap();
        layer.experts_delta_dense(&x3, &logits).unwrap();
        assert_eq!(layer.stats.counts(), vec![3, 0, 0, 0]);
    }

    #[test]
    fn lora_delta_runtime_equals_merged_weight() {
        let delta = LoraDelta {
            down: icedit_test_support::randn(0f32, 1.0, (2, 6)),
            up: icedit_test_support::randn(0f32, 1.0, (5, 2)),
            up_bias: None,
            scale: 1.5,
        };
        let x = icedit_test_support::randn(0f32, 1.0, (2, 3, 6));
        let runtime = delta.forward_delta(&x).unwrap();
        let merged = x
            .broadcast_matmul(&delta.weight_delta().unwrap().t().unwrap())
            .unwrap();
        assert!(icedit_flux::compare::max_abs_diff(&runtime, &merged).unwrap() < 1e-5);
    }
}
