//! The FLUX pipeline: one denoising loop shared by FLUX.1 Fill (image + mask + prompt -> image,
//! as diffusers' `FluxFillPipeline`) and FLUX.1 Kontext (photo + instruction -> image, as
//! `FluxKontextPipeline`, see [`crate::kontext`]): same noise for the same seed, same latents
//! layout, same schedule as diffusers. The variants differ only in what they put beside the
//! noise tokens ([`Condition`]).
//!
//! Components load when first needed. The text encoders (T5-XXL alone is 9 GB in bf16) are
//! dropped as soon as the prompt is encoded, before the transformer loads, unless the caller
//! keeps them for serving several prompts.

use std::path::PathBuf;

use crate::memory::{MemoryOptions, Offload, PlanInputs};
use candle_core::{DType, Device, Tensor};
use icedit_adapters::{apply_adapters, AdapterChoice, AppliedAdapter, ApplyMode};
use icedit_flux::{
    AutoencoderKl, Checkpoint, FluxConfig, FluxInput, FluxTransformer, Posterior, StepCache,
    StepCacheConfig, WeightSource,
};
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

/// Which FLUX model a pipeline runs: they share the transformer and the loop, and differ in how
/// the source image conditions it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipelineKind {
    /// FLUX.1 Fill (384 input channels): masked image and mask beside each noise token. ICEdit's
    /// diptych edits run on it.
    Fill,
    /// FLUX.1 Kontext [dev] (64 input channels): the photo's tokens after the noise tokens.
    Kontext,
}

impl PipelineKind {
    /// The transformer's input channels for this kind.
    pub fn in_channels(self) -> usize {
        match self {
            Self::Fill => 384,
            Self::Kontext => 64,
        }
    }

    /// The diffusers pipeline class that computes the same.
    pub fn diffusers_class(self) -> &'static str {
        match self {
            Self::Fill => FILL_PIPELINE_CLASS,
            Self::Kontext => KONTEXT_PIPELINE_CLASS,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Fill => "FLUX.1 Fill",
            Self::Kontext => "FLUX.1 Kontext",
        }
    }
}

/// The result: the image and the facts a recipe records.
pub struct FillOutput {
    pub image: RgbImage,
    /// Prompt parts dropped by the tokenizers' length limits, for a warning.
    pub truncation: Vec<String>,
}

/// A FLUX.1 Fill pipeline over a model repo (Hub or local folder in diffusers layout).
pub struct FluxPipeline {
    repo: ModelRepo,
    kind: PipelineKind,
    dtype: DType,
    device: Device,
    scheduler: SchedulerConfig,
    keep_text_encoders: bool,
    text: Option<TextEncoders>,
    transformer: Option<FluxTransformer>,
    /// With `--offload model`: the transformer as loaded, in host memory; `transformer` is its
    /// copy on the device while denoising, dropped while the VAE works.
    transformer_host: Option<FluxTransformer>,
    /// Offload and quantization at load (`--offload`, `--quantize`, or a `--max-memory` plan).
    memory: MemoryOptions,
    /// A transformer file used instead of the pipeline's own weights (`--transformer`).
    transformer_file: Option<PathBuf>,
    /// A T5 encoder file used instead of `text_encoder_2/`'s weights (`--text-encoder-2`).
    text_encoder_2_file: Option<PathBuf>,
    vae: Option<AutoencoderKl>,
    /// Adapters to apply when the transformer loads, and what applying them did.
    pending_adapters: Vec<AdapterChoice>,
    adapter_mode: ApplyMode,
    applied_adapters: Vec<AppliedAdapter>,
    /// The VAE posterior of the last encoded image (Fill: the masked image; Kontext: the
    /// photo), by a hash of its pixels: seeds of one edit (and the candidates of a seed search)
    /// share it.
    posterior_cache: Option<(u64, Posterior)>,
    /// A step cache for every run started from now on (`--cache`).
    step_cache: Option<StepCacheConfig>,
}

impl FluxPipeline {
    /// Opens the pipeline; weights load on first use. Reads the scheduler config now, so a
    /// repo that is not a FLUX pipeline fails early. The kind comes from `model_index.json`,
    /// else from the transformer's config (384 input channels: Fill); see
    /// [`FluxPipeline::with_kind`] for single files and folders without either.
    pub fn new(repo: ModelRepo, dtype: DType, device: Device) -> Result<Self> {
        Self::with_kind(repo, None, dtype, device)
    }

    /// As [`FluxPipeline::new`], with the kind the user asked for (`--pipeline`). It must agree
    /// with `model_index.json` when the model has one.
    pub fn with_kind(
        repo: ModelRepo,
        asked: Option<PipelineKind>,
        dtype: DType,
        device: Device,
    ) -> Result<Self> {
        icedit_flux::check_model_dtype(dtype)?;
        let kind = pipeline_kind(&repo, asked)?;
        let scheduler =
            SchedulerConfig::from_json_file(&repo.file("scheduler/scheduler_config.json")?)?;
        Ok(Self {
            repo,
            kind,
            dtype,
            device,
            scheduler,
            keep_text_encoders: false,
            text: None,
            transformer: None,
            transformer_host: None,
            memory: MemoryOptions::default(),
            transformer_file: None,
            text_encoder_2_file: None,
            vae: None,
            pending_adapters: Vec::new(),
            adapter_mode: ApplyMode::Merge,
            applied_adapters: Vec::new(),
            posterior_cache: None,
            step_cache: None,
        })
    }

    /// Keeps the text encoders loaded between prompts (for a server); by default they are
    /// released right after encoding.
    pub fn keep_text_encoders(mut self, keep: bool) -> Self {
        self.keep_text_encoders = keep;
        self
    }

    /// [`FluxPipeline::keep_text_encoders`] on a pipeline in place.
    pub fn set_keep_text_encoders(&mut self, keep: bool) {
        self.keep_text_encoders = keep;
    }

    /// A step cache (lossy, opt-in) for the runs started from now on; `None` computes every step
    /// in full.
    pub fn set_step_cache(&mut self, cache: Option<StepCacheConfig>) {
        self.step_cache = cache;
    }

    /// Drops the text encoders now (they are kept while [`FluxPipeline::keep_text_encoders`]
    /// is on, e.g. to encode a negative prompt too).
    pub fn release_text_encoders(&mut self) {
        self.text = None;
    }

    /// Where the weights live and whether a dense transformer is quantized as it loads. Must be
    /// set before the transformer loads.
    pub fn set_memory(&mut self, memory: MemoryOptions) -> Result<()> {
        if self.transformer.is_some() || self.transformer_host.is_some() {
            return Err(PipelineError::Input(
                "offload and quantization must be set before the transformer loads".into(),
            ));
        }
        self.memory = memory;
        Ok(())
    }

    pub fn memory(&self) -> MemoryOptions {
        self.memory
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

    /// Turns the loaded adapters on and off for the next runs: those named on, the others off
    /// (`None`: all on). An adapter merged into the weights cannot be turned off: a server
    /// that chooses adapters per request applies them at run time.
    pub fn use_adapters(&self, names: Option<&[String]>) -> Result<()> {
        if let Some(names) = names {
            if let Some(unknown) = names
                .iter()
                .find(|n| !self.applied_adapters.iter().any(|a| &a.name == *n))
            {
                let loaded: Vec<&str> = self
                    .applied_adapters
                    .iter()
                    .map(|a| a.name.as_str())
                    .collect();
                return Err(PipelineError::Input(format!(
                    "no adapter {unknown:?} is loaded; this server has: {}",
                    if loaded.is_empty() {
                        "none".to_string()
                    } else {
                        loaded.join(", ")
                    }
                )));
            }
        }
        for adapter in &self.applied_adapters {
            let on = names.is_none_or(|names| names.contains(&adapter.name));
            if !on && adapter.merged_layers > 0 {
                return Err(PipelineError::Input(format!(
                    "the adapter {:?} is merged into the weights and cannot be left out; start \
                     the server with --lora-mode runtime to choose adapters per request",
                    adapter.name
                )));
            }
        }
        for adapter in &self.applied_adapters {
            let on = names.is_none_or(|names| names.contains(&adapter.name));
            adapter
                .switch
                .store(on, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    /// Loads the transformer and applies the adapters now (otherwise this happens at the first
    /// denoising step), so that adapter errors show before any other work.
    pub fn load_transformer(&mut self, progress: &mut dyn FnMut(Progress)) -> Result<()> {
        self.transformer(progress).map(|_| ())
    }

    pub fn repo(&self) -> &ModelRepo {
        &self.repo
    }

    /// Which model this pipeline runs.
    pub fn kind(&self) -> PipelineKind {
        self.kind
    }

    /// The device the pipeline computes on.
    pub fn device(&self) -> &Device {
        &self.device
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

    /// The transformer's checkpoint (`--transformer`'s file, or the pipeline's folder), opened
    /// without reading its weights.
    fn transformer_checkpoint(&self) -> Result<Checkpoint> {
        Ok(match &self.transformer_file {
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
        })
    }

    /// What a memory plan needs to know of this pipeline, from its config files and file sizes
    /// (no weights are read), for a run over `image_tokens` and `pixels`.
    pub fn plan_inputs(
        &self,
        image_tokens: u64,
        text_tokens: u64,
        pixels: u64,
    ) -> Result<PlanInputs> {
        let checkpoint = self.transformer_checkpoint()?;
        let gguf_bytes = |file: &Option<PathBuf>| {
            file.as_ref()
                .filter(|f| {
                    f.extension()
                        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
                })
                .and_then(|f| std::fs::metadata(f).ok())
                .map(|m| m.len())
        };
        let json = |path: &str| -> Result<serde_json::Value> {
            let file = self.repo.file(path)?;
            let text = std::fs::read_to_string(&file)
                .map_err(|e| PipelineError::Input(format!("{}: {e}", file.display())))?;
            serde_json::from_str(&text)
                .map_err(|e| PipelineError::Input(format!("{}: {e}", file.display())))
        };
        let (t5, clip, vae) = (
            json("text_encoder_2/config.json")?,
            json("text_encoder/config.json")?,
            json("vae/config.json")?,
        );
        let n = |v: &serde_json::Value, key: &str, default: u64| v[key].as_u64().unwrap_or(default);
        // T5 v1.1 (gated MLP): embedding, then per layer attention (4 projections of
        // heads x d_kv) and three MLP matrices.
        let (d, ff, kv) = (
            n(&t5, "d_model", 4096),
            n(&t5, "d_ff", 10240),
            n(&t5, "d_kv", 64),
        );
        let t5_parameters = n(&t5, "vocab_size", 32128) * d
            + n(&t5, "num_layers", 24) * (4 * d * n(&t5, "num_heads", 64) * kv + 3 * d * ff);
        let h = n(&clip, "hidden_size", 768);
        let clip_parameters =
            (n(&clip, "vocab_size", 49408) + n(&clip, "max_position_embeddings", 77)) * h
                + n(&clip, "num_hidden_layers", 12)
                    * (4 * h * h + 2 * h * n(&clip, "intermediate_size", 3072));
        // FLUX's VAE has 83.8M parameters at 512 channels; they grow with the channels squared.
        let widest = vae["block_out_channels"]
            .as_array()
            .and_then(|c| c.iter().filter_map(|c| c.as_u64()).max())
            .unwrap_or(512);
        let vae_parameters = 83_800_000 * widest * widest / (512 * 512);
        Ok(PlanInputs {
            transformer: checkpoint.config().clone(),
            transformer_parameters: FluxTransformer::parameters(checkpoint.config())?,
            transformer_file_bytes: gguf_bytes(&self.transformer_file),
            text_encoder_parameters: t5_parameters + clip_parameters,
            text_encoder_2_file_bytes: gguf_bytes(&self.text_encoder_2_file),
            vae_parameters,
            image_tokens,
            text_tokens,
            pixels,
            dtype: self.dtype,
            device_is_cpu: self.device.is_cpu(),
            text_encoders_kept: self.keep_text_encoders,
        })
    }

    fn transformer(&mut self, progress: &mut dyn FnMut(Progress)) -> Result<&FluxTransformer> {
        if self.memory.offload != Offload::None {
            // Offloaded: the VAE is on the device only while it encodes or decodes.
            self.vae = None;
        }
        if self.transformer.is_none() {
            if let Some(host) = &self.transformer_host {
                // `--offload model`: back on the device after the VAE's turn.
                self.transformer = Some(host.placed(&self.device, false)?);
                return Ok(self.transformer.as_ref().expect("placed above"));
            }
            progress(Progress::Loading("transformer"));
            let checkpoint = self.transformer_checkpoint()?;
            // Offloaded weights load into host memory; the device gets its copy below.
            let offloaded = self.memory.offload != Offload::None && !self.device.is_cpu();
            let load_on = if offloaded {
                Device::Cpu
            } else {
                self.device.clone()
            };
            let mut transformer = FluxTransformer::new(
                checkpoint.config(),
                WeightSource::checkpoint(&checkpoint, self.dtype, &load_on)
                    .quantized_at_load(self.memory.quantize),
            )?;
            drop(checkpoint);
            let channels = transformer.config().in_channels;
            if channels != self.kind.in_channels() {
                let file = match &self.transformer_file {
                    Some(file) => file.display().to_string(),
                    None => "the pipeline's transformer".into(),
                };
                return Err(PipelineError::Input(format!(
                    "{file} takes {channels} input channels, but a {} transformer takes {}: \
                     it belongs to another model (FLUX.1 dev and Kontext: 64; Fill: 384)",
                    self.kind.name(),
                    self.kind.in_channels()
                )));
            }
            // Offloaded: the blocks stay in host memory, the rest (adapters too) on the device.
            if offloaded {
                transformer = transformer.placed(&self.device, true)?;
            }
            let adapters = std::mem::take(&mut self.pending_adapters);
            if !adapters.is_empty() {
                progress(Progress::Loading("adapters"));
                self.applied_adapters =
                    apply_adapters(&mut transformer, adapters, self.adapter_mode)?;
            }
            if offloaded && self.memory.offload == Offload::Model {
                // The whole transformer on the device while denoising; its blocks kept in host
                // memory for the next time.
                self.transformer = Some(transformer.placed(&self.device, false)?);
                self.transformer_host = Some(transformer);
            } else {
                self.transformer = Some(transformer);
            }
        }
        Ok(self.transformer.as_ref().expect("loaded above"))
    }

    fn vae(&mut self, progress: &mut dyn FnMut(Progress)) -> Result<&AutoencoderKl> {
        if self.transformer_host.is_some() {
            // `--offload model`: the transformer leaves the device while the VAE works.
            self.transformer = None;
        }
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
    /// schedule and the text inputs. [`FluxPipeline::advance`] then runs steps, so that a run
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
            let key = pixels_key(
                request.image.dimensions(),
                &[request.image.as_raw(), request.mask.as_raw()],
            );
            let posterior = self.encode_cached(key, progress, |device| {
                let pixels = pixels_to_tensor(
                    request.image.as_raw(),
                    height as usize,
                    width as usize,
                    device,
                )?;
                let keep =
                    Tensor::from_slice(&mask, (1, 1, height as usize, width as usize), device)?
                        .affine(-1.0, 1.0)?;
                Ok(pixels.broadcast_mul(&keep)?.to_dtype(dtype)?)
            })?;
            let noise = rng.randn(&latent_shape, dtype, &device)?;
            let z = self.scale_latents(&posterior.sample(&noise)?, progress)?;
            icedit_flux::check_finite(&z, dtype, || {
                "in the VAE encoding of the masked image".into()
            })?;
            let mask =
                pack_mask(&mask, height as usize, width as usize, &device)?.to_dtype(dtype)?;
            Condition::Channels(Tensor::cat(&[pack(&z)?, mask], 2)?)
        };
        let run = RunSetup {
            seed: request.noise.seed(),
            steps: request.steps,
            guidance: request.guidance,
            latent_size: (h, w),
        };
        self.new_state(run, latents, condition, text, None)
    }

    /// The state before the first step, common to every variant: the schedule (its shift from
    /// the noise tokens only, as diffusers), the ids (the condition's tokens, if any, after the
    /// noise tokens'), the text inputs and the guidance.
    pub(crate) fn new_state(
        &self,
        run: RunSetup,
        latents: Tensor,
        condition: Condition,
        text: &TextConditioning,
        true_cfg: Option<(&TextConditioning, f32)>,
    ) -> Result<Denoising> {
        let (dtype, device) = (self.dtype, &self.device);
        let (h, w) = run.latent_size;
        let tokens = (h / 2) * (w / 2);
        let mut img_ids = image_ids(h / 2, w / 2, device)?;
        if let Condition::Tokens { ids, .. } = &condition {
            img_ids = Tensor::cat(&[&img_ids, ids], 0)?;
        }
        let on_device =
            |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(device)?.to_dtype(dtype)?) };
        let txt = on_device(&text.t5)?;
        let true_cfg = match true_cfg {
            Some((negative, scale)) => {
                let neg_txt = on_device(&negative.t5)?;
                Some(TrueCfg {
                    txt_ids: text_ids(neg_txt.dim(1)?, device)?,
                    txt: neg_txt,
                    pooled: on_device(&negative.pooled)?,
                    scale,
                })
            }
            None => None,
        };
        Ok(Denoising {
            seed: run.seed,
            latents,
            velocity: None,
            step: 0,
            evaluations: 0,
            schedule: FlowMatchSchedule::new(&self.scheduler, run.steps, tokens)?,
            condition,
            keep_outside: None,
            step_caches: self.step_cache.as_ref().map(|c| {
                let branches = 1 + true_cfg.is_some() as usize;
                (0..branches).map(|_| c.new_state()).collect()
            }),
            true_cfg,
            img_ids,
            txt_ids: text_ids(txt.dim(1)?, device)?,
            txt,
            pooled: on_device(&text.pooled)?,
            guidance: Tensor::new(&[run.guidance], device)?,
            latent_size: run.latent_size,
        })
    }

    /// The VAE posterior of the image `pixels` builds (`[1, 3, H, W]` in the model's dtype),
    /// reused while `key` stays the same.
    pub(crate) fn encode_cached(
        &mut self,
        key: u64,
        progress: &mut dyn FnMut(Progress),
        pixels: impl FnOnce(&Device) -> Result<Tensor>,
    ) -> Result<Posterior> {
        if let Some((k, posterior)) = &self.posterior_cache {
            if *k == key {
                return Ok(posterior.clone());
            }
        }
        let image = pixels(&self.device)?;
        let posterior = self.vae(progress)?.encode(&image)?;
        self.posterior_cache = Some((key, posterior.clone()));
        Ok(posterior)
    }

    /// VAE latents shifted and scaled as the transformer sees them, in the model's dtype.
    pub(crate) fn scale_latents(
        &mut self,
        z: &Tensor,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Tensor> {
        Ok(self.vae(progress)?.scale_latents(z)?.to_dtype(self.dtype)?)
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
    /// time (`batch` 1) is exactly [`FluxPipeline::advance`]; batched results agree to
    /// rounding (the matrix products change shape).
    pub fn advance_batch(
        &mut self,
        states: Vec<&mut Denoising>,
        until: usize,
        batch: usize,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<()> {
        self.advance_batch_until(states, until, batch, progress, &|| None)
    }

    /// [`FluxPipeline::advance_batch`], asking `stop` before every step: `Some(reason)` ends
    /// it with [`PipelineError::Stopped`], the runs left where they stand.
    pub fn advance_batch_until(
        &mut self,
        mut states: Vec<&mut Denoising>,
        until: usize,
        batch: usize,
        progress: &mut dyn FnMut(Progress),
        stop: &dyn Fn() -> Option<&'static str>,
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
                    || s.img_ids.dims() != first.img_ids.dims()
                    || s.true_cfg
                        .as_ref()
                        .map(|c| (c.txt.dims().to_vec(), c.scale))
                        != first
                            .true_cfg
                            .as_ref()
                            .map(|c| (c.txt.dims().to_vec(), c.scale))
            }) {
                return Err(PipelineError::Input(
                    "runs advanced together must be at the same step of the same schedule, \
                     image size, prompt length and true CFG"
                        .into(),
                ));
            }
            if group.len() > 1 && group.iter().any(|s| s.step_caches.is_some()) {
                return Err(PipelineError::Input(
                    "a step cache keeps each run's own state: advance runs one at a time \
                     (--batch-candidates 1) with --cache"
                        .into(),
                ));
            }
            let total = first.total_steps();
            let noise_tokens = first.latents.dim(1)?;
            while group[0].step < until.min(total) {
                if let Some(reason) = stop() {
                    return Err(PipelineError::Stopped(reason));
                }
                let step = group[0].step;
                // A step cache's state goes with the one run it belongs to (checked above).
                let mut caches = group[0].step_caches.take();
                let cat = |part: &dyn Fn(&Denoising) -> Result<Tensor>| -> Result<Tensor> {
                    let parts = group.iter().map(|s| part(s)).collect::<Result<Vec<_>>>()?;
                    Ok(Tensor::cat(&parts, 0)?)
                };
                let img = cat(&|s| s.model_input())?;
                let guidance = cat(&|s| Ok(s.guidance.clone()))?;
                let t = group[0].schedule.model_timestep(step, dtype);
                let timestep = Tensor::new(vec![t; group.len()], &device)?;
                let mut branch = caches.iter_mut().flatten();
                let img_ids = &group[0].img_ids;
                // Only the noise tokens' prediction is used (Kontext appends the photo's).
                let mut predict =
                    |txt: &Tensor, txt_ids: &Tensor, pooled: &Tensor| -> Result<Tensor> {
                        let out = transformer.forward_cached(
                            &FluxInput {
                                img: &img,
                                img_ids,
                                txt,
                                txt_ids,
                                pooled,
                                timestep: &timestep,
                                guidance: transformer.config().guidance_embeds.then_some(&guidance),
                            },
                            branch.next(),
                        )?;
                        Ok(out.narrow(1, 0, noise_tokens)?)
                    };
                let mut velocity = predict(
                    &cat(&|s| Ok(s.txt.clone()))?,
                    &group[0].txt_ids,
                    &cat(&|s| Ok(s.pooled.clone()))?,
                )?;
                let mut passes = 1;
                if let Some(cfg) = &group[0].true_cfg {
                    // diffusers: neg + scale * (pos - neg), each product rounded to the dtype.
                    let negative = predict(
                        &cat(&|s| Ok(s.true_cfg.as_ref().expect("checked above").txt.clone()))?,
                        &cfg.txt_ids,
                        &cat(&|s| Ok(s.true_cfg.as_ref().expect("checked above").pooled.clone()))?,
                    )?;
                    let scaled = ((&velocity - &negative)?.to_dtype(DType::F32)?
                        * cfg.scale as f64)?
                        .to_dtype(dtype)?;
                    velocity = (negative + scaled)?;
                    passes = 2;
                }
                drop(predict);
                group[0].step_caches = caches;
                for (i, state) in group.iter_mut().enumerate() {
                    let velocity = velocity.narrow(0, i, 1)?;
                    state.latents = state.schedule.step(step, &state.latents, &velocity)?;
                    if let Some(keep) = &state.keep_outside {
                        state.latents = keep.blend(&state.schedule, step, &state.latents)?;
                    }
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
                    state.evaluations += passes;
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

/// What the transformer sees beside the noise tokens, fixed through a run.
#[derive(Debug, Clone)]
pub(crate) enum Condition {
    /// FLUX.1 Fill: the masked image's latents and the mask, appended to each noise token's
    /// channels.
    Channels(Tensor),
    /// FLUX.1 Kontext: the photo's packed latents, appended to the sequence, with their ids
    /// (first coordinate 1).
    Tokens { latents: Tensor, ids: Tensor },
}

/// The fixed numbers of a run that every variant sets.
pub(crate) struct RunSetup {
    pub seed: u64,
    pub steps: usize,
    pub guidance: f32,
    /// Latent cells `(h, w)` of the generated image.
    pub latent_size: (usize, usize),
}

/// True classifier-free guidance (Kontext's `true_cfg_scale`): a second pass per step with the
/// negative prompt.
#[derive(Debug, Clone)]
struct TrueCfg {
    txt: Tensor,
    txt_ids: Tensor,
    pooled: Tensor,
    scale: f32,
}

/// Inpainting by latent blending (`FluxKontextInpaintPipeline`): after each step the latents
/// outside the mask are put back to the photo's, noised to the next step's level.
#[derive(Debug, Clone)]
pub(crate) struct KeepOutside {
    /// Packed, 1 where the latents are regenerated.
    pub mask: Tensor,
    /// The photo's packed latents.
    pub photo: Tensor,
    /// The run's initial packed noise.
    pub noise: Tensor,
}

impl KeepOutside {
    /// diffusers: `(1 - mask) * scale_noise(photo, t_next, noise) + mask * latents`, where
    /// `scale_noise` is `sigma * noise + (1 - sigma) * photo` in the latents' dtype (the photo
    /// itself after the last step).
    fn blend(&self, schedule: &FlowMatchSchedule, step: usize, latents: &Tensor) -> Result<Tensor> {
        let dtype = latents.dtype();
        let proper = if step + 1 < schedule.steps() {
            let sigma = icedit_flux::round_to(schedule.sigma(step + 1), dtype);
            let rest = icedit_flux::round_to(1.0 - sigma, dtype);
            (self.noise.affine(sigma as f64, 0.0)? + self.photo.affine(rest as f64, 0.0)?)?
        } else {
            self.photo.clone()
        };
        let outside = self.mask.affine(-1.0, 1.0)?;
        Ok(((outside * proper)? + (&self.mask * latents)?)?)
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
    condition: Condition,
    keep_outside: Option<KeepOutside>,
    /// The step cache's state per guidance branch (cond, then uncond with true CFG).
    step_caches: Option<Vec<StepCache>>,
    true_cfg: Option<TrueCfg>,
    /// The noise tokens' ids, then the condition tokens'.
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    pooled: Tensor,
    guidance: Tensor,
    latent_size: (usize, usize),
}

impl Denoising {
    /// The transformer's image input: the noise tokens with the condition.
    fn model_input(&self) -> Result<Tensor> {
        Ok(match &self.condition {
            Condition::Channels(c) => Tensor::cat(&[&self.latents, c], 2)?,
            Condition::Tokens { latents, .. } => Tensor::cat(&[&self.latents, latents], 1)?,
        })
    }

    /// Blends the latents outside a mask back to the photo's after each step (Kontext
    /// inpainting); `noise` is the run's initial packed latents.
    pub(crate) fn keep_outside(&mut self, keep: KeepOutside) {
        self.keep_outside = Some(keep);
    }

    /// The packed latents where the run stands.
    pub fn latents(&self) -> &Tensor {
        &self.latents
    }

    /// The transformer's image input for the next step and its position ids, as diffusers
    /// passes them (`hidden_states`, `img_ids`).
    pub fn transformer_image_input(&self) -> Result<(Tensor, &Tensor)> {
        Ok((self.model_input()?, &self.img_ids))
    }

    /// For each step, whether the transformer computed it in full, per guidance branch (cond,
    /// then uncond with true CFG); `None` without a step cache (every step is).
    pub fn computed_steps(&self) -> Option<Vec<Vec<bool>>> {
        self.step_caches
            .as_ref()
            .map(|caches| caches.iter().map(|c| c.computed().to_vec()).collect())
    }

    /// Transformer passes computed in full (all of them without a step cache).
    pub fn full_evaluations(&self) -> usize {
        match self.computed_steps() {
            Some(branches) => branches.iter().flatten().filter(|&&c| c).count(),
            None => self.evaluations,
        }
    }

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

/// The pipeline classes diffusers' `model_index.json` names for FLUX.1 Fill and Kontext.
const FILL_PIPELINE_CLASS: &str = "FluxFillPipeline";
const KONTEXT_PIPELINE_CLASS: &str = "FluxKontextPipeline";

/// The model's kind: `model_index.json`'s pipeline class, which `asked` (`--pipeline`) must
/// agree with; without that file, `asked`, else the transformer config's input channels (384:
/// Fill; 64 is FLUX.1 dev's too, so a Kontext folder without `model_index.json` must be named).
/// Refuses other pipelines (FLUX.1 dev, an SD model): their weights would load and compute
/// something else.
fn pipeline_kind(repo: &ModelRepo, asked: Option<PipelineKind>) -> Result<PipelineKind> {
    if !repo.exists("model_index.json")? {
        if let Some(kind) = asked {
            return Ok(kind);
        }
        if !repo.exists("transformer/config.json")? {
            return Ok(PipelineKind::Fill);
        }
        let path = repo.file("transformer/config.json")?;
        return match FluxConfig::from_json_file(&path)?.in_channels {
            64 => Err(PipelineError::Config {
                path,
                message: "a transformer of 64 input channels is FLUX.1 dev's or Kontext's; for \
                          Kontext say --pipeline kontext (icedit does not run FLUX.1 dev)"
                    .into(),
            }),
            _ => Ok(PipelineKind::Fill),
        };
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
    let kind = match index.get("_class_name").and_then(|c| c.as_str()) {
        Some(FILL_PIPELINE_CLASS) => PipelineKind::Fill,
        // The inpainting variant ships the same weights.
        Some(KONTEXT_PIPELINE_CLASS | "FluxKontextInpaintPipeline") => PipelineKind::Kontext,
        Some(other) => {
            return Err(bad(format!(
                "the model is a {other}; icedit runs FLUX.1 Fill ({FILL_PIPELINE_CLASS}, e.g. \
                 black-forest-labs/FLUX.1-Fill-dev) and FLUX.1 Kontext \
                 ({KONTEXT_PIPELINE_CLASS}, black-forest-labs/FLUX.1-Kontext-dev)"
            )))
        }
        None => {
            return Err(bad(format!(
                "no `_class_name`; expected \"{FILL_PIPELINE_CLASS}\" or \
                 \"{KONTEXT_PIPELINE_CLASS}\""
            )))
        }
    };
    match asked {
        Some(asked) if asked != kind => Err(bad(format!(
            "the model is a {} pipeline ({}), not the {} asked for; drop --pipeline or pick \
             another --model",
            kind.name(),
            kind.diffusers_class(),
            asked.name()
        ))),
        _ => Ok(kind),
    }
}

/// A hash of an image's size and pixels (and its mask's), to know when an encoding can be reused.
pub(crate) fn pixels_key(size: (u32, u32), parts: &[&[u8]]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (size, parts).hash(&mut hasher);
    hasher.finish()
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
