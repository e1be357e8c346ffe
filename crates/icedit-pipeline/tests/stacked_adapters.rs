//! Stacked adapters against diffusers with several adapters loaded and weighted
//! (`set_adapters([...], adapter_weights=[...])`; tests/fixtures/stacked, made by
//! tests/reference/gen_stacked_adapters.py): a PEFT LoRA plus a kohya-named LoRA, and ICEdit's
//! MoE-LoRA plus that LoRA, whole diptych edits, merged and at run time.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use icedit_adapters::{AdapterChoice, AdapterFile, ApplyMode};
use icedit_hub::{HubOptions, ModelRepo};
use icedit_pipeline::edit::diptych_prompt;
use icedit_pipeline::image_io::{load_rgb, max_pixel_diff};
use icedit_pipeline::latents::pixels_to_tensor;
use icedit_pipeline::{Diptych, EditJob, EditSettings, EditText, FluxPipeline, InitialNoise};
use icedit_test_support::fixtures;
use serde_json::Value;

fn adapter(file: &str, scale: f64, top_k: Option<usize>) -> AdapterChoice {
    AdapterChoice {
        name: file.into(),
        file: AdapterFile::read(&fixtures().join(file)).unwrap(),
        scale,
        top_k,
    }
}

#[test]
fn stacked_adapters_match_diffusers() {
    let runs: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("stacked/runs.json")).unwrap(),
    )
    .unwrap();
    let source = load_rgb(&fixtures().join("edit/source.png")).unwrap().rgb;
    let job = EditJob::Diptych(Diptych::new(&source, 64).unwrap());
    let prompt = diptych_prompt("make it night").unwrap();
    for name in ["peft_plus_kohya", "moe_plus_peft"] {
        let run = runs["runs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap();
        assert_eq!(run["prompt"], prompt.as_str());
        let settings = EditSettings {
            steps: run["steps"].as_u64().unwrap() as usize,
            guidance: run["guidance"].as_f64().unwrap() as f32,
            max_sequence_length: run["max_sequence_length"].as_u64().unwrap() as usize,
        };
        for mode in [ApplyMode::Merge, ApplyMode::Runtime] {
            // The adapters as the reference loaded them, in order, with their weights.
            let adapters = run["adapters"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| {
                    let file = a["file"]
                        .as_str()
                        .unwrap()
                        .trim_start_matches("tests/fixtures/");
                    adapter(
                        file,
                        a["adapter_weight"].as_f64().unwrap(),
                        a["top_k"].as_u64().map(|k| k as usize),
                    )
                })
                .collect();
            let repo = ModelRepo::open(
                fixtures().join("fill_pipeline/tiny").to_str().unwrap(),
                &HubOptions::new(std::env::temp_dir()).with_offline(true),
            )
            .unwrap();
            let mut p = FluxPipeline::new(repo, DType::F32, Device::Cpu).unwrap();
            p.set_adapters(adapters, mode).unwrap();
            let text = p
                .encode_prompt(&prompt, settings.max_sequence_length, &mut |_| {})
                .unwrap();
            let seed = run["seed"].as_u64().unwrap();
            let out = p
                .edit(
                    &job,
                    &EditText::new(&prompt, &text),
                    &settings,
                    InitialNoise::Seed(seed),
                    &mut |_| {},
                )
                .unwrap();
            assert_eq!(
                p.applied_adapters().len(),
                2,
                "{name}: both adapters applied"
            );
            let reference: HashMap<String, Tensor> = candle_core::safetensors::load(
                fixtures().join(format!("stacked/runs/{name}/image.safetensors")),
                &Device::Cpu,
            )
            .unwrap();
            let ours = pixels_to_tensor(out.generated.as_raw(), 48, 128, &Device::Cpu)
                .unwrap()
                .affine(0.5, 0.5)
                .unwrap();
            let float_err = icedit_flux::compare::max_abs_diff(&ours, &reference["image"]).unwrap();
            let png = load_rgb(&fixtures().join(format!("stacked/runs/{name}/edit.png")))
                .unwrap()
                .rgb;
            let png_err = max_pixel_diff(&out.edited, &png).unwrap();
            eprintln!("{name} {mode:?}: float {float_err:.2e}, PNG {png_err}/255");
            assert!(float_err <= 3e-3, "{name} {mode:?}: {float_err}");
            assert!(png_err <= 1, "{name} {mode:?}: PNG {png_err}/255");
        }
    }
}
