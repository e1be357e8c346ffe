//! `icedit`: the command-line front end. Thin by design: parsing, progress and error reporting
//! here, the work in the library crates.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand, ValueEnum};
use icedit_flux::{parse_dtype, Checkpoint, FluxConfig, FluxInput, FluxTransformer};
use icedit_pipeline::edit::MAX_SEQUENCE_LENGTH;
use icedit_pipeline::image_io;
use icedit_pipeline::latents::{image_ids, text_ids, PIXELS_PER_TOKEN};
use icedit_pipeline::recipe::Recipe;
use icedit_pipeline::PipelineKind;

mod adapters;
mod batch;
mod edit;
mod fill;
mod inputs;
mod judge;
mod outputs;
mod progress;
mod quantize;
mod selftest;
mod serve;
mod worker;

// Every op allocates a fresh tensor; an allocator that keeps freed pages mapped spares the
// page faults (measurably faster on CPU).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "icedit",
    version,
    about = "Natural-language image editing on FLUX.1 Fill (ICEdit) and FLUX.1 Kontext"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load a FLUX transformer checkpoint, report what it is, and optionally time one forward
    /// pass on random inputs (a check that weights, dtype and device work together).
    Inspect(InspectArgs),
    /// Edit a photo by instruction ("make it night"): ICEdit's in-context diptych on FLUX.1 Fill
    /// with LoRA or MoE-LoRA adapters, or FLUX.1 Kontext [dev] when --model is a Kontext model.
    Edit(edit::EditArgs),
    /// Inpaint (regenerate the masked area) or outpaint (--expand) an image with FLUX.1 Fill.
    Fill(fill::FillArgs),
    /// Keep the model loaded and serve edits over HTTP: OpenAI's `POST /v1/images/edits` and a
    /// job API with progress events.
    Serve(serve::ServeArgs),
    /// Run a JSON Lines file of edits (one model load; resumes where it stopped), or submit
    /// them to a Redis queue with --queue and collect the results.
    Batch(batch::BatchArgs),
    /// Run edits from a Redis queue filled by `icedit serve --queue` or `icedit batch --queue`
    /// (one worker per GPU; a job survives a worker that dies).
    Worker(worker::WorkerArgs),
    /// Write a FLUX transformer as a GGUF file (BFL naming, as ComfyUI-GGUF and diffusers read
    /// it), its matrices quantized (q8_0, q4_k, ...), for `--transformer` on smaller GPUs.
    Quantize(quantize::QuantizeArgs),
    /// Check this build against the committed parity fixtures (transformer in f32, bf16 and
    /// f16, GGUF forwards, whole edits with LoRA and MoE-LoRA) on a device, with the test
    /// suite's tolerances: a table of results, exit 1 on any failure.
    Selftest(selftest::SelftestArgs),
    /// Ask a judge which of two edits of a photo is better: tries a judge setup (a server,
    /// CLIP or Qwen3-VL) before a seed search relies on it.
    Judge(judge::JudgeCommandArgs),
}

/// The default model of the generating commands.
pub const DEFAULT_MODEL: &str = "black-forest-labs/FLUX.1-Fill-dev";

/// Which pipeline, in which precision, on which device: shared by `edit` and `fill`.
#[derive(clap::Args)]
pub(crate) struct ModelArgs {
    /// Hub repo id (`owner/name[@revision]`) or a local folder in diffusers layout.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// The transformer's weights from this file instead of --model's: a GGUF (Q8_0, Q4_K, ...)
    /// or a single .safetensors (BFL or diffusers names); a local path or
    /// `hf:OWNER/REPO[@REVISION]/FILE`. --model's transformer weights are then never fetched.
    #[arg(long, value_name = "SPEC")]
    pub transformer: Option<String>,
    /// The T5 encoder's weights from this file instead of --model's `text_encoder_2/`: a GGUF
    /// in llama.cpp's naming (city96/t5-v1_1-xxl-encoder-gguf) or a .safetensors in
    /// transformers' naming; a local path or `hf:OWNER/REPO[@REVISION]/FILE`.
    #[arg(long = "text-encoder-2", value_name = "SPEC")]
    pub text_encoder_2: Option<String>,
    /// T5 prompt length in tokens (longer prompts are truncated, with a warning).
    #[arg(long, default_value_t = 512)]
    pub max_seq_len: usize,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// auto: CUDA if built in and present, else Metal, else the CPU.
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceArg,
    /// Which model --model is: auto reads its model_index.json (FluxFillPipeline or
    /// FluxKontextPipeline); name it for a folder without one whose transformer takes 64
    /// channels (Kontext and FLUX.1 dev look alike).
    #[arg(long, value_enum, default_value = "auto")]
    pub pipeline: PipelineArg,
    /// Where the transformer's weights live on a GPU: none (on the device throughout), model
    /// (it leaves the device while the VAE works), blocks (its blocks stay in host memory and
    /// come to the device one at a time, the next while the current one computes). With model
    /// or blocks the VAE is on the device only to encode and decode. On the CPU all compute
    /// alike.
    #[arg(long, value_enum, default_value = "none")]
    pub offload: OffloadArg,
    /// Quantize a dense transformer to this ggml type as it loads (q8_0, q6_k, q5_k, q4_k,
    /// q4_0, ...), each layer as `icedit quantize --type` writes it; a GGUF stays as stored.
    #[arg(long, value_name = "TYPE")]
    pub quantize: Option<String>,
    /// Fit the run into this much device memory (24G, 12GiB, 8000M): chooses --quantize and
    /// --offload, and prints the plan and its predicted peak before loading.
    #[arg(long, value_name = "SIZE", conflicts_with_all = ["offload", "quantize"])]
    pub max_memory: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum OffloadArg {
    None,
    Model,
    Blocks,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum PipelineArg {
    Auto,
    Fill,
    Kontext,
}

/// The pipeline `edit` and `fill` run, with its files fetched.
pub(crate) struct OpenedPipeline {
    pub pipeline: icedit_pipeline::FluxPipeline,
    /// `--model` as the recipe names it (with the commit, for Hub models).
    pub model_name: String,
    /// `--transformer`'s origin, when given.
    pub transformer: Option<String>,
    /// `--text-encoder-2`'s origin, when given.
    pub text_encoder_2: Option<String>,
    /// What the transformer's weights are stored as (`diffusers safetensors`, `GGUF Q4_K x30`).
    pub weights: String,
}

impl OpenedPipeline {
    /// The recipe's fields that come from the model, its weights and the run's precision; each
    /// command fills in the rest.
    pub fn recipe(&self, dtype: DType, max_sequence_length: usize) -> Recipe {
        Recipe {
            model: self.model_name.clone(),
            transformer: self.transformer.clone(),
            text_encoder_2: self.text_encoder_2.clone(),
            weights: self.weights.clone(),
            pipeline: (self.pipeline.kind() == PipelineKind::Kontext).then(|| "kontext".into()),
            max_sequence_length,
            dtype: format!("{dtype:?}").to_lowercase(),
            software: concat!("icedit ", env!("CARGO_PKG_VERSION")).into(),
            ..Recipe::default()
        }
    }
}

impl ModelArgs {
    /// `--transformer`, checked without touching the network.
    pub fn transformer_spec(&self) -> Result<Option<icedit_hub::FileSpec>> {
        file_spec("--transformer", self.transformer.as_deref())
    }

    /// `--text-encoder-2`, checked without touching the network.
    pub fn text_encoder_2_spec(&self) -> Result<Option<icedit_hub::FileSpec>> {
        file_spec("--text-encoder-2", self.text_encoder_2.as_deref())
    }

    /// Opens `--model` reading only its small config files: what kind of model it is is known
    /// before any weights are fetched.
    pub fn open(
        &self,
        hub: &icedit_hub::HubOptions,
        dtype: DType,
        device: &Device,
    ) -> Result<icedit_pipeline::FluxPipeline> {
        let repo = icedit_hub::ModelRepo::open(&self.model, hub)
            .with_context(|| format!("cannot open the model {}", self.model))?;
        let model_name = repo.describe();
        let asked = match self.pipeline {
            PipelineArg::Auto => None,
            PipelineArg::Fill => Some(PipelineKind::Fill),
            PipelineArg::Kontext => Some(PipelineKind::Kontext),
        };
        icedit_pipeline::FluxPipeline::with_kind(repo, asked, dtype, device.clone()).with_context(
            || format!("{model_name} does not look like a FLUX.1 Fill or Kontext pipeline"),
        )
    }

    /// Fetches every file an opened pipeline needs (`--transformer` and `--text-encoder-2` in
    /// place of the model's own).
    pub fn fetch_weights(
        &self,
        mut pipeline: icedit_pipeline::FluxPipeline,
        hub: &icedit_hub::HubOptions,
    ) -> Result<OpenedPipeline> {
        let (transformer, weights) = match self.transformer_spec()? {
            Some(spec) => {
                let (path, origin) = spec.fetch(hub)?;
                let files = icedit_flux::TensorFiles::open(std::slice::from_ref(&path))
                    .with_context(|| format!("--transformer {}", path.display()))?;
                pipeline.set_transformer_file(path);
                (Some(origin), files.format_summary())
            }
            None => (None, "diffusers safetensors".to_string()),
        };
        let text_encoder_2 = match self.text_encoder_2_spec()? {
            Some(spec) => {
                let (path, origin) = spec.fetch(hub)?;
                pipeline.set_text_encoder_2_file(path);
                Some(origin)
            }
            None => None,
        };
        pipeline.fetch_all()?;
        Ok(OpenedPipeline {
            // The recipe names the commit the files came from, for Hub models.
            model_name: pipeline.repo().describe_commit(),
            pipeline,
            transformer,
            text_encoder_2,
            weights,
        })
    }
}

/// The size of one run, for a memory plan.
pub(crate) struct RunSize {
    pub image_tokens: u64,
    pub text_tokens: u64,
    pub pixels: u64,
    /// The text encoders stay loaded beside the transformer (a server or worker).
    pub text_encoders_kept: bool,
}

impl ModelArgs {
    /// `--quantize`'s type, checked before anything loads.
    fn quantize_type(&self) -> Result<Option<candle_core::quantized::GgmlDType>> {
        self.quantize
            .as_deref()
            .map(|name| {
                icedit_flux::quantize::parse_quant_type(name).with_context(|| {
                    format!(
                        "--quantize {name}: not a type icedit quantizes to; use one of q8_0, \
                         q6_k, q5_k, q5_0, q5_1, q4_k, q4_0, q4_1, q3_k, q2_k, f16, bf16"
                    )
                })
            })
            .transpose()
    }

    /// `--max-memory`, checked before anything loads.
    pub fn memory_budget(&self) -> Result<Option<u64>> {
        self.quantize_type()?;
        self.max_memory
            .as_deref()
            .map(|text| {
                icedit_pipeline::memory::parse_size(text).with_context(|| {
                    format!("--max-memory {text}: not a size; write it as 24G, 12GiB or 8000M")
                })
            })
            .transpose()
    }

    /// Sets the pipeline's offload and quantization: `--offload` and `--quantize` as given,
    /// or the plan `--max-memory` makes for a run of `size` (printed, and returned for
    /// `--json`). Call before the transformer loads.
    pub fn apply_memory(
        &self,
        opened: &mut OpenedPipeline,
        size: RunSize,
        reporter: &progress::Reporter,
    ) -> Result<Option<icedit_pipeline::MemoryPlan>> {
        use icedit_pipeline::{MemoryOptions, Offload};
        let plan = match self.memory_budget()? {
            Some(budget) => {
                let mut inputs = opened.pipeline.plan_inputs(
                    size.image_tokens,
                    size.text_tokens,
                    size.pixels,
                )?;
                inputs.text_encoders_kept |= size.text_encoders_kept;
                let plan = icedit_pipeline::memory::plan(&inputs, budget).map_err(|e| {
                    anyhow::anyhow!(
                        "--max-memory {}: {e}",
                        self.max_memory.as_deref().unwrap_or_default()
                    )
                })?;
                reporter.note(&plan.describe());
                Some(plan)
            }
            None => None,
        };
        let options = match &plan {
            Some(plan) => plan.options,
            None => MemoryOptions {
                offload: match self.offload {
                    OffloadArg::None => Offload::None,
                    OffloadArg::Model => Offload::Model,
                    OffloadArg::Blocks => Offload::Blocks,
                },
                quantize: self.quantize_type()?,
            },
        };
        opened.pipeline.set_memory(options)?;
        if let Some(t) = options.quantize {
            // Weights the file stores quantized stay so; the dense ones are quantized.
            opened.weights = format!("{}, dense ones quantized to {t:?} at load", opened.weights);
        }
        Ok(plan)
    }
}

/// What `--json` says of memory: the options, the plan if any, and the peaks measured.
pub(crate) fn memory_json(
    options: icedit_pipeline::MemoryOptions,
    plan: Option<&icedit_pipeline::MemoryPlan>,
    device_peak: Option<&icedit_pipeline::memory::DeviceMemoryWatch>,
) -> serde_json::Value {
    serde_json::json!({
        "offload": options.offload.name(),
        "quantize": options.quantize.map(|t| format!("{t:?}")),
        "plan": plan.map(|p| p.to_json()),
        "peak_rss_bytes": icedit_pipeline::memory::peak_rss_bytes(),
        "peak_device_bytes": device_peak.map(|w| w.peak_bytes()),
    })
}

fn file_spec(flag: &str, spec: Option<&str>) -> Result<Option<icedit_hub::FileSpec>> {
    spec.map(|spec| {
        icedit_hub::FileSpec::parse(spec)
            .with_context(|| format!("{flag} {spec}: not a usable weights file"))
    })
    .transpose()
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum DeviceArg {
    /// CUDA if built in and a GPU answers, else Metal likewise, else the CPU.
    Auto,
    Cpu,
    Cuda,
    Metal,
}

#[derive(clap::Args)]
struct InspectArgs {
    /// A diffusers pipeline or transformer folder, or a single .safetensors file (BFL or diffusers names).
    #[arg(long)]
    model: PathBuf,
    /// The transformer's config.json, for single files whose config cannot be inferred.
    #[arg(long)]
    config: Option<PathBuf>,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceArg,
    /// Time one forward pass on random inputs for an image of this size (pixels, WIDTHxHEIGHT).
    #[arg(long, value_name = "WxH")]
    forward: Option<String>,
    /// Text tokens for --forward.
    #[arg(long, default_value_t = 512)]
    text_tokens: usize,
    /// Time the forward on these inputs instead (a .safetensors of `img`, `img_ids`, `txt`,
    /// `txt_ids`, `pooled`, `timestep`, `guidance`); an `out` tensor in it is compared with.
    #[arg(long, value_name = "FILE", conflicts_with = "forward")]
    inputs: Option<PathBuf>,
    /// Forwards to time (the first is a warm-up when there are several); the median is shown.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Keep the blocks in host memory and stream them to the device (`--offload blocks`).
    #[arg(long)]
    offload_blocks: bool,
    /// Quantize the dense weights at load (`--quantize` of edit).
    #[arg(long, value_name = "TYPE")]
    quantize: Option<String>,
}

fn main() {
    let cli = Cli::parse();
    // A signal runs no destructors: remove the temporary file of a result being written, so
    // that a stopped run leaves nothing behind. The server handles its own signals (it stops
    // accepting and finishes its jobs; a worker finishes the job in hand).
    if !matches!(cli.command, Command::Serve(_) | Command::Worker(_)) {
        let _ = ctrlc::set_handler(|| {
            icedit_pipeline::image_io::remove_partial_outputs();
            eprintln!("icedit: stopped; no partial output left behind");
            std::process::exit(130);
        });
    }
    if let Err(err) = run(cli) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect(args) => inspect(args),
        Command::Edit(args) => edit::run(args),
        Command::Fill(args) => fill::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Worker(args) => worker::run(args),
        Command::Batch(args) => batch::run(args),
        Command::Selftest(args) => selftest::run(args),
        Command::Judge(args) => judge::run(args),
        Command::Quantize(args) => quantize::run(args),
    }
}

pub(crate) fn device(arg: DeviceArg) -> Result<Device> {
    match arg {
        DeviceArg::Auto => Ok(auto_device()),
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda if cfg!(feature = "cuda") => {
            Device::new_cuda(0).context("cannot open CUDA device 0")
        }
        DeviceArg::Metal if cfg!(feature = "metal") => {
            Device::new_metal(0).context("cannot open the Metal device")
        }
        DeviceArg::Cuda => {
            bail!("this icedit was built without CUDA: rebuild with `--features cuda`")
        }
        DeviceArg::Metal => {
            bail!("this icedit was built without Metal: rebuild with `--features metal`")
        }
    }
}

/// The first device that answers: CUDA, then Metal (each only when built in), then the CPU.
fn auto_device() -> Device {
    if cfg!(feature = "cuda") {
        if let Ok(device) = Device::new_cuda(0) {
            return device;
        }
    }
    if cfg!(feature = "metal") {
        if let Ok(device) = Device::new_metal(0) {
            return device;
        }
    }
    Device::Cpu
}

/// How progress output and `--json` name a device.
/// Which attention a run on `device` takes for FLUX's 128-wide heads.
pub(crate) fn attention_path(device: &Device) -> &'static str {
    if icedit_flux::flash_attention(device, DType::BF16, 128) {
        "flash attention in bf16/f16, query chunks in f32"
    } else if icedit_flux::cpu_fast_paths(device) {
        "tiled CPU kernel"
    } else {
        "query chunks (half precision: f32 scores, rounded probabilities)"
    }
}

pub(crate) fn device_name(device: &Device) -> &'static str {
    match device {
        Device::Cpu => "cpu",
        Device::Cuda(_) => "cuda:0",
        Device::Metal(_) => "metal:0",
    }
}

fn inspect(args: InspectArgs) -> Result<()> {
    let dtype = parse_dtype(&args.dtype)?;
    let device = device(args.device)?;
    if let Some(size) = &args.forward {
        parse_forward(size, args.text_tokens)?;
    }
    let checkpoint = match &args.config {
        Some(path) => Checkpoint::open_with_config(&args.model, FluxConfig::from_json_file(path)?),
        None => Checkpoint::open(&args.model),
    }
    .with_context(|| format!("cannot open the transformer at {}", args.model.display()))?;

    let quantize = args
        .quantize
        .as_deref()
        .map(|name| {
            icedit_flux::quantize::parse_quant_type(name)
                .with_context(|| format!("--quantize {name}: not a type icedit quantizes to"))
        })
        .transpose()?;
    if args.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    let watch = icedit_pipeline::memory::DeviceMemoryWatch::start(&device);
    let start = Instant::now();
    let load_on = if args.offload_blocks {
        Device::Cpu
    } else {
        device.clone()
    };
    let mut model = FluxTransformer::new(
        checkpoint.config(),
        icedit_flux::WeightSource::checkpoint(&checkpoint, dtype, &load_on)
            .quantized_at_load(quantize),
    )
    .with_context(|| format!("cannot load the transformer from {}", args.model.display()))?;
    if args.offload_blocks {
        model = model.placed(&device, true)?;
    }
    let load_s = start.elapsed().as_secs_f64();
    let c = model.config();
    println!(
        "checkpoint   {} ({:?} layout, {} file(s))",
        args.model.display(),
        checkpoint.layout(),
        checkpoint.files().paths().len()
    );
    println!(
        "transformer  {} double + {} single blocks, {} heads x {}, channels {} -> {}, guidance {}",
        c.num_layers,
        c.num_single_layers,
        c.num_attention_heads,
        c.attention_head_dim,
        c.in_channels,
        c.out_channels(),
        if c.guidance_embeds {
            "embedded"
        } else {
            "none"
        },
    );
    println!("loaded       {dtype:?} on {device:?} in {load_s:.2}s");
    println!("attention    {}", attention_path(&device));
    let unused = checkpoint.unused_tensors();
    if !unused.is_empty() {
        eprintln!(
            "warning: {} tensor(s) in the checkpoint are not part of this transformer (another model's weights?): {}{}",
            unused.len(),
            unused.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
            if unused.len() > 5 { ", ..." } else { "" }
        );
    }
    drop(checkpoint);

    let (resident, offloaded) = model.weight_bytes();
    println!(
        "weights      {:.2} GiB on the device, {:.2} GiB in host memory",
        resident as f64 / (1u64 << 30) as f64,
        offloaded as f64 / (1u64 << 30) as f64
    );
    if let Some(path) = &args.inputs {
        let io = candle_core::safetensors::load(path, &device)
            .with_context(|| format!("--inputs {}", path.display()))?;
        let input = FluxInput::from_named(&io)?;
        let out = time_forwards(&model, &input, args.repeat, &device, "--inputs")?;
        if let Some(expected) = io.get("out") {
            let (out, expected) = (out.to_dtype(DType::F32)?, expected.to_dtype(DType::F32)?);
            println!(
                "vs out       max abs {:.3e}, rms {:.3e}, out rms {:.3e}",
                icedit_flux::compare::max_abs_diff(&out, &expected)?,
                icedit_flux::compare::rms_diff(&out, &expected)?,
                expected.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()?
            );
        }
    }
    if let Some(size) = args.forward {
        time_forward(&model, &size, args.text_tokens, &device, dtype, args.repeat)?;
    }
    if let Some(watch) = &watch {
        println!(
            "peak device  {:.2} GiB in use (the driver's count, sampled every 2 ms)",
            watch.peak_bytes() as f64 / (1u64 << 30) as f64
        );
    }
    if let Some(rss) = icedit_pipeline::memory::peak_rss_bytes() {
        println!("peak RSS     {:.2} GiB", rss as f64 / (1u64 << 30) as f64);
    }
    Ok(())
}

/// `repeat` timed forwards (after a warm-up when `repeat` > 1); prints the median and returns
/// the last output.
fn time_forwards(
    model: &FluxTransformer,
    input: &FluxInput,
    repeat: usize,
    device: &Device,
    what: &str,
) -> Result<Tensor> {
    if repeat > 1 {
        model.forward(input)?;
        device.synchronize()?;
    }
    let mut seconds = Vec::with_capacity(repeat);
    let mut out = None;
    for _ in 0..repeat {
        let start = Instant::now();
        out = Some(model.forward(input)?);
        device.synchronize()?;
        seconds.push(start.elapsed().as_secs_f64());
    }
    seconds.sort_by(f64::total_cmp);
    let out = out.expect("repeat >= 1");
    println!(
        "forward      {what}: median {:.3}s of {repeat} (fastest {:.3}s), output {:?}",
        seconds[repeat / 2],
        seconds[0],
        out.dims()
    );
    Ok(out)
}

/// `--forward WxH` and `--text-tokens`, checked before the model loads.
fn parse_forward(size: &str, text_tokens: usize) -> Result<(usize, usize)> {
    let (w, h) = size
        .split_once(['x', 'X'])
        .and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)))
        .with_context(|| {
            format!("--forward takes WIDTHxHEIGHT in pixels, e.g. 1024x512, not `{size}`")
        })?;
    image_io::check_size(w, h, &format!("--forward {size}"))?;
    if text_tokens == 0 || text_tokens > MAX_SEQUENCE_LENGTH {
        bail!(
            "--text-tokens {text_tokens}: between 1 and {MAX_SEQUENCE_LENGTH} (T5's limit in FLUX)"
        );
    }
    Ok((w as usize, h as usize))
}

fn time_forward(
    model: &FluxTransformer,
    size: &str,
    text_tokens: usize,
    device: &Device,
    dtype: DType,
    repeat: usize,
) -> Result<()> {
    let (w, h) = parse_forward(size, text_tokens)?;

    let (gh, gw) = (h / PIXELS_PER_TOKEN, w / PIXELS_PER_TOKEN);
    let c = model.config();
    let img = Tensor::randn(0f32, 1.0, (1, gh * gw, c.in_channels), device)?;
    let img_ids = image_ids(gh, gw, device)?;
    let txt = Tensor::randn(0f32, 1.0, (1, text_tokens, c.joint_attention_dim), device)?;
    let txt_ids = text_ids(text_tokens, device)?;
    let pooled = Tensor::randn(0f32, 1.0, (1, c.pooled_projection_dim), device)?;
    let timestep = Tensor::new(&[0.5f32], device)?;
    let guidance = Tensor::new(&[0.03f32], device)?;
    let input = FluxInput {
        img: &img,
        img_ids: &img_ids,
        txt: &txt,
        txt_ids: &txt_ids,
        pooled: &pooled,
        timestep: &timestep,
        guidance: c.guidance_embeds.then_some(&guidance),
    };
    let what = format!(
        "{w}x{h} px ({} image + {text_tokens} text tokens), {dtype:?}",
        gh * gw
    );
    time_forwards(model, &input, repeat, device, &what)?;
    Ok(())
}
