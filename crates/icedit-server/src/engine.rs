//! The edit engine the server keeps loaded: one pipeline (transformer, adapters, VAE and text
//! encoders), run on its own thread, one job at a time, exactly as `icedit edit` runs an edit.

use candle_core::Tensor;
use icedit_judge::Judge;
use icedit_pipeline::edit::{adapters_template, templated_prompt, JobOptions};
use icedit_pipeline::image_io::png_bytes;
use icedit_pipeline::recipe::Recipe;
use icedit_pipeline::search::SearchOutcome;
use icedit_pipeline::search::{EarlyFilter, SearchSettings, Selection, MAX_CANDIDATES};
use icedit_pipeline::{
    EditJob, EditOutput, EditSettings, EditText, FluxPipeline, InitialNoise, PipelineError,
    PipelineKind, Progress,
};
use icedit_text::TextConditioning;
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
    /// The judge's name, when the server has one (requests may then ask for a search).
    pub judge: Option<String>,
    /// The adapters loaded, for requests that choose among them.
    pub adapters: Vec<ServedAdapter>,
    /// The template when the chosen adapters name none (`{instruction}`, or ICEdit's diptych
    /// prompt on Fill).
    pub base_template: String,
    /// Most images one request may ask for ([`MAX_SEEDS`] on a server).
    pub max_images: usize,
}

/// An adapter a server has loaded.
#[derive(Debug, Clone)]
pub struct ServedAdapter {
    /// As given on the command line (a manifest name, `hf:` reference or path).
    pub name: String,
    /// The prompt template its manifest names.
    pub template: Option<String>,
    /// Whether it can be left out of a request: applied at run time, not merged. Unknown
    /// (`None`) where the model is not loaded (a server in front of a queue).
    pub can_leave_out: Option<bool>,
}

impl EngineConfig {
    /// The prompt template of a request that names its adapters; they must be loaded, and
    /// those left out must be run-time adapters.
    pub fn template_for(&self, names: &[String]) -> Result<String, PipelineError> {
        let loaded: Vec<&str> = self.adapters.iter().map(|a| a.name.as_str()).collect();
        if let Some(unknown) = names.iter().find(|n| !loaded.contains(&n.as_str())) {
            return Err(PipelineError::Input(format!(
                "no adapter {unknown:?} on this server; it has: {}",
                if loaded.is_empty() {
                    "none".into()
                } else {
                    loaded.join(", ")
                }
            )));
        }
        if let Some(merged) = self
            .adapters
            .iter()
            .find(|a| !names.contains(&a.name) && a.can_leave_out == Some(false))
        {
            return Err(PipelineError::Input(format!(
                "the adapter {:?} is merged into this server's weights and cannot be left out \
                 (a server started with --lora-mode runtime can)",
                merged.name
            )));
        }
        let chosen: Vec<&str> = self
            .adapters
            .iter()
            .filter(|a| names.contains(&a.name))
            .filter_map(|a| a.template.as_deref())
            .collect();
        Ok(adapters_template(&chosen)?
            .map(str::to_string)
            .unwrap_or_else(|| self.base_template.clone()))
    }
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
    /// A best-of-N search: `seeds` are its candidates and the judge's winner is the one
    /// result. Needs a server started with `--judge`.
    #[serde(default)]
    pub search: Option<SearchRequest>,
    /// The adapters to use, by name, among the server's (`None`: all of them; empty: none).
    #[serde(default)]
    pub adapters: Option<Vec<String>>,
}

/// The search settings a request may choose (the judge is the server's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    /// Steps each candidate runs before the judge sees it.
    pub early_steps: usize,
    #[serde(default)]
    pub early_filter: EarlyFilter,
    #[serde(default)]
    pub selection: Selection,
}

/// A request checked and turned into the model's job; what the engine runs.
#[derive(Debug, Clone)]
pub struct PreparedEdit {
    pub request: EditRequest,
    pub job: EditJob,
    pub prompt: String,
    pub settings: EditSettings,
    pub search: Option<SearchSettings>,
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
        if self.search.is_some() && config.judge.is_none() {
            return bad("this server has no judge (--judge): it cannot run a search".into());
        }
        let most = if self.search.is_some() {
            MAX_CANDIDATES
        } else {
            config.max_images
        };
        if self.seeds.is_empty() || self.seeds.len() > most {
            return bad(format!(
                "ask for 1 to {most} {} (n or seeds), got {}",
                if self.search.is_some() {
                    "candidates"
                } else {
                    "images"
                },
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
        let search = match &self.search {
            Some(search) => {
                let search = SearchSettings {
                    seeds: self.seeds.clone(),
                    early_steps: search.early_steps,
                    filter: search.early_filter,
                    selection: search.selection,
                    batch: 1,
                };
                search.validate(&settings)?;
                Some(search)
            }
            None => None,
        };
        let template = match &self.adapters {
            Some(names) => config.template_for(names)?,
            None => config.template.clone(),
        };
        let prompt = templated_prompt(&template, &self.instruction)?;
        let job = EditJob::new(kind, &self.photo, self.mask.as_ref(), &self.options)?;
        Ok(PreparedEdit {
            request: self.clone(),
            job,
            prompt,
            settings,
            search,
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
    /// A search's winner: the candidates and the judge's calls that chose it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search: Option<SearchSummary>,
}

/// How a search chose its winner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchSummary {
    pub candidates: Vec<u64>,
    pub winner: u64,
    pub verdicts: Vec<VerdictSummary>,
    /// Transformer evaluations, all candidates included.
    pub transformer_evaluations: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerdictSummary {
    pub first_seed: u64,
    pub second_seed: u64,
    pub winner_seed: u64,
    pub at_step: usize,
    pub judge: String,
    pub answer: String,
    pub seconds: f64,
}

/// What the engine reports while it works.
#[derive(Debug, Clone)]
pub enum EngineEvent {
    /// Denoising step `step` of `total` of the `index`-th seed finished.
    Step {
        index: usize,
        seed: u64,
        step: usize,
        total: usize,
    },
    /// A search computed its `evaluations`-th denoising step (candidates and the finish).
    SearchStep { evaluations: usize },
    /// The pipeline's own progress (loading, each step, decoding), for a progress bar.
    Progress(Progress),
    /// Something the user should know (a prompt cut to the T5 length).
    Warning(String),
}

/// Why a run stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("stopped: {0}")]
    Stopped(&'static str),
}

pub struct Engine {
    pipeline: FluxPipeline,
    config: EngineConfig,
    judge: Option<Box<dyn Judge>>,
    /// A server keeps its text encoders for the next requests; one run frees them.
    keep_text_encoders: bool,
}

impl Engine {
    /// An engine over a loaded pipeline (adapters applied); its text encoders stay loaded.
    pub fn new(pipeline: FluxPipeline, config: EngineConfig) -> Self {
        Self {
            pipeline,
            config,
            judge: None,
            keep_text_encoders: true,
        }
    }

    /// An engine for one run (`icedit edit`): the text encoders are freed as soon as its
    /// prompts are encoded, before the transformer's turn.
    pub fn for_one_run(pipeline: FluxPipeline, config: EngineConfig) -> Self {
        Self {
            keep_text_encoders: false,
            ..Self::new(pipeline, config)
        }
    }

    /// The judge of requests that ask for a search (its name goes in the config).
    pub fn with_judge(mut self, judge: Box<dyn Judge>) -> Self {
        self.config.judge = Some(judge.name());
        self.judge = Some(judge);
        self
    }

    pub fn kind(&self) -> PipelineKind {
        self.pipeline.kind()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Loads the transformer and applies the adapters now (otherwise the first step does).
    pub fn load_transformer(
        &mut self,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(), EngineError> {
        Ok(self.pipeline.load_transformer(progress)?)
    }

    /// The pipeline, for what it reports after a run (adapters applied, routing).
    pub fn pipeline(&self) -> &FluxPipeline {
        &self.pipeline
    }

    /// Runs one prepared edit, seed after seed: the same images `icedit edit` makes with these
    /// settings, as PNGs with their recipes. `stop` is asked between steps (cancel, time
    /// limit).
    pub fn run(
        &mut self,
        edit: &PreparedEdit,
        events: &mut dyn FnMut(EngineEvent),
        stop: &dyn Fn() -> Option<&'static str>,
    ) -> Result<Vec<EditResult>, EngineError> {
        let config = self.config.clone();
        let mut results = Vec::new();
        self.run_each(edit, None, events, stop, &mut |produced| {
            results.push(match produced {
                Produced::Edit { seed, output } => png_result(&config, edit, seed, &output.edited)?,
                Produced::Search(outcome) => {
                    let mut result =
                        png_result(&config, edit, outcome.winner_seed, &outcome.result.edited)?;
                    result.search = Some(SearchSummary::of(outcome, edit));
                    result
                }
            });
            Ok(())
        })?;
        Ok(results)
    }

    /// Runs one prepared edit and hands over each result as soon as it is ready: every seed's
    /// edit, or a search's outcome. `latents` replace each seed's noise (`icedit edit
    /// --latents`). The one runner of `icedit edit`, the server, its workers and `batch`.
    pub fn run_each(
        &mut self,
        edit: &PreparedEdit,
        latents: Option<&Tensor>,
        events: &mut dyn FnMut(EngineEvent),
        stop: &dyn Fn() -> Option<&'static str>,
        produced: &mut dyn FnMut(Produced) -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        let encoded = self.encode(edit, events)?;
        self.run_encoded(edit, &encoded, latents, events, stop, produced)
    }

    /// The first half of [`Engine::run_each`]: the request's adapters chosen and its prompts
    /// encoded (for one run, the text encoders then freed).
    pub fn encode(
        &mut self,
        edit: &PreparedEdit,
        events: &mut dyn FnMut(EngineEvent),
    ) -> Result<EncodedPrompts, EngineError> {
        self.pipeline
            .use_adapters(edit.request.adapters.as_deref())?;
        let max_len = edit.settings.max_sequence_length;
        let negative = edit.request.negative.as_ref();
        // One run frees the text encoders once its prompts (both, with true CFG) are encoded.
        self.pipeline
            .set_keep_text_encoders(self.keep_text_encoders || negative.is_some());
        let mut progress = |p: Progress| events(EngineEvent::Progress(p));
        let prompt = self
            .pipeline
            .encode_prompt(&edit.prompt, max_len, &mut progress)?;
        for dropped in prompt.truncation_warnings() {
            events(EngineEvent::Warning(dropped));
        }
        let negative = match negative {
            Some((text, scale)) => {
                let mut progress = |p: Progress| events(EngineEvent::Progress(p));
                let encoded = self.pipeline.encode_prompt(text, max_len, &mut progress)?;
                for dropped in encoded.truncation_warnings() {
                    events(EngineEvent::Warning(format!(
                        "the negative prompt: {dropped}"
                    )));
                }
                Some((encoded, *scale))
            }
            None => None,
        };
        if !self.keep_text_encoders {
            self.pipeline.set_keep_text_encoders(false);
            self.pipeline.release_text_encoders();
        }
        Ok(EncodedPrompts { prompt, negative })
    }

    /// The second half of [`Engine::run_each`]: the denoising of every seed (or the search).
    pub fn run_encoded(
        &mut self,
        edit: &PreparedEdit,
        encoded: &EncodedPrompts,
        latents: Option<&Tensor>,
        events: &mut dyn FnMut(EngineEvent),
        stop: &dyn Fn() -> Option<&'static str>,
        produced: &mut dyn FnMut(Produced) -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        let text = EditText {
            prompt: &edit.prompt,
            encoded: &encoded.prompt,
            true_cfg: encoded.negative.as_ref().map(|(n, s)| (n, *s)),
        };
        if let Some(search) = &edit.search {
            let judge = self
                .judge
                .as_mut()
                .ok_or_else(|| PipelineError::Input("no judge is loaded for a search".into()))?;
            let mut evaluations = 0;
            let outcome = self
                .pipeline
                .edit_search_until(
                    &edit.job,
                    &text,
                    &edit.request.instruction,
                    &edit.settings,
                    search,
                    judge.as_mut(),
                    &mut |p| {
                        if let Progress::Step { .. } = p {
                            evaluations += 1;
                            events(EngineEvent::SearchStep { evaluations });
                        }
                        events(EngineEvent::Progress(p));
                    },
                    stop,
                )
                .map_err(|e| match e {
                    PipelineError::Stopped(reason) => EngineError::Stopped(reason),
                    other => other.into(),
                })?;
            return produced(Produced::Search(&outcome));
        }
        for (index, &seed) in edit.request.seeds.iter().enumerate() {
            let noise = match latents {
                Some(latents) => InitialNoise::Latents {
                    latents: latents.clone(),
                    seed,
                },
                None => InitialNoise::Seed(seed),
            };
            let mut state =
                self.pipeline
                    .start_edit(&edit.job, &text, &edit.settings, noise, &mut |p| {
                        events(EngineEvent::Progress(p))
                    })?;
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
                    events(EngineEvent::Progress(p));
                })?;
            }
            events(EngineEvent::Progress(Progress::Decoding));
            let output = self.pipeline.finish(&edit.job, &state)?;
            produced(Produced::Edit {
                seed,
                output: &output,
            })?;
        }
        Ok(())
    }
}

/// A request's prompts, encoded.
pub struct EncodedPrompts {
    pub prompt: TextConditioning,
    /// True CFG's negative prompt and scale.
    pub negative: Option<(TextConditioning, f32)>,
}

/// What [`Engine::run_each`] hands over.
pub enum Produced<'a> {
    /// One seed's edit.
    Edit { seed: u64, output: &'a EditOutput },
    /// A search's outcome: the winner's edit, the candidates and the verdicts.
    Search(&'a SearchOutcome),
}

impl SearchSummary {
    fn of(outcome: &SearchOutcome, edit: &PreparedEdit) -> Self {
        Self {
            candidates: edit.request.seeds.clone(),
            winner: outcome.winner_seed,
            verdicts: outcome
                .calls
                .iter()
                .map(|c| VerdictSummary {
                    first_seed: c.first_seed,
                    second_seed: c.second_seed,
                    winner_seed: c.winner_seed,
                    at_step: c.at_step,
                    judge: c.judge.clone(),
                    answer: c.answer.clone(),
                    seconds: c.latency.as_secs_f64(),
                })
                .collect(),
            transformer_evaluations: outcome.evaluations,
        }
    }
}

/// One image as the PNG a client gets, its recipe inside.
fn png_result(
    config: &EngineConfig,
    edit: &PreparedEdit,
    seed: u64,
    edited: &RgbImage,
) -> Result<EditResult, EngineError> {
    let recipe = Recipe {
        task: "edit".into(),
        prompt: edit.prompt.clone(),
        instruction: Some(edit.request.instruction.clone()),
        seed,
        steps: edit.settings.steps,
        guidance: edit.settings.guidance,
        max_sequence_length: edit.settings.max_sequence_length,
        negative_prompt: edit.request.negative.as_ref().map(|(n, _)| n.clone()),
        true_cfg_scale: edit.request.negative.as_ref().map(|(_, s)| *s),
        width: edited.width(),
        height: edited.height(),
        adapters: match &edit.request.adapters {
            Some(names) => (config.recipe.adapters.iter())
                .filter(|a| names.contains(&a.name))
                .cloned()
                .collect(),
            None => config.recipe.adapters.clone(),
        },
        ..config.recipe.clone()
    };
    let png = png_bytes(edited, &recipe.png_metadata())
        .map_err(|m| PipelineError::Input(format!("cannot encode the PNG: {m}")))?;
    Ok(EditResult {
        seed,
        png,
        recipe,
        search: None,
    })
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
