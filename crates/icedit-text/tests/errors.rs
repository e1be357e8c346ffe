//! Broken folders give errors that name the file (and tensor) at fault, never panics.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use icedit_text::{ClipTextEncoder, PromptTokenizer, T5Encoder, TextEncoders, TextError};

fn tiny() -> PathBuf {
    icedit_test_support::fixture("fill_pipeline/tiny")
}

/// A copy of the fixture folder `name`, without the files `skip`.
fn copy_of(name: &str, skip: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(tiny().join(name)).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_str().unwrap().to_string();
        if !skip.contains(&file.as_str()) {
            std::fs::copy(&path, dir.path().join(file)).unwrap();
        }
    }
    dir
}

/// Rewrites `file` in `dir` with `edit` applied to its tensors.
fn edit_tensors(dir: &Path, file: &str, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = dir.join(file);
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

fn load_clip(dir: &Path) -> Result<ClipTextEncoder, TextError> {
    ClipTextEncoder::load(dir, DType::F32, &Device::Cpu)
}

fn load_t5(dir: &Path) -> Result<T5Encoder, TextError> {
    T5Encoder::load(dir, DType::F32, &Device::Cpu)
}

#[test]
fn missing_clip_vocabulary_or_merges() {
    for (skip, what) in [
        ("vocab.json", "CLIP vocabulary"),
        ("merges.txt", "CLIP merges"),
    ] {
        let dir = copy_of("tokenizer", &[skip]);
        let err = PromptTokenizer::clip(dir.path()).err().unwrap();
        match &err {
            TextError::MissingFile { what: w, path, .. } => {
                assert_eq!(*w, what);
                assert_eq!(path, &dir.path().join(skip));
            }
            other => panic!("unexpected error {other:?}"),
        }
        let message = err.to_string();
        assert!(
            message.contains(skip) && message.contains("tokenizer.json"),
            "{message}"
        );
    }
}

#[test]
fn missing_t5_tokenizer_json() {
    let dir = copy_of("tokenizer_2", &["tokenizer.json"]);
    let err = PromptTokenizer::t5(dir.path()).err().unwrap();
    assert!(
        matches!(
            err,
            TextError::MissingFile {
                what: "T5 tokenizer",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
fn missing_tokenizer_folder() {
    let err = PromptTokenizer::clip(&tiny().join("no_such_folder"))
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            TextError::MissingFile {
                what: "tokenizer folder",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn broken_tokenizer_files() {
    // Not JSON at all.
    let dir = copy_of("tokenizer_2", &[]);
    std::fs::write(dir.path().join("tokenizer.json"), "{ not json").unwrap();
    let err = PromptTokenizer::t5(dir.path()).err().unwrap();
    assert!(matches!(err, TextError::Json { .. }), "{err:?}");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");

    // JSON, but a BPE model where T5 needs Unigram (the CLIP folder's files are not T5's).
    std::fs::write(
        dir.path().join("tokenizer.json"),
        r#"{"model": {"type": "BPE", "vocab": {}, "merges": []}}"#,
    )
    .unwrap();
    let err = PromptTokenizer::t5(dir.path()).err().unwrap();
    assert!(
        matches!(err, TextError::Tokenizer { which: "T5", .. }),
        "{err:?}"
    );

    // A merges line that is not a pair.
    let dir = copy_of("tokenizer", &[]);
    std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\na b c\n").unwrap();
    let err = PromptTokenizer::clip(dir.path()).err().unwrap();
    assert!(
        matches!(err, TextError::Tokenizer { which: "CLIP", .. }),
        "{err:?}"
    );
}

#[test]
fn missing_weight_tensor_is_named() {
    let dir = copy_of("text_encoder", &[]);
    edit_tensors(dir.path(), "model.safetensors", |t| {
        t.remove("encoder.layers.1.mlp.fc2.weight").unwrap();
    });
    let err = load_clip(dir.path()).err().unwrap();
    match &err {
        TextError::MissingTensor { name, files, .. } => {
            assert_eq!(name, "encoder.layers.1.mlp.fc2.weight");
            assert_eq!(files, &vec![dir.path().join("model.safetensors")]);
        }
        other => panic!("unexpected error {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("encoder.layers.1.mlp.fc2.weight")
            && message.contains("model.safetensors"),
        "{message}"
    );
}

#[test]
fn missing_tensor_in_a_shard_is_named() {
    let dir = copy_of("text_encoder_2", &[]);
    edit_tensors(dir.path(), "model-00003-of-00003.safetensors", |t| {
        t.remove("encoder.final_layer_norm.weight").unwrap();
    });
    let err = load_t5(dir.path()).err().unwrap();
    assert!(
        matches!(&err, TextError::MissingTensor { name, files, .. } if name == "encoder.final_layer_norm.weight"
            && files == &vec![dir.path().join("model-00003-of-00003.safetensors")]),
        "{err:?}"
    );
}

#[test]
fn misshapen_tensor_names_its_shard() {
    let dir = copy_of("text_encoder_2", &[]);
    edit_tensors(dir.path(), "model-00002-of-00003.safetensors", |t| {
        let wo = t["encoder.block.0.layer.1.DenseReluDense.wo.weight"]
            .t()
            .unwrap()
            .contiguous()
            .unwrap();
        t.insert(
            "encoder.block.0.layer.1.DenseReluDense.wo.weight".into(),
            wo,
        );
    });
    let err = load_t5(dir.path()).err().unwrap();
    match &err {
        TextError::TensorShape {
            name,
            file,
            expected,
            found,
        } => {
            assert_eq!(name, "encoder.block.0.layer.1.DenseReluDense.wo.weight");
            assert_eq!(file, &dir.path().join("model-00002-of-00003.safetensors"));
            assert_eq!(
                (expected.as_slice(), found.as_slice()),
                (&[32, 48][..], &[48, 32][..])
            );
        }
        other => panic!("unexpected error {other:?}"),
    }
}

#[test]
fn missing_shard_or_weights() {
    let dir = copy_of("text_encoder_2", &["model-00002-of-00003.safetensors"]);
    let err = load_t5(dir.path()).err().unwrap();
    assert!(
        matches!(
            err,
            TextError::MissingFile {
                what: "weight shard",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("model-00002-of-00003.safetensors"),
        "{err}"
    );

    let dir = copy_of("text_encoder", &["model.safetensors"]);
    let err = load_clip(dir.path()).err().unwrap();
    assert!(
        matches!(
            err,
            TextError::MissingFile {
                what: "model weights",
                ..
            }
        ),
        "{err:?}"
    );

    let dir = copy_of("text_encoder", &["config.json"]);
    let err = load_clip(dir.path()).err().unwrap();
    assert!(
        matches!(
            err,
            TextError::MissingFile {
                what: "model config",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn wrong_folder_is_a_missing_tensor() {
    // The T5 folder given as CLIP: its config reads (unknown keys ignored), its tensors do not.
    let err = load_clip(&tiny().join("text_encoder_2")).err().unwrap();
    assert!(
        matches!(&err, TextError::MissingTensor { name, model: "CLIP text encoder", .. } if name == "embeddings.token_embedding.weight"),
        "{err:?}"
    );
    let err = load_t5(&tiny().join("text_encoder")).err().unwrap();
    assert!(
        matches!(
            &err,
            TextError::MissingTensor {
                model: "T5 encoder",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn config_that_does_not_parse() {
    let dir = copy_of("text_encoder", &[]);
    let config = dir.path().join("config.json");

    std::fs::write(&config, "{\"hidden_size\": 32,").unwrap();
    let err = load_clip(dir.path()).err().unwrap();
    assert!(
        matches!(err, TextError::Json { ref path, .. } if path == &config),
        "{err:?}"
    );

    std::fs::write(&config, r#"{"hidden_size": "thirty-two"}"#).unwrap();
    let err = load_clip(dir.path()).err().unwrap();
    assert!(matches!(err, TextError::Config { .. }), "{err:?}");
    assert!(
        err.to_string().contains("hidden_size") || err.to_string().contains("invalid type"),
        "{err}"
    );

    std::fs::write(&config, r#"{"hidden_size": 32, "hidden_act": "mish"}"#).unwrap();
    let err = load_clip(dir.path()).err().unwrap();
    assert!(err.to_string().contains("hidden_act `mish`"), "{err}");

    let dir = copy_of("text_encoder_2", &[]);
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"d_model": 32, "feed_forward_proj": "gated-mish"}"#,
    )
    .unwrap();
    let err = load_t5(dir.path()).err().unwrap();
    assert!(
        matches!(err, TextError::Config { .. }) && err.to_string().contains("gated-mish"),
        "{err}"
    );
}

#[test]
fn pipeline_folder_without_text_encoders() {
    let dir = tempfile::tempdir().unwrap();
    let err = TextEncoders::load(dir.path(), None, DType::F32, &Device::Cpu)
        .err()
        .unwrap();
    assert!(matches!(err, TextError::MissingFile { .. }), "{err:?}");
}
