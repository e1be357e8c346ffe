//! The recipe of a result, stored in its PNG metadata so that any output can be reproduced.

use serde::{Deserialize, Serialize};

/// PNG text keyword holding the recipe as JSON.
pub const RECIPE_KEY: &str = "icedit";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    /// "fill", "outpaint", "edit".
    pub task: String,
    pub prompt: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instruction: Option<String>,
    pub seed: u64,
    /// The latents file used instead of seeded noise, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latents: Option<String>,
    pub steps: usize,
    pub guidance: f32,
    pub max_sequence_length: usize,
    /// "kontext" for FLUX.1 Kontext edits (absent: FLUX.1 Fill).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<String>,
    /// True CFG's negative prompt and scale (Kontext).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub true_cfg_scale: Option<f32>,
    /// The mask file of a masked edit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
    /// The step cache (`--cache`), lossy: the result depends on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<String>,
    pub width: u32,
    pub height: u32,
    /// Outpainting margins L,T,R,B.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expand: Option<[u32; 4]>,
    pub model: String,
    /// The transformer file used instead of the model's own weights (`--transformer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transformer: Option<String>,
    /// The T5 encoder file used instead of the model's own (`--text-encoder-2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_encoder_2: Option<String>,
    /// How the transformer's weights are stored (`diffusers safetensors`, `GGUF Q4_K x27, ...`).
    #[serde(default)]
    pub weights: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adapters: Vec<AdapterUse>,
    pub dtype: String,
    pub software: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterUse {
    /// As given: manifest name, `hf:` reference or path.
    pub name: String,
    /// The file used: `owner/repo@revision/file` or a local path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub scale: f32,
    /// Experts per token, for mixture-of-experts adapters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
}

impl Recipe {
    /// PNG text chunks: the JSON recipe, plus a one-line summary for image viewers.
    pub fn png_metadata(&self) -> Vec<(&'static str, String)> {
        let json = serde_json::to_string(self).expect("a recipe always serialises");
        let summary = format!(
            "{}: {:?}, seed {}, {} steps, guidance {}, model {}",
            self.task, self.prompt, self.seed, self.steps, self.guidance, self.model
        );
        vec![
            (RECIPE_KEY, json),
            ("Description", summary),
            ("Software", self.software.clone()),
        ]
    }

    /// The recipe stored in a PNG's metadata, if any.
    pub fn from_png_metadata(chunks: &[(String, String)]) -> Option<Self> {
        chunks
            .iter()
            .find(|(k, _)| k == RECIPE_KEY)
            .and_then(|(_, v)| serde_json::from_str(v).ok())
    }
}
