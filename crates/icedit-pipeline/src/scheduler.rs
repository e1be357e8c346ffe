//! Flow-matching Euler sampling with FLUX's resolution-dependent shift, as diffusers'
//! `FlowMatchEulerDiscreteScheduler` computes it for the FLUX pipelines (in f32, op for op, so
//! that the timesteps the model sees are the reference's to the last bit).

use std::path::Path;

use candle_core::{DType, Tensor};
use icedit_flux::round_to;
use serde::Deserialize;

use crate::error::{PipelineError, Result};
use icedit_flux::files::{read_text_file, MAX_CONFIG_BYTES};

/// The fields of `scheduler/scheduler_config.json` FLUX uses; defaults are FLUX.1's.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub use_dynamic_shifting: bool,
    /// Static shift, used only without dynamic shifting.
    pub shift: f64,
    pub base_image_seq_len: usize,
    pub max_image_seq_len: usize,
    pub base_shift: f64,
    pub max_shift: f64,
    /// Options of the diffusers scheduler that FLUX does not use; rejected if set.
    pub shift_terminal: Option<f64>,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub invert_sigmas: bool,
    pub stochastic_sampling: bool,
    pub time_shift_type: String,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            use_dynamic_shifting: true,
            shift: 3.0,
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
            base_shift: 0.5,
            max_shift: 1.15,
            shift_terminal: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            invert_sigmas: false,
            stochastic_sampling: false,
            time_shift_type: "exponential".to_string(),
        }
    }
}

impl SchedulerConfig {
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = read_text_file(path, MAX_CONFIG_BYTES).map_err(|source| PipelineError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let config: Self = serde_json::from_str(&text).map_err(|e| PipelineError::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.validate().map_err(|message| PipelineError::Config {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let unsupported = [
            (self.shift_terminal.is_some(), "shift_terminal"),
            (self.use_karras_sigmas, "use_karras_sigmas"),
            (self.use_exponential_sigmas, "use_exponential_sigmas"),
            (self.use_beta_sigmas, "use_beta_sigmas"),
            (self.invert_sigmas, "invert_sigmas"),
            (self.stochastic_sampling, "stochastic_sampling"),
        ];
        if let Some((_, name)) = unsupported.iter().find(|(set, _)| *set) {
            return Err(format!(
                "`{name}` is set; FLUX's Euler sampler does not use it and icedit does not support it"
            ));
        }
        if self.time_shift_type != "exponential" && self.time_shift_type != "linear" {
            return Err(format!(
                "time_shift_type must be \"exponential\" or \"linear\", got {:?}",
                self.time_shift_type
            ));
        }
        if self.num_train_timesteps == 0 || self.num_train_timesteps > 100_000 {
            return Err(format!(
                "num_train_timesteps must be between 1 and 100000, got {}",
                self.num_train_timesteps
            ));
        }
        let shifts = [self.shift, self.base_shift, self.max_shift];
        if shifts.iter().any(|v| !v.is_finite() || v.abs() > 1e3) {
            return Err(format!(
                "shift, base_shift and max_shift must be finite numbers, got {shifts:?}"
            ));
        }
        if self.max_image_seq_len == self.base_image_seq_len {
            return Err("max_image_seq_len must differ from base_image_seq_len".into());
        }
        Ok(())
    }

    /// FLUX's shift parameter for an image of `image_seq_len` packed tokens: linear between
    /// (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), not clamped.
    pub fn mu(&self, image_seq_len: usize) -> f64 {
        let m = (self.max_shift - self.base_shift)
            / (self.max_image_seq_len as f64 - self.base_image_seq_len as f64);
        let b = self.base_shift - m * self.base_image_seq_len as f64;
        image_seq_len as f64 * m + b
    }
}

/// The noise levels of one sampling run: `sigmas` has one entry per step plus the final 0.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowMatchSchedule {
    pub sigmas: Vec<f32>,
    /// `sigma * num_train_timesteps` for each step (the value diffusers calls the timestep).
    pub timesteps: Vec<f32>,
}

impl FlowMatchSchedule {
    /// The schedule the FLUX pipelines use for `steps` steps on an image of `image_seq_len`
    /// packed tokens ((H/16) * (W/16)).
    pub fn new(config: &SchedulerConfig, steps: usize, image_seq_len: usize) -> Result<Self> {
        if steps == 0 {
            return Err(PipelineError::Input(
                "the number of steps must be at least 1".into(),
            ));
        }
        // np.linspace(1, 1/N, N) in f64, then cast to f32 as diffusers does.
        let first = 1.0f64;
        let last = 1.0 / steps as f64;
        let base: Vec<f32> = (0..steps)
            .map(|i| {
                if steps == 1 {
                    first as f32
                } else {
                    let step = (last - first) / (steps - 1) as f64;
                    // numpy computes start + i*step and pins the endpoint exactly.
                    let v = if i == steps - 1 {
                        last
                    } else {
                        first + i as f64 * step
                    };
                    v as f32
                }
            })
            .collect();
        let shifted: Vec<f32> = if config.use_dynamic_shifting {
            let mu = config.mu(image_seq_len);
            base.iter()
                .map(|&t| time_shift(&config.time_shift_type, mu, t))
                .collect()
        } else {
            let shift = config.shift as f32;
            base.iter()
                .map(|&s| shift * s / (1.0 + (shift - 1.0) * s))
                .collect()
        };
        // A config's shift values (or an image far larger than the config's sequence lengths)
        // can make the shift overflow: refuse noise levels that are not in [0, 1].
        if let Some(bad) = shifted
            .iter()
            .find(|s| !(s.is_finite() && (0.0..=1.0).contains(*s)))
        {
            return Err(PipelineError::Input(format!(
                "the scheduler config gives a noise level of {bad} (it must be between 0 and 1) \
                 for {steps} steps at {image_seq_len} image tokens; check shift, base_shift, \
                 max_shift, base_image_seq_len and max_image_seq_len in scheduler_config.json"
            )));
        }
        let scale = config.num_train_timesteps as f32;
        let timesteps = shifted.iter().map(|&s| s * scale).collect();
        let mut sigmas = shifted;
        sigmas.push(0.0);
        Ok(Self { sigmas, timesteps })
    }

    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }

    /// The noise level before `step` (`steps()` gives the final 0).
    pub fn sigma(&self, step: usize) -> f32 {
        self.sigmas[step]
    }

    /// The value the transformer receives for `step`: diffusers casts the timestep to the
    /// latents' dtype and divides by 1000 in that dtype (the model multiplies back).
    pub fn model_timestep(&self, step: usize, dtype: DType) -> f32 {
        let t = round_to(self.timesteps[step], dtype);
        round_to(t / 1000.0, dtype)
    }

    /// One Euler step `x + (sigma_next - sigma) * v`, computed as diffusers does: in f32, with the
    /// product rounded to the velocity's dtype first (torch multiplies a half-precision tensor
    /// by an f32 scalar in f32 and rounds), and the result cast back to the velocity's dtype.
    pub fn step(&self, step: usize, latents: &Tensor, velocity: &Tensor) -> Result<Tensor> {
        let dt = self.sigmas[step + 1] - self.sigmas[step];
        let dtype = velocity.dtype();
        let update = (velocity.to_dtype(DType::F32)? * dt as f64)?
            .to_dtype(dtype)?
            .to_dtype(DType::F32)?;
        let next = (latents.to_dtype(DType::F32)? + update)?;
        Ok(next.to_dtype(dtype)?)
    }
}

/// diffusers' `time_shift` in numpy f32: `exp(mu) / (exp(mu) + (1/t - 1) ** 1)`, where the
/// Python float `exp(mu)` is rounded to f32 when it meets the f32 array.
fn time_shift(kind: &str, mu: f64, t: f32) -> f32 {
    let numerator = if kind == "linear" {
        mu as f32
    } else {
        mu.exp() as f32
    };
    let ratio = 1.0f32 / t - 1.0;
    numerator / (numerator + ratio)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mu_is_linear_and_unclamped() {
        let c = SchedulerConfig::default();
        assert!((c.mu(256) - 0.5).abs() < 1e-12);
        assert!((c.mu(4096) - 1.15).abs() < 1e-12);
        assert!(c.mu(8192) > 1.15);
        assert!(c.mu(16) < 0.5);
    }

    #[test]
    fn zero_steps_is_an_error() {
        assert!(FlowMatchSchedule::new(&SchedulerConfig::default(), 0, 256).is_err());
    }

    /// Found by tests/fuzz_parsers.rs: shifts that overflow gave NaN noise levels.
    #[test]
    fn schedules_outside_zero_to_one_are_refused() {
        let close = SchedulerConfig {
            base_image_seq_len: 256,
            max_image_seq_len: 257,
            max_shift: 1000.0,
            ..Default::default()
        };
        let err = FlowMatchSchedule::new(&close, 28, 4096).unwrap_err();
        assert!(err.to_string().contains("noise level"), "{err}");
        let negative = SchedulerConfig {
            use_dynamic_shifting: false,
            shift: -2.0,
            ..Default::default()
        };
        assert!(FlowMatchSchedule::new(&negative, 28, 4096).is_err());
        let linear = SchedulerConfig {
            time_shift_type: "linear".into(),
            base_shift: -5.0,
            max_shift: -5.0,
            max_image_seq_len: 4097,
            ..Default::default()
        };
        assert!(FlowMatchSchedule::new(&linear, 28, 4096).is_err());
        assert!(FlowMatchSchedule::new(&SchedulerConfig::default(), 50, 16384).is_ok());
    }

    #[test]
    fn unsupported_options_are_rejected() {
        let c = SchedulerConfig {
            use_karras_sigmas: true,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().contains("use_karras_sigmas"));
    }
}
