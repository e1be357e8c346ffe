//! NaN and infinity in a run stop it with an error naming where they appeared, rather than
//! ending as a black image: a denoising step (alone, or candidates advanced in a batch), the VAE
//! decode, and half-precision overflows with their advice. The tiny pipeline fixture, with an
//! adapter of an absurd scale or a copied VAE made to overflow.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use icedit_adapters::{AdapterChoice, AdapterFile, ApplyMode};
use icedit_hub::{HubOptions, ModelRepo};
use icedit_pipeline::image_io::{load_mask, load_rgb};
use icedit_pipeline::{FillRequest, FluxPipeline, InitialNoise, PipelineError};
use icedit_test_support::fixtures;
use image::{GrayImage, RgbImage};

fn pipeline(root: &Path, dtype: DType) -> FluxPipeline {
    let repo = ModelRepo::open(root.to_str().unwrap(), &HubOptions::from_env()).unwrap();
    FluxPipeline::new(repo, dtype, Device::Cpu).unwrap()
}

fn with_lora(mut pipeline: FluxPipeline, scale: f64) -> FluxPipeline {
    let path = fixtures().join("edit/adapters/lora_peft.safetensors");
    let choice = AdapterChoice {
        name: "lora_peft".into(),
        file: AdapterFile::read(&path).unwrap(),
        scale,
        top_k: None,
    };
    pipeline
        .set_adapters(vec![choice], ApplyMode::Merge)
        .unwrap();
    pipeline
}

fn inputs() -> (RgbImage, GrayImage) {
    let dir = fixtures().join("fill_pipeline/reference/inpaint_seed");
    (
        load_rgb(&dir.join("image.png")).unwrap().rgb,
        load_mask(&dir.join("mask.png")).unwrap(),
    )
}

fn request<'a>(image: &'a RgbImage, mask: &'a GrayImage, seed: u64) -> FillRequest<'a> {
    FillRequest {
        image,
        mask,
        prompt: "a red door",
        steps: 3,
        guidance: 30.0,
        noise: InitialNoise::Seed(seed),
        max_sequence_length: 16,
    }
}

fn fill_err(pipeline: &mut FluxPipeline, seed: u64) -> String {
    let (image, mask) = inputs();
    match pipeline.fill(&request(&image, &mask, seed), &mut |_| {}) {
        Ok(_) => panic!("the run succeeded"),
        Err(e) => {
            assert!(
                matches!(
                    e,
                    PipelineError::Flux(icedit_flux::FluxError::NonFiniteValues { .. })
                ),
                "{e}"
            );
            e.to_string()
        }
    }
}

#[test]
fn an_overflow_in_a_step_names_the_step_and_the_seed() {
    let tiny = fixtures().join("fill_pipeline/tiny");
    // Merged weights of 1e30 are finite in f32; the activations they make are not.
    let mut p = with_lora(pipeline(&tiny, DType::F32), 1e30);
    let message = fill_err(&mut p, 42);
    assert!(
        message.contains("NaN or infinite values at denoising step 1 of 3 (seed 42)"),
        "{message}"
    );
    assert!(message.contains("adapter scale"), "{message}");
}

#[test]
fn batched_candidates_are_checked_each() {
    let tiny = fixtures().join("fill_pipeline/tiny");
    let mut p = with_lora(pipeline(&tiny, DType::F32), 1e30);
    let (image, mask) = inputs();
    let text = p.encode_prompt("a red door", 16, &mut |_| {}).unwrap();
    let mut states: Vec<_> = [5u64, 6]
        .iter()
        .map(|&seed| {
            p.start(&request(&image, &mask, seed), &text, &mut |_| {})
                .unwrap()
        })
        .collect();
    let err = p
        .advance_batch(states.iter_mut().collect(), usize::MAX, 2, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("denoising step 1 of 3 (seed 5)"), "{err}");
}

#[test]
fn half_precision_overflows_suggest_another_dtype() {
    let tiny = fixtures().join("fill_pipeline/tiny");
    // Finite merged weights in f16 whose activations leave its range.
    let mut p = with_lora(pipeline(&tiny, DType::F16), 1e3);
    let message = fill_err(&mut p, 42);
    assert!(
        message.contains("the model overflowed at denoising step 1 of 3"),
        "{message}"
    );
    assert!(
        message.contains("--dtype bf16") && message.contains("--dtype f32"),
        "{message}"
    );
}

#[test]
fn an_overflowing_vae_decode_is_an_error_not_a_black_image() {
    // A copy of the tiny pipeline whose VAE decoder's last convolution overflows f32.
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("fill_pipeline/tiny"), dir.path());
    let weights = dir.path().join("vae/diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let conv = &tensors["decoder.conv_out.weight"];
    let huge = Tensor::full(3e38f32, conv.shape(), &Device::Cpu).unwrap();
    tensors.insert("decoder.conv_out.weight".into(), huge);
    candle_core::safetensors::save(&tensors, &weights).unwrap();

    let mut p = pipeline(dir.path(), DType::F32);
    let message = fill_err(&mut p, 42);
    assert!(message.contains("in the VAE decode"), "{message}");
}

#[test]
fn the_checks_change_nothing_in_a_normal_run() {
    let tiny = fixtures().join("fill_pipeline/tiny");
    let (image, mask) = inputs();
    let mut p = pipeline(&tiny, DType::F32);
    let a = p.fill(&request(&image, &mask, 42), &mut |_| {}).unwrap();
    let b = p.fill(&request(&image, &mask, 42), &mut |_| {}).unwrap();
    assert_eq!(a.image.as_raw(), b.image.as_raw());
    assert!(a.image.as_raw().iter().any(|&v| v > 0));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}
