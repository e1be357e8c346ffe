//! Adapter flags shared by `edit` and `serve`: which adapters, at which scales, checked against
//! the model's kind, resolved and read before the model loads.

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use icedit_adapters::{
    resolve, AdapterChoice, AdapterFile, AdapterKind, AppliedAdapter, ApplyMode, Manifest,
    ResolvedAdapter, DEFAULT_ADAPTER, TURBO_ADAPTER,
};
use icedit_hub::{HubOptions, ModelSource};
use icedit_pipeline::edit::adapters_template;
use icedit_pipeline::recipe::AdapterUse;
use icedit_pipeline::PipelineKind;

use crate::progress::Reporter;

#[derive(clap::Args)]
pub struct AdapterArgs {
    /// Adapter: a known name (icedit-moe, icedit-normal, ...), `hf:OWNER/REPO[/FILE]`, or a
    /// local .safetensors file, folder or .toml manifest. Repeat to combine. Default: icedit-moe
    /// on Fill models, none on Kontext models.
    #[arg(long = "lora", value_name = "SPEC")]
    pub loras: Vec<String>,
    /// Strength of each --lora, in order (default: the manifest's, else 1).
    #[arg(long = "lora-scale", value_name = "X")]
    pub lora_scales: Vec<f64>,
    /// Run the bare model without any adapter.
    #[arg(long, conflicts_with_all = ["loras", "lora_scales"])]
    pub no_lora: bool,
    /// Experts per token for mixture-of-experts adapters (default: the file's, else 1).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// merge: LoRA folded into the weights at load (fast); runtime: computed at each layer, as
    /// PEFT does. MoE layers always run at run time.
    #[arg(long, value_enum, default_value = "merge")]
    pub lora_mode: LoraMode,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LoraMode {
    Merge,
    Runtime,
}

impl LoraMode {
    pub fn apply_mode(self) -> ApplyMode {
        match self {
            Self::Merge => ApplyMode::Merge,
            Self::Runtime => ApplyMode::Runtime,
        }
    }
}

/// The `--lora` specs, or the default adapter (ICEdit's, on Fill; none on Kontext, which edits
/// by itself); none with --no-lora.
pub fn adapter_specs(args: &AdapterArgs, kind: PipelineKind, fast: bool) -> Vec<String> {
    let mut specs = if args.no_lora {
        Vec::new()
    } else if args.loras.is_empty() {
        match kind {
            PipelineKind::Fill => vec![DEFAULT_ADAPTER.to_string()],
            PipelineKind::Kontext => Vec::new(),
        }
    } else {
        args.loras.clone()
    };
    if fast && !specs.iter().any(|s| s == TURBO_ADAPTER) {
        specs.push(TURBO_ADAPTER.to_string());
    }
    specs
}

/// An adapter trained on the other kind of model cannot load into this one (Fill's transformer
/// takes 384 input channels, Kontext's 64): refused before anything downloads.
pub fn check_base_model(manifest: &Manifest, kind: PipelineKind) -> Result<()> {
    let Some(base) = manifest.base_model.as_deref() else {
        return Ok(());
    };
    let lower = base.to_ascii_lowercase();
    let trained_on = if lower.contains("kontext") {
        PipelineKind::Kontext
    } else if lower.contains("fill") {
        PipelineKind::Fill
    } else {
        return Ok(());
    };
    if trained_on != kind {
        bail!(
            "adapter {} was trained on {base} ({}, {} input channels), but --model is {} ({} \
             input channels); pick an adapter for this model or --no-lora",
            manifest.name,
            trained_on.name(),
            trained_on.in_channels(),
            kind.name(),
            kind.in_channels()
        );
    }
    Ok(())
}

/// The prompt template the adapters were trained with (`default` when no manifest names one:
/// ICEdit's diptych prompt on Fill, the instruction itself on Kontext).
pub fn manifest_template(manifests: &[Manifest], default: &'static str) -> Result<&'static str> {
    let names: Vec<&str> = manifests
        .iter()
        .filter_map(|m| m.prompt.as_deref())
        .collect();
    Ok(adapters_template(&names)?.unwrap_or(default))
}

/// A warning when `--model` is a Hub repo other than the one the adapter was trained on.
/// Also when the adapter was trained on another FLUX model than this kind (the turbo LoRAs,
/// trained on FLUX.1 dev), whatever `--model` is.
pub fn base_model_warning(manifest: &Manifest, model: &str, kind: PipelineKind) -> Option<String> {
    let base = manifest.base_model.as_deref()?;
    match ModelSource::parse(model) {
        Ok(ModelSource::Hub { repo_id, .. }) if !repo_id.eq_ignore_ascii_case(base) => {
            Some(format!(
                "adapter {} was trained on {base}, not {repo_id}: expect weaker edits",
                manifest.name
            ))
        }
        Ok(ModelSource::Hub { .. }) => None,
        _ => {
            let lower = base.to_ascii_lowercase();
            let same_kind = match kind {
                PipelineKind::Fill => lower.contains("fill"),
                PipelineKind::Kontext => lower.contains("kontext"),
            };
            (!same_kind).then(|| {
                format!(
                    "adapter {} was trained on {base}, not {}: expect weaker edits",
                    manifest.name,
                    kind.name()
                )
            })
        }
    }
}

/// Resolves (downloading if needed) and reads every adapter; checks manifests' stated kinds.
pub fn load_adapters(
    args: &AdapterArgs,
    specs: &[String],
    fast: bool,
    hub: &HubOptions,
    reporter: &Reporter,
) -> Result<Vec<(ResolvedAdapter, AdapterChoice)>> {
    // --fast's turbo LoRA, added after the others, keeps its manifest's scale.
    let added_turbo = fast && !args.loras.iter().any(|s| s == TURBO_ADAPTER);
    let scalable = specs.len() - usize::from(added_turbo);
    if !args.lora_scales.is_empty() && args.lora_scales.len() != scalable {
        bail!(
            "{} --lora-scale value(s) for {scalable} adapter(s); give one scale per --lora, in \
             order",
            args.lora_scales.len(),
        );
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

pub fn describe_applied(a: &AppliedAdapter) -> String {
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

/// The adapters as a recipe records them: name, source file, scale, and top-k for MoE.
pub fn adapter_uses(adapters: &[(ResolvedAdapter, AdapterChoice)]) -> Vec<AdapterUse> {
    adapters
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
        .collect()
}
