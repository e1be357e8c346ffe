//! Checks and readers shared by the commands.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

/// An output must be a PNG and must not overwrite an input.
pub fn check_output<'a>(
    out: &Path,
    inputs: impl IntoIterator<Item = &'a std::path::PathBuf>,
) -> Result<()> {
    let is_png = out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if !is_png {
        bail!(
            "--out {}: icedit writes PNG (lossless, with the recipe in its metadata); use a .png name",
            out.display()
        );
    }
    let same = |input: &Path| match (input.canonicalize(), out.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if let Some(input) = inputs.into_iter().find(|p| same(p)) {
        bail!(
            "--out {} is one of the inputs; icedit never overwrites its inputs, choose another name",
            input.display()
        );
    }
    Ok(())
}

/// `--latents`: a safetensors file with a float32 tensor `latents` [1, 16, H/8, W/8].
pub fn read_latents(path: &Path) -> Result<Tensor> {
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
