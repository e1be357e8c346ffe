//! `icedit selftest`: the parity fixtures the test suite checks, checked by the binary itself on
//! the device asked for, with the tests' tolerances: a GPU machine with no Rust toolchain can
//! prove the build it was handed. A table of results; exit 1 on any failure.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use icedit_flux::compare::{max_abs_diff, rms_diff};
use icedit_flux::{Checkpoint, FluxConfig, FluxInput, FluxTransformer};

use crate::{attention_path, device, device_name, DeviceArg};

#[derive(clap::Args)]
pub struct SelftestArgs {
    /// The committed fixtures: the repo's tests/fixtures, or a GPU bundle's copy.
    #[arg(long, default_value = "tests/fixtures")]
    fixtures: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceArg,
    /// Only the checks whose name contains this text.
    #[arg(long)]
    only: Option<String>,
}

/// diffusers' f32 output, within f32 rounding (the test suite's tolerance).
const F32_TOLERANCE: f32 = 1e-4;
/// A whole edit's PNG against diffusers' (the test suite's tolerance for f32 runs).
const PNG_TOLERANCE: u8 = 1;

struct Outcome {
    name: String,
    passed: bool,
    detail: String,
    seconds: f64,
}

pub fn run(args: SelftestArgs) -> Result<()> {
    let device = device(args.device)?;
    let fixtures = args.fixtures.clone();
    if !fixtures.join("flux").is_dir() || !fixtures.join("gguf").is_dir() {
        bail!(
            "--fixtures {}: not icedit's test fixtures (no flux/ and gguf/ inside); run from the \
             repository's root or pass the folder (a GPU bundle has its own copy)",
            fixtures.display()
        );
    }
    println!(
        "icedit selftest on {} ({}) with {}",
        device_name(&device),
        attention_path(&device),
        fixtures.display()
    );
    let mut checks: Vec<(String, Box<dyn Fn() -> Result<(bool, String)> + '_>)> = Vec::new();
    for config in ["fill_diptych", "dev_sharded", "noguidance_wide"] {
        for layout in ["diffusers", "bfl"] {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let (fixtures, device) = (&fixtures, &device);
                checks.push((
                    format!("transformer {config} {layout} {}", dtype.as_str()),
                    Box::new(move || transformer_check(fixtures, config, layout, dtype, device)),
                ));
            }
        }
    }
    for dtype in [DType::BF16, DType::F16] {
        let mut paths = vec![("query chunks", false)];
        if icedit_flux::flash_attention(&device, dtype, 128) {
            paths.push(("flash", true));
        }
        for (path, flash) in paths {
            let device = &device;
            checks.push((
                format!("attention {} {path}", dtype.as_str()),
                Box::new(move || attention_check(dtype, flash, device)),
            ));
        }
    }
    for (file, out) in [
        ("flux_q8_0.gguf", "out.q8_0"),
        ("flux_q4_k.gguf", "out.q4_k"),
        ("flux_mixed.gguf", "out.mixed"),
    ] {
        let (fixtures, device) = (&fixtures, &device);
        checks.push((
            format!("gguf forward {file}"),
            Box::new(move || gguf_forward_check(fixtures, file, out, device)),
        ));
    }
    for (run, file, adapter) in [
        ("q8_0_bare", "flux_q8_0.gguf", None),
        ("q4_k_bare", "flux_q4_k.gguf", None),
        (
            "q4_k_lora",
            "flux_q4_k.gguf",
            Some("adapters/lora_peft.safetensors"),
        ),
        (
            "q8_0_moe",
            "flux_q8_0.gguf",
            Some("adapters/moe_lora.safetensors"),
        ),
    ] {
        let (fixtures, device_arg) = (&fixtures, args.device);
        checks.push((
            format!("edit {run} (T5, CLIP, VAE, whole run)"),
            Box::new(move || edit_check(fixtures, run, file, adapter, device_arg)),
        ));
    }

    let mut outcomes = Vec::new();
    for (name, check) in &checks {
        if args
            .only
            .as_ref()
            .is_some_and(|o| !name.contains(o.as_str()))
        {
            continue;
        }
        let started = Instant::now();
        let (passed, detail) = match check() {
            Ok(result) => result,
            Err(e) => (false, format!("error: {e:#}")),
        };
        let outcome = Outcome {
            name: name.clone(),
            passed,
            detail,
            seconds: started.elapsed().as_secs_f64(),
        };
        println!(
            "{:<4} {:<52} {:>6.2}s  {}",
            if outcome.passed { "ok" } else { "FAIL" },
            outcome.name,
            outcome.seconds,
            outcome.detail
        );
        outcomes.push(outcome);
    }
    let failed = outcomes.iter().filter(|o| !o.passed).count();
    println!(
        "{} checks, {} passed, {failed} failed",
        outcomes.len(),
        outcomes.len() - failed
    );
    if outcomes.is_empty() {
        bail!(
            "--only {:?} matches no check",
            args.only.unwrap_or_default()
        );
    }
    if failed > 0 {
        bail!("{failed} selftest check(s) failed");
    }
    Ok(())
}

/// Attention at FLUX's head size (128) in half precision, on the path asked for, against f32
/// on the host: 3 heads, 300 queries over 77 keys and 77 over 300 (neither a whole number of
/// the kernels' blocks). The bounds are a few steps of the dtype at the outputs' size: what
/// rounding the probabilities and the output costs, far below what a wrong kernel gives. The
/// inputs are seeded, so every run and machine checks the same numbers.
fn attention_check(dtype: DType, flash: bool, device: &Device) -> Result<(bool, String)> {
    let tolerance = if dtype == DType::BF16 { 2e-2 } else { 2.5e-3 };
    let mut worst = 0f32;
    let mut generator = icedit_pipeline::torch_rng::TorchGenerator::new(0);
    for (s_q, s_k) in [(300, 77), (77, 300)] {
        let mut randn = |s: usize| generator.randn(&[1, 3, s, 128], DType::F32, &Device::Cpu);
        let (q, k, v) = (randn(s_q)?, randn(s_k)?, randn(s_k)?);
        let scores = (q.matmul(&k.t()?)? / (128f64).sqrt())?;
        let exp = scores
            .broadcast_sub(&scores.max_keepdim(D::Minus1)?)?
            .exp()?;
        let expected = exp
            .broadcast_div(&exp.sum_keepdim(D::Minus1)?)?
            .matmul(&v)?;
        let on_device = |t: &Tensor| t.to_dtype(dtype)?.to_device(device);
        let (q, k, v) = (on_device(&q)?, on_device(&k)?, on_device(&v)?);
        let out = if flash {
            // [B, S, H*D] back to [B, H, S, D].
            icedit_flux::attention(&q, &k, &v)?
                .reshape((1, s_q, 3, 128))?
                .transpose(1, 2)?
        } else {
            icedit_flux::chunked_attention(&q, &k, &v)?
        };
        let out = out.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        worst = worst.max(icedit_flux::compare::max_abs_diff(&out, &expected)?);
    }
    Ok((
        worst <= tolerance,
        format!("max abs {worst:.2e} (tolerance {tolerance:.1e})"),
    ))
}

/// diffusers' FluxTransformer2DModel on the flux/ fixtures (tests/reference/
/// gen_flux_transformer.py): f32 within [`F32_TOLERANCE`]; half precision no worse than
/// diffusers' own half-precision error (RMS within 5%, max within half an output ulp).
fn transformer_check(
    fixtures: &Path,
    config: &str,
    layout: &str,
    dtype: DType,
    device: &Device,
) -> Result<(bool, String)> {
    let dir = fixtures.join("flux").join(config);
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu)?;
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json"))?)?;
    let checkpoint = match layout {
        "diffusers" => Checkpoint::open(&dir)?,
        _ => Checkpoint::open_with_config(
            &dir.join("flux1-bfl.safetensors"),
            FluxConfig::from_json_file(&dir.join("transformer/config.json"))?,
        )?,
    };
    let model = FluxTransformer::load(&checkpoint, dtype, device)?;
    let out = model
        .forward(&FluxInput::from_named(&io)?)?
        .to_device(&Device::Cpu)?;
    let f32_out = &io["out_f32"];
    if dtype == DType::F32 {
        let err = max_abs_diff(&out, f32_out)?;
        return Ok((
            err <= F32_TOLERANCE,
            format!("max abs {err:.2e} (tolerance {F32_TOLERANCE:.0e})"),
        ));
    }
    let (label, mantissa_bits) = match dtype {
        DType::BF16 => ("bf16", 7),
        _ => ("f16", 10),
    };
    let out_max = meta["out_max_abs"].as_f64().context("out_max_abs")? as f32;
    let theirs_max = meta["reference_max_abs_err_vs_f32"][label]
        .as_f64()
        .context("reference error")? as f32;
    let theirs_rms = rms_diff(&io[&format!("out_{label}")], f32_out)?;
    let (ours_max, ours_rms) = (max_abs_diff(&out, f32_out)?, rms_diff(&out, f32_out)?);
    let half_ulp = 2f32.powi(out_max.log2().floor() as i32 - mantissa_bits) / 2.0;
    Ok((
        ours_rms <= theirs_rms * 1.05 && ours_max <= theirs_max + half_ulp,
        format!(
            "vs f32: max {ours_max:.2e} (diffusers {theirs_max:.2e}), rms {ours_rms:.2e} \
             (diffusers {theirs_rms:.2e})"
        ),
    ))
}

/// diffusers' GGUF loader (dequantized weights, f32 compute) on the gguf/ fixtures.
fn gguf_forward_check(
    fixtures: &Path,
    file: &str,
    out: &str,
    device: &Device,
) -> Result<(bool, String)> {
    let dir = fixtures.join("gguf");
    let io = candle_core::safetensors::load(dir.join("forward.safetensors"), &Device::Cpu)?;
    let checkpoint = Checkpoint::open(&dir.join(file))?;
    let model = FluxTransformer::load(&checkpoint, DType::F32, device)?;
    let ours = model
        .forward(&FluxInput::from_named(&io)?)?
        .to_device(&Device::Cpu)?;
    let err = max_abs_diff(&ours, &io[out])?;
    Ok((
        err <= F32_TOLERANCE,
        format!("max abs {err:.2e} (tolerance {F32_TOLERANCE:.0e})"),
    ))
}

/// A whole `icedit edit` (this binary, in a child process) on the tiny pipeline with a GGUF
/// transformer, against diffusers' FluxFillPipeline's PNG (tests/reference/gen_gguf.py).
fn edit_check(
    fixtures: &Path,
    run: &str,
    file: &str,
    adapter: Option<&str>,
    device: DeviceArg,
) -> Result<(bool, String)> {
    let work = tempfile::tempdir()?;
    let model = work.path().join("pipeline");
    let tiny = fixtures.join("fill_pipeline/tiny");
    for entry in std::fs::read_dir(&tiny)? {
        let entry = entry?.path();
        let name = entry.file_name().context("a file name")?;
        if name != "transformer" {
            copy_tree(&entry, &model.join(name))?;
        }
    }
    std::fs::create_dir_all(model.join("transformer"))?;
    let gguf = fixtures.join("gguf");
    std::fs::copy(
        gguf.join("transformer/config.json"),
        model.join("transformer/config.json"),
    )?;
    let out = work.path().join("edit.png");
    let mut command = std::process::Command::new(std::env::current_exe()?);
    command
        .arg("edit")
        .arg("--model")
        .arg(&model)
        .arg("--transformer")
        .arg(gguf.join(file))
        .arg("--image")
        .arg(gguf.join("source.png"))
        .args([
            "--instruction",
            "make it night",
            "--width",
            "64",
            "--steps",
            "4",
        ])
        .args(["--seed", "42", "--dtype", "f32", "--quiet", "--device"])
        .arg(match device {
            DeviceArg::Auto => "auto",
            DeviceArg::Cpu => "cpu",
            DeviceArg::Cuda => "cuda",
            DeviceArg::Metal => "metal",
        })
        .arg("--out")
        .arg(&out)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", work.path().join("hf"));
    match adapter {
        Some(adapter) => command.arg("--lora").arg(gguf.join(adapter)),
        None => command.arg("--no-lora"),
    };
    let result = command.output()?;
    if !result.status.success() {
        return Ok((
            false,
            format!(
                "edit failed: {}",
                String::from_utf8_lossy(&result.stderr).trim()
            ),
        ));
    }
    let ours = image::open(&out)?.to_rgb8();
    let theirs = image::open(gguf.join(format!("runs/{run}/edit.png")))?.to_rgb8();
    let diff = icedit_pipeline::image_io::max_pixel_diff(&ours, &theirs)?;
    Ok((
        diff <= PNG_TOLERANCE,
        format!("PNG max difference {diff}/255 (tolerance {PNG_TOLERANCE})"),
    ))
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    if from.is_dir() {
        std::fs::create_dir_all(to)?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?.path();
            copy_tree(
                &entry,
                &to.join(entry.file_name().expect("an entry has a name")),
            )?;
        }
        Ok(())
    } else {
        std::fs::copy(from, to).map(|_| ())
    }
}
