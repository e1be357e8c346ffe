//! `icedit quantize`: a FLUX transformer checkpoint written as GGUF (BFL naming), the file
//! ComfyUI-GGUF, diffusers' `from_single_file` and `icedit --transformer` read.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use icedit_adapters::lora_deltas;
use icedit_flux::quantize::{parse_quant_type, write_gguf, WeightDelta};
use icedit_flux::{Checkpoint, FluxConfig};
use icedit_hub::HubOptions;
use indicatif::{ProgressBar, ProgressStyle};

use crate::adapters::{load_adapters, AdapterArgs, LoraMode};
use crate::outputs::{Inputs, Outputs};
use crate::progress::Reporter;

#[derive(clap::Args)]
pub struct QuantizeArgs {
    /// The transformer: a diffusers pipeline or transformer folder, or a single .safetensors or
    /// .gguf file (BFL, ComfyUI or diffusers names; FP8 included).
    #[arg(long)]
    model: PathBuf,
    /// The transformer's config.json, for single files whose config cannot be inferred.
    #[arg(long)]
    config: Option<PathBuf>,
    /// q8_0, q6_k, q5_k, q5_0, q5_1, q4_k, q4_0, q4_1, q3_k, q2_k, bf16, f16 or f32. Matrices
    /// whose rows are not whole blocks of it fall back to Q8_0, then F16; the input embedders
    /// and the final layer stay F16, and 1-D tensors F32, as the community's files keep them.
    #[arg(long = "type", value_name = "TYPE")]
    quant_type: String,
    /// A LoRA merged into the weights before they are quantized (as mflux's save does): a known
    /// name, `hf:OWNER/REPO[/FILE]`, or a local file, folder or manifest. Repeat to merge
    /// several, in order. A mixture of LoRA experts cannot be merged (it routes each token).
    #[arg(long = "lora", value_name = "SPEC")]
    loras: Vec<String>,
    /// Strength of each --lora, in order (default: the manifest's, else 1).
    #[arg(long = "lora-scale", value_name = "X")]
    lora_scales: Vec<f64>,
    /// The GGUF file to write (`.gguf`); it appears only once complete.
    #[arg(long)]
    out: PathBuf,
    /// No progress bar or notes.
    #[arg(long)]
    quiet: bool,
}

pub fn run(args: QuantizeArgs) -> Result<()> {
    let reporter = Reporter::new(args.quiet);
    let Some(dtype) = parse_quant_type(&args.quant_type) else {
        bail!(
            "--type {}: not a type icedit writes; choose one of q8_0, q6_k, q5_k, q5_0, q5_1, \
             q4_k, q4_0, q4_1, q3_k, q2_k, bf16, f16, f32",
            args.quant_type
        );
    };
    if args
        .out
        .extension()
        .is_none_or(|e| !e.eq_ignore_ascii_case("gguf"))
    {
        bail!(
            "--out {}: name the file with a .gguf extension",
            args.out.display()
        );
    }
    let mut inputs = Inputs::default();
    if args.model.is_dir() {
        inputs.folder("--model", &args.model);
    } else {
        inputs.file("--model", &args.model);
    }
    if let Some(config) = &args.config {
        inputs.file("--config", config);
    }
    // The adapters, read and checked before anything is written.
    let adapter_args = AdapterArgs {
        loras: args.loras.clone(),
        lora_scales: args.lora_scales.clone(),
        no_lora: false,
        top_k: None,
        lora_mode: LoraMode::Merge,
    };
    let adapters = load_adapters(
        &adapter_args,
        &args.loras,
        false,
        &HubOptions::from_env(),
        &reporter,
    )?;
    for (resolved, _) in &adapters {
        inputs.file("--lora", &resolved.path);
    }
    let mut outputs = Outputs::default();
    outputs.file("--out", &args.out);
    outputs.check(&inputs)?;

    let checkpoint = match &args.config {
        Some(path) => Checkpoint::open_with_config(&args.model, FluxConfig::from_json_file(path)?),
        None => Checkpoint::open(&args.model),
    }
    .with_context(|| format!("cannot open the transformer {}", args.model.display()))?;
    reporter.note(&format!(
        "{}: {} ({:?} layout)",
        args.model.display(),
        checkpoint.files().format_summary(),
        checkpoint.layout()
    ));
    let names: Vec<String> = adapters.iter().map(|(_, c)| c.name.clone()).collect();
    let lora_layers = lora_deltas(
        checkpoint.config(),
        adapters.into_iter().map(|(_, choice)| choice).collect(),
    )?;
    if !names.is_empty() {
        reporter.note(&format!(
            "merging {} LoRA layer(s) of {} before quantizing",
            lora_layers.len(),
            names.join(", ")
        ));
    }
    let deltas: Vec<WeightDelta> = lora_layers
        .iter()
        .map(|(module, lora)| WeightDelta {
            module: module.clone(),
            delta: Box::new(move || lora.weight_delta()),
        })
        .collect();
    let bar = (!args.quiet).then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("quantizing [{bar:30}] {pos}/{len} tensors, {elapsed}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar
    });
    let summary = write_gguf(
        &checkpoint,
        dtype,
        &deltas,
        &args.out,
        &mut |done, total| {
            if let Some(bar) = &bar {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            }
        },
    )
    .with_context(|| format!("cannot write {}", args.out.display()))?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let types: Vec<String> = summary
        .types
        .iter()
        .map(|(t, n)| format!("{t} x{n}"))
        .collect();
    reporter.done(&format!(
        "wrote {} ({:.1} MiB, {} tensors: {})",
        args.out.display(),
        summary.bytes as f64 / (1 << 20) as f64,
        summary.tensors,
        types.join(", ")
    ));
    Ok(())
}
