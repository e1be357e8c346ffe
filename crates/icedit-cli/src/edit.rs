//! `icedit edit`: instruction-based editing, ICEdit's in-context diptych on FLUX.1 Fill with
//! LoRA / MoE-LoRA adapters.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use icedit_adapters::{
    resolve, AdapterChoice, AdapterFile, AdapterKind, AppliedAdapter, ApplyMode, ResolvedAdapter,
    DEFAULT_ADAPTER,
};
use icedit_flux::parse_dtype;
use icedit_hub::{HubOptions, ModelRepo};
use icedit_image::resize::{resize_rgb, Filter};
use icedit_judge::Judge;
use icedit_pipeline::edit::{diptych_prompt, DEFAULT_WIDTH};
use icedit_pipeline::image_io::{load_rgb, save_png};
use icedit_pipeline::latents::VAE_SCALE;
use icedit_pipeline::recipe::{AdapterUse, Recipe};
use icedit_pipeline::search::{EarlyFilter, SearchOutcome, SearchSettings, Selection};
use icedit_pipeline::{Diptych, EditSettings, FillPipeline, InitialNoise};
use serde_json::json;

use crate::inputs::{check_output, read_latents};
use crate::judge::JudgeArgs;
use crate::progress::Reporter;
use crate::{device, ModelArgs};

#[derive(clap::Args)]
pub struct EditArgs {
    /// The photo to edit (PNG, JPEG, WebP, BMP, TIFF).
    #[arg(long)]
    image: PathBuf,
    /// What to change, e.g. "make it night"; it completes ICEdit's in-context prompt
    /// (prompts/icedit-diptych.txt).
    #[arg(long, required_unless_present = "prompt", conflicts_with = "prompt")]
    instruction: Option<String>,
    /// The whole prompt instead of the templated instruction.
    #[arg(long)]
    prompt: Option<String>,
    /// Adapter: a known name (icedit-moe, icedit-normal), `hf:OWNER/REPO[/FILE]`, or a local
    /// .safetensors file, folder or .toml manifest. Repeat to combine. Default: icedit-moe.
    #[arg(long = "lora", value_name = "SPEC")]
    loras: Vec<String>,
    /// Strength of each --lora, in order (default: the manifest's, else 1).
    #[arg(long = "lora-scale", value_name = "X")]
    lora_scales: Vec<f64>,
    /// Run the bare model without any adapter.
    #[arg(long, conflicts_with_all = ["loras", "lora_scales"])]
    no_lora: bool,
    /// Experts per token for mixture-of-experts adapters (default: the file's, else 1).
    #[arg(long)]
    top_k: Option<usize>,
    /// merge: LoRA folded into the weights at load (fast); runtime: computed at each layer, as
    /// PEFT does. MoE layers always run at run time.
    #[arg(long, value_enum, default_value = "merge")]
    lora_mode: LoraMode,
    /// Width of each half of the diptych (the adapters were trained at 512).
    #[arg(long, default_value_t = DEFAULT_WIDTH)]
    width: u32,
    #[arg(long, default_value_t = 28)]
    steps: usize,
    #[arg(long, default_value_t = 50.0)]
    guidance: f32,
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
    /// `latents` [1, 16, H/8, 2W/8] for the whole diptych.
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
    /// Also write the whole generated diptych, as OUT-diptych.png.
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

#[derive(Clone, Copy, ValueEnum)]
enum LoraMode {
    Merge,
    Runtime,
}

pub fn run(args: EditArgs) -> Result<()> {
    let reporter = Reporter::new(args.quiet);
    let started = Instant::now();
    let dtype = parse_dtype(&args.model.dtype)?;
    let device = device(args.model.device)?;
    let prompt = match (&args.instruction, &args.prompt) {
        (Some(instruction), _) => diptych_prompt(instruction)?,
        (None, Some(p)) if p.trim().is_empty() => {
            bail!("--prompt is empty; describe the edit, or give --instruction")
        }
        (None, Some(p)) => p.clone(),
        (None, None) => bail!("give --instruction (what to change)"),
    };
    let first_seed = args.seed.unwrap_or(42);
    let seeds = match (&args.judging.judge, args.seeds.as_slice()) {
        (Some(_), []) => bail!("--judge compares candidates: give --seeds N (a count) or a list"),
        (Some(_), [count]) => {
            if *count < 2 {
                bail!("--seeds {count}: a seed search needs at least 2 candidates");
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
    let settings = EditSettings {
        steps: args.steps,
        guidance: args.guidance,
        max_sequence_length: args.model.max_seq_len,
    };
    if judge_specs.is_some() {
        search.validate(&settings)?;
    }
    // A search writes one result, the winner's.
    let outputs = output_paths(
        &args.out,
        if judge_specs.is_some() {
            &seeds[..1]
        } else {
            &seeds
        },
    )?;
    let inputs = [Some(&args.image), args.latents.as_ref()];
    for out in &outputs {
        check_output(&out.edit, inputs.into_iter().flatten())?;
    }

    // Inputs and adapters first: a bad image or adapter should fail before the model loads.
    let source = load_rgb(&args.image)?;
    if let Some(note) = &source.conversion {
        reporter.note(&format!("{}: {note}", args.image.display()));
    }
    let diptych = Diptych::new(&source.rgb, args.width)?;
    let latents = match &args.latents {
        Some(path) => {
            let latents = read_latents(path)?;
            let expected = [
                1,
                16,
                (diptych.height as usize) / VAE_SCALE,
                (2 * diptych.half_width as usize) / VAE_SCALE,
            ];
            if latents.dims() != expected {
                bail!(
                    "{}: the latents are {:?}; this {}x{} diptych needs {expected:?}",
                    path.display(),
                    latents.dims(),
                    2 * diptych.half_width,
                    diptych.height
                );
            }
            Some(latents)
        }
        None => None,
    };
    let hub = HubOptions::from_env();
    let adapters = load_adapters(&args, &hub, &reporter)?;

    let repo = ModelRepo::open(&args.model.model, &hub)
        .with_context(|| format!("cannot open the model {}", args.model.model))?;
    let model_name = repo.describe();
    let mut pipeline = FillPipeline::new(repo, dtype, device.clone())
        .with_context(|| format!("{model_name} does not look like a FLUX.1 Fill pipeline"))?;
    pipeline.fetch_all()?;
    let judge = match &judge_specs {
        Some(specs) => {
            let names: Vec<String> = specs.iter().map(|s| s.name()).collect();
            reporter.note(&format!("judge: {}", names.join(", then ")));
            Some(args.judging.build(specs, &hub, &device, dtype)?)
        }
        None => None,
    };
    let adapter_uses: Vec<AdapterUse> = adapters
        .iter()
        .map(|(resolved, choice)| AdapterUse {
            name: resolved.name.clone(),
            source: Some(resolved.origin.clone()),
            scale: choice.scale as f32,
            top_k: choice
                .file
                .is_moe()
                .then(|| choice.top_k.or(choice.file.metadata_top_k()).unwrap_or(1)),
        })
        .collect();
    let mode = match args.lora_mode {
        LoraMode::Merge => ApplyMode::Merge,
        LoraMode::Runtime => ApplyMode::Runtime,
    };
    pipeline.set_adapters(adapters.into_iter().map(|(_, c)| c).collect(), mode)?;

    reporter.note(&format!(
        "diptych {}x{}, {} steps, guidance {}, seed(s) {}",
        2 * diptych.half_width,
        diptych.height,
        args.steps,
        args.guidance,
        seeds
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    ));
    let mut callback = reporter.callback();
    let text = pipeline.encode_prompt(&prompt, args.model.max_seq_len, &mut callback)?;
    for dropped in text.truncation_warnings() {
        reporter.warn(&dropped);
    }
    // Loads the transformer and applies the adapters: a mismatched adapter fails here.
    pipeline.load_transformer(&mut callback)?;
    for applied in pipeline.applied_adapters() {
        reporter.note(&describe_applied(applied));
    }

    // The edits to write: every seed, or the winner of a seed search.
    let mut finished = Vec::new();
    let mut search_summary = None;
    if let Some(mut judge) = judge {
        let started = Instant::now();
        let instruction = args.instruction.clone().unwrap_or_else(|| prompt.clone());
        let outcome = pipeline.edit_search(
            &diptych,
            &prompt,
            &instruction,
            &text,
            &settings,
            &search,
            &mut judge,
            &mut callback,
        )?;
        for call in &outcome.calls {
            for warning in &call.warnings {
                reporter.warn(warning);
            }
        }
        reporter.note(&format!(
            "seed {} won over {} candidates: {} transformer evaluations ({} for one edit)",
            outcome.winner_seed,
            seeds.len(),
            outcome.evaluations,
            args.steps
        ));
        let summary = search_json(&outcome, &search, &judge.name(), args.steps);
        if let Some(dir) = &args.save_candidates {
            save_candidates(dir, &outcome, &summary)?;
        }
        search_summary = Some(summary);
        finished.push((outcome.winner_seed, outcome.result, started.elapsed()));
    } else {
        for seed in &seeds {
            let started = Instant::now();
            let noise = match &latents {
                Some(latents) => InitialNoise::Latents {
                    latents: latents.clone(),
                    seed: *seed,
                },
                None => InitialNoise::Seed(*seed),
            };
            let output =
                pipeline.edit(&diptych, &prompt, &text, &settings, noise, &mut callback)?;
            finished.push((*seed, output, started.elapsed()));
        }
    }

    let mut results = Vec::new();
    for (i, (seed, output, elapsed)) in finished.into_iter().enumerate() {
        let paths = match search_summary {
            Some(_) => output_paths(&args.out, &[seed])?.remove(0),
            None => outputs[i].clone(),
        };
        let edited = if args.keep_size {
            let (w, h) = source.rgb.dimensions();
            resize_rgb(&output.edited, w, h, Filter::Bicubic)
        } else {
            output.edited
        };
        let recipe = Recipe {
            task: "edit".into(),
            prompt: prompt.clone(),
            instruction: args.instruction.clone(),
            seed,
            latents: args.latents.as_ref().map(|p| p.display().to_string()),
            steps: args.steps,
            guidance: args.guidance,
            max_sequence_length: args.model.max_seq_len,
            width: edited.width(),
            height: edited.height(),
            expand: None,
            model: model_name.clone(),
            adapters: adapter_uses.clone(),
            dtype: format!("{dtype:?}").to_lowercase(),
            software: concat!("icedit ", env!("CARGO_PKG_VERSION")).into(),
        };
        save_png(&paths.edit, &edited, &recipe.png_metadata())?;
        if args.save_diptych {
            save_png(&paths.diptych, &output.diptych, &recipe.png_metadata())?;
        }
        reporter.done(&format!("wrote {}", paths.edit.display()));
        results.push(json!({
            "seed": seed,
            "path": paths.edit,
            "diptych": args.save_diptych.then_some(&paths.diptych),
            "width": edited.width(),
            "height": edited.height(),
            "seconds": elapsed.as_secs_f64(),
        }));
    }

    let applied = pipeline.applied_adapters();
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
            "model": model_name,
            "adapters": adapters,
            "steps": args.steps,
            "guidance": args.guidance,
            "diptych": [2 * diptych.half_width, diptych.height],
            "dtype": format!("{dtype:?}").to_lowercase(),
            "outputs": results,
            "search": search_summary,
            "seconds": started.elapsed().as_secs_f64(),
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(())
}

/// Resolves (downloading if needed) and reads every adapter; checks manifests' stated kinds.
fn load_adapters(
    args: &EditArgs,
    hub: &HubOptions,
    reporter: &Reporter,
) -> Result<Vec<(ResolvedAdapter, AdapterChoice)>> {
    if args.no_lora {
        return Ok(Vec::new());
    }
    let specs = if args.loras.is_empty() {
        vec![DEFAULT_ADAPTER.to_string()]
    } else {
        args.loras.clone()
    };
    if !args.lora_scales.is_empty() && args.lora_scales.len() != specs.len() {
        bail!(
            "{} --lora-scale value(s) for {} adapter(s); give one scale per --lora, in order",
            args.lora_scales.len(),
            specs.len()
        );
    }
    if args.top_k == Some(0) {
        bail!("--top-k must be at least 1");
    }
    let mut adapters = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let resolved =
            resolve(spec, hub).with_context(|| format!("cannot get the adapter `{spec}`"))?;
        let file = AdapterFile::read(&resolved.path)?;
        if let Some(manifest) = &resolved.manifest {
            let kind = if file.is_moe() {
                AdapterKind::MoeLora
            } else {
                AdapterKind::Lora
            };
            if kind != manifest.kind {
                bail!(
                    "{}: the manifest `{}` says {:?} but the file holds a {kind:?} adapter",
                    resolved.path.display(),
                    manifest.name,
                    manifest.kind
                );
            }
        }
        if !file.text_encoder_keys().is_empty() {
            reporter.warn(&format!(
                "{}: {} text-encoder LoRA tensor(s) are NOT applied (icedit adapts the \
                 transformer only)",
                resolved.path.display(),
                file.text_encoder_keys().len()
            ));
        }
        let scale = args
            .lora_scales
            .get(i)
            .copied()
            .unwrap_or_else(|| resolved.default_scale());
        if !scale.is_finite() {
            bail!("--lora-scale must be a finite number");
        }
        let top_k = args
            .top_k
            .or(resolved.manifest.as_ref().and_then(|m| m.top_k));
        let choice = AdapterChoice {
            name: resolved.name.clone(),
            file,
            scale,
            top_k,
        };
        adapters.push((resolved, choice));
    }
    Ok(adapters)
}

fn describe_applied(a: &AppliedAdapter) -> String {
    let mut text = format!("adapter {}: {} LoRA layer(s)", a.name, a.lora_layers);
    if a.lora_layers > 0 {
        text += &format!(" ({} merged)", a.merged_layers);
    }
    if a.moe_layers > 0 {
        text += &format!(
            ", {} MoE layer(s) with {} experts, top-{}",
            a.moe_layers, a.experts, a.top_k
        );
    }
    text
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

#[derive(Clone)]
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
) -> serde_json::Value {
    json!({
        "judge": judge,
        "early_filter": format!("{:?}", search.filter).to_lowercase(),
        "selection": format!("{:?}", search.selection).to_lowercase(),
        "early_steps": search.early_steps,
        "batch_candidates": search.batch,
        "winner_seed": outcome.winner_seed,
        "transformer_evaluations": outcome.evaluations,
        "single_edit_evaluations": steps,
        "candidates": outcome.candidates.iter().map(|c| json!({
            "seed": c.seed,
            "preview_steps": c.previews.iter().map(|(s, _)| s).collect::<Vec<_>>(),
            "transformer_evaluations": c.evaluations,
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
    let path = dir.join("verdicts.json");
    let temp = dir.join(".verdicts.json.tmp");
    std::fs::write(&temp, serde_json::to_string_pretty(summary)?)
        .and_then(|_| std::fs::rename(&temp, &path))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
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
}
