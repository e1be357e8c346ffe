//! T5 from GGUF files in llama.cpp's naming (as city96/t5-v1_1-xxl-encoder-gguf publishes
//! T5-XXL) against transformers' GGUF loader (tests/reference/gen_t5_gguf_fp8.py): the tiny
//! pipeline's T5 as Q8_0 and F16, encoding ICEdit's prompt padded to 512 tokens.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use icedit_test_support::fixtures;
use icedit_text::T5Encoder;

fn t5_config() -> PathBuf {
    fixtures().join("fill_pipeline/tiny/text_encoder_2/config.json")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    icedit_flux::compare::max_abs_diff(a, b).unwrap()
}

#[test]
fn t5_from_gguf_matches_transformers() {
    let io = candle_core::safetensors::load(
        fixtures().join("t5_gguf/encoded.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    for (file, reference) in [
        ("t5_q8_0.gguf", "hidden.q8_0"),
        ("t5_f16.gguf", "hidden.f16"),
    ] {
        let path = fixtures().join("t5_gguf").join(file);
        let encoder = T5Encoder::load_file(&t5_config(), &path, DType::F32, &Device::Cpu).unwrap();
        let hidden = encoder.forward(&ids).unwrap();
        let err = max_abs_diff(&hidden, &io[reference]);
        let quantization = max_abs_diff(&io[reference], &io["hidden.f32"]);
        println!(
            "{file}: max abs error {err:.2e} (the quantization moves it by {quantization:.2e})"
        );
        assert!(err < 1e-5, "{file}: max abs error {err}");
    }
}

#[test]
fn a_gguf_of_another_model_is_refused() {
    // A FLUX transformer GGUF given as the T5 encoder.
    let path = fixtures().join("gguf/flux_q8_0.gguf");
    let err = match T5Encoder::load_file(&t5_config(), &path, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("a FLUX GGUF loaded as T5"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("general.architecture") && err.contains("flux"),
        "{err}"
    );
    // A T5 GGUF of another size names the tensor and both shapes.
    let other = tempfile::tempdir().unwrap();
    let config = std::fs::read_to_string(t5_config())
        .unwrap()
        .replace("\"d_model\": 32", "\"d_model\": 64");
    std::fs::write(other.path().join("config.json"), config).unwrap();
    let path = fixtures().join("t5_gguf/t5_q8_0.gguf");
    let err = match T5Encoder::load_file(
        &other.path().join("config.json"),
        &path,
        DType::F32,
        &Device::Cpu,
    ) {
        Ok(_) => panic!("a 32-wide T5 loaded with a 64-wide config"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("token_embd.weight") && err.contains("64"),
        "{err}"
    );
}
