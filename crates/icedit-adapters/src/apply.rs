//! Matching an adapter file's modules to the transformer's linear layers (diffusers, BFL and
//! kohya namings; fused BFL modules split into their diffusers layers), checking every shape,
//! and applying the result: merged into the weights, or hooked in at run time.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use icedit_flux::{bfl_linear, BflPart, FluxConfig, FluxTransformer, Linear, LinearAdapter};

use crate::error::{AdapterError, Result};
use crate::file::{AdapterFile, ModuleTensors};
use crate::layers::{LoraDelta, MoeLoraLayer, RoutingStats};

/// One adapter to apply: the parsed file with the user's choices.
#[derive(Debug)]
pub struct AdapterChoice {
    /// How the adapter is named in messages and recipes.
    pub name: String,
    pub file: AdapterFile,
    /// Multiplies the file's own alpha/rank scale (diffusers' adapter weight).
    pub scale: f64,
    /// MoE experts per token; default: the file's metadata, else 1.
    pub top_k: Option<usize>,
}

/// Whether plain LoRA layers are merged into the weights (faster; the default) or computed at
/// run time like PEFT does (needed for MoE layers, which always run at run time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyMode {
    Merge,
    Runtime,
}

/// What applying an adapter did.
#[derive(Debug, Clone)]
pub struct AppliedAdapter {
    pub name: String,
    pub lora_layers: usize,
    pub merged_layers: usize,
    /// LoRA layers applied at run time although merging was asked for: their base weight is
    /// quantized, and a merge would round the LoRA's change to the quantization's steps (as
    /// diffusers on a GGUF model, the LoRA is added at run time instead).
    pub runtime_on_quantized: usize,
    pub moe_layers: usize,
    pub experts: usize,
    pub top_k: usize,
    /// Router statistics of each MoE layer, by module path.
    pub routing: Vec<(String, Arc<RoutingStats>)>,
    /// Turns the layers applied at run time on and off together (on when applied); merged
    /// layers are part of the weights for good.
    pub switch: Arc<AtomicBool>,
}

impl AppliedAdapter {
    /// Tokens per expert summed over the layers of each group (block type and module, e.g.
    /// `single_transformer_blocks.*.proj_out`).
    pub fn routing_histogram(&self) -> Vec<(String, Vec<u64>)> {
        let mut groups: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for (module, stats) in &self.routing {
            // The block index is the first number in the path.
            let mut replaced = false;
            let group = module
                .split('.')
                .map(|p| match p.parse::<usize>() {
                    Ok(_) if !replaced => {
                        replaced = true;
                        "*"
                    }
                    _ => p,
                })
                .collect::<Vec<_>>()
                .join(".");
            let counts = stats.counts();
            let sum = groups.entry(group).or_insert_with(|| vec![0; counts.len()]);
            for (s, c) in sum.iter_mut().zip(counts) {
                *s += c;
            }
        }
        groups.into_iter().collect()
    }
}

/// Applies the adapters in order. Nothing is changed unless every adapter matches the model.
pub fn apply_adapters(
    model: &mut FluxTransformer,
    adapters: Vec<AdapterChoice>,
    mode: ApplyMode,
) -> Result<Vec<AppliedAdapter>> {
    let layers = ModelLayers::of(model);
    let bound = adapters
        .into_iter()
        .map(|a| bind(&layers, a))
        .collect::<Result<Vec<_>>>()?;

    let mut reports: Vec<AppliedAdapter> = bound
        .iter()
        .map(|b| AppliedAdapter {
            name: b.name.clone(),
            lora_layers: 0,
            merged_layers: 0,
            runtime_on_quantized: 0,
            moe_layers: 0,
            experts: 0,
            top_k: 0,
            routing: Vec::new(),
            switch: Arc::new(AtomicBool::new(true)),
        })
        .collect();
    let mut by_module: HashMap<String, Vec<(usize, BoundLayer)>> = HashMap::new();
    for (i, adapter) in bound.into_iter().enumerate() {
        for (module, layer) in adapter.layers {
            by_module.entry(module).or_default().push((i, layer));
        }
    }
    let mut failure = None;
    model.visit_linears(&mut |name, linear| {
        let Some(layers) = by_module.remove(name) else {
            return;
        };
        for (i, layer) in layers {
            let report = &mut reports[i];
            if let Err(e) = install(linear, layer, mode, report, name) {
                failure.get_or_insert(e);
            }
        }
    });
    match failure {
        Some(e) => Err(e),
        None => Ok(reports),
    }
}

/// The plain LoRA layers of `adapters`, by the diffusers module each one changes, matched and
/// checked as [`apply_adapters`] does, against a model that is not loaded (`icedit quantize
/// --lora` merges them into the weights it reads one tensor at a time). A mixture of LoRA
/// experts routes each token and a LoRA bias adds to the bias: neither can be merged into a
/// weight, so both are refused.
pub fn lora_deltas(
    config: &FluxConfig,
    adapters: Vec<AdapterChoice>,
) -> Result<Vec<(String, LoraDelta)>> {
    let mut model =
        FluxTransformer::shapes_only(config).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let layers = ModelLayers::of(&mut model);
    let mut deltas = Vec::new();
    for adapter in adapters {
        let path = adapter.file.path().to_path_buf();
        let bound = bind(&layers, adapter)?;
        for (module, layer) in bound.layers {
            match layer {
                BoundLayer::Lora(delta) if delta.up_bias.is_none() => {
                    deltas.push((module, delta));
                }
                BoundLayer::Lora(_) => {
                    return Err(AdapterError::Invalid {
                        path,
                        problems: vec![format!(
                            "the LoRA on `{module}` has a bias (PEFT's lora_bias), which a \
                             merge into the weights cannot hold; apply it at run time with \
                             --lora instead"
                        )],
                    })
                }
                BoundLayer::Moe(_) => {
                    return Err(AdapterError::Invalid {
                        path,
                        problems: vec![format!(
                            "`{module}` is a mixture of LoRA experts, which routes each token \
                             to its experts and cannot be merged into the weights; apply it at \
                             run time with --lora instead"
                        )],
                    })
                }
            }
        }
    }
    Ok(deltas)
}

fn install(
    linear: &mut Linear,
    layer: BoundLayer,
    mode: ApplyMode,
    report: &mut AppliedAdapter,
    module: &str,
) -> Result<()> {
    let (dtype, device) = (linear.dtype(), linear.device().clone());
    let convert = |t: &Tensor| t.to_device(&device)?.to_dtype(dtype);
    // The file's tensors are checked when read; what is checked here is what the scale and
    // the model's dtype make of them (one pass per tensor, before the layer is changed).
    let check = |tensors: &[&Tensor], what: &'static str, scale: f64| -> Result<()> {
        for t in tensors {
            if !icedit_flux::all_finite(t)? {
                return Err(AdapterError::NonFiniteLayer {
                    adapter: report.name.clone(),
                    layer: module.to_string(),
                    what,
                    scale,
                    dtype,
                });
            }
        }
        Ok(())
    };
    match layer {
        BoundLayer::Lora(delta) => {
            let quantized = linear.quantization().is_some();
            if mode == ApplyMode::Merge && delta.up_bias.is_none() && !quantized {
                let merged = (linear.weight()?.to_dtype(DType::F32)?
                    + delta.weight_delta()?.to_device(&device)?)?
                .to_dtype(dtype)?;
                check(&[&merged], "merged weights", delta.scale)?;
                report.lora_layers += 1;
                linear.set_weight(merged)?;
                report.merged_layers += 1;
            } else {
                if mode == ApplyMode::Merge && quantized {
                    report.runtime_on_quantized += 1;
                }
                let delta = LoraDelta {
                    down: convert(&delta.down)?,
                    up: convert(&delta.up)?,
                    up_bias: delta.up_bias.as_ref().map(convert).transpose()?,
                    scale: delta.scale,
                };
                let mut parts = vec![&delta.down, &delta.up];
                parts.extend(&delta.up_bias);
                check(&parts, "weights", delta.scale)?;
                report.lora_layers += 1;
                linear.attach_switched(
                    Arc::new(delta) as Arc<dyn LinearAdapter>,
                    Some(report.switch.clone()),
                )?;
            }
        }
        BoundLayer::Moe(moe) => {
            let experts = moe
                .experts
                .iter()
                .map(|(d, u)| Ok((convert(d)?, convert(u)?)))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let mut parts: Vec<&Tensor> = experts.iter().flat_map(|(d, u)| [d, u]).collect();
            let (route, route_bias) = (
                convert(&moe.route)?,
                moe.route_bias.as_ref().map(convert).transpose()?,
            );
            parts.push(&route);
            parts.extend(&route_bias);
            check(&parts, "weights", moe.scale)?;
            let moe = MoeLoraLayer::new(route, route_bias, experts, moe.scale, moe.top_k)?;
            report.moe_layers += 1;
            report.experts = report.experts.max(moe.experts.len());
            report.top_k = moe.top_k;
            report.routing.push((module.to_string(), moe.stats.clone()));
            linear.attach_switched(
                Arc::new(moe) as Arc<dyn LinearAdapter>,
                Some(report.switch.clone()),
            )?;
        }
    }
    Ok(())
}

/// The transformer's linear layers by every name an adapter may use for them.
struct ModelLayers {
    /// Diffusers module path -> (out, in).
    shapes: BTreeMap<String, (usize, usize)>,
    /// BFL module -> the diffusers layers it holds.
    bfl: HashMap<String, Vec<(String, BflPart)>>,
    /// kohya spelling (dots as underscores) -> diffusers or BFL module path.
    underscored: HashMap<String, String>,
}

impl ModelLayers {
    fn of(model: &mut FluxTransformer) -> Self {
        let config = model.config().clone();
        let mut shapes = BTreeMap::new();
        model.visit_linears(&mut |name, linear| {
            shapes.insert(
                name.to_string(),
                (linear.out_features(), linear.in_features()),
            );
        });
        let mut bfl: HashMap<String, Vec<(String, BflPart)>> = HashMap::new();
        for name in shapes.keys() {
            if let Some((module, part)) = bfl_linear(name, &config) {
                bfl.entry(module)
                    .or_default()
                    .push((name.to_string(), part));
            }
        }
        let underscored = shapes
            .keys()
            .chain(bfl.keys())
            .map(|m| (m.replace('.', "_"), m.clone()))
            .collect();
        Self {
            shapes,
            bfl,
            underscored,
        }
    }

    /// The diffusers layers a module name of an adapter file stands for.
    fn targets(&self, module: &str) -> Option<Vec<(String, BflPart)>> {
        if self.shapes.contains_key(module) {
            return Some(vec![(module.to_string(), BflPart::Whole)]);
        }
        if let Some(parts) = self.bfl.get(module) {
            let mut parts = parts.clone();
            parts.sort_by_key(|(_, p)| match p {
                BflPart::Rows { rows, .. } => rows.start,
                _ => 0,
            });
            return Some(parts);
        }
        let dotted = self.underscored.get(module)?;
        self.targets(dotted)
    }
}

enum BoundLayer {
    Lora(LoraDelta),
    Moe(MoeLoraLayer),
}

struct BoundAdapter {
    name: String,
    layers: Vec<(String, BoundLayer)>,
}

/// Matches every module of the file to model layers, or fails listing every key that does not
/// match and every shape that does not fit.
fn bind(layers: &ModelLayers, choice: AdapterChoice) -> Result<BoundAdapter> {
    let file = &choice.file;
    let mut unmatched = Vec::new();
    let mut shape_problems = Vec::new();
    let mut invalid = Vec::new();
    let mut bound = Vec::new();
    for (module, tensors) in &file.modules {
        let Some(targets) = layers.targets(module) else {
            unmatched.extend(tensors.keys.iter().cloned());
            continue;
        };
        let mut ctx = BindContext {
            layers,
            file,
            module,
            tensors,
            user_scale: choice.scale,
            shape_problems: &mut shape_problems,
            invalid: &mut invalid,
        };
        if tensors.is_plain() {
            if let Some(found) = ctx.plain(&targets)? {
                bound.extend(found.into_iter().map(|(m, d)| (m, BoundLayer::Lora(d))));
            }
        }
        if tensors.is_moe() {
            if let Some((m, moe)) = ctx.moe(&targets, choice.top_k)? {
                bound.push((m, BoundLayer::Moe(moe)));
            }
        }
    }
    let path = file.path.clone();
    if !unmatched.is_empty() {
        return Err(AdapterError::UnmatchedKeys {
            path,
            keys: unmatched,
        });
    }
    if !shape_problems.is_empty() {
        return Err(AdapterError::ShapeMismatch {
            path,
            problems: shape_problems,
        });
    }
    if !invalid.is_empty() {
        return Err(AdapterError::Invalid {
            path,
            problems: invalid,
        });
    }
    if bound.is_empty() {
        return Err(AdapterError::Invalid {
            path,
            problems: vec!["the file holds no LoRA layers for the transformer".into()],
        });
    }
    Ok(BoundAdapter {
        name: choice.name,
        layers: bound,
    })
}

struct BindContext<'a> {
    layers: &'a ModelLayers,
    file: &'a AdapterFile,
    module: &'a str,
    tensors: &'a ModuleTensors,
    user_scale: f64,
    shape_problems: &'a mut Vec<String>,
    invalid: &'a mut Vec<String>,
}

impl BindContext<'_> {
    fn key_names(&self) -> String {
        self.tensors.keys.join(", ")
    }

    /// A plain LoRA module, split over the diffusers layers of a fused BFL module if need be.
    fn plain(&mut self, targets: &[(String, BflPart)]) -> Result<Option<Vec<(String, LoraDelta)>>> {
        let t = self.tensors;
        let (Some(down), Some(up)) = (&t.down, &t.up) else {
            self.invalid.push(format!(
                "{}: a LoRA needs both the down (lora_A) and up (lora_B) matrices; found only {}",
                self.module,
                self.key_names()
            ));
            return Ok(None);
        };
        let (rank, d_in) = down.dims2()?;
        let (d_out, up_rank) = up.dims2()?;
        if up_rank != rank {
            self.shape_problems.push(format!(
                "{}: down is [{rank}, {d_in}] but up is [{d_out}, {up_rank}]; their ranks differ",
                self.module
            ));
            return Ok(None);
        }
        let (first, _) = &targets[0];
        let (layer_out, layer_in) = self.layers.shapes[first];
        let fused_out: usize = match &targets[0].1 {
            BflPart::Rows { total_rows, .. } => *total_rows,
            _ => layer_out,
        };
        if d_in != layer_in || d_out != fused_out {
            self.shape_problems.push(format!(
                "{}: the LoRA maps {d_in} -> {d_out} features, the model's layer {} maps \
                 {layer_in} -> {fused_out}",
                self.key_names(),
                first
            ));
            return Ok(None);
        }
        // Diffusers layers are named by module path; alpha patterns use those names.
        let scale = self.file.scaling.scale(first, rank, t.alpha) * self.user_scale;
        let delta = |down: Tensor, up: Tensor, up_bias: Option<Tensor>| LoraDelta {
            down,
            up,
            up_bias,
            scale,
        };
        let bias = t.up_bias.clone();
        let out = match &targets[0].1 {
            BflPart::Whole => vec![(first.clone(), delta(down.clone(), up.clone(), bias))],
            BflPart::SwappedHalves => {
                let swap = |t: &Tensor| -> candle_core::Result<Tensor> {
                    let h = t.dim(0)? / 2;
                    Tensor::cat(&[t.narrow(0, h, h)?, t.narrow(0, 0, h)?], 0)
                };
                let bias = bias.as_ref().map(swap).transpose()?;
                vec![(first.clone(), delta(down.clone(), swap(up)?, bias))]
            }
            BflPart::Rows { .. } => split_fused(down, up, bias.as_ref(), targets)?
                .into_iter()
                .map(|(m, d, u, b)| (m, delta(d, u, b)))
                .collect(),
        };
        Ok(Some(out))
    }

    /// An ICEdit MoE-LoRA module.
    fn moe(
        &mut self,
        targets: &[(String, BflPart)],
        top_k: Option<usize>,
    ) -> Result<Option<(String, MoeLoraLayer)>> {
        let t = self.tensors;
        let [(target, BflPart::Whole)] = targets else {
            self.invalid.push(format!(
                "{}: mixture-of-experts layers on fused BFL modules are not supported; name the \
                 diffusers layers",
                self.module
            ));
            return Ok(None);
        };
        let Some(route) = &t.route else {
            self.invalid.push(format!(
                "{}: expert matrices without a router (lora_route.weight)",
                self.module
            ));
            return Ok(None);
        };
        let (n_experts, route_in) = route.dims2()?;
        let (layer_out, layer_in) = self.layers.shapes[target];
        let indices: Vec<usize> = t.experts.keys().copied().collect();
        if indices != (0..n_experts).collect::<Vec<_>>() {
            self.invalid.push(format!(
                "{}: the router has {n_experts} outputs but the experts are numbered {indices:?}",
                self.module
            ));
            return Ok(None);
        }
        if route_in != layer_in {
            self.shape_problems.push(format!(
                "{}.lora_route.weight is [{n_experts}, {route_in}], the layer {target} takes \
                 {layer_in} features",
                self.module
            ));
            return Ok(None);
        }
        let mut experts = Vec::with_capacity(n_experts);
        let mut ranks = Vec::new();
        for (k, (down, up)) in &t.experts {
            let (Some(down), Some(up)) = (down, up) else {
                self.invalid.push(format!(
                    "{}: expert {k} needs both lora_A.expert_{k} and lora_B.expert_{k}",
                    self.module
                ));
                return Ok(None);
            };
            let (rank, d_in) = down.dims2()?;
            let (d_out, up_rank) = up.dims2()?;
            if d_in != layer_in || d_out != layer_out || up_rank != rank {
                self.shape_problems.push(format!(
                    "{} expert {k}: down [{rank}, {d_in}] and up [{d_out}, {up_rank}] do not fit \
                     the layer {target} ({layer_in} -> {layer_out})",
                    self.module
                ));
                return Ok(None);
            }
            ranks.push(rank);
            experts.push((down.clone(), up.clone()));
        }
        if ranks.windows(2).any(|w| w[0] != w[1]) {
            self.invalid.push(format!(
                "{}: experts of different ranks {ranks:?} are not supported",
                self.module
            ));
            return Ok(None);
        }
        let top_k = top_k.or(self.file.top_k).unwrap_or(1);
        if top_k == 0 || top_k > n_experts {
            self.invalid.push(format!(
                "{}: top-k {top_k} is out of range for {n_experts} experts",
                self.module
            ));
            return Ok(None);
        }
        let scale = self.file.scaling.scale(target, ranks[0], t.alpha) * self.user_scale;
        let moe = MoeLoraLayer::new(route.clone(), t.route_bias.clone(), experts, scale, top_k)?;
        Ok(Some((target.clone(), moe)))
    }
}

type Split = (String, Tensor, Tensor, Option<Tensor>);

/// Splits a LoRA on a fused BFL module (qkv, `linear1`) into one LoRA per diffusers layer, as
/// diffusers' kohya converter does: when the up matrix is block diagonal (each layer has its own
/// slice of the rank), down is chunked and up cut into its blocks; otherwise down is shared and
/// up is cut by rows. Either way the product is unchanged.
fn split_fused(
    down: &Tensor,
    up: &Tensor,
    bias: Option<&Tensor>,
    targets: &[(String, BflPart)],
) -> candle_core::Result<Vec<Split>> {
    let rank = down.dim(0)?;
    let n = targets.len();
    let rows: Vec<(usize, usize)> = targets
        .iter()
        .map(|(_, p)| match p {
            BflPart::Rows { rows, .. } => (rows.start, rows.len()),
            _ => unreachable!("fused targets are all row slices"),
        })
        .collect();
    let block = rank / n;
    let block_diagonal = rank % n == 0 && {
        let mut zero_elsewhere = true;
        for (j, &(start, len)) in rows.iter().enumerate() {
            for k in (0..n).filter(|&k| k != j) {
                let off = up.narrow(0, start, len)?.narrow(1, k * block, block)?;
                zero_elsewhere &= off
                    .abs()?
                    .max_all()?
                    .to_dtype(DType::F32)?
                    .to_scalar::<f32>()?
                    == 0.0;
            }
        }
        zero_elsewhere
    };
    let mut out = Vec::with_capacity(n);
    for (j, ((module, _), &(start, len))) in targets.iter().zip(&rows).enumerate() {
        let up_rows = up.narrow(0, start, len)?;
        let (d, u) = if block_diagonal {
            (
                down.narrow(0, j * block, block)?,
                up_rows.narrow(1, j * block, block)?,
            )
        } else {
            (down.clone(), up_rows)
        };
        let b = bias.map(|b| b.narrow(0, start, len)).transpose()?;
        out.push((module.clone(), d.contiguous()?, u.contiguous()?, b));
    }
    Ok(out)
}
