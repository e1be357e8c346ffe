//! Checks and readers shared by the commands.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use icedit_adapters::AdapterSpec;
use icedit_hub::{HubOptions, ModelSource};

use crate::outputs::Inputs;
use crate::ModelArgs;

/// Results are PNG files (lossless, with the recipe in their metadata).
pub fn check_png_name(out: &Path) -> Result<()> {
    let is_png = out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if !is_png {
        bail!(
            "--out {}: icedit writes PNG (lossless, with the recipe in its metadata); use a .png name",
            out.display()
        );
    }
    Ok(())
}

/// The model's files as inputs: a local model folder, and the Hub cache that Hub models,
/// adapters and judges are read from. Outputs never go inside either.
pub fn add_model_inputs(inputs: &mut Inputs, model: &ModelArgs, hub: &HubOptions) -> Result<()> {
    if let Ok(ModelSource::Local(folder)) = ModelSource::parse(&model.model) {
        inputs.folder("model folder", &folder);
    }
    inputs.folder("Hugging Face cache", &hub.cache_dir);
    if let Some(icedit_hub::FileSpec::Local(path)) = model.transformer_spec()? {
        inputs.file("--transformer", &path);
    }
    if let Some(icedit_hub::FileSpec::Local(path)) = model.text_encoder_2_spec()? {
        inputs.file("--text-encoder-2", &path);
    }
    Ok(())
}

/// A `--lora` given as a local file, folder or manifest is an input (a manifest's own local
/// `repo` folder is checked when it is read).
pub fn add_adapter_inputs(inputs: &mut Inputs, spec: &str) {
    if let Ok(AdapterSpec::Path(path)) = AdapterSpec::parse(spec) {
        if path.is_dir() {
            inputs.folder("adapter folder", &path);
        } else {
            inputs.file("--lora", &path);
        }
    }
}

/// Bytes a `--latents` file may have: a 2048x2048 canvas's latents in float32 are 16 MiB.
const MAX_LATENTS_FILE_BYTES: u64 = 64 << 20;

/// `--latents`: a safetensors file with a float32 tensor `latents` [1, 16, H/8, W/8], finite.
pub fn read_latents(path: &Path) -> Result<Tensor> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read the latents file {}", path.display()))?;
    if !meta.is_file() {
        bail!(
            "--latents {}: not a regular file (a pipe or device is not read)",
            path.display()
        );
    }
    if meta.len() > MAX_LATENTS_FILE_BYTES {
        bail!(
            "--latents {}: {} bytes is far more than the latents of any image icedit runs on \
             (at most {MAX_LATENTS_FILE_BYTES} bytes); is it the right file?",
            path.display(),
            meta.len()
        );
    }
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("cannot read the latents file {}", path.display()))?;
    let latents = tensors.get("latents").with_context(|| {
        let names: Vec<_> = tensors.keys().cloned().collect();
        format!(
            "{} has no tensor named `latents` (it has: {})",
            path.display(),
            names.join(", ")
        )
    })?;
    if latents.dtype() != DType::F32 {
        bail!(
            "{}: `latents` must be float32, it is {:?}",
            path.display(),
            latents.dtype()
        );
    }
    if !icedit_flux::all_finite(latents)? {
        bail!(
            "{}: `latents` holds NaN or infinite values; the run would make a black image",
            path.display()
        );
    }
    Ok(latents.clone())
}

pub fn random_seed() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    // Mixed so that runs started in the same second differ; kept within 32 bits for readability.
    ((nanos as u64) ^ ((nanos >> 64) as u64) ^ (std::process::id() as u64).rotate_left(17))
        % 4_294_967_296
}
