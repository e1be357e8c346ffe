//! transformers' `CLIPTextModel` (5.23), for its pooled output.
//!
//! Written here rather than taken from candle-transformers, whose CLIP text model hard-codes
//! the layer-norm epsilon and activation, only pools at `argmax(ids)`, and reports missing
//! or misshapen weights without naming the file.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::Linear;
use serde::Deserialize;

use crate::error::{read_json, Result, TextError};
use crate::layers::{
    apply, checked_ids, linear, merge_heads, softmax_f32, split_heads, Activation, LayerNorm,
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
        let mut value: serde_json::Value = read_json(path)?;
        if let Some(text) = value.get_mut("text_config") {
            value = text.take();
        }
        let config: Self = serde_json::from_value(value).map_err(|e| TextError::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.check().map_err(|message| TextError::Config {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    fn check(&self) -> std::result::Result<(), String> {
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

/// CLIP's text transformer; [`ClipTextEncoder::pooled_output`] is what FLUX conditions on.
pub struct ClipTextEncoder {
    config: ClipTextConfig,
    activation: Activation,
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
        let eps = config.layer_norm_eps;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("{prefix}encoder.layers.{i}");
                let lin = |name: &str, dims| {
                    linear(&weights, &format!("{p}.{name}"), dims, true, dtype, device)
                };
                Ok(EncoderLayer {
                    layer_norm1: LayerNorm::load(
                        &weights,
                        &format!("{p}.layer_norm1"),
                        h,
                        eps,
                        device,
                    )?,
                    q_proj: lin("self_attn.q_proj", (h, h))?,
                    k_proj: lin("self_attn.k_proj", (h, h))?,
                    v_proj: lin("self_attn.v_proj", (h, h))?,
                    out_proj: lin("self_attn.out_proj", (h, h))?,
                    layer_norm2: LayerNorm::load(
                        &weights,
                        &format!("{p}.layer_norm2"),
                        h,
                        eps,
                        device,
                    )?,
                    fc1: lin("mlp.fc1", (h, config.intermediate_size))?,
                    fc2: lin("mlp.fc2", (config.intermediate_size, h))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::load(
            &weights,
            &format!("{prefix}final_layer_norm"),
            h,
            eps,
            device,
        )?;
        Ok(Self {
            activation: config.activation(),
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
            xs = self.layer_forward(layer, &xs, &mask)?;
        }
        self.final_layer_norm.forward(&xs)
    }

    fn layer_forward(&self, layer: &EncoderLayer, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let heads = self.config.num_attention_heads;
        let scale = ((self.config.hidden_size / heads) as f64).powf(-0.5);

        let normed = layer.layer_norm1.forward(xs)?;
        let q = split_heads(&apply(&layer.q_proj, &normed)?, heads)?;
        let k = split_heads(&apply(&layer.k_proj, &normed)?, heads)?;
        let v = split_heads(&apply(&layer.v_proj, &normed)?, heads)?;
        let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
        let scores = scores.to_dtype(DType::F32)?.broadcast_add(mask)?;
        let probs = softmax_f32(&scores, self.dtype)?;
        let attended = merge_heads(&probs.matmul(&v)?)?;
        let xs = (xs + apply(&layer.out_proj, &attended)?)?;

        let normed = layer.layer_norm2.forward(&xs)?;
        let mlp = self.activation.forward(&apply(&layer.fc1, &normed)?)?;
        Ok((&xs + apply(&layer.fc2, &mlp)?)?)
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
