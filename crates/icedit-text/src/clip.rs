//! transformers' `CLIPTextModel` (5.23), for its pooled output, and `CLIPModel` (both towers with
//! their projections), for the CLIP judge.
//!
//! Written here rather than taken from candle-transformers, whose CLIP text model hard-codes
//! the layer-norm epsilon and activation, only pools at `argmax(ids)`, and reports missing
//! or misshapen weights without naming the file.

use icedit_flux::files::{
    check_config_sizes, MAX_CONFIG_LAYERS, MAX_CONFIG_VOCAB, MAX_CONFIG_WIDTH,
};
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use icedit_flux::norms::LayerNorm;
use icedit_flux::Linear;
use serde::Deserialize;

use crate::error::{read_json, Result, TextError};
use crate::layers::{
    apply, checked_ids, layer_norm, linear, merge_heads, softmax_f32, split_heads, Activation,
};
use crate::weights::ModelWeights;

const MODEL: &str = "CLIP text encoder";

/// The fields of transformers' `CLIPTextConfig` the text model uses (defaults are
/// transformers').
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    /// `2` (as in openai/clip-vit-large-patch14) selects the legacy pooling at `argmax(ids)`;
    /// any other id pools at its first occurrence.
    pub eos_token_id: u32,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            eos_token_id: 49407,
        }
    }
}

impl ClipTextConfig {
    /// Reads a `CLIPTextModel` config.json (or a full `CLIPConfig`'s `text_config`).
    pub fn from_file(path: &Path) -> Result<Self> {
        read_config(path, "text_config", Self::check)
    }

    fn check(&self) -> std::result::Result<(), String> {
        check_config_sizes(&[
            ("vocab_size", self.vocab_size, MAX_CONFIG_VOCAB),
            ("hidden_size", self.hidden_size, MAX_CONFIG_WIDTH),
            (
                "intermediate_size",
                self.intermediate_size,
                MAX_CONFIG_WIDTH,
            ),
            (
                "num_hidden_layers",
                self.num_hidden_layers,
                MAX_CONFIG_LAYERS,
            ),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 16,
            ),
        ])?;
        check_epsilon("layer_norm_eps", self.layer_norm_eps)?;
        if Activation::from_name(&self.hidden_act).is_none() {
            return Err(format!(
                "hidden_act `{}` is not supported (quick_gelu, gelu, gelu_new, relu, silu are)",
                self.hidden_act
            ));
        }
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        Ok(())
    }

    fn activation(&self) -> Activation {
        Activation::from_name(&self.hidden_act).expect("checked when the config was read")
    }
}

/// One pre-norm encoder layer; the text and the vision tower are stacks of the same layer.
struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// What an encoder layer's computation depends on besides its weights.
#[derive(Debug, Clone, Copy)]
struct LayerShape {
    hidden: usize,
    intermediate: usize,
    heads: usize,
    eps: f64,
    activation: Activation,
    dtype: DType,
}

impl EncoderLayer {
    fn load(
        weights: &ModelWeights,
        prefix: &str,
        shape: &LayerShape,
        device: &Device,
    ) -> Result<Self> {
        let (h, eps, dtype) = (shape.hidden, shape.eps, shape.dtype);
        let lin = |name: &str, dims| {
            linear(
                weights,
                &format!("{prefix}.{name}"),
                dims,
                true,
                dtype,
                device,
            )
        };
        let norm = |name: &str| layer_norm(weights, &format!("{prefix}.{name}"), h, eps, device);
        Ok(Self {
            layer_norm1: norm("layer_norm1")?,
            q_proj: lin("self_attn.q_proj", (h, h))?,
            k_proj: lin("self_attn.k_proj", (h, h))?,
            v_proj: lin("self_attn.v_proj", (h, h))?,
            out_proj: lin("self_attn.out_proj", (h, h))?,
            layer_norm2: norm("layer_norm2")?,
            fc1: lin("mlp.fc1", (h, shape.intermediate))?,
            fc2: lin("mlp.fc2", (shape.intermediate, h))?,
        })
    }

    /// `mask` is added to the attention scores (the text tower's causal mask).
    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>, shape: &LayerShape) -> Result<Tensor> {
        let heads = shape.heads;
        let scale = ((shape.hidden / heads) as f64).powf(-0.5);

        let normed = self.layer_norm1.forward(xs)?;
        let q = split_heads(&apply(&self.q_proj, &normed)?, heads)?;
        let k = split_heads(&apply(&self.k_proj, &normed)?, heads)?;
        let v = split_heads(&apply(&self.v_proj, &normed)?, heads)?;
        let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?.to_dtype(DType::F32)?;
        let scores = match mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        let probs = softmax_f32(&scores, shape.dtype)?;
        let attended = merge_heads(&probs.matmul(&v)?)?;
        let xs = (xs + apply(&self.out_proj, &attended)?)?;

        let normed = self.layer_norm2.forward(&xs)?;
        let mlp = shape.activation.forward(&apply(&self.fc1, &normed)?)?;
        Ok((&xs + apply(&self.fc2, &mlp)?)?)
    }
}

/// CLIP's text transformer; [`ClipTextEncoder::pooled_output`] is what FLUX conditions on.
pub struct ClipTextEncoder {
    config: ClipTextConfig,
    shape: LayerShape,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    dtype: DType,
}

impl ClipTextEncoder {
    /// Loads a transformers `CLIPTextModel` folder (diffusers' `text_encoder/`): weights stored
    /// in any float dtype are converted to `dtype`. Accepts tensor names with or without the
    /// `text_model.` prefix (older and newer transformers save either).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let (config_path, weights) = ModelWeights::open(dir, MODEL)?;
        let config = ClipTextConfig::from_file(&config_path)?;
        let prefix = if weights.contains("text_model.embeddings.token_embedding.weight") {
            "text_model."
        } else {
            ""
        };
        let h = config.hidden_size;
        let token_embedding = weights.tensor(
            &format!("{prefix}embeddings.token_embedding.weight"),
            &[config.vocab_size, h],
            dtype,
            device,
        )?;
        let position_embedding = weights.tensor(
            &format!("{prefix}embeddings.position_embedding.weight"),
            &[config.max_position_embeddings, h],
            dtype,
            device,
        )?;
        let shape = LayerShape {
            hidden: h,
            intermediate: config.intermediate_size,
            heads: config.num_attention_heads,
            eps: config.layer_norm_eps,
            activation: config.activation(),
            dtype,
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                EncoderLayer::load(
                    &weights,
                    &format!("{prefix}encoder.layers.{i}"),
                    &shape,
                    device,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = layer_norm(
            &weights,
            &format!("{prefix}final_layer_norm"),
            h,
            shape.eps,
            device,
        )?;
        Ok(Self {
            shape,
            config,
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            dtype,
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        self.token_embedding.device()
    }

    /// Token ids `[batch, seq]` (seq <= max_position_embeddings) -> pooled output
    /// `[batch, hidden]`: the final hidden state at each sequence's end token.
    pub fn pooled_output(&self, input_ids: &Tensor) -> Result<Tensor> {
        let rows = checked_ids(input_ids, self.config.vocab_size)?;
        let hidden = self.last_hidden_state(input_ids)?;
        let pooled = rows
            .iter()
            .enumerate()
            .map(|(b, ids)| Ok(hidden.i((b, self.pool_index(ids)))?.unsqueeze(0)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&pooled, 0)?)
    }

    /// Token ids `[batch, seq]` -> final-layer-normed hidden states `[batch, seq, hidden]`.
    pub fn last_hidden_state(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (batch, seq) = input_ids.dims2()?;
        if seq == 0 || seq > self.config.max_position_embeddings {
            return Err(TextError::Input(format!(
                "CLIP takes 1 to {} tokens, got {seq}",
                self.config.max_position_embeddings
            )));
        }
        checked_ids(input_ids, self.config.vocab_size)?;
        let device = self.device();
        let ids = input_ids
            .to_dtype(DType::U32)?
            .to_device(device)?
            .flatten_all()?;
        let tokens = self.token_embedding.index_select(&ids, 0)?.reshape((
            batch,
            seq,
            self.config.hidden_size,
        ))?;
        let positions = self.position_embedding.narrow(0, 0, seq)?;
        let mut xs = tokens.broadcast_add(&positions)?;

        // Causal mask, added to the scores in f32: position i sees positions <= i.
        let mask: Vec<f32> = (0..seq)
            .flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (1, 1, seq, seq), device)?;

        for layer in &self.layers {
            xs = layer.forward(&xs, Some(&mask), &self.shape)?;
        }
        Ok(self.final_layer_norm.forward(&xs)?)
    }

    /// Where transformers' `CLIPTextModel` reads the pooled output from.
    fn pool_index(&self, ids: &[u32]) -> usize {
        if self.config.eos_token_id == 2 {
            // Legacy configs: the end token has the largest id; torch's argmax takes the first.
            let max = ids.iter().copied().max().unwrap_or(0);
            ids.iter().position(|&id| id == max).unwrap_or(0)
        } else {
            // First end token (padding may repeat it); argmax of all-false is 0.
            ids.iter()
                .position(|&id| id == self.config.eos_token_id)
                .unwrap_or(0)
        }
    }
}

/// The fields of transformers' `CLIPVisionConfig` the vision tower uses (defaults are
/// transformers').
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

impl ClipVisionConfig {
    /// Reads a `CLIPVisionModel` config.json (or a full `CLIPConfig`'s `vision_config`).
    pub fn from_file(path: &Path) -> Result<Self> {
        read_config(path, "vision_config", Self::check)
    }

    fn check(&self) -> std::result::Result<(), String> {
        check_config_sizes(&[
            ("hidden_size", self.hidden_size, MAX_CONFIG_WIDTH),
            (
                "intermediate_size",
                self.intermediate_size,
                MAX_CONFIG_WIDTH,
            ),
            (
                "num_hidden_layers",
                self.num_hidden_layers,
                MAX_CONFIG_LAYERS,
            ),
            ("image_size", self.image_size, 1 << 14),
            ("patch_size", self.patch_size, 1 << 10),
            ("num_channels", self.num_channels, 16),
        ])?;
        check_epsilon("layer_norm_eps", self.layer_norm_eps)?;
        if Activation::from_name(&self.hidden_act).is_none() {
            Err(format!("hidden_act `{}` is not supported", self.hidden_act))
        } else if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0
        {
            Err("hidden_size is not a multiple of num_attention_heads".into())
        } else if self.patch_size == 0 || self.image_size % self.patch_size != 0 {
            Err("image_size is not a multiple of patch_size".into())
        } else {
            Ok(())
        }
    }
}

/// A normalisation epsilon must be a small positive number.
pub(crate) fn check_epsilon(name: &str, eps: f64) -> std::result::Result<(), String> {
    if eps.is_finite() && eps > 0.0 && eps < 1.0 {
        Ok(())
    } else {
        Err(format!(
            "{name} is {eps}; it must be a small positive number (e.g. 1e-5)"
        ))
    }
}

/// Reads a tower's config from config.json: the whole file, or its `section` in a full
/// `CLIPConfig`; `check` says what this crate cannot run.
fn read_config<T: serde::de::DeserializeOwned>(
    path: &Path,
    section: &str,
    check: fn(&T) -> std::result::Result<(), String>,
) -> Result<T> {
    let mut value: serde_json::Value = read_json(path)?;
    if let Some(tower) = value.get_mut(section) {
        value = tower.take();
    }
    let invalid = |message: String| TextError::Config {
        path: path.to_path_buf(),
        message,
    };
    let config: T = serde_json::from_value(value).map_err(|e| invalid(e.to_string()))?;
    check(&config).map_err(invalid)?;
    Ok(config)
}

/// CLIP's vision transformer (`CLIPVisionTransformer`): patches plus a class token, the shared
/// encoder layers, and the class token's final state as the pooled output.
pub struct ClipVisionEncoder {
    config: ClipVisionConfig,
    shape: LayerShape,
    /// `[hidden, channels, patch, patch]`, a convolution with stride `patch` and no bias.
    patch_embedding: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layernorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
}

impl ClipVisionEncoder {
    fn from_weights(
        weights: &ModelWeights,
        config: ClipVisionConfig,
        prefix: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let h = config.hidden_size;
        let p = config.patch_size;
        let positions = (config.image_size / p).pow(2) + 1;
        let shape = LayerShape {
            hidden: h,
            intermediate: config.intermediate_size,
            heads: config.num_attention_heads,
            eps: config.layer_norm_eps,
            activation: Activation::from_name(&config.hidden_act)
                .expect("checked when the config was read"),
            dtype,
        };
        let read = |name: &str, dims: &[usize]| {
            weights.tensor(&format!("{prefix}{name}"), dims, dtype, device)
        };
        let norm =
            |name: &str| layer_norm(weights, &format!("{prefix}{name}"), h, shape.eps, device);
        Ok(Self {
            patch_embedding: read(
                "embeddings.patch_embedding.weight",
                &[h, config.num_channels, p, p],
            )?,
            class_embedding: read("embeddings.class_embedding", &[h])?,
            position_embedding: read("embeddings.position_embedding.weight", &[positions, h])?,
            // Sic: transformers' name.
            pre_layernorm: norm("pre_layrnorm")?,
            layers: (0..config.num_hidden_layers)
                .map(|i| {
                    EncoderLayer::load(
                        weights,
                        &format!("{prefix}encoder.layers.{i}"),
                        &shape,
                        device,
                    )
                })
                .collect::<Result<Vec<_>>>()?,
            post_layernorm: norm("post_layernorm")?,
            config,
            shape,
        })
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// `pixel_values` `[batch, channels, image_size, image_size]` -> pooled output
    /// `[batch, hidden]`.
    pub fn pooled_output(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let (batch, channels, height, width) = pixel_values.dims4()?;
        if channels != c.num_channels || height != c.image_size || width != c.image_size {
            return Err(TextError::Input(format!(
                "CLIP's vision tower takes [batch, {}, {size}, {size}] pixels, got {:?}",
                c.num_channels,
                pixel_values.dims(),
                size = c.image_size
            )));
        }
        let pixels = pixel_values
            .to_device(self.patch_embedding.device())?
            .to_dtype(self.shape.dtype)?;
        let patches = pixels
            .conv2d(&self.patch_embedding, 0, c.patch_size, 1, 1)?
            .flatten_from(2)?
            .transpose(1, 2)?; // [b, patches, hidden]
        let class = self
            .class_embedding
            .reshape((1, 1, c.hidden_size))?
            .broadcast_as((batch, 1, c.hidden_size))?;
        let xs = Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        let mut xs = self.pre_layernorm.forward(&xs)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, None, &self.shape)?;
        }
        Ok(self.post_layernorm.forward(&xs.i((.., 0))?)?)
    }
}

/// transformers' `CLIPModel`: both towers and the projections into their shared space.
pub struct ClipModel {
    pub text: ClipTextEncoder,
    pub vision: ClipVisionEncoder,
    text_projection: Linear,
    visual_projection: Linear,
}

#[derive(Deserialize)]
struct ProjectionConfig {
    #[serde(default = "default_projection_dim")]
    projection_dim: usize,
}

fn default_projection_dim() -> usize {
    512
}

impl ClipModel {
    /// Loads a `CLIPModel` folder (config.json with `text_config` and `vision_config`, and its
    /// weights), e.g. openai/clip-vit-large-patch14.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let text = ClipTextEncoder::load(dir, dtype, device)?;
        let (config_path, weights) = ModelWeights::open(dir, "CLIP model")?;
        let vision_config = ClipVisionConfig::from_file(&config_path)?;
        let projection: ProjectionConfig = read_json(&config_path)?;
        let vision = ClipVisionEncoder::from_weights(
            &weights,
            vision_config,
            "vision_model.",
            dtype,
            device,
        )?;
        let dim = projection.projection_dim;
        let text_projection = linear(
            &weights,
            "text_projection",
            (text.config().hidden_size, dim),
            false,
            dtype,
            device,
        )?;
        let visual_projection = linear(
            &weights,
            "visual_projection",
            (vision.config().hidden_size, dim),
            false,
            dtype,
            device,
        )?;
        Ok(Self {
            text,
            vision,
            text_projection,
            visual_projection,
        })
    }

    /// `get_text_features`: pooled text output, projected (not normalised) `[batch, dim]`.
    pub fn text_features(&self, input_ids: &Tensor) -> Result<Tensor> {
        apply(&self.text_projection, &self.text.pooled_output(input_ids)?)
    }

    /// `get_image_features`: pooled image output, projected (not normalised) `[batch, dim]`.
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        apply(
            &self.visual_projection,
            &self.vision.pooled_output(pixel_values)?,
        )
    }
}
