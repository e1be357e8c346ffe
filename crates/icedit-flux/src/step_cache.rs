//! Step caches: reuse work across denoising steps, trading exactness for speed, with diffusers'
//! decisions (`diffusers.hooks`, 0.42.1). Opt-in and lossy; each run and each guidance branch
//! (cond, uncond) keeps its own state, as diffusers' cache contexts do.
//!
//! - [`FirstBlockCache`] (`FirstBlockCacheConfig`): the first block always runs; when its image
//!   residual changed little since the last full evaluation (mean |r - r_prev| / mean |r_prev| at
//!   or below the threshold), the other blocks are skipped and what they added then is added
//!   again.
//! - [`TaylorSeerCache`] (`TaylorSeerCacheConfig`): every block's attention output is computed on
//!   a schedule and predicted by a Taylor expansion in the step count in between.

use candle_core::{DType, Tensor};

use crate::error::{FluxError, Result};

/// Which cache, with its settings.
#[derive(Debug, Clone, PartialEq)]
pub enum StepCacheConfig {
    FirstBlock {
        threshold: f32,
    },
    TaylorSeer {
        /// Steps between full computations (diffusers' `cache_interval`).
        interval: usize,
        /// Steps before any prediction (`disable_cache_before_step`).
        warmup: usize,
        /// Steps from which everything is computed again (`disable_cache_after_step`).
        cooldown: Option<usize>,
        /// The Taylor expansion's highest order (`max_order`).
        order: usize,
        /// The dtype the Taylor factors are kept in (`taylor_factors_dtype`, bf16 by default).
        factors_dtype: DType,
    },
}

impl StepCacheConfig {
    /// `first-block:THRESHOLD` (diffusers' default 0.05), or
    /// `taylorseer[:interval=5,warmup=3,order=1,cooldown=N,dtype=bf16|f32]` (diffusers' defaults).
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |why: &str| {
            FluxError::Input(format!(
                "--cache {text:?}: {why}; use first-block:THRESHOLD (e.g. first-block:0.1) or \
                 taylorseer[:interval=5,warmup=3,order=1,cooldown=N,dtype=bf16|f32]"
            ))
        };
        let (kind, params) = text.split_once(':').unwrap_or((text, ""));
        match kind.trim() {
            "first-block" => {
                let threshold = if params.trim().is_empty() {
                    0.05
                } else {
                    params
                        .trim()
                        .parse::<f32>()
                        .map_err(|_| bad("the threshold is not a number"))?
                };
                if !threshold.is_finite() || threshold < 0.0 {
                    return Err(bad("the threshold must be a finite number, 0 or more"));
                }
                Ok(Self::FirstBlock { threshold })
            }
            "taylorseer" => {
                let (mut interval, mut warmup, mut cooldown, mut order) = (5, 3, None, 1);
                let mut factors_dtype = DType::BF16;
                for part in params.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    let (key, value) = part.split_once('=').ok_or_else(|| bad("key=value"))?;
                    let number = || {
                        value
                            .trim()
                            .parse::<usize>()
                            .map_err(|_| bad(&format!("{key} takes a whole number")))
                    };
                    match key.trim() {
                        "interval" => interval = number()?,
                        "warmup" => warmup = number()?,
                        "cooldown" => cooldown = Some(number()?),
                        "order" => order = number()?,
                        "dtype" => {
                            factors_dtype = match value.trim() {
                                "bf16" => DType::BF16,
                                "f16" => DType::F16,
                                "f32" => DType::F32,
                                _ => return Err(bad("dtype is bf16, f16 or f32")),
                            }
                        }
                        other => return Err(bad(&format!("unknown setting {other:?}"))),
                    }
                }
                if interval == 0 || order == 0 || order > 4 {
                    return Err(bad("interval must be at least 1 and order 1 to 4"));
                }
                Ok(Self::TaylorSeer {
                    interval,
                    warmup,
                    cooldown,
                    order,
                    factors_dtype,
                })
            }
            _ => Err(bad("unknown cache")),
        }
    }

    /// A fresh state for one run and guidance branch.
    pub fn new_state(&self) -> StepCache {
        match self {
            Self::FirstBlock { threshold } => StepCache::FirstBlock(FirstBlockCache {
                threshold: *threshold,
                head_residual: None,
                tail_residuals: None,
                computed: Vec::new(),
                changes: Vec::new(),
            }),
            Self::TaylorSeer {
                interval,
                warmup,
                cooldown,
                order,
                factors_dtype,
            } => StepCache::TaylorSeer(TaylorSeerCache {
                interval: *interval,
                warmup: *warmup,
                cooldown: *cooldown,
                order: *order,
                factors_dtype: *factors_dtype,
                step: -1,
                slots: Vec::new(),
                computed: Vec::new(),
            }),
        }
    }
}

/// One run's (and branch's) cache state.
#[derive(Debug, Clone)]
pub enum StepCache {
    FirstBlock(FirstBlockCache),
    TaylorSeer(TaylorSeerCache),
}

impl StepCache {
    /// For each evaluation so far: whether it was computed in full.
    pub fn computed(&self) -> &[bool] {
        match self {
            Self::FirstBlock(c) => &c.computed,
            Self::TaylorSeer(c) => &c.computed,
        }
    }
}

/// First Block Cache state.
#[derive(Debug, Clone)]
pub struct FirstBlockCache {
    threshold: f32,
    /// The first block's image residual at the last full evaluation.
    head_residual: Option<Tensor>,
    /// What the other blocks added then (image, text).
    pub(crate) tail_residuals: Option<(Tensor, Tensor)>,
    computed: Vec<bool>,
    /// The relative change of the first block's residual at each evaluation (none at the
    /// first).
    pub changes: Vec<Option<f32>>,
}

impl FirstBlockCache {
    /// Whether the blocks after the first must run, given the first block's image residual:
    /// diffusers' `absmean(r - r_prev) / absmean(r_prev) > threshold`, each mean rounded to the
    /// model's dtype as torch's are. Records the decision.
    pub(crate) fn should_compute(&mut self, residual: &Tensor) -> Result<bool> {
        let compute = match (&self.head_residual, &self.tail_residuals) {
            (Some(prev), Some(_)) => {
                let dtype = residual.dtype();
                let absmean = |t: &Tensor| -> Result<f32> {
                    let mean = t
                        .abs()?
                        .to_dtype(DType::F32)?
                        .mean_all()?
                        .to_scalar::<f32>()?;
                    Ok(round_to(mean, dtype))
                };
                let change = round_to(absmean(&(residual - prev)?)? / absmean(prev)?, dtype);
                self.changes.push(Some(change));
                change > self.threshold
            }
            _ => {
                self.changes.push(None);
                true
            }
        };
        self.computed.push(compute);
        Ok(compute)
    }

    /// After a full evaluation: the first block's residual and what the rest added.
    pub(crate) fn store(&mut self, head_residual: Tensor, tail: (Tensor, Tensor)) {
        self.head_residual = Some(head_residual);
        self.tail_residuals = Some(tail);
    }
}

/// TaylorSeer state: a step counter and, per hooked attention module, its Taylor factors.
#[derive(Debug, Clone)]
pub struct TaylorSeerCache {
    interval: usize,
    warmup: usize,
    cooldown: Option<usize>,
    order: usize,
    factors_dtype: DType,
    /// The current evaluation's index (diffusers counts from -1 and adds 1 before each).
    step: i64,
    /// Per attention module, in the model's order: the last update's step and, per output,
    /// the factors (order 0 first).
    slots: Vec<(i64, Vec<Vec<Tensor>>)>,
    computed: Vec<bool>,
}

impl TaylorSeerCache {
    /// Starts an evaluation: whether the attention modules compute (diffusers: warm-up steps,
    /// every `interval`-th step after it, and the cool-down).
    pub(crate) fn begin(&mut self) -> bool {
        self.step += 1;
        let step = self.step;
        let warmup = step < self.warmup as i64;
        let on_interval = (step - self.warmup as i64 - 1).rem_euclid(self.interval as i64) == 0;
        let cooldown = self.cooldown.is_some_and(|c| step >= c as i64);
        let compute = warmup || on_interval || cooldown;
        self.computed.push(compute);
        compute
    }

    /// Records module `index`'s computed outputs: new factors by finite differences against
    /// the last update's (`(f_k - f_prev_k) / dt`, in the outputs' dtype), kept in the factors'
    /// dtype.
    pub(crate) fn update(&mut self, index: usize, outputs: &[Tensor]) -> candle_core::Result<()> {
        if self.slots.len() <= index {
            self.slots.resize(index + 1, (i64::MIN, Vec::new()));
        }
        let (last, previous) = &self.slots[index];
        let first = *last == i64::MIN;
        let dt = if first {
            1.0
        } else {
            (self.step - *last) as f64
        };
        let mut all = Vec::with_capacity(outputs.len());
        for (i, features) in outputs.iter().enumerate() {
            let dtype = features.dtype();
            let mut factors = vec![features.clone()];
            if !first {
                if let Some(prev) = previous.get(i) {
                    for j in 0..self.order {
                        let Some(p) = prev.get(j) else { break };
                        if p.dims() != factors[j].dims() {
                            break;
                        }
                        let diff = (&factors[j] - p.to_dtype(dtype)?)?;
                        factors.push(divide(&diff, dt)?);
                    }
                }
            }
            all.push(
                factors
                    .into_iter()
                    .map(|f| f.to_dtype(self.factors_dtype))
                    .collect::<candle_core::Result<Vec<_>>>()?,
            );
        }
        self.slots[index] = (self.step, all);
        Ok(())
    }

    /// Module `index`'s predicted outputs: `sum_k f_k * dt^k / k!`, each term in `dtype` as
    /// diffusers adds them (from zeros).
    pub(crate) fn predict(&self, index: usize, dtype: DType) -> candle_core::Result<Vec<Tensor>> {
        let (last, factors) = self.slots.get(index).ok_or_else(|| {
            candle_core::Error::Msg("TaylorSeer: a prediction before any computed step".into())
        })?;
        let offset = (self.step - last) as f64;
        factors
            .iter()
            .map(|orders| {
                let mut out = orders[0].zeros_like()?.to_dtype(dtype)?;
                let mut factorial = 1.0;
                for (k, factor) in orders.iter().enumerate() {
                    if k > 0 {
                        factorial *= k as f64;
                    }
                    let coeff = offset.powi(k as i32) / factorial;
                    out = (out + scale(&factor.to_dtype(dtype)?, coeff)?)?;
                }
                Ok(out)
            })
            .collect()
    }
}

/// `t / d` as torch divides a tensor by a Python number: in f32 for half types, then rounded.
fn divide(t: &Tensor, d: f64) -> candle_core::Result<Tensor> {
    (t.to_dtype(DType::F32)? / d)?.to_dtype(t.dtype())
}

/// `t * c` as torch multiplies a tensor by a Python number.
fn scale(t: &Tensor, c: f64) -> candle_core::Result<Tensor> {
    (t.to_dtype(DType::F32)? * c)?.to_dtype(t.dtype())
}

/// Rounds an f32 to the nearest value of `dtype` (no-op for f32): torch's scalars and
/// reductions in a half-precision dtype.
pub fn round_to(value: f32, dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(value).to_f32(),
        DType::F16 => half::f16::from_f32(value).to_f32(),
        _ => value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_with_diffusers_defaults() {
        assert_eq!(
            StepCacheConfig::parse("first-block:0.1").unwrap(),
            StepCacheConfig::FirstBlock { threshold: 0.1 }
        );
        assert_eq!(
            StepCacheConfig::parse("first-block").unwrap(),
            StepCacheConfig::FirstBlock { threshold: 0.05 }
        );
        assert_eq!(
            StepCacheConfig::parse("taylorseer").unwrap(),
            StepCacheConfig::TaylorSeer {
                interval: 5,
                warmup: 3,
                cooldown: None,
                order: 1,
                factors_dtype: DType::BF16
            }
        );
        assert_eq!(
            StepCacheConfig::parse("taylorseer:interval=3,warmup=2,order=2,dtype=f32,cooldown=9")
                .unwrap(),
            StepCacheConfig::TaylorSeer {
                interval: 3,
                warmup: 2,
                cooldown: Some(9),
                order: 2,
                factors_dtype: DType::F32
            }
        );
        for bad in [
            "first-block:x",
            "first-block:-1",
            "taylorseer:interval=0",
            "taylorseer:foo=1",
            "taylorseer:order",
            "magcache",
        ] {
            assert!(StepCacheConfig::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn taylorseer_schedule_is_diffusers() {
        // warm-up 3, interval 5: steps 0,1,2 compute, then 3+1=4, 9, 14, ...
        let StepCache::TaylorSeer(mut c) =
            StepCacheConfig::parse("taylorseer").unwrap().new_state()
        else {
            unreachable!()
        };
        let computed: Vec<usize> = (0..16).filter(|_| c.begin()).collect();
        assert_eq!(computed, [0, 1, 2, 4, 9, 14]);
    }
}
