//! The edit engine the server keeps loaded: one pipeline (transformer, adapters, VAE and text
//! encoders), run on its own thread, one job at a time, exactly as `icedit edit` runs an edit.

use icedit_pipeline::edit::{templated_prompt, JobOptions};
use icedit_pipeline::image_io::png_bytes;
use icedit_pipeline::recipe::Recipe;
use icedit_pipeline::{
    EditJob, EditSettings, EditText, FluxPipeline, InitialNoise, PipelineError, PipelineKind,
    Progress,
};
use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};

/// What every job of this server shares: the prompt template of its adapters and the recipe's
/// fixed fields (model, weights, adapters, dtype).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The template `{instruction}` goes into (ICEdit's diptych prompt, or `{instruction}`).
    pub template: String,
    /// The recipe's fixed fields; prompt, seed, steps and size are set per result.
    pub recipe: Recipe,
    pub max_sequence_length: usize,
}

/// One edit request, as the server's entry points build it. Serialized (the images as base64
/// PNG) it is what travels on a queue to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EditRequest {
    #[serde(with = "png_b64")]
    pub photo: RgbImage,
    /// White edits (whatever convention the request came in).
    #[serde(with = "mask_png_b64", default)]
    pub mask: Option<GrayImage>,
    pub instruction: String,
    pub seeds: Vec<u64>,
    pub steps: Option<usize>,
    pub guidance: Option<f32>,
    #[serde(default)]
    pub options: JobOptions,
    /// Kontext's true CFG: the negative prompt and its scale.
    #[serde(default)]
    pub negative: Option<(String, f32)>,
}

/// A request checked and turned into the model's job; what the engine runs.
#[derive(Debug, Clone)]
pub struct PreparedEdit {
    pub request: EditRequest,
    pub job: EditJob,
    pub prompt: String,
    pub settings: EditSettings,
}

/// Most seeds one request may ask for (`n`).
pub const MAX_SEEDS: usize = 10;

impl EditRequest {
    /// Validates the request for a model of `kind` and builds its job: everything the engine
    /// would refuse is refused here, before the request is queued.
    pub fn prepare(
        &self,
        kind: PipelineKind,
        config: &EngineConfig,
    ) -> Result<PreparedEdit, PipelineError> {
        let bad = |m: String| Err(PipelineError::Input(m));
        if self.seeds.is_empty() || self.seeds.len() > MAX_SEEDS {
            return bad(format!(
                "ask for 1 to {MAX_SEEDS} images (n), got {}",
                self.seeds.len()
            ));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(seed) = self.seeds.iter().find(|s| !seen.insert(**s)) {
            return bad(format!("seed {seed} is listed twice"));
        }
        if let Some((negative, scale)) = &self.negative {
            if kind != PipelineKind::Kontext {
                return bad("a negative prompt (true CFG) is for Kontext models".into());
            }
            if negative.trim().is_empty() || !scale.is_finite() || *scale <= 1.0 {
                return bad("true CFG takes a negative prompt and a scale above 1".into());
            }
        }
        let defaults = EditSettings::for_kind(kind);
        let settings = EditSettings {
            steps: self.steps.unwrap_or(defaults.steps),
            guidance: self.guidance.unwrap_or(defaults.guidance),
            max_sequence_length: config.max_sequence_length,
        };
        settings.validate()?;
        let prompt = templated_prompt(&config.template, &self.instruction)?;
        let job = EditJob::new(kind, &self.photo, self.mask.as_ref(), &self.options)?;
        Ok(PreparedEdit {
            request: self.clone(),
            job,
            prompt,
            settings,
        })
    }
}

/// One finished image; in JSON (the job API, a queue's results) the PNG is base64 `png_b64`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EditResult {
    pub seed: u64,
    /// The PNG, its recipe in the metadata.
    #[serde(rename = "png_b64", with = "bytes_b64")]
    pub png: Vec<u8>,
    pub recipe: Recipe,
}

/// What the engine reports while it works.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// Denoising step `step` of `total` of the `index`-th seed finished.
    Step {
        index: usize,
        seed: u64,
        step: usize,
        total: usize,
    },
}

/// Why a run stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Pipeline(#[from] PipelineError),
    #[error("stopped: {0}")]
    Stopped(&'static str),
}

pub struct Engine {
    pipeline: FluxPipeline,
    config: EngineConfig,
}

impl Engine {
    /// An engine over a loaded pipeline (adapters applied); its text encoders stay loaded.
    pub fn new(pipeline: FluxPipeline, config: EngineConfig) -> Self {
        Self {
            pipeline: pipeline.keep_text_encoders(true),
            config,
        }
    }

    pub fn kind(&self) -> PipelineKind {
        self.pipeline.kind()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Runs one prepared edit, seed after seed: the same images `icedit edit` makes with these
    /// settings. `stop` is asked between steps (cancel, time limit).
    pub fn run(
        &mut self,
        edit: &PreparedEdit,
        events: &mut dyn FnMut(EngineEvent),
        stop: &dyn Fn() -> Option<&'static str>,
    ) -> Result<Vec<EditResult>, EngineError> {
        let max_len = edit.settings.max_sequence_length;
        let encoded = self
            .pipeline
            .encode_prompt(&edit.prompt, max_len, &mut |_| {})?;
        let negative = match &edit.request.negative {
            Some((text, scale)) => Some((
                self.pipeline.encode_prompt(text, max_len, &mut |_| {})?,
                *scale,
            )),
            None => None,
        };
        let text = EditText {
            prompt: &edit.prompt,
            encoded: &encoded,
            true_cfg: negative.as_ref().map(|(n, s)| (n, *s)),
        };
        let mut results = Vec::with_capacity(edit.request.seeds.len());
        for (index, &seed) in edit.request.seeds.iter().enumerate() {
            let mut state = self.pipeline.start_edit(
                &edit.job,
                &text,
                &edit.settings,
                InitialNoise::Seed(seed),
                &mut |_| {},
            )?;
            let total = state.total_steps();
            while !state.is_done() {
                if let Some(reason) = stop() {
                    return Err(EngineError::Stopped(reason));
                }
                let until = state.step() + 1;
                self.pipeline.advance(&mut state, until, &mut |p| {
                    if let Progress::Step { done, .. } = p {
                        events(EngineEvent::Step {
                            index,
                            seed,
                            step: done,
                            total,
                        });
                    }
                })?;
            }
            let output = self.pipeline.finish(&edit.job, &state)?;
            let recipe = Recipe {
                task: "edit".into(),
                prompt: edit.prompt.clone(),
                instruction: Some(edit.request.instruction.clone()),
                seed,
                steps: edit.settings.steps,
                guidance: edit.settings.guidance,
                max_sequence_length: max_len,
                negative_prompt: edit.request.negative.as_ref().map(|(n, _)| n.clone()),
                true_cfg_scale: edit.request.negative.as_ref().map(|(_, s)| *s),
                width: output.edited.width(),
                height: output.edited.height(),
                ..self.config.recipe.clone()
            };
            let png = png_bytes(&output.edited, &recipe.png_metadata())
                .map_err(|m| PipelineError::Input(format!("cannot encode the PNG: {m}")))?;
            results.push(EditResult { seed, png, recipe });
        }
        Ok(results)
    }
}

/// An RGB image as base64 PNG in JSON: lossless, so a worker edits exactly the uploaded pixels.
mod png_b64 {
    use base64::Engine as _;
    use icedit_pipeline::image_io::{decode_rgb, png_bytes};
    use image::RgbImage;
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(image: &RgbImage, s: S) -> Result<S::Ok, S::Error> {
        let png = png_bytes(image, &[]).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(png))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<RgbImage, D::Error> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(String::deserialize(d)?)
            .map_err(D::Error::custom)?;
        Ok(decode_rgb(&bytes, "the request's photo")
            .map_err(D::Error::custom)?
            .rgb)
    }
}

mod mask_png_b64 {
    use base64::Engine as _;
    use icedit_pipeline::image_io::decode_mask;
    use image::GrayImage;
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(mask: &Option<GrayImage>, s: S) -> Result<S::Ok, S::Error> {
        let Some(mask) = mask else {
            return s.serialize_none();
        };
        let mut png = Vec::new();
        mask.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .map_err(serde::ser::Error::custom)?;
        s.serialize_some(&base64::engine::general_purpose::STANDARD.encode(png))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<GrayImage>, D::Error> {
        let Some(text) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(D::Error::custom)?;
        Ok(Some(
            decode_mask(&bytes, "the request's mask").map_err(D::Error::custom)?,
        ))
    }
}

mod bytes_b64 {
    use base64::Engine as _;
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        base64::engine::general_purpose::STANDARD
            .decode(String::deserialize(d)?)
            .map_err(D::Error::custom)
    }
}
