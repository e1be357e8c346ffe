//! `icedit edit`: instruction-based editing, ICEdit's in-context diptych on FLUX.1 Fill with
//! LoRA / MoE-LoRA adapters, or FLUX.1 Kontext's in-sequence conditioning on a Kontext model.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use icedit_adapters::{manifest_of, AppliedAdapter};
use icedit_flux::{parse_dtype, StepCacheConfig};
use icedit_hub::{HubOptions, ModelSource};
use icedit_image::resize::{resize_rgb, Filter};
use icedit_judge::JudgeSpec;
use icedit_pipeline::edit::{
    JobOptions, DEFAULT_CONTEXT, DEFAULT_FEATHER, DIPTYCH_TEMPLATE, ICEDIT_GUIDANCE,
};
use icedit_pipeline::image_io::{
    aspect_warning, load_mask, load_rgb, save_png, write_file_atomically,
};
use icedit_pipeline::latents::VAE_SCALE;
use icedit_pipeline::masked::{ContextMargin, Window};
use icedit_pipeline::recipe::Recipe;
use icedit_pipeline::search::{
    EarlyFilter, SearchOutcome, SearchSettings, Selection, MAX_CANDIDATES,
};
use icedit_pipeline::{EditJob, EditOutput, EditSettings, PipelineKind};
use serde_json::json;

use crate::adapters::{
    adapter_specs, adapter_uses, base_model_warning, check_base_model, describe_applied,
    load_adapters, manifest_template, AdapterArgs,
};
use crate::inputs::{add_adapter_inputs, add_model_inputs, check_png_name, read_latents};
use crate::judge::JudgeArgs;
use crate::outputs::{Inputs, Outputs};
use crate::progress::Reporter;
use crate::{device, device_name, memory_json, ModelArgs, RunSize};
use icedit_pipeline::memory::DeviceMemoryWatch;
use icedit_server::engine::{
    EditRequest, Engine, EngineConfig, EngineError, EngineEvent, Produced, SearchRequest,
};

#[derive(clap::Args)]
pub struct EditArgs {
    /// The photo to edit (PNG, JPEG, WebP, BMP, TIFF).
    #[arg(long)]
    image: PathBuf,
    /// What to change, e.g. "make it night". ICEdit: it completes the in-context prompt
    /// (prompts/icedit-diptych.txt); Kontext: it is the prompt, as typed.
    #[arg(long, required_unless_present = "prompt", conflicts_with = "prompt")]
    instruction: Option<String>,
    /// The whole prompt instead of the templated instruction.
    #[arg(long)]
    prompt: Option<String>,
    #[command(flatten)]
    adapters: AdapterArgs,
    /// ICEdit: the width of each half of the diptych [default: 512, as the adapters were
    /// trained]. Kontext: the output's width, with --height [default: the photo's aspect ratio
    /// at --max-area].
    #[arg(long)]
    width: Option<u32>,
    /// Kontext: the output's height, with --width.
    #[arg(long)]
    height: Option<u32>,
    /// Kontext: the output's pixel budget; the size keeps --width/--height's (or the photo's)
    /// aspect ratio [default: --width x --height, else 1048576 (1024^2)].
    #[arg(long, value_name = "PIXELS")]
    max_area: Option<u64>,
    /// Kontext: use the photo at its own size (floored to multiples of 16) instead of the
    /// Kontext training resolution of the nearest aspect ratio.
    #[arg(long)]
    no_auto_resize: bool,
    /// Change only where this mask is white (a PNG of the photo's size). ICEdit: a window
    /// around the mask is edited at --width and stitched back into the photo at its own size
    /// (cost follows the mask). Kontext: diffusers' FluxKontextInpaintPipeline, the output at
    /// the photo's Kontext size.
    #[arg(long, value_name = "PNG", conflicts_with = "region")]
    mask: Option<PathBuf>,
    /// A rectangle to change instead of --mask: x,y,w,h in the photo's pixels.
    #[arg(long, value_name = "X,Y,W,H")]
    region: Option<String>,
    /// ICEdit masked edits: context around the mask's bounding box on each side, in pixels
    /// (64) or as a fraction of the box's longer side (0.25 or 25%) [default: 0.25].
    #[arg(long, value_name = "PX|FRACTION")]
    context: Option<String>,
    /// ICEdit masked edits: width in pixels of the soft edge outside the mask where the edit
    /// fades into the photo [default: 8].
    #[arg(long, value_name = "PX")]
    feather: Option<u32>,
    /// Kontext: what the edit should avoid, with --true-cfg (two transformer passes per step).
    #[arg(long, requires = "true_cfg")]
    negative_prompt: Option<String>,
    /// Kontext: true classifier-free guidance scale (> 1) with --negative-prompt.
    #[arg(long, value_name = "SCALE", requires = "negative_prompt")]
    true_cfg: Option<f32>,
    /// Denoising steps [default: 28; 8 with --fast].
    #[arg(long)]
    steps: Option<usize>,
    /// A faster, lower-quality edit: the 8-step turbo LoRA (turbo-alpha, trained on FLUX.1
    /// dev) stacked on the other adapters, 8 steps.
    #[arg(long, conflicts_with = "no_lora")]
    fast: bool,
    /// A step cache, lossy and opt-in, deciding as diffusers' hooks do:
    /// `first-block:THRESHOLD` (FirstBlockCacheConfig; e.g. first-block:0.1) or
    /// `taylorseer[:interval=5,warmup=3,order=1,cooldown=N,dtype=bf16|f32]`
    /// (TaylorSeerCacheConfig's settings and defaults). --json lists the steps computed in full.
    #[arg(long, value_name = "SPEC")]
    cache: Option<String>,
    /// Embedded guidance [default: 50 for ICEdit, as its paper; 2.5 for Kontext, as BFL's
    /// examples].
    #[arg(long)]
    guidance: Option<f32>,
    /// Noise seed (torch-compatible) [default: 42]; with --judge and `--seeds N`, the first
    /// candidate's.
    #[arg(long)]
    seed: Option<u64>,
    /// Several seeds, comma separated: one output each (`{seed}` in --out is replaced).
    #[arg(long, value_delimiter = ',', value_name = "S1,S2,..")]
    seeds: Vec<u64>,
    #[command(flatten)]
    judging: JudgeArgs,
    /// Steps each candidate runs before the judge sees it.
    #[arg(long, default_value_t = 10)]
    early_steps: usize,
    /// continue: candidates run the start of the full schedule and the winner goes on from
    /// there (cost steps + (N-1) x early steps); restart: the paper's short runs, then a fresh
    /// full run of the winner (N x early steps + steps).
    #[arg(long, value_enum, default_value = "continue")]
    early_filter: EarlyFilterArg,
    /// tournament: the running best against each next candidate; halving: pairs, the better
    /// half kept at twice the steps each round.
    #[arg(long, value_enum, default_value = "tournament")]
    selection: SelectionArg,
    /// Candidates denoised together in one transformer pass before judging (faster on a GPU
    /// with memory to spare; results equal to rounding). 1 runs them one at a time, each
    /// exactly as a plain edit of its seed.
    #[arg(long, default_value_t = 1)]
    batch_candidates: usize,
    /// Keep every candidate's previews and the judge's verdicts (verdicts.json) here.
    #[arg(long, value_name = "DIR")]
    save_candidates: Option<PathBuf>,
    /// Initial latents instead of seeded noise: a safetensors file with a float32 tensor
    /// `latents` [1, 16, H/8, W/8] for the whole generated image (ICEdit: the diptych).
    #[arg(long, value_name = "FILE")]
    latents: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// Where to write the edited image (PNG); `{seed}` is replaced by the seed.
    #[arg(long)]
    out: PathBuf,
    /// Resize the result back to the source image's size.
    #[arg(long)]
    keep_size: bool,
    /// ICEdit: also write the whole generated diptych, as OUT-diptych.png.
    #[arg(long)]
    save_diptych: bool,
    /// Print a machine-readable summary (JSON) on stdout.
    #[arg(long)]
    json: bool,
    /// Also print the MoE routing histogram.
    #[arg(long)]
    verbose: bool,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
}

/// Steps of an edit: FLUX's usual 28, or 8 with the turbo LoRA (`--fast`).
const DEFAULT_STEPS: usize = 28;
const FAST_STEPS: usize = 8;

#[derive(Clone, Copy, ValueEnum)]
enum EarlyFilterArg {
    Continue,
    Restart,
}

#[derive(Clone, Copy, ValueEnum)]
enum SelectionArg {
    Tournament,
    Halving,
}

pub fn run(args: EditArgs) -> Result<()> {
    let reporter = Reporter::new(args.quiet);
    let started = Instant::now();
    let dtype = parse_dtype(&args.model.dtype)?;
    let device = device(args.model.device)?;
    args.model.memory_budget()?;
    let device_memory = DeviceMemoryWatch::start(&device);
    match (&args.instruction, &args.prompt) {
        (Some(i), _) if i.trim().is_empty() => {
            bail!("the instruction is empty; say what to change, e.g. \"make it night\"")
        }
        (None, Some(p)) if p.trim().is_empty() => {
            bail!("--prompt is empty; describe the edit, or give --instruction")
        }
        (None, None) => bail!("give --instruction (what to change)"),
        _ => {}
    }
    let steps = args
        .steps
        .unwrap_or(if args.fast { FAST_STEPS } else { DEFAULT_STEPS });
    let first_seed = args.seed.unwrap_or(42);
    let seeds = match (&args.judging.judge, args.seeds.as_slice()) {
        (Some(_), []) => bail!("--judge compares candidates: give --seeds N (a count) or a list"),
        (Some(_), [count]) => {
            if *count < 2 || *count > MAX_CANDIDATES as u64 {
                bail!("--seeds {count}: a seed search takes 2 to {MAX_CANDIDATES} candidates");
            }
            if first_seed.checked_add(*count).is_none() {
                bail!("--seed {first_seed} with --seeds {count}: the seeds would pass 2^64");
            }
            (first_seed..first_seed + count).collect()
        }
        (_, []) => vec![first_seed],
        (_, _) if args.seed.is_some() => {
            bail!("give either --seed or a --seeds list, not both")
        }
        (_, list) => list.to_vec(),
    };
    if args.judging.judge.is_some() && args.latents.is_some() {
        bail!("--latents gives one starting point; it cannot be combined with a seed search (--judge)");
    }
    // Judge specs are checked now; in-process judges load once the inputs are known good.
    let judge_specs = args.judging.parse()?;
    let search = SearchSettings {
        seeds: seeds.clone(),
        early_steps: args.early_steps,
        filter: match args.early_filter {
            EarlyFilterArg::Continue => EarlyFilter::Continue,
            EarlyFilterArg::Restart => EarlyFilter::Restart,
        },
        selection: match args.selection {
            SelectionArg::Tournament => Selection::Tournament,
            SelectionArg::Halving => Selection::Halving,
        },
        batch: args.batch_candidates,
    };
    // The guidance's default depends on the model, known once it is opened; the numbers given
    // are checked now.
    let settings = EditSettings {
        steps,
        guidance: args.guidance.unwrap_or(ICEDIT_GUIDANCE),
        max_sequence_length: args.model.max_seq_len,
    };
    settings.validate()?;
    if judge_specs.is_some() {
        search.validate(&settings)?;
    } else if args.save_candidates.is_some() {
        bail!("--save-candidates keeps a seed search's previews; it needs --judge");
    }
    let step_cache = args
        .cache
        .as_deref()
        .map(StepCacheConfig::parse)
        .transpose()?;
    if step_cache.is_some() && judge_specs.is_some() && args.batch_candidates > 1 {
        bail!("--cache keeps each candidate's own state: use it with --batch-candidates 1");
    }
    if args.adapters.top_k == Some(0) {
        bail!("--top-k must be at least 1");
    }
    if let Some(scale) = args.adapters.lora_scales.iter().find(|s| !s.is_finite()) {
        bail!("--lora-scale {scale}: a scale must be a finite number");
    }

    // Every file this run may write, checked against every input before anything is read,
    // downloaded or loaded. A search writes one result, the winner's, which may be any seed.
    check_png_name(&args.out)?;
    let outputs = if judge_specs.is_some() {
        let mut winners: Vec<OutputPaths> = Vec::new();
        for seed in &seeds {
            let paths = output_paths(&args.out, &[*seed])?.remove(0);
            if !winners.contains(&paths) {
                winners.push(paths);
            }
        }
        winners
    } else {
        output_paths(&args.out, &seeds)?
    };
    let hub = HubOptions::from_env();
    let mut inputs = Inputs::default();
    inputs.file("--image", &args.image);
    if let Some(mask) = &args.mask {
        inputs.file("--mask", mask);
    }
    if let Some(region) = &args.region {
        Window::parse(region)?;
    }
    if let Some(context) = &args.context {
        ContextMargin::parse(context)?;
    }
    if let Some(latents) = &args.latents {
        inputs.file("--latents", latents);
    }
    add_model_inputs(&mut inputs, &args.model, &hub)?;
    for spec in &args.adapters.loras {
        add_adapter_inputs(&mut inputs, spec);
    }
    for spec in judge_specs.iter().flatten() {
        if let JudgeSpec::Clip { model } | JudgeSpec::Vlm { model } = spec {
            if let Ok(ModelSource::Local(folder)) = ModelSource::parse(model) {
                inputs.folder("judge's model folder", &folder);
            }
        }
    }
    let mut planned = Outputs::default();
    for paths in &outputs {
        planned.file("--out", &paths.edit);
        if args.save_diptych {
            planned.file("--save-diptych", &paths.diptych);
        }
    }
    if let Some(dir) = &args.save_candidates {
        planned.folder("--save-candidates", dir, is_candidate_file);
    }
    planned.check(&inputs)?;

    // Inputs and adapters first: a bad image or adapter should fail before the model loads.
    let source = load_rgb(&args.image)?;
    for note in &source.notes {
        reporter.note(&format!("{}: {note}", args.image.display()));
    }
    let mask = match (&args.mask, &args.region) {
        (Some(path), _) => Some(load_mask(path)?),
        (None, Some(region)) => {
            let (w, h) = source.rgb.dimensions();
            Some(Window::parse(region)?.mask(w, h)?)
        }
        (None, None) => None,
    };
    let context = match &args.context {
        Some(text) => ContextMargin::parse(text)?,
        None => DEFAULT_CONTEXT,
    };
    // The model's kind, from its small config files; its weights are fetched later.
    let pipeline = args.model.open(&hub, dtype, &device)?;
    let kind = pipeline.kind();
    check_flags_for(kind, &args)?;
    // The adapters' manifests (built in or local, no download) say which prompt template they
    // were trained with and on which model.
    let adapter_specs = adapter_specs(&args.adapters, kind, args.fast);
    let mut manifests = Vec::new();
    for spec in &adapter_specs {
        manifests.extend(manifest_of(spec).with_context(|| format!("--lora {spec}"))?);
    }
    for manifest in &manifests {
        check_base_model(manifest, kind)?;
        if let Some(warning) = base_model_warning(manifest, &args.model.model, kind) {
            reporter.warn(&warning);
        }
    }
    // A whole --prompt goes to the model as it is; an instruction into the adapters' template.
    let (instruction, template) = match (&args.instruction, &args.prompt) {
        (Some(instruction), _) => {
            let default = match kind {
                PipelineKind::Fill => DIPTYCH_TEMPLATE,
                PipelineKind::Kontext => "{instruction}",
            };
            (instruction.clone(), manifest_template(&manifests, default)?)
        }
        (None, Some(p)) => (p.clone(), "{instruction}"),
        (None, None) => unreachable!("checked above"),
    };
    let negative = match (&args.negative_prompt, args.true_cfg) {
        (Some(negative), Some(scale)) => {
            if !scale.is_finite() || scale <= 1.0 {
                bail!("--true-cfg {scale}: true CFG takes a scale above 1 (1 turns it off)");
            }
            if negative.trim().is_empty() {
                bail!("--negative-prompt is empty; say what the edit should avoid");
            }
            Some((negative.clone(), scale))
        }
        _ => None,
    };
    // The request, as the server, its workers and `batch` build it, checked in the same place.
    let request = EditRequest {
        photo: source.rgb.clone(),
        mask,
        instruction,
        seeds: seeds.clone(),
        steps: Some(steps),
        guidance: args.guidance,
        options: JobOptions {
            width: args.width,
            height: args.height,
            max_area: args.max_area,
            auto_resize: !args.no_auto_resize,
            context,
            feather: args.feather.unwrap_or(DEFAULT_FEATHER),
        },
        negative,
        search: judge_specs.as_ref().map(|_| SearchRequest {
            early_steps: search.early_steps,
            early_filter: search.filter,
            selection: search.selection,
        }),
        adapters: None,
    };
    let mut config = EngineConfig {
        template: template.to_string(),
        recipe: Recipe::default(),
        max_sequence_length: args.model.max_seq_len,
        judge: judge_specs.as_ref().map(|specs| {
            let names: Vec<String> = specs.iter().map(|s| s.name()).collect();
            names.join(", then ")
        }),
        adapters: Vec::new(),
        base_template: template.to_string(),
        max_images: usize::MAX,
    };
    let mut edit = request
        .prepare(kind, &config)
        .with_context(|| format!("--image {}", args.image.display()))?;
    if let Some(search) = edit.search.as_mut() {
        search.batch = args.batch_candidates;
    }
    let (job, prompt, settings) = (&edit.job, edit.prompt.clone(), edit.settings.clone());
    let negative = edit.request.negative.clone();
    if kind == PipelineKind::Fill {
        let (w, h) = job.generated_size();
        if let Some(warning) = aspect_warning(w / 2, h, "the edit") {
            reporter.warn(&warning);
        }
    }
    let (generated_width, generated_height) = job.generated_size();
    let latents = match &args.latents {
        Some(path) => {
            let latents = read_latents(path)?;
            let expected = [
                1,
                16,
                generated_height as usize / VAE_SCALE,
                generated_width as usize / VAE_SCALE,
            ];
            if latents.dims() != expected {
                bail!(
                    "{}: the latents are {:?}; this {generated_width}x{generated_height} {} \
                     needs {expected:?}",
                    path.display(),
                    latents.dims(),
                    match kind {
                        PipelineKind::Fill => "diptych",
                        PipelineKind::Kontext => "output",
                    }
                );
            }
            Some(latents)
        }
        None => None,
    };
    let passes_per_step = 1 + negative.is_some() as usize;
    let adapters = load_adapters(&args.adapters, &adapter_specs, args.fast, &hub, &reporter)?;
    // Adapters named by manifests are known only now: their files are inputs too.
    for (resolved, _) in &adapters {
        inputs.file("adapter", &resolved.path);
    }
    planned.check(&inputs)?;

    let mut opened = args.model.fetch_weights(pipeline, &hub)?;
    let memory_plan = args.model.apply_memory(
        &mut opened,
        RunSize {
            image_tokens: job.transformer_tokens() as u64,
            text_tokens: args.model.max_seq_len as u64,
            pixels: generated_width as u64 * generated_height as u64,
            text_encoders_kept: false,
        },
        &reporter,
    )?;
    let model_recipe = opened.recipe(dtype, args.model.max_seq_len);
    let memory_options = opened.pipeline.memory();
    let mut pipeline = opened.pipeline;
    let judge = match &judge_specs {
        Some(specs) => {
            reporter.note(&format!("judge: {}", config.judge.as_deref().unwrap_or("")));
            Some(args.judging.build(specs, &hub, &device, dtype)?)
        }
        None => None,
    };
    let adapter_uses = adapter_uses(&adapters);
    let mode = args.adapters.lora_mode.apply_mode();
    pipeline.set_adapters(adapters.into_iter().map(|(_, c)| c).collect(), mode)?;
    pipeline.set_step_cache(step_cache.clone());

    let what = match job {
        EditJob::Diptych(_) => "diptych".to_string(),
        EditJob::Masked(m) => format!(
            "masked edit of a {}x{} window at {},{} of the {}x{} photo, diptych",
            m.window.width,
            m.window.height,
            m.window.x,
            m.window.y,
            source.rgb.width(),
            source.rgb.height()
        ),
        EditJob::Kontext(k) => format!(
            "Kontext edit of the photo at {}x{}{}, output",
            k.photo.width(),
            k.photo.height(),
            if k.mask.is_some() { ", masked" } else { "" }
        ),
    };
    reporter.note(&format!(
        "{what} {generated_width}x{generated_height} on {}, {} steps, guidance {}{}, seed(s) {}",
        device_name(&device),
        steps,
        settings.guidance,
        match &negative {
            Some((_, scale)) => format!(", true CFG {scale}"),
            None => String::new(),
        },
        seeds
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    ));
    config.recipe = Recipe {
        task: "edit".into(),
        prompt: prompt.clone(),
        instruction: args.instruction.clone(),
        latents: args.latents.as_ref().map(|p| p.display().to_string()),
        steps,
        guidance: settings.guidance,
        negative_prompt: negative.as_ref().map(|(n, _)| n.clone()),
        true_cfg_scale: negative.as_ref().map(|(_, s)| *s),
        mask: args.mask.as_ref().map(|p| p.display().to_string()),
        cache: args.cache.clone(),
        adapters: adapter_uses.clone(),
        ..model_recipe.clone()
    };
    // Each result is written as soon as it is ready; an error later names what was written.
    let writer = ResultWriter {
        args: &args,
        source_size: source.rgb.dimensions(),
        recipe: config.recipe.clone(),
    };
    let mut engine = Engine::for_one_run(pipeline, config);
    if let Some(judge) = judge {
        engine = engine.with_judge(Box::new(judge));
    }
    let mut callback = reporter.callback();
    let mut events = |event: EngineEvent| match event {
        EngineEvent::Progress(p) => callback(p),
        EngineEvent::Warning(w) => reporter.warn(&w),
        EngineEvent::Step { .. } | EngineEvent::SearchStep { .. } => {}
    };
    // The prompts are encoded and the text encoders freed before the transformer loads.
    let encoded = engine.encode(&edit, &mut events)?;
    // Loads the transformer and applies the adapters: a mismatched adapter fails here.
    engine.load_transformer(&mut |p| events(EngineEvent::Progress(p)))?;
    for applied in engine.pipeline().applied_adapters() {
        reporter.note(&describe_applied(applied));
    }

    let judge_name = engine.config().judge.clone().unwrap_or_default();
    let mut results = Vec::new();
    let mut search_summary = None;
    let mut written: Vec<String> = Vec::new();
    let mut write_error = None;
    let mut since = Instant::now();
    let ran = engine.run_encoded(
        &edit,
        &encoded,
        latents.as_ref(),
        &mut events,
        &|| None,
        &mut |produced| {
            let wrote = match produced {
                Produced::Edit { seed, output } => {
                    let index = seeds
                        .iter()
                        .position(|s| *s == seed)
                        .expect("a seed asked for");
                    let paths = &outputs[index];
                    writer.write(seed, output, paths, since).map(|summary| {
                        reporter.done(&format!("wrote {}", paths.edit.display()));
                        written.push(paths.edit.display().to_string());
                        results.push(summary);
                    })
                }
                Produced::Search(outcome) => (|| {
                    for call in &outcome.calls {
                        for warning in &call.warnings {
                            reporter.warn(warning);
                        }
                    }
                    reporter.note(&format!(
                        "seed {} won over {} candidates: {} transformer evaluations ({} for one \
                         edit)",
                        outcome.winner_seed,
                        seeds.len(),
                        outcome.evaluations,
                        steps * passes_per_step
                    ));
                    let search = edit.search.as_ref().expect("a search");
                    let summary = search_json(outcome, search, &judge_name, steps, passes_per_step);
                    let paths = output_paths(&args.out, &[outcome.winner_seed])?.remove(0);
                    let written_now =
                        writer.write(outcome.winner_seed, &outcome.result, &paths, since)?;
                    reporter.done(&format!("wrote {}", paths.edit.display()));
                    written.push(paths.edit.display().to_string());
                    results.push(written_now);
                    if let Some(dir) = &args.save_candidates {
                        save_candidates(dir, outcome, &summary)?;
                        reporter.done(&format!("wrote the candidates to {}", dir.display()));
                    }
                    search_summary = Some(summary);
                    Ok(())
                })(),
            };
            since = Instant::now();
            wrote.map_err(|e| {
                write_error = Some(e);
                EngineError::Stopped("a result could not be written")
            })
        },
    );
    if let Err(err) = ran {
        let err = match (write_error, err) {
            (Some(written_error), _) => written_error,
            (None, EngineError::Pipeline(e)) => anyhow::Error::from(e),
            (None, other) => anyhow::Error::from(other),
        };
        if written.is_empty() {
            return Err(err);
        }
        return Err(err.context(format!(
            "an edit failed; written before it: {}",
            written.join(", ")
        )));
    }
    if written.len() > 1 {
        reporter.done(&format!("wrote {} edits", written.len()));
    }

    let applied = engine.pipeline().applied_adapters();
    if args.verbose {
        for adapter in applied.iter().filter(|a| a.moe_layers > 0) {
            for line in routing_lines(adapter) {
                eprintln!("{line}");
            }
        }
    }
    if args.json {
        let adapters: Vec<_> = applied
            .iter()
            .zip(&adapter_uses)
            .map(|(a, used)| {
                json!({
                    "name": used.name,
                    "source": used.source,
                    "scale": used.scale,
                    "lora_layers": a.lora_layers,
                    "merged_layers": a.merged_layers,
                    "runtime_on_quantized": a.runtime_on_quantized,
                    "moe_layers": a.moe_layers,
                    "experts": a.experts,
                    "top_k": used.top_k,
                    "routing": a.routing_histogram().into_iter().map(|(g, c)| (g, json!(c))).collect::<serde_json::Map<_, _>>(),
                })
            })
            .collect();
        let summary = json!({
            "task": "edit",
            "instruction": args.instruction,
            "prompt": prompt,
            "model": model_recipe.model,
            "transformer": model_recipe.transformer,
            "text_encoder_2": model_recipe.text_encoder_2,
            "weights": model_recipe.weights,
            "adapters": adapters,
            "steps": steps,
            "guidance": settings.guidance,
            "pipeline": kind.diffusers_class(),
            "true_cfg_scale": negative.as_ref().map(|(_, s)| s),
            "transformer_passes_per_step": passes_per_step,
            "cache": args.cache,
            "generated": [generated_width, generated_height],
            "diptych": (kind == PipelineKind::Fill).then_some([generated_width, generated_height]),
            "transformer_image_tokens": edit.job.transformer_tokens(),
            "masked": match &edit.job {
                EditJob::Masked(m) => json!({
                    "window": [m.window.x, m.window.y, m.window.width, m.window.height],
                    "photo": [source.rgb.width(), source.rgb.height()],
                    "feather": args.feather.unwrap_or(DEFAULT_FEATHER),
                }),
                _ => serde_json::Value::Null,
            },
            "kontext": match &edit.job {
                EditJob::Kontext(k) => json!({
                    "photo": [k.photo.width(), k.photo.height()],
                    "masked": k.mask.is_some(),
                    "auto_resize": !args.no_auto_resize,
                }),
                _ => serde_json::Value::Null,
            },
            "dtype": format!("{dtype:?}").to_lowercase(),
            "device": device_name(&device),
            "memory": memory_json(memory_options, memory_plan.as_ref(), device_memory.as_ref()),
            "outputs": results,
            "search": search_summary,
            "seconds": started.elapsed().as_secs_f64(),
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(())
}

/// Writes one finished edit (and its diptych) with its recipe; returns its `--json` entry.
struct ResultWriter<'a> {
    args: &'a EditArgs,
    source_size: (u32, u32),
    /// The run's recipe; seed and size are filled in per result.
    recipe: Recipe,
}

impl ResultWriter<'_> {
    fn write(
        &self,
        seed: u64,
        output: &EditOutput,
        paths: &OutputPaths,
        started: Instant,
    ) -> Result<serde_json::Value> {
        let edited = if self.args.keep_size {
            let (w, h) = self.source_size;
            resize_rgb(&output.edited, w, h, Filter::Bicubic)
        } else {
            output.edited.clone()
        };
        let recipe = Recipe {
            seed,
            width: edited.width(),
            height: edited.height(),
            ..self.recipe.clone()
        };
        save_png(&paths.edit, &edited, &recipe.png_metadata())?;
        if self.args.save_diptych {
            save_png(&paths.diptych, &output.generated, &recipe.png_metadata())?;
        }
        Ok(json!({
            "seed": seed,
            "path": paths.edit,
            "diptych": self.args.save_diptych.then_some(&paths.diptych),
            "width": edited.width(),
            "height": edited.height(),
            "transformer_evaluations": output.evaluations,
            "full_evaluations": output.full_evaluations,
            "computed_steps": output.computed_steps,
            "seconds": started.elapsed().as_secs_f64(),
        }))
    }
}

/// Flags that only one kind of model takes, refused on the other before anything loads.
fn check_flags_for(kind: PipelineKind, args: &EditArgs) -> Result<()> {
    let kontext_only = [
        ("--height", args.height.is_some()),
        ("--max-area", args.max_area.is_some()),
        ("--no-auto-resize", args.no_auto_resize),
        ("--negative-prompt", args.negative_prompt.is_some()),
        ("--true-cfg", args.true_cfg.is_some()),
    ];
    let fill_only = [
        ("--save-diptych", args.save_diptych),
        ("--context", args.context.is_some()),
        ("--feather", args.feather.is_some()),
    ];
    let (refused, other) = match kind {
        PipelineKind::Fill => (kontext_only.as_slice(), "FLUX.1 Kontext"),
        PipelineKind::Kontext => (fill_only.as_slice(), "ICEdit on FLUX.1 Fill"),
    };
    if let Some((flag, _)) = refused.iter().find(|(_, given)| *given) {
        bail!(
            "{flag} is for {other} models, and --model {} is {}",
            args.model.model,
            kind.name()
        );
    }
    let masked = args.mask.is_some() || args.region.is_some();
    if !masked && (args.context.is_some() || args.feather.is_some()) {
        bail!("--context and --feather shape a masked edit; give --mask or --region");
    }
    if masked && args.keep_size {
        bail!("--keep-size: a masked edit already has the photo's own size");
    }
    // Sizes that do not go together are the job's to refuse (EditJob::new), for every entry
    // point alike.
    Ok(())
}

/// One line per layer group: the share of tokens each expert received.
fn routing_lines(a: &AppliedAdapter) -> Vec<String> {
    let mut lines = vec![format!(
        "MoE routing of {} (tokens per expert, all steps):",
        a.name
    )];
    for (group, counts) in a.routing_histogram() {
        let total: u64 = counts.iter().sum::<u64>().max(1);
        let shares: Vec<String> = counts
            .iter()
            .enumerate()
            .map(|(e, &c)| format!("e{e} {:5.1}%", 100.0 * c as f64 / total as f64))
            .collect();
        lines.push(format!(
            "  {group:<40} {}  ({total} selections)",
            shares.join("  ")
        ));
    }
    lines
}

#[derive(Clone, PartialEq)]
struct OutputPaths {
    edit: PathBuf,
    diptych: PathBuf,
}

/// `--out` per seed: `{seed}` replaced; with several seeds and no `{seed}`, `-SEED` is added
/// before the extension so that no result overwrites another.
fn output_paths(out: &Path, seeds: &[u64]) -> Result<Vec<OutputPaths>> {
    let text = out.to_string_lossy();
    let mut seen = std::collections::HashSet::new();
    let mut paths = Vec::new();
    for seed in seeds {
        if !seen.insert(seed) {
            bail!("--seeds lists {seed} twice");
        }
        let edit = if text.contains("{seed}") {
            PathBuf::from(text.replace("{seed}", &seed.to_string()))
        } else if seeds.len() > 1 {
            with_suffix(out, &format!("-{seed}"))
        } else {
            out.to_path_buf()
        };
        let diptych = with_suffix(&edit, "-diptych");
        paths.push(OutputPaths { edit, diptych });
    }
    Ok(paths)
}

/// `dir/name.png` -> `dir/name{suffix}.png`.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let name = match path.extension() {
        Some(ext) => format!("{stem}{suffix}.{}", ext.to_string_lossy()),
        None => format!("{stem}{suffix}"),
    };
    path.with_file_name(name)
}

/// The search for `--json` and verdicts.json: candidates, judge calls with latencies, cost.
fn search_json(
    outcome: &SearchOutcome,
    search: &SearchSettings,
    judge: &str,
    steps: usize,
    passes_per_step: usize,
) -> serde_json::Value {
    json!({
        "judge": judge,
        "early_filter": format!("{:?}", search.filter).to_lowercase(),
        "selection": format!("{:?}", search.selection).to_lowercase(),
        "early_steps": search.early_steps,
        "batch_candidates": search.batch,
        "winner_seed": outcome.winner_seed,
        "transformer_evaluations": outcome.evaluations,
        "full_evaluations": outcome.full_evaluations,
        "single_edit_evaluations": steps * passes_per_step,
        "transformer_passes_per_step": passes_per_step,
        "candidates": outcome.candidates.iter().map(|c| json!({
            "seed": c.seed,
            "preview_steps": c.previews.iter().map(|(s, _)| s).collect::<Vec<_>>(),
            "transformer_evaluations": c.evaluations,
            "full_evaluations": c.full_evaluations,
        })).collect::<Vec<_>>(),
        "verdicts": outcome.calls.iter().map(|v| json!({
            "first_seed": v.first_seed,
            "second_seed": v.second_seed,
            "winner_seed": v.winner_seed,
            "at_step": v.at_step,
            "judge": v.judge,
            "answer": v.answer,
            "seconds": v.latency.as_secs_f64(),
            "warnings": v.warnings,
        })).collect::<Vec<_>>(),
    })
}

/// `--save-candidates DIR`: every preview as `seed{S}-step{K}.png`, the result as
/// `winner-seed{S}.png`, and verdicts.json.
fn save_candidates(dir: &Path, outcome: &SearchOutcome, summary: &serde_json::Value) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create --save-candidates folder {}", dir.display()))?;
    for c in &outcome.candidates {
        for (step, preview) in &c.previews {
            save_png(
                &dir.join(format!("seed{}-step{step}.png", c.seed)),
                preview,
                &[],
            )?;
        }
    }
    save_png(
        &dir.join(format!("winner-seed{}.png", outcome.winner_seed)),
        &outcome.result.edited,
        &[],
    )?;
    write_file_atomically(
        &dir.join(VERDICTS_FILE),
        serde_json::to_string_pretty(summary)?.as_bytes(),
    )?;
    Ok(())
}

const VERDICTS_FILE: &str = "verdicts.json";

/// The names `save_candidates` writes (checked against the inputs before the search).
fn is_candidate_file(name: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let preview = name
        .strip_prefix("seed")
        .and_then(|r| r.strip_suffix(".png"))
        .and_then(|r| r.split_once("-step"))
        .is_some_and(|(seed, step)| digits(seed) && digits(step));
    let winner = name
        .strip_prefix("winner-seed")
        .and_then(|r| r.strip_suffix(".png"))
        .is_some_and(digits);
    preview || winner || name == VERDICTS_FILE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_per_seed() {
        let one = output_paths(Path::new("out/cat.png"), &[42]).unwrap();
        assert_eq!(one[0].edit, Path::new("out/cat.png"));
        assert_eq!(one[0].diptych, Path::new("out/cat-diptych.png"));
        let many = output_paths(Path::new("cat.png"), &[1, 2]).unwrap();
        assert_eq!(many[1].edit, Path::new("cat-2.png"));
        let templated = output_paths(Path::new("cat_{seed}.png"), &[7, 9]).unwrap();
        assert_eq!(templated[0].edit, Path::new("cat_7.png"));
        assert_eq!(templated[1].diptych, Path::new("cat_9-diptych.png"));
        assert!(output_paths(Path::new("a.png"), &[3, 3]).is_err());
    }

    #[test]
    fn candidate_file_names() {
        for name in ["seed42-step10.png", "winner-seed7.png", "verdicts.json"] {
            assert!(is_candidate_file(name), "{name}");
        }
        for name in [
            "seed-step1.png",
            "seedx-step1.png",
            "photo.png",
            "winner-seed.png",
        ] {
            assert!(!is_candidate_file(name), "{name}");
        }
    }
}
