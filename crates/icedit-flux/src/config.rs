//! The transformer's shape, read from a diffusers `transformer/config.json` or inferred from
//! the tensors of a BFL single-file checkpoint.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{FluxError, Result};

/// FLUX transformer hyper-parameters, with the field names and defaults of diffusers'
/// `FluxTransformer2DModel` config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FluxConfig {
    #[serde(default = "defaults::patch_size")]
    pub patch_size: usize,
    /// Packed input channels: 64 for FLUX.1-dev, 384 for FLUX.1 Fill (noise | masked image | mask).
    #[serde(default = "defaults::in_channels")]
    pub in_channels: usize,
    /// Packed output channels; `None` means the same as `in_channels` (diffusers' rule).
    #[serde(default)]
    pub out_channels: Option<usize>,
    #[serde(default = "defaults::num_layers")]
    pub num_layers: usize,
    #[serde(default = "defaults::num_single_layers")]
    pub num_single_layers: usize,
    #[serde(default = "defaults::attention_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "defaults::joint_attention_dim")]
    pub joint_attention_dim: usize,
    #[serde(default = "defaults::pooled_projection_dim")]
    pub pooled_projection_dim: usize,
    #[serde(default)]
    pub guidance_embeds: bool,
    #[serde(default = "defaults::axes_dims_rope")]
    pub axes_dims_rope: Vec<usize>,
}

mod defaults {
    pub fn patch_size() -> usize {
        1
    }
    pub fn in_channels() -> usize {
        64
    }
    pub fn num_layers() -> usize {
        19
    }
    pub fn num_single_layers() -> usize {
        38
    }
    pub fn attention_head_dim() -> usize {
        128
    }
    pub fn num_attention_heads() -> usize {
        24
    }
    pub fn joint_attention_dim() -> usize {
        4096
    }
    pub fn pooled_projection_dim() -> usize {
        768
    }
    pub fn axes_dims_rope() -> Vec<usize> {
        vec![16, 56, 56]
    }
}

/// RoPE base frequency; fixed in both BFL's and diffusers' FLUX.
pub const ROPE_THETA: f64 = 10_000.0;
/// FLUX's MLP width is always four times the hidden size.
pub const MLP_RATIO: usize = 4;

impl FluxConfig {
    /// FLUX.1-dev: 64 packed latent channels in and out.
    pub fn dev() -> Self {
        Self {
            patch_size: 1,
            in_channels: 64,
            out_channels: None,
            num_layers: 19,
            num_single_layers: 38,
            attention_head_dim: 128,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            pooled_projection_dim: 768,
            guidance_embeds: true,
            axes_dims_rope: vec![16, 56, 56],
        }
    }

    /// FLUX.1 Fill: the dev shape with 384 input channels (noise | masked image | mask) and 64 out.
    pub fn fill() -> Self {
        Self {
            in_channels: 384,
            out_channels: Some(64),
            ..Self::dev()
        }
    }

    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = crate::files::read_text_file(path, crate::files::MAX_CONFIG_BYTES).map_err(
            |source| FluxError::Io {
                path: path.to_path_buf(),
                source,
            },
        )?;
        let config: Self = serde_json::from_str(&text).map_err(|e| FluxError::Config {
            path: Some(path.to_path_buf()),
            message: e.to_string(),
        })?;
        config.validate().map_err(|e| match e {
            FluxError::Config { message, .. } => FluxError::Config {
                path: Some(path.to_path_buf()),
                message,
            },
            other => other,
        })?;
        Ok(config)
    }

    pub fn hidden_size(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn mlp_hidden_size(&self) -> usize {
        self.hidden_size() * MLP_RATIO
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Checks the invariants the model relies on, so that a bad config fails here with a reason
    /// rather than deep inside a matmul.
    pub fn validate(&self) -> Result<()> {
        let fail = |message: String| {
            Err(FluxError::Config {
                path: None,
                message,
            })
        };
        if self.patch_size != 1 {
            return fail(format!(
                "patch_size is {}, but FLUX transformers take 2x2-packed latents with patch_size 1",
                self.patch_size
            ));
        }
        use crate::files::{check_config_sizes, MAX_CONFIG_LAYERS, MAX_CONFIG_WIDTH};
        let hidden = self
            .num_attention_heads
            .checked_mul(self.attention_head_dim)
            .unwrap_or(usize::MAX);
        check_config_sizes(&[
            ("num_attention_heads", self.num_attention_heads, 1024),
            ("attention_head_dim", self.attention_head_dim, 1024),
            (
                "the hidden size (heads x head dim)",
                hidden,
                MAX_CONFIG_WIDTH / MLP_RATIO,
            ),
            ("in_channels", self.in_channels, MAX_CONFIG_WIDTH),
            ("out_channels", self.out_channels(), MAX_CONFIG_WIDTH),
            (
                "joint_attention_dim",
                self.joint_attention_dim,
                MAX_CONFIG_WIDTH,
            ),
            (
                "pooled_projection_dim",
                self.pooled_projection_dim,
                MAX_CONFIG_WIDTH,
            ),
        ])
        .or_else(fail)?;
        if self.num_layers > MAX_CONFIG_LAYERS || self.num_single_layers > MAX_CONFIG_LAYERS {
            return fail(format!(
                "{} double and {} single blocks; at most {MAX_CONFIG_LAYERS} each",
                self.num_layers, self.num_single_layers
            ));
        }
        if self.attention_head_dim % 2 != 0 {
            return fail(format!(
                "attention_head_dim {} must be even for rotary embeddings",
                self.attention_head_dim
            ));
        }
        // Checked: a hostile config's sizes could wrap around to the head size.
        let rope_sum = self
            .axes_dims_rope
            .iter()
            .try_fold(0usize, |sum, d| sum.checked_add(*d));
        if self.axes_dims_rope.len() != 3
            || rope_sum != Some(self.attention_head_dim)
            || self.axes_dims_rope.iter().any(|d| d % 2 != 0)
        {
            return fail(format!(
                "axes_dims_rope {:?} must be three even sizes summing to attention_head_dim {}",
                self.axes_dims_rope, self.attention_head_dim
            ));
        }
        if self.in_channels == 0 || self.out_channels() == 0 {
            return fail("in_channels and out_channels must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by tests/fuzz_parsers.rs: the sum of `axes_dims_rope` overflowed (a panic with
    /// overflow checks, and a wrapped sum that could pass as the head size without them).
    #[test]
    fn huge_rope_axes_are_refused() {
        for axes in [
            vec![usize::MAX, 1, 16],
            vec![usize::MAX, 17, 0],
            vec![usize::MAX - 1, 2, 16],
        ] {
            let config = FluxConfig {
                attention_head_dim: 16,
                num_attention_heads: 2,
                axes_dims_rope: axes.clone(),
                ..FluxConfig::dev()
            };
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains("axes_dims_rope"), "{axes:?}: {err}");
        }
    }
}
