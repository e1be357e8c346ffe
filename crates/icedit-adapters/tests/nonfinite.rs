//! NaN and infinite adapters are refused before they touch the model: a LoRA A/B matrix or an
//! MoE router/expert with NaN or infinity in the file, named by key; a merge whose scale
//! overflows the layer's weights, named by layer; and run-time LoRA/MoE tensors that do not fit
//! the model's dtype.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use icedit_adapters::{apply_adapters, AdapterChoice, AdapterError, AdapterFile, ApplyMode};
use icedit_flux::{Checkpoint, FluxTransformer};
use icedit_test_support::fixtures;

fn model(dtype: DType) -> FluxTransformer {
    let checkpoint = Checkpoint::open(&fixtures().join("fill_pipeline/tiny/transformer")).unwrap();
    FluxTransformer::load(&checkpoint, dtype, &Device::Cpu).unwrap()
}

/// The fixture adapter `file` with one element of `key` set to `value`, in `dir`.
fn poked(dir: &Path, file: &str, key: &str, value: f32) -> PathBuf {
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixtures().join("edit/adapters").join(file), &Device::Cpu)
            .unwrap();
    let t = &tensors[key];
    let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v[0] = value;
    let t = Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap();
    tensors.insert(key.to_string(), t);
    let path = dir.join(file);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    path
}

fn apply(path: &Path, scale: f64, dtype: DType, mode: ApplyMode) -> Result<(), AdapterError> {
    let file = AdapterFile::read(path)?;
    let mut m = model(dtype);
    apply_adapters(
        &mut m,
        vec![AdapterChoice {
            name: "test-lora".into(),
            file,
            scale,
            top_k: None,
        }],
        mode,
    )?;
    Ok(())
}

#[test]
fn nan_or_inf_in_a_lora_or_moe_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    for (file, key, value) in [
        (
            "lora_peft.safetensors",
            "transformer.single_transformer_blocks.0.attn.to_k.lora_A.weight",
            f32::NAN,
        ),
        (
            "lora_kohya.safetensors",
            "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight",
            f32::INFINITY,
        ),
        (
            "moe_lora.safetensors",
            "transformer.single_transformer_blocks.0.proj_out.lora_route.weight",
            f32::NAN,
        ),
        (
            "moe_lora.safetensors",
            "transformer.single_transformer_blocks.0.proj_out.lora_B.expert_1.weight",
            f32::NEG_INFINITY,
        ),
    ] {
        let path = poked(dir.path(), file, key, value);
        let err = AdapterFile::read(&path).unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(&err, AdapterError::NonFiniteTensors { keys, .. } if keys == &[key]),
            "{message}"
        );
        assert!(message.contains(key), "{message}");
        assert!(message.contains(path.to_str().unwrap()), "{message}");
        assert!(message.contains("NaN or infinite"), "{message}");
    }
}

#[test]
fn a_scale_that_overflows_the_merged_weights_names_the_layer() {
    let path = fixtures().join("edit/adapters/lora_peft.safetensors");
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        // 1e39 is past f32's range: every merged weight becomes infinite.
        let err = apply(&path, 1e39, dtype, ApplyMode::Merge).expect_err("an overflow");
        let message = err.to_string();
        assert!(
            matches!(&err, AdapterError::NonFiniteLayer { layer, what: "merged weights", .. }
                if !layer.is_empty()),
            "{message}"
        );
        assert!(
            message.contains("adapter `test-lora` on layer `"),
            "{message}"
        );
        assert!(message.contains("--lora-scale"), "{message}");
        assert!(message.contains("(scale 2e39)"), "{message}");
        assert!(message.contains(dtype.as_str()), "{message}");
    }
    // Within f32 and bf16's range, past f16's.
    apply(&path, 1e6, DType::F32, ApplyMode::Merge).unwrap();
    apply(&path, 1e6, DType::BF16, ApplyMode::Merge).unwrap();
    let message = apply(&path, 1e6, DType::F16, ApplyMode::Merge)
        .expect_err("an f16 overflow")
        .to_string();
    assert!(message.contains("--dtype bf16"), "{message}");
}

#[test]
fn run_time_adapters_that_do_not_fit_the_dtype_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Finite in the file, infinite in f16.
    let lora = poked(
        dir.path(),
        "lora_peft.safetensors",
        "transformer.single_transformer_blocks.0.attn.to_k.lora_A.weight",
        1e6,
    );
    apply(&lora, 1.0, DType::F32, ApplyMode::Runtime).unwrap();
    let message = apply(&lora, 1.0, DType::F16, ApplyMode::Runtime)
        .expect_err("an f16 overflow")
        .to_string();
    assert!(
        message.contains("layer `single_transformer_blocks.0.attn.to_k`"),
        "{message}"
    );
    let moe = poked(
        dir.path(),
        "moe_lora.safetensors",
        "transformer.single_transformer_blocks.0.proj_out.lora_A.expert_0.weight",
        1e6,
    );
    apply(&moe, 1.0, DType::F32, ApplyMode::Merge).unwrap();
    let message = apply(&moe, 1.0, DType::F16, ApplyMode::Merge)
        .expect_err("an f16 overflow")
        .to_string();
    assert!(
        message.contains("layer `single_transformer_blocks.0.proj_out`"),
        "{message}"
    );
}
