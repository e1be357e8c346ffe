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

/// One edit request, as the server's entry points build it.
#[derive(Debug, Clone)]
pub struct EditRequest {
    pub photo: RgbImage,
    pub mask: Option<GrayImage>,
    pub instruction: String,
    pub seeds: Vec<u64>,
    pub steps: Option<usize>,
    pub guidance: Option<f32>,
    pub options: JobOptions,
    /// Kontext's true CFG: the negative prompt and its scale.
    pub negative: Option<(String, f32)>,
}

/// A request checked and turned into the model's job; what the engine runs.
#[derive(Debug, Clone)]
pub struct PreparedEdit {
    pub job: EditJob,
    pub prompt: String,
    pub instruction: String,
    pub settings: EditSettings,
    pub seeds: Vec<u64>,
    pub negative: Option<(String, f32)>,
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
            job,
            prompt,
            instruction: self.instruction.clone(),
            settings,
            seeds: self.seeds.clone(),
            negative: self.negative.clone(),
        })
    }
}

/// One finished image.
#[derive(Debug, Clone)]
pub struct EditResult {
    pub seed: u64,
    /// The PNG, its recipe in the metadata.
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
        let negative = match &edit.negative {
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
        let mut results = Vec::with_capacity(edit.seeds.len());
        for (index, &seed) in edit.seeds.iter().enumerate() {
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
                instruction: Some(edit.instruction.clone()),
                seed,
                steps: edit.settings.steps,
                guidance: edit.settings.guidance,
                max_sequence_length: max_len,
                negative_prompt: edit.negative.as_ref().map(|(n, _)| n.clone()),
                true_cfg_scale: edit.negative.as_ref().map(|(_, s)| *s),
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
