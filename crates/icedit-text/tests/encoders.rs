//! CLIP pooled output and T5 states against transformers 5.23 (the fixture's
//! reference/text.safetensors, from diffusers' `encode_prompt(..., max_sequence_length=16)`).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use icedit_text::{ClipTextEncoder, T5Encoder, TextEncoders};
use serde::Deserialize;

fn fixtures() -> PathBuf {
    icedit_test_support::fixture("fill_pipeline")
}

fn tiny() -> PathBuf {
    fixtures().join("tiny")
}

#[derive(Deserialize)]
struct T5Ids {
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    clip_ids: Vec<u32>,
    t5: HashMap<String, T5Ids>,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixtures().join("reference/tokens.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("reference/text.safetensors"), &Device::Cpu)
        .unwrap()
}

fn ids(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    icedit_flux::compare::max_abs_diff(a, b).unwrap()
}

fn max_abs(a: &Tensor) -> f32 {
    a.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn t5_states_match_transformers() {
    let t5 = T5Encoder::load(&tiny().join("text_encoder_2"), DType::F32, &Device::Cpu).unwrap();
    let reference = reference();
    let mut worst = 0f32;
    for (i, case) in cases().iter().enumerate() {
        let out = t5.forward(&ids(&case.t5["16"].ids)).unwrap();
        assert_eq!(out.dims(), &[1, 16, 32]);
        let expected = reference[&format!("t5_{i}")].unsqueeze(0).unwrap();
        let err = max_abs_diff(&out, &expected);
        println!(
            "t5_{i}: max abs error {err:.3e} (values up to {:.2})",
            max_abs(&expected)
        );
        worst = worst.max(err);
    }
    assert!(worst < 1e-5, "T5 max abs error {worst:e}");
}

#[test]
fn clip_pooled_matches_transformers() {
    let clip =
        ClipTextEncoder::load(&tiny().join("text_encoder"), DType::F32, &Device::Cpu).unwrap();
    let reference = reference();
    let mut worst = 0f32;
    for (i, case) in cases().iter().enumerate() {
        let pooled = clip.pooled_output(&ids(&case.clip_ids)).unwrap();
        assert_eq!(pooled.dims(), &[1, 32]);
        let expected = reference[&format!("clip_pooled_{i}")].unsqueeze(0).unwrap();
        let err = max_abs_diff(&pooled, &expected);
        println!(
            "clip_pooled_{i}: max abs error {err:.3e} (values up to {:.2})",
            max_abs(&expected)
        );
        worst = worst.max(err);
    }
    assert!(worst < 1e-5, "CLIP max abs error {worst:e}");
}

#[test]
fn clip_pools_at_the_first_end_token_with_a_modern_config() {
    // With eos_token_id set to the real end token (not the legacy 2) transformers pools at its
    // first occurrence; on these ids that is the same position as argmax.
    let dir = tempfile::tempdir().unwrap();
    let source = tiny().join("text_encoder");
    std::fs::copy(
        source.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).unwrap())
            .unwrap();
    config["eos_token_id"] = 770.into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let clip = ClipTextEncoder::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let reference = reference();
    for (i, case) in cases().iter().enumerate() {
        let pooled = clip.pooled_output(&ids(&case.clip_ids)).unwrap();
        let expected = reference[&format!("clip_pooled_{i}")].unsqueeze(0).unwrap();
        assert!(max_abs_diff(&pooled, &expected) < 1e-5, "case {i}");
    }
}

#[test]
fn encode_prompt_matches_diffusers() {
    let encoders = TextEncoders::load(&tiny(), None, DType::F32, &Device::Cpu).unwrap();
    let reference = reference();
    for (i, case) in cases().iter().enumerate() {
        let text = encoders.encode(&case.prompt, 16).unwrap();
        assert_eq!(text.t5.dims(), &[1, 16, 32]);
        assert_eq!(text.pooled.dims(), &[1, 32]);
        let t5_ref = reference[&format!("t5_{i}")].unsqueeze(0).unwrap();
        let pooled_ref = reference[&format!("clip_pooled_{i}")].unsqueeze(0).unwrap();
        assert!(max_abs_diff(&text.t5, &t5_ref) < 1e-5, "case {i}");
        assert!(max_abs_diff(&text.pooled, &pooled_ref) < 1e-5, "case {i}");
        assert_eq!(text.clip_tokens.ids, case.clip_ids);
        assert_eq!(text.t5_tokens.ids, case.t5["16"].ids);
    }

    let long = encoders.encode(&cases()[4].prompt, 16).unwrap();
    let warnings = long.truncation_warnings();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].starts_with("CLIP prompt truncated to 77 tokens"));
    assert!(warnings[1].starts_with("T5 prompt truncated to 16 tokens"));
    assert!(encoders
        .encode("make it night", 16)
        .unwrap()
        .truncation_warnings()
        .is_empty());
    assert!(encoders.encode("make it night", 513).is_err());
}

/// Half precision runs and stays close to f32: within a few bf16/f16 steps of the output's scale.
#[test]
fn half_precision_is_close_to_f32() {
    let reference = reference();
    for (dtype, tolerance) in [(DType::BF16, 0.05f32), (DType::F16, 0.01)] {
        let encoders = TextEncoders::load(&tiny(), None, dtype, &Device::Cpu).unwrap();
        let (mut t5_worst, mut clip_worst) = (0f32, 0f32);
        for (i, case) in cases().iter().enumerate() {
            let text = encoders.encode(&case.prompt, 16).unwrap();
            assert_eq!(text.t5.dtype(), dtype);
            assert_eq!(text.pooled.dtype(), dtype);
            let t5_ref = reference[&format!("t5_{i}")].unsqueeze(0).unwrap();
            let pooled_ref = reference[&format!("clip_pooled_{i}")].unsqueeze(0).unwrap();
            t5_worst = t5_worst.max(max_abs_diff(&text.t5, &t5_ref) / max_abs(&t5_ref));
            clip_worst =
                clip_worst.max(max_abs_diff(&text.pooled, &pooled_ref) / max_abs(&pooled_ref));
        }
        println!("{dtype:?}: max error relative to the largest value: T5 {t5_worst:.3e}, CLIP {clip_worst:.3e}");
        assert!(
            t5_worst < tolerance && clip_worst < tolerance,
            "{dtype:?}: T5 {t5_worst}, CLIP {clip_worst}"
        );
    }
}

#[test]
fn out_of_vocabulary_ids_are_an_input_error() {
    let t5 = T5Encoder::load(&tiny().join("text_encoder_2"), DType::F32, &Device::Cpu).unwrap();
    let err = t5.forward(&ids(&[3, 100_000, 1])).unwrap_err();
    assert!(matches!(err, icedit_text::TextError::Input(_)), "{err}");
    let clip =
        ClipTextEncoder::load(&tiny().join("text_encoder"), DType::F32, &Device::Cpu).unwrap();
    assert!(
        clip.pooled_output(&ids(&[769; 78])).is_err(),
        "78 tokens exceed CLIP's 77 positions"
    );
}
