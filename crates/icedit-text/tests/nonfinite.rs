//! NaN and infinite values in the text encoders: a weight is refused at load, naming the tensor
//! and file; an encoder whose output overflows (T5 in float16) stops the prompt's encoding with
//! advice to change the dtype.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use icedit_flux::FluxError;
use icedit_text::{TextEncoders, TextError};

fn tiny() -> PathBuf {
    icedit_test_support::fixture("fill_pipeline/tiny")
}

/// The text parts of the tiny pipeline copied, with every element of `tensor` (in the
/// safetensors file of `folder` that holds it) mapped by `edit`.
fn pipeline_with(folder: &str, tensor: &str, edit: impl Fn(f32) -> f32) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for part in ["tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"] {
        std::fs::create_dir(dir.path().join(part)).unwrap();
        for entry in std::fs::read_dir(tiny().join(part)).unwrap() {
            let path = entry.unwrap().path();
            let target = dir.path().join(part).join(path.file_name().unwrap());
            std::fs::copy(&path, &target).unwrap();
            if part != folder || path.extension().is_none_or(|e| e != "safetensors") {
                continue;
            }
            let mut tensors: HashMap<String, Tensor> =
                candle_core::safetensors::load(&target, &Device::Cpu).unwrap();
            if let Some(t) = tensors.get(tensor) {
                let v: Vec<f32> = t
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .into_iter()
                    .enumerate()
                    .map(|(i, x)| if i < 3 { edit(x) } else { x })
                    .collect();
                let edited = Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap();
                tensors.insert(tensor.to_string(), edited);
                candle_core::safetensors::save(&tensors, &target).unwrap();
            }
        }
    }
    dir
}

fn load_err(dir: &Path, dtype: DType) -> TextError {
    match TextEncoders::load(dir, None, dtype, &Device::Cpu) {
        Ok(_) => panic!("loaded"),
        Err(e) => e,
    }
}

#[test]
fn nan_or_inf_text_encoder_weights_are_named_at_load() {
    for (folder, tensor, value) in [
        (
            "text_encoder_2",
            "encoder.block.1.layer.1.DenseReluDense.wo.weight",
            f32::NAN,
        ),
        ("text_encoder_2", "shared.weight", f32::INFINITY),
        (
            "text_encoder",
            "encoder.layers.0.layer_norm1.weight",
            f32::NAN,
        ),
    ] {
        let dir = pipeline_with(folder, tensor, |_| value);
        let err = load_err(dir.path(), DType::F32);
        let message = err.to_string();
        assert!(
            matches!(&err, TextError::Weights(FluxError::NonFiniteWeight { name, .. }) if name == tensor),
            "{message}"
        );
        assert!(message.contains(&format!("`{tensor}`")), "{message}");
        assert!(message.contains(folder), "{message}");
    }
}

#[test]
fn a_t5_overflow_in_float16_stops_the_encoding() {
    // The final norm's scale at the edge of float16's range: its output overflows.
    let dir = pipeline_with("text_encoder_2", "encoder.final_layer_norm.weight", |_| {
        60000.0
    });
    let f32_encoders = TextEncoders::load(dir.path(), None, DType::F32, &Device::Cpu).unwrap();
    f32_encoders.encode("a red door", 16).unwrap();
    let f16_encoders = TextEncoders::load(dir.path(), None, DType::F16, &Device::Cpu).unwrap();
    let err = f16_encoders.encode("a red door", 16).unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(
            err,
            TextError::NonFiniteOutput {
                encoder: "T5 text encoder",
                ..
            }
        ),
        "{message}"
    );
    assert!(message.contains("--dtype bf16"), "{message}");
}
