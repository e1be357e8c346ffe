//! FLUX.1 Fill: image + mask + prompt -> image, computing what diffusers' `FluxFillPipeline`
//! computes (same noise for the same seed, same latents layout, same schedule).
//!
//! Components load when first needed. The text encoders (T5-XXL alone is 9 GB in bf16) are
//! dropped as soon as the prompt is encoded, before the transformer loads, unless the caller
//! keeps them for serving several prompts.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use icedit_adapters::{apply_adapters, AdapterChoice, AppliedAdapter, ApplyMode};
use icedit_flux::{AutoencoderKl, Checkpoint, FluxConfig, FluxInput, FluxTransformer, Posterior};
use icedit_hub::ModelRepo;
use icedit_text::{TextConditioning, TextEncoders};
use image::{GrayImage, RgbImage};

use crate::error::{PipelineError, Result};
use crate::image_io::binarize;
use crate::latents::{
    image_ids, pack, pack_mask, pixels_to_tensor, tensor_to_pixels, text_ids, unpack,
    PIXELS_PER_TOKEN, VAE_SCALE,
};
use crate::scheduler::{FlowMatchSchedule, SchedulerConfig};
use crate::torch_rng::TorchGenerator;

/// Latent channels of the FLUX VAE.
pub const LATENT_CHANNELS: usize = 16;

/// Where the initial noise comes from.
#[derive(Debug, Clone)]
pub enum InitialNoise {
    /// Drawn from torch's CPU generator seeded with this value, as diffusers does with
    /// `generator=torch.Generator("cpu").manual_seed(seed)`.
    Seed(u64),
    /// Given `[1, 16, H/8, W/8]` latents (diffusers' `latents=` argument, unpacked); the seed
    /// still drives the VAE posterior sample of the masked image.
    Latents { latents: Tensor, seed: u64 },
}

impl InitialNoise {
    fn seed(&self) -> u64 {
        match self {
            Self::Seed(seed) | Self::Latents { seed, .. } => *seed,
        }
    }
}

/// One inpainting job. Image and mask must have the same size, a multiple of 16 (see
/// [`crate::canvas::fit_to_grid`]); mask pixels >= 128 are regenerated.
pub struct FillRequest<'a> {
    pub image: &'a RgbImage,
    pub mask: &'a GrayImage,
    pub prompt: &'a str,
    pub steps: usize,
    pub guidance: f32,
    pub noise: InitialNoise,
    /// T5 tokens (the prompt is padded to this length; diffusers' default is 512).
    pub max_sequence_length: usize,
}

/// What the pipeline reports while it works.
#[derive(Debug, Clone)]
pub enum Progress {
    Loading(&'static str),
    /// A denoising step finished (1-based).
    Step {
        done: usize,
        total: usize,
    },
    Decoding,
}

/// The result: the image and the facts a recipe records.
pub struct FillOutput {
    pub image: RgbImage,
    /// Prompt parts dropped by the tokenizers' length limits, for a warning.
    pub truncation: Vec<String>,
}

/// A FLUX.1 Fill pipeline over a model repo (Hub or local folder in diffusers layout).
pub struct FillPipeline {
    repo: ModelRepo,
    dtype: DType,
    device: Device,
    scheduler: SchedulerConfig,
    keep_text_encoders: bool,
    text: Option<TextEncoders>,
    transformer: Option<FluxTransformer>,
    /// A transformer file used instead of the pipeline's own weights (`--transformer`).
    transformer_file: Option<PathBuf>,
    /// A T5 encoder file used instead of `text_encoder_2/`'s weights (`--text-encoder-2`).
    text_encoder_2_file: Option<PathBuf>,
    vae: Option<AutoencoderKl>,
    /// Adapters to apply when the transformer loads, and what applying them did.
    pending_adapters: Vec<AdapterChoice>,
    adapter_mode: ApplyMode,
    applied_adapters: Vec<AppliedAdapter>,
    /// The VAE posterior of the last masked image, by a hash of image and mask: seeds of one
    /// edit (and the candidates of a seed search) share it; only its sample differs.
    posterior_cache: Option<(u64, Posterior)>,
}

impl FillPipeline {
    /// Opens the pipeline; weights load on first use. Reads the scheduler config now, so a
    /// repo that is not a FLUX pipeline fails early.
    pub fn new(repo: ModelRepo, dtype: DType, device: Device) -> Result<Self> {
        icedit_flux::check_model_dtype(dtype)?;
        check_pipeline_class(&repo)?;
        let scheduler =
            SchedulerConfig::from_json_file(&repo.file("scheduler/scheduler_config.json")?)?;
        Ok(Self {
            repo,
            dtype,
            device,
            scheduler,
            keep_text_encoders: false,
            text: None,
            transformer: None,
            transformer_file: None,
            text_encoder_2_file: None,
            vae: None,
            pending_adapters: Vec::new(),
            adapter_mode: ApplyMode::Merge,
            applied_adapters: Vec::new(),
            posterior_cache: None,
        })
    }

    /// Keeps the text encoders loaded between prompts (for a server); by default they are
    /// released right after encoding.
    pub fn keep_text_encoders(mut self, keep: bool) -> Self {
        self.keep_text_encoders = keep;
        self
    }

    /// Loads the transformer from `file` (a GGUF or a single `.safetensors`, in BFL or diffusers
    /// naming) instead of the pipeline's `transformer/` weights, which are then never fetched.
    /// The pipeline's `transformer/config.json` is used when it has one (a GGUF user's download
    /// often holds only that), else the config is read off the file.
    pub fn set_transformer_file(&mut self, file: PathBuf) {
        self.transformer_file = Some(file);
        self.transformer = None;
    }

    /// Loads the T5 encoder's weights from `file` (a GGUF in llama.cpp's naming, or a
    /// `.safetensors` in transformers'), with the pipeline's `text_encoder_2/config.json`;
    /// `text_encoder_2/`'s own weights are then never fetched.
    pub fn set_text_encoder_2_file(&mut self, file: PathBuf) {
        self.text_encoder_2_file = Some(file);
        self.text = None;
    }

    /// Adapters (LoRA, MoE-LoRA) for the transformer, applied in order when it loads. Must be
    /// set before the first denoising run.
    pub fn set_adapters(&mut self, adapters: Vec<AdapterChoice>, mode: ApplyMode) -> Result<()> {
        if self.transformer.is_some() {
            return Err(PipelineError::Input(
                "adapters must be set before the transformer loads".into(),
            ));
        }
        self.pending_adapters = adapters;
        self.adapter_mode = mode;
        Ok(())
    }

    /// What applying the adapters did (empty until the transformer has loaded).
    pub fn applied_adapters(&self) -> &[AppliedAdapter] {
        &self.applied_adapters
    }

    /// Loads the transformer and applies the adapters now (otherwise this happens at the first
    /// denoising step), so that adapter errors show before any other work.
    pub fn load_transformer(&mut self, progress: &mut dyn FnMut(Progress)) -> Result<()> {
        self.transformer(progress).map(|_| ())
    }

    pub fn repo(&self) -> &ModelRepo {
        &self.repo
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Fetches every file the pipeline needs (downloading what is missing, or one error naming
    /// all files that are unavailable), without loading anything.
    pub fn fetch_all(&self) -> Result<()> {
        fetch_text_files(&self.repo, self.text_encoder_2_file.is_some())?;
        if self.transformer_file.is_none() {
            self.repo
                .safetensors_set("transformer", "diffusion_pytorch_model")?;
            self.repo.file("transformer/config.json")?;
        }
        self.repo.file("vae/config.json")?;
        self.repo
            .safetensors_set("vae", "diffusion_pytorch_model")?;
        Ok(())
    }

    /// T5 states and CLIP pooled output for a prompt.
    pub fn encode_prompt(
        &mut self,
        prompt: &str,
        max_sequence_length: usize,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<TextConditioning> {
        if prompt.trim().is_empty() {
            return Err(PipelineError::Input(
                "the prompt is empty; describe what the masked area should show".into(),
            ));
        }
        if self.text.is_none() {
            progress(Progress::Loading("text encoders"));
            let root = fetch_text_files(&self.repo, self.text_encoder_2_file.is_some())?;
            self.text = Some(TextEncoders::load(
                &root,
                self.text_encoder_2_file.as_deref(),
                self.dtype,
                &self.device,
            )?);
        }
        let encoders = self.text.as_ref().expect("loaded above");
        let conditioning = encoders.encode(prompt, max_sequence_length)?;
        if !self.keep_text_encoders {
            self.text = None;
        }
        Ok(conditioning)
    }

    fn transformer(&mut self, progress: &mut dyn FnMut(Progress)) -> Result<&FluxTransformer> {
        if self.transformer.is_none() {
            progress(Progress::Loading("transformer"));
            let checkpoint = match &self.transformer_file {
                Some(file) => match self.repo.exists("transformer/config.json")? {
                    true => {
                        let config = self.repo.file("transformer/config.json")?;
                        Checkpoint::open_with_config(file, FluxConfig::from_json_file(&config)?)?
                    }
                    false => Checkpoint::open(file)?,
                },
                None => {
                    // The folder (local, or the Hub cache's snapshot) holds config, index and
                    // shards.
                    let config = self.repo.file("transformer/config.json")?;
                    self.repo
                        .safetensors_set("transformer", "diffusion_pytorch_model")?;
                    Checkpoint::open(folder_of(&config))?
                }
            };
            let mut transformer = FluxTransformer::load(&checkpoint, self.dtype, &self.device)?;
            drop(checkpoint);
            let adapters = std::mem::take(&mut self.pending_adapters);
            if !adapters.is_empty() {
                progress(Progress::Loading("adapters"));
                self.applied_adapters =
                    apply_adapters(&mut transformer, adapters, self.adapter_mode)?;
            }
            self.transformer = Some(transformer);
        }
        Ok(self.transformer.as_ref().expect("loaded above"))
    }

    fn vae(&mut self, progress: &mut dyn FnMut(Progress)) -> Result<&AutoencoderKl> {
        if self.vae.is_none() {
            progress(Progress::Loading("VAE"));
            let config = self.repo.file("vae/config.json")?;
            self.repo
                .safetensors_set("vae", "diffusion_pytorch_model")?;
            self.vae = Some(AutoencoderKl::load(
                folder_of(&config),
                self.dtype,
                &self.device,
            )?);
        }
        Ok(self.vae.as_ref().expect("loaded above"))
    }

    /// Runs one inpainting job.
    pub fn fill(
        &mut self,
        request: &FillRequest,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<FillOutput> {
        check_request(request)?;
        let conditioning =
            self.encode_prompt(request.prompt, request.max_sequence_length, progress)?;
        let image = self.denoise(request, &conditioning, progress)?;
        Ok(FillOutput {
            image,
            truncation: conditioning.truncation_warnings(),
        })
    }

    /// The denoising loop and decode for already encoded text.
    pub fn denoise(
        &mut self,
        request: &FillRequest,
        text: &TextConditioning,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<RgbImage> {
        let mut state = self.start(request, text, progress)?;
        let total = state.total_steps();
        self.advance(&mut state, total, progress)?;
        progress(Progress::Decoding);
        self.decode(&state)
    }

    /// Prepares a run up to its first step: the initial noise, the masked-image condition, the
    /// schedule and the text inputs. [`FillPipeline::advance`] then runs steps, so that a run
    /// can stop part way (to preview it) and go on later exactly as if it had not stopped.
    pub fn start(
        &mut self,
        request: &FillRequest,
        text: &TextConditioning,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Denoising> {
        check_request(request)?;
        let (dtype, device) = (self.dtype, self.device.clone());
        let (width, height) = request.image.dimensions();
        let (w, h) = (width as usize / VAE_SCALE, height as usize / VAE_SCALE);
        let latent_shape = [1, LATENT_CHANNELS, h, w];
        let mut rng = TorchGenerator::new(request.noise.seed());

        // Initial noise. Without given latents diffusers first encodes the source image and
        // samples its posterior (unused at full strength: sigma is 1), then draws the noise;
        // the posterior draw is skipped here but its random numbers are consumed all the same.
        let latents = match &request.noise {
            InitialNoise::Latents { latents, .. } => latents.to_device(&device)?.to_dtype(dtype)?,
            InitialNoise::Seed(_) => {
                rng.randn(&latent_shape, dtype, &Device::Cpu)?;
                rng.randn(&latent_shape, dtype, &device)?
            }
        };
        let latents = pack(&latents)?;

        // Masked image latents | mask channels, fixed through the loop.
        let mask = binarize(request.mask);
        let condition = {
            let key = {
                use std::hash::{Hash, Hasher};
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                (
                    request.image.dimensions(),
                    request.image.as_raw(),
                    request.mask.as_raw(),
                )
                    .hash(&mut hasher);
                hasher.finish()
            };
            let cached = match &self.posterior_cache {
                Some((k, posterior)) if *k == key => Some(posterior.clone()),
                _ => None,
            };
            let posterior = match cached {
                Some(posterior) => posterior,
                None => {
                    let vae = self.vae(progress)?;
                    let pixels = pixels_to_tensor(
                        request.image.as_raw(),
                        height as usize,
                        width as usize,
                        &device,
                    )?;
                    let keep = Tensor::from_slice(
                        &mask,
                        (1, 1, height as usize, width as usize),
                        &device,
                    )?
                    .affine(-1.0, 1.0)?;
                    let masked = pixels.broadcast_mul(&keep)?.to_dtype(dtype)?;
                    let posterior = vae.encode(&masked)?;
                    self.posterior_cache = Some((key, posterior.clone()));
                    posterior
                }
            };
            let vae = self.vae(progress)?;
            let noise = rng.randn(&latent_shape, dtype, &device)?;
            let z = vae
                .scale_latents(&posterior.sample(&noise)?)?
                .to_dtype(dtype)?;
            icedit_flux::check_finite(&z, dtype, || {
                "in the VAE encoding of the masked image".into()
            })?;
            let mask =
                pack_mask(&mask, height as usize, width as usize, &device)?.to_dtype(dtype)?;
            Tensor::cat(&[pack(&z)?, mask], 2)?
        };

        let tokens = (height as usize / PIXELS_PER_TOKEN) * (width as usize / PIXELS_PER_TOKEN);
        let txt = text.t5.to_device(&device)?.to_dtype(dtype)?;
        Ok(Denoising {
            seed: request.noise.seed(),
            latents,
            velocity: None,
            step: 0,
            evaluations: 0,
            schedule: FlowMatchSchedule::new(&self.scheduler, request.steps, tokens)?,
            condition,
            img_ids: image_ids(h / 2, w / 2, &device)?,
            txt_ids: text_ids(txt.dim(1)?, &device)?,
            txt,
            pooled: text.pooled.to_device(&device)?.to_dtype(dtype)?,
            guidance: Tensor::new(&[request.guidance], &device)?,
            latent_size: (h, w),
        })
    }

    /// Runs the steps of `state` up to `until` (at most its last step), one transformer
    /// evaluation each.
    pub fn advance(
        &mut self,
        state: &mut Denoising,
        until: usize,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<()> {
        self.advance_batch(vec![state], until, 1, progress)
    }

    /// Runs several runs of one image size and schedule up to `until`, `batch` of them per
    /// transformer evaluation (candidates of a seed search in one pass, on a GPU). One at a
    /// time (`batch` 1) is exactly [`FillPipeline::advance`]; batched results agree to
    /// rounding (the matrix products change shape).
    pub fn advance_batch(
        &mut self,
        mut states: Vec<&mut Denoising>,
        until: usize,
        batch: usize,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<()> {
        let dtype = self.dtype;
        let transformer = self.transformer(progress)?;
        let device = transformer.device().clone();
        for group in states.chunks_mut(batch.max(1)) {
            let first = &group[0];
            if group.iter().any(|s| {
                s.step != first.step
                    || s.schedule.steps() != first.schedule.steps()
                    || s.latents.dims() != first.latents.dims()
                    || s.txt.dims() != first.txt.dims()
            }) {
                return Err(PipelineError::Input(
                    "runs advanced together must be at the same step of the same schedule, \
                     image size and prompt length"
                        .into(),
                ));
            }
            let total = first.total_steps();
            while group[0].step < until.min(total) {
                let step = group[0].step;
                let cat = |part: &dyn Fn(&Denoising) -> Result<Tensor>| -> Result<Tensor> {
                    let parts = group.iter().map(|s| part(s)).collect::<Result<Vec<_>>>()?;
                    Ok(Tensor::cat(&parts, 0)?)
                };
                let img = cat(&|s| Ok(Tensor::cat(&[&s.latents, &s.condition], 2)?))?;
                let txt = cat(&|s| Ok(s.txt.clone()))?;
                let pooled = cat(&|s| Ok(s.pooled.clone()))?;
                let guidance = cat(&|s| Ok(s.guidance.clone()))?;
                let t = group[0].schedule.model_timestep(step, dtype);
                let timestep = Tensor::new(vec![t; group.len()], &device)?;
                let velocity = transformer.forward(&FluxInput {
                    img: &img,
                    img_ids: &group[0].img_ids,
                    txt: &txt,
                    txt_ids: &group[0].txt_ids,
                    pooled: &pooled,
                    timestep: &timestep,
                    guidance: transformer.config().guidance_embeds.then_some(&guidance),
                })?;
                for (i, state) in group.iter_mut().enumerate() {
                    let velocity = velocity.narrow(0, i, 1)?;
                    state.latents = state.schedule.step(step, &state.latents, &velocity)?;
                    // One pass per step: NaN or infinity never heals, and would end as a black
                    // image; stop here, naming the step.
                    icedit_flux::check_finite(&state.latents, dtype, || {
                        format!(
                            "at denoising step {} of {total} (seed {})",
                            step + 1,
                            state.seed
                        )
                    })?;
                    state.velocity = Some(velocity);
                    state.step += 1;
                    state.evaluations += 1;
                }
                progress(Progress::Step {
                    done: step + 1,
                    total,
                });
            }
        }
        Ok(())
    }

    /// The image the run is heading for, as seen from where it stands: the clean-image
    /// estimate `x0 = x_t - sigma_t * v` of the last evaluation, decoded. Before any step it is
    /// the noise itself.
    pub fn preview(&mut self, state: &Denoising) -> Result<RgbImage> {
        let estimate = match &state.velocity {
            Some(v) => {
                let sigma = state.schedule.sigma(state.step) as f64;
                let x = state.latents.to_dtype(DType::F32)?;
                let v = v.to_dtype(DType::F32)?;
                (x - (v * sigma)?)?.to_dtype(self.dtype)?
            }
            None => state.latents.clone(),
        };
        self.decode_latents(&estimate, state.latent_size)
    }

    /// Decodes where the run stands (after its last step: the result).
    pub fn decode(&mut self, state: &Denoising) -> Result<RgbImage> {
        self.decode_latents(&state.latents, state.latent_size)
    }

    fn decode_latents(&mut self, packed: &Tensor, (h, w): (usize, usize)) -> Result<RgbImage> {
        let vae = self.vae(&mut |_| {})?;
        let z = vae.unscale_latents(&unpack(packed, h, w)?)?;
        let decoded = vae.decode(&z)?;
        icedit_flux::check_finite(&decoded, decoded.dtype(), || "in the VAE decode".into())?;
        let (rgb, out_h, out_w) = tensor_to_pixels(&decoded)?;
        RgbImage::from_raw(out_w as u32, out_h as u32, rgb)
            .ok_or_else(|| PipelineError::Input("decoded image has an unexpected size".into()))
    }
}

/// A run in progress: everything needed to take its next step, so that runs can be paused,
/// previewed, compared and continued (the early-filter seed search).
#[derive(Debug, Clone)]
pub struct Denoising {
    /// The seed of the run's noise, for messages.
    seed: u64,
    /// Packed latents after `step` steps.
    latents: Tensor,
    /// The last evaluation's velocity, for the clean-image estimate.
    velocity: Option<Tensor>,
    step: usize,
    evaluations: usize,
    schedule: FlowMatchSchedule,
    condition: Tensor,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    pooled: Tensor,
    guidance: Tensor,
    latent_size: (usize, usize),
}

impl Denoising {
    /// Steps taken so far.
    pub fn step(&self) -> usize {
        self.step
    }

    pub fn total_steps(&self) -> usize {
        self.schedule.steps()
    }

    pub fn is_done(&self) -> bool {
        self.step == self.total_steps()
    }

    /// Transformer evaluations spent on this run.
    pub fn evaluations(&self) -> usize {
        self.evaluations
    }
}

/// Makes the tokenizer and text-encoder files of the repo local (downloading what is missing)
/// and returns the pipeline root they live under.
/// The text encoders' files; T5's weights only when no file replaces them (`t5_file`).
fn fetch_text_files(repo: &ModelRepo, t5_file: bool) -> Result<std::path::PathBuf> {
    let mut required = vec![
        "text_encoder/config.json",
        "text_encoder_2/config.json",
        "tokenizer_2/tokenizer.json",
    ];
    // The FLUX repos have no CLIP tokenizer.json, only vocab.json + merges.txt.
    if repo.exists("tokenizer/tokenizer.json")? {
        required.push("tokenizer/tokenizer.json");
    } else {
        required.extend(["tokenizer/vocab.json", "tokenizer/merges.txt"]);
    }
    for optional in [
        "tokenizer/tokenizer_config.json",
        "tokenizer/special_tokens_map.json",
        "tokenizer_2/tokenizer_config.json",
        "tokenizer_2/special_tokens_map.json",
    ] {
        if repo.exists(optional)? {
            required.push(optional);
        }
    }
    let paths = repo.files(&required)?;
    repo.safetensors_set("text_encoder", "model")?;
    if !t5_file {
        repo.safetensors_set("text_encoder_2", "model")?;
    }
    // `text_encoder/config.json` -> the pipeline root.
    let config = &paths[0];
    Ok(folder_of(folder_of(config)).to_path_buf())
}

/// The pipeline class diffusers' `model_index.json` names for FLUX.1 Fill.
const FILL_PIPELINE_CLASS: &str = "FluxFillPipeline";

/// Refuses a repo whose `model_index.json` names another pipeline (FLUX.1 dev, Kontext, an SD
/// model): its weights would load and compute something else. Folders without the file pass.
fn check_pipeline_class(repo: &ModelRepo) -> Result<()> {
    if !repo.exists("model_index.json")? {
        return Ok(());
    }
    let path = repo.file("model_index.json")?;
    let bad = |message: String| PipelineError::Config {
        path: path.clone(),
        message,
    };
    let text = icedit_flux::files::read_text_file(&path, icedit_flux::files::MAX_CONFIG_BYTES)
        .map_err(|source| PipelineError::Io {
            path: path.clone(),
            source,
        })?;
    let index: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    match index.get("_class_name").and_then(|c| c.as_str()) {
        Some(FILL_PIPELINE_CLASS) => Ok(()),
        Some(other) => Err(bad(format!(
            "the model is a {other}, not a {FILL_PIPELINE_CLASS}; icedit edit and fill run \
             FLUX.1 Fill (e.g. black-forest-labs/FLUX.1-Fill-dev)"
        ))),
        None => Err(bad(format!(
            "no `_class_name`; expected \"{FILL_PIPELINE_CLASS}\""
        ))),
    }
}

fn folder_of(file: &std::path::Path) -> &std::path::Path {
    file.parent().unwrap_or(file)
}

fn check_request(request: &FillRequest) -> Result<()> {
    let (width, height) = request.image.dimensions();
    let g = PIXELS_PER_TOKEN as u32;
    if width % g != 0 || height % g != 0 || width == 0 || height == 0 {
        return Err(PipelineError::Input(format!(
            "the image is {width}x{height}; the pipeline needs multiples of {g} (use canvas::fit_to_grid)"
        )));
    }
    if request.mask.dimensions() != (width, height) {
        let (mw, mh) = request.mask.dimensions();
        return Err(PipelineError::Input(format!(
            "the mask is {mw}x{mh} but the image is {width}x{height}; give a mask of the image's size"
        )));
    }
    if let InitialNoise::Latents { latents, .. } = &request.noise {
        let expected = [
            1,
            LATENT_CHANNELS,
            height as usize / VAE_SCALE,
            width as usize / VAE_SCALE,
        ];
        if latents.dims() != expected {
            return Err(PipelineError::Input(format!(
                "the given latents are {:?}; a {width}x{height} image needs {expected:?}",
                latents.dims()
            )));
        }
    }
    if request.prompt.trim().is_empty() {
        return Err(PipelineError::Input(
            "the prompt is empty; describe what the masked area should show".into(),
        ));
    }
    crate::edit::EditSettings {
        steps: request.steps,
        guidance: request.guidance,
        max_sequence_length: request.max_sequence_length,
    }
    .validate()?;
    Ok(())
}
