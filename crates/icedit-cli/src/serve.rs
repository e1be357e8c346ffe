//! `icedit serve`: loads the model and adapters once and serves edits over HTTP (OpenAI's
//! images edits API and a job API, see icedit-server).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use icedit_flux::parse_dtype;
use icedit_hub::HubOptions;
use icedit_pipeline::edit::{DIPTYCH_TEMPLATE, MAX_SEQUENCE_LENGTH};
use icedit_pipeline::image_io::MAX_PIXELS;
use icedit_pipeline::recipe::Recipe;
use icedit_pipeline::PipelineKind;
use icedit_server::engine::{ServedAdapter, MAX_SEEDS};
use icedit_server::{router, AppState, Engine, EngineConfig, Jobs, RedisQueue, ServerConfig};

use crate::adapters::{
    adapter_specs, adapter_uses, base_model_warning, check_base_model, describe_applied,
    load_adapters, manifest_template, AdapterArgs,
};
use crate::judge::JudgeArgs;
use crate::progress::Reporter;
use crate::{device, device_name, ModelArgs};

#[derive(clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    adapters: AdapterArgs,
    /// The judge of requests that ask for a best-of-N search (`search` in the job API).
    #[command(flatten)]
    judging: JudgeArgs,
    /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0 needs --api-keys).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// A file of API keys, one per line: requests must send `Authorization: Bearer KEY`.
    #[arg(long, value_name = "FILE")]
    api_keys: Option<PathBuf>,
    /// Jobs that may wait beside the running one; more are refused with 429.
    #[arg(long, default_value_t = 16)]
    queue_size: usize,
    /// Largest request body, in MiB.
    #[arg(long, default_value_t = 32)]
    max_upload_mb: usize,
    /// Largest image, in pixels (checked from its header, before decoding).
    #[arg(long, default_value_t = MAX_PIXELS)]
    max_pixels: u64,
    /// Seconds a request may take, queue included.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Send jobs to this Redis queue (`redis://HOST:PORT[/DB]`, or `redis+unix:///PATH` for a Unix socket) instead of running them here:
    /// `icedit worker`s with the same model flags run them. The model is then not loaded.
    #[arg(long, value_name = "URL")]
    queue: Option<String>,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
}

/// The key prefix of icedit's Redis queue.
pub const QUEUE_PREFIX: &str = "icedit";

/// What serving needs from the model flags: the pipeline's kind, the jobs' template and
/// recipe, and (when loaded) the engine. The server and `icedit worker` build it alike, so a
/// worker refuses exactly what its server does.
pub(crate) struct EngineSetup {
    pub kind: PipelineKind,
    pub model_name: String,
    pub config: EngineConfig,
    pub engine: Option<Engine>,
    pub device: candle_core::Device,
}

impl EngineSetup {
    pub fn open(
        model: &ModelArgs,
        adapter_args: &AdapterArgs,
        judging: &JudgeArgs,
        reporter: &Reporter,
        load: bool,
    ) -> Result<Self> {
        let judge_specs = judging.parse()?;
        let judge_name = judge_specs.as_ref().map(|specs| {
            specs
                .iter()
                .map(|s| s.name())
                .collect::<Vec<_>>()
                .join(", then ")
        });
        let dtype = parse_dtype(&model.dtype)?;
        let device = device(model.device)?;
        model.memory_budget()?;
        let hub = HubOptions::from_env();
        if model.max_seq_len == 0 || model.max_seq_len > MAX_SEQUENCE_LENGTH {
            bail!("--max-seq-len must be 1 to {MAX_SEQUENCE_LENGTH}");
        }
        let pipeline = model.open(&hub, dtype, &device)?;
        let kind = pipeline.kind();
        let specs = adapter_specs(adapter_args, kind, false);
        let mut manifests = Vec::new();
        let mut served = Vec::new();
        for spec in &specs {
            let manifest =
                icedit_adapters::manifest_of(spec).with_context(|| format!("--lora {spec}"))?;
            served.push(ServedAdapter {
                name: spec.clone(),
                template: manifest.as_ref().and_then(|m| m.prompt.clone()),
                can_leave_out: None,
            });
            manifests.extend(manifest);
        }
        for manifest in &manifests {
            check_base_model(manifest, kind)?;
            if let Some(warning) = base_model_warning(manifest, &model.model, kind) {
                reporter.warn(&warning);
            }
        }
        let base_template = match kind {
            PipelineKind::Fill => DIPTYCH_TEMPLATE,
            PipelineKind::Kontext => "{instruction}",
        };
        let template = manifest_template(&manifests, base_template)?.to_string();
        // Without the weights (a queue's front end), what the model's name and kind say.
        let mut recipe = Recipe {
            task: "edit".into(),
            model: pipeline.repo().describe(),
            pipeline: (kind == PipelineKind::Kontext).then(|| "kontext".to_string()),
            max_sequence_length: model.max_seq_len,
            dtype: format!("{dtype:?}").to_lowercase(),
            software: concat!("icedit ", env!("CARGO_PKG_VERSION")).into(),
            ..Recipe::default()
        };
        if !load {
            return Ok(Self {
                kind,
                model_name: recipe.model.clone(),
                config: EngineConfig {
                    template,
                    recipe,
                    max_sequence_length: model.max_seq_len,
                    judge: judge_name,
                    adapters: served,
                    base_template: base_template.to_string(),
                    max_images: MAX_SEEDS,
                },
                engine: None,
                device,
            });
        }
        let adapters = load_adapters(adapter_args, &specs, false, &hub, reporter)?;
        let mut opened = model.fetch_weights(pipeline, &hub)?;
        // A server plans for the usual size of its model's runs: ICEdit's 1024x512 diptych,
        // or Kontext's megapixel output beside a megapixel photo.
        let (image_tokens, pixels) = match kind {
            PipelineKind::Fill => (2048, 1024 * 512),
            PipelineKind::Kontext => (8192, 1024 * 1024),
        };
        if model.max_memory.is_some() {
            reporter.note(&format!(
                "planning memory for a run of {image_tokens} image tokens ({pixels} pixels)"
            ));
        }
        model.apply_memory(
            &mut opened,
            crate::RunSize {
                image_tokens,
                text_tokens: model.max_seq_len as u64,
                pixels,
                text_encoders_kept: true,
            },
            reporter,
        )?;
        let model_name = opened.model_name.clone();
        recipe = Recipe {
            task: "edit".into(),
            ..opened.recipe(dtype, model.max_seq_len)
        };
        let mut pipeline = opened.pipeline;
        recipe.adapters = adapter_uses(&adapters);
        pipeline.set_adapters(
            adapters.into_iter().map(|(_, c)| c).collect(),
            adapter_args.lora_mode.apply_mode(),
        )?;
        let mut callback = reporter.callback();
        pipeline.load_transformer(&mut callback)?;
        for applied in pipeline.applied_adapters() {
            reporter.note(&describe_applied(applied));
            if let Some(adapter) = served.iter_mut().find(|a| a.name == applied.name) {
                adapter.can_leave_out = Some(applied.merged_layers == 0);
            }
        }
        let mut engine = Engine::new(
            pipeline,
            EngineConfig {
                template,
                recipe,
                max_sequence_length: model.max_seq_len,
                judge: None,
                adapters: served,
                base_template: base_template.to_string(),
                max_images: MAX_SEEDS,
            },
        );
        if let Some(specs) = &judge_specs {
            reporter.note(&format!("judge: {}", judge_name.as_deref().unwrap_or("")));
            engine = engine.with_judge(Box::new(judging.build(specs, &hub, &device, dtype)?));
        }
        Ok(Self {
            kind,
            model_name,
            config: engine.config().clone(),
            engine: Some(engine),
            device,
        })
    }
}

pub fn run(args: ServeArgs) -> Result<()> {
    let reporter = Reporter::new(args.quiet);
    if args.queue_size == 0 || args.queue_size > 10_000 {
        bail!("--queue-size must be 1 to 10000");
    }
    if args.timeout == 0 || args.max_upload_mb == 0 || args.max_pixels == 0 {
        bail!("--timeout, --max-upload-mb and --max-pixels must be above 0");
    }
    let address: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .with_context(|| {
            format!(
                "--host {} --port {}: not an address to listen on",
                args.host, args.port
            )
        })?;
    let api_keys = match &args.api_keys {
        Some(path) => read_keys(path)?,
        None => Vec::new(),
    };
    if !address.ip().is_loopback() && api_keys.is_empty() {
        bail!(
            "--host {}: a server reachable from other machines needs --api-keys FILE",
            args.host
        );
    }

    let setup = EngineSetup::open(
        &args.model,
        &args.adapters,
        &args.judging,
        &reporter,
        // With a queue the workers hold the model; the server only validates.
        args.queue.is_none(),
    )?;
    let EngineSetup {
        kind,
        model_name,
        config: engine_config,
        engine,
        device,
    } = setup;
    let timeout = Duration::from_secs(args.timeout);
    let (jobs, engine_thread) = match (&args.queue, engine) {
        (Some(url), _) => {
            let queue = RedisQueue::open(url, QUEUE_PREFIX)?;
            reporter.note(&format!("jobs go to the Redis queue at {url}"));
            Jobs::start_queue(Arc::new(queue), args.queue_size, Some(timeout))
        }
        (None, Some(engine)) => Jobs::start(engine, args.queue_size, Some(timeout)),
        (None, None) => unreachable!("an engine is loaded without --queue"),
    };
    let place = match &args.queue {
        Some(url) => format!("queue {url}"),
        None => device_name(&device).to_string(),
    };
    let state = AppState {
        jobs: Arc::clone(&jobs),
        kind,
        engine: Arc::new(engine_config),
        config: Arc::new(ServerConfig {
            api_keys,
            max_body_bytes: args.max_upload_mb << 20,
            max_pixels: args.max_pixels,
            timeout: Some(timeout),
            model_name: model_name.clone(),
        }),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()
        .context("cannot start the server's runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen on {address}"))?;
        let bound = listener.local_addr()?;
        // One line a client or a test can read: where the server listens.
        eprintln!(
            "icedit serve: {model_name} ({}) on {}, listening on http://{bound}",
            kind.name(),
            place
        );
        axum::serve(listener, router(state))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("the server stopped")
    })?;
    // Stop taking jobs; the engine finishes those it has (with a queue: the relay follows
    // its jobs to their end), then exits.
    jobs.close();
    reporter.note("finishing the queued jobs before exiting");
    let _ = engine_thread.join();
    Ok(())
}

fn read_keys(path: &PathBuf) -> Result<Vec<String>> {
    let text = icedit_flux::files::read_text_file(path, 1 << 20)
        .with_context(|| format!("--api-keys {}", path.display()))?;
    let keys: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    if keys.is_empty() {
        bail!(
            "--api-keys {}: the file holds no key (one a line)",
            path.display()
        );
    }
    if let Some(short) = keys.iter().find(|k| k.len() < 16) {
        bail!(
            "--api-keys {}: a key of {} characters is too easy to guess; use 16 or more",
            path.display(),
            short.len()
        );
    }
    Ok(keys)
}

/// Ctrl-C or SIGTERM: stop accepting, finish the requests in flight.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
