//! Loading paths and their errors: missing or mis-shaped tensors, bad dtypes, broken folders,
//! config inference for BFL single files, and model input checks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use icedit_flux::{
    parse_dtype, Checkpoint, FluxConfig, FluxError, FluxInput, FluxTransformer, Layout,
};

fn fixture(name: &str) -> PathBuf {
    icedit_test_support::fixture("flux").join(name)
}

fn fill_config() -> FluxConfig {
    FluxConfig::from_json_file(&fixture("fill_diptych").join("transformer/config.json")).unwrap()
}

fn load_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn load_err(checkpoint: &Checkpoint) -> FluxError {
    FluxTransformer::load(checkpoint, DType::F32, &Device::Cpu).unwrap_err()
}

/// The BFL fixture rewritten by `edit` into a temporary file.
fn edited_bfl(edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> (tempfile::TempDir, PathBuf) {
    let mut tensors = load_tensors(&fixture("fill_diptych").join("flux1-bfl.safetensors"));
    edit(&mut tensors);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flux1-fill-dev.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    (dir, path)
}

#[test]
fn missing_tensor_is_named() {
    let (_dir, path) = edited_bfl(|t| {
        t.remove("double_blocks.1.txt_attn.qkv.weight");
    });
    let err = load_err(&Checkpoint::open_with_config(&path, fill_config()).unwrap());
    let msg = err.to_string();
    assert!(matches!(err, FluxError::MissingTensor { .. }), "{err:?}");
    assert!(msg.contains("double_blocks.1.txt_attn.qkv.weight"), "{msg}");
    assert!(
        msg.contains("transformer_blocks.1.attn.add_q_proj.weight"),
        "{msg}"
    );

    // Same in a diffusers folder.
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("fill_diptych").join("transformer");
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let mut tensors = load_tensors(&src.join("diffusion_pytorch_model.safetensors"));
    tensors.remove("single_transformer_blocks.2.proj_out.bias");
    candle_core::safetensors::save(
        &tensors,
        dir.path().join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let err = load_err(&Checkpoint::open(dir.path()).unwrap());
    assert!(
        err.to_string()
            .contains("`single_transformer_blocks.2.proj_out.bias` is missing"),
        "{err}"
    );
}

#[test]
fn wrong_shape_names_tensor_expected_and_found() {
    // A config that disagrees with the weights.
    let config = FluxConfig {
        joint_attention_dim: 25,
        ..fill_config()
    };
    let err = load_err(&Checkpoint::open_with_config(&fixture("fill_diptych"), config).unwrap());
    match &err {
        FluxError::ShapeMismatch {
            name,
            read_as,
            expected,
            found,
        } => {
            assert_eq!(name, "context_embedder.weight");
            assert_eq!(read_as, &None);
            assert_eq!(expected, &[32, 25]);
            assert_eq!(found, &[32, 24]);
        }
        other => panic!("expected a shape mismatch, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("[32, 25]") && msg.contains("[32, 24]"),
        "{msg}"
    );

    // A fused BFL tensor with a row too few.
    let (_dir, path) = edited_bfl(|t| {
        let qkv = t["double_blocks.0.img_attn.qkv.weight"]
            .narrow(0, 0, 95)
            .unwrap();
        t.insert("double_blocks.0.img_attn.qkv.weight".into(), qkv);
    });
    let err = load_err(&Checkpoint::open_with_config(&path, fill_config()).unwrap());
    match &err {
        FluxError::ShapeMismatch {
            name,
            read_as,
            expected,
            found,
        } => {
            assert_eq!(name, "double_blocks.0.img_attn.qkv.weight");
            assert_eq!(
                read_as.as_deref(),
                Some("transformer_blocks.0.attn.to_q.weight")
            );
            assert_eq!(expected, &[96, 32]);
            assert_eq!(found, &[95, 32]);
        }
        other => panic!("expected a shape mismatch, got {other:?}"),
    }
}

#[test]
fn unsupported_dtypes_are_refused_with_the_choices() {
    let checkpoint = Checkpoint::open(&fixture("fill_diptych")).unwrap();
    for dtype in [DType::U8, DType::I64, DType::F64] {
        let err = FluxTransformer::load(&checkpoint, dtype, &Device::Cpu).unwrap_err();
        assert!(matches!(err, FluxError::UnsupportedDtype { .. }), "{err:?}");
        assert!(err.to_string().contains("f32, bf16, f16"), "{err}");
    }
    assert_eq!(parse_dtype("BF16").unwrap(), DType::BF16);
    assert_eq!(parse_dtype("float16").unwrap(), DType::F16);
    assert_eq!(parse_dtype("fp32").unwrap(), DType::F32);
    let err = parse_dtype("int8").unwrap_err();
    assert!(err.to_string().contains("int8") && err.to_string().contains("f32, bf16, f16"));

    // A checkpoint tensor stored as integers cannot be read as model weights.
    let (_dir, path) = edited_bfl(|t| {
        let ints = t["img_in.bias"].to_dtype(DType::I64).unwrap();
        t.insert("img_in.bias".into(), ints);
    });
    let err = load_err(&Checkpoint::open_with_config(&path, fill_config()).unwrap());
    assert!(
        matches!(err, FluxError::UnsupportedTensorDtype { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("img_in.bias"), "{err}");
}

#[test]
fn broken_folders_and_files_say_what_is_wrong() {
    // No config.json.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("fill_diptych").join("transformer/diffusion_pytorch_model.safetensors"),
        dir.path().join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let err = Checkpoint::open(dir.path()).err().unwrap();
    assert!(err.to_string().contains("config.json"), "{err}");

    // No weights.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("fill_diptych").join("transformer/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let err = Checkpoint::open(dir.path()).err().unwrap();
    assert!(
        err.to_string()
            .contains("diffusion_pytorch_model.safetensors"),
        "{err}"
    );

    // A shard named by the index is missing.
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("dev_sharded").join("transformer");
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        if !name.contains("00003-of") {
            std::fs::copy(entry.path(), dir.path().join(&name)).unwrap();
        }
    }
    let err = Checkpoint::open(dir.path()).err().unwrap();
    assert!(err.to_string().contains("00003-of-00004"), "{err}");

    // A truncated download.
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("fill_diptych").join("flux1-bfl.safetensors")).unwrap();
    let truncated = dir.path().join("flux1-fill-dev.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = Checkpoint::open(&truncated).err().unwrap();
    assert!(matches!(err, FluxError::Safetensors { .. }), "{err:?}");
    assert!(
        err.to_string().contains("flux1-fill-dev.safetensors"),
        "{err}"
    );

    // Not there at all.
    let err = Checkpoint::open(Path::new("/nonexistent/flux"))
        .err()
        .unwrap();
    assert!(err.to_string().contains("/nonexistent/flux"), "{err}");

    // A safetensors file of something else.
    let (_dir, path) = {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vae.safetensors");
        let t = HashMap::from([(
            "decoder.conv_in.weight".to_string(),
            Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
        )]);
        candle_core::safetensors::save(&t, &path).unwrap();
        (dir, path)
    };
    let err = Checkpoint::open(&path).err().unwrap();
    assert!(err.to_string().contains("double_blocks"), "{err}");
}

#[test]
fn bfl_config_needs_a_config_file_when_heads_are_not_128_wide() {
    let err = Checkpoint::open(&fixture("fill_diptych").join("flux1-bfl.safetensors"))
        .err()
        .unwrap();
    assert!(matches!(err, FluxError::Config { .. }), "{err:?}");
    assert!(err.to_string().contains("config.json"), "{err}");
}

/// BFL tensor names and shapes for a config, written independently of the loader's mapping.
fn bfl_tensors(c: &FluxConfig, prefix: &str) -> HashMap<String, Tensor> {
    let h = c.hidden_size();
    let mlp = 4 * h;
    let mut shapes: Vec<(String, Vec<usize>)> = Vec::new();
    let mut linear = |name: &str, out: usize, inp: usize| {
        shapes.push((format!("{name}.weight"), vec![out, inp]));
        shapes.push((format!("{name}.bias"), vec![out]));
    };
    linear("img_in", h, c.in_channels);
    linear("txt_in", h, c.joint_attention_dim);
    linear("time_in.in_layer", h, 256);
    linear("time_in.out_layer", h, h);
    linear("guidance_in.in_layer", h, 256);
    linear("guidance_in.out_layer", h, h);
    linear("vector_in.in_layer", h, c.pooled_projection_dim);
    linear("vector_in.out_layer", h, h);
    linear("final_layer.linear", c.out_channels(), h);
    linear("final_layer.adaLN_modulation.1", 2 * h, h);
    for i in 0..c.num_layers {
        for s in ["img", "txt"] {
            linear(&format!("double_blocks.{i}.{s}_mod.lin"), 6 * h, h);
            linear(&format!("double_blocks.{i}.{s}_attn.qkv"), 3 * h, h);
            linear(&format!("double_blocks.{i}.{s}_attn.proj"), h, h);
            linear(&format!("double_blocks.{i}.{s}_mlp.0"), mlp, h);
            linear(&format!("double_blocks.{i}.{s}_mlp.2"), h, mlp);
        }
    }
    for i in 0..c.num_single_layers {
        linear(&format!("single_blocks.{i}.linear1"), 3 * h + mlp, h);
        linear(&format!("single_blocks.{i}.linear2"), h, h + mlp);
        linear(&format!("single_blocks.{i}.modulation.lin"), 3 * h, h);
    }
    for i in 0..c.num_layers {
        for s in ["img", "txt"] {
            for n in ["query_norm", "key_norm"] {
                shapes.push((
                    format!("double_blocks.{i}.{s}_attn.norm.{n}.scale"),
                    vec![c.attention_head_dim],
                ));
            }
        }
    }
    for i in 0..c.num_single_layers {
        for n in ["query_norm", "key_norm"] {
            shapes.push((
                format!("single_blocks.{i}.norm.{n}.scale"),
                vec![c.attention_head_dim],
            ));
        }
    }
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let t = (icedit_test_support::randn(0f32, 0.02, shape))
                .to_dtype(DType::BF16)
                .unwrap();
            (format!("{prefix}{name}"), t)
        })
        .collect()
}

#[test]
fn bfl_config_is_inferred_from_tensor_shapes() {
    // FLUX's real head size (128), Fill's channels, a ComfyUI prefix and a stray VAE tensor.
    let expected = FluxConfig {
        num_layers: 2,
        num_single_layers: 3,
        num_attention_heads: 1,
        joint_attention_dim: 8,
        pooled_projection_dim: 4,
        ..FluxConfig::fill()
    };
    let mut tensors = bfl_tensors(&expected, "model.diffusion_model.");
    tensors.insert(
        "vae.decoder.conv_in.weight".into(),
        Tensor::zeros(3, DType::BF16, &Device::Cpu).unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flux1-fill-dev.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();

    let checkpoint = Checkpoint::open(&path).unwrap();
    assert_eq!(checkpoint.layout(), Layout::Bfl);
    assert_eq!(checkpoint.config(), &expected);
    let model = FluxTransformer::load(&checkpoint, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        checkpoint.unused_tensors(),
        vec!["vae.decoder.conv_in.weight".to_string()]
    );

    // And it runs: 2 x 3 packed grid, 5 text tokens.
    let dev = Device::Cpu;
    let img = icedit_test_support::randn(0f32, 1., (1, 6, 384));
    let img_ids = Tensor::zeros((6, 3), DType::F32, &dev).unwrap();
    let txt = icedit_test_support::randn(0f32, 1., (1, 5, 8));
    let txt_ids = Tensor::zeros((5, 3), DType::F32, &dev).unwrap();
    let pooled = icedit_test_support::randn(0f32, 1., (1, 4));
    let t = Tensor::new(&[0.5f32], &dev).unwrap();
    let g = Tensor::new(&[0.03f32], &dev).unwrap();
    let out = model
        .forward(&FluxInput {
            img: &img,
            img_ids: &img_ids,
            txt: &txt,
            txt_ids: &txt_ids,
            pooled: &pooled,
            timestep: &t,
            guidance: Some(&g),
        })
        .unwrap();
    assert_eq!(out.dims(), &[1, 6, 64]);
}

#[test]
fn bad_model_inputs_are_explained() {
    let io = load_tensors(&fixture("fill_diptych").join("io.safetensors"));
    let checkpoint = Checkpoint::open(&fixture("fill_diptych")).unwrap();
    let model = FluxTransformer::load(&checkpoint, DType::F32, &Device::Cpu).unwrap();
    let good = FluxInput {
        img: &io["img"],
        img_ids: &io["img_ids"],
        txt: &io["txt"],
        txt_ids: &io["txt_ids"],
        pooled: &io["pooled"],
        timestep: &io["timestep"],
        guidance: Some(&io["guidance"]),
    };
    let expect_input_err = |input: FluxInput, needle: &str| {
        let err = model.forward(&input).unwrap_err();
        assert!(matches!(err, FluxError::Input(_)), "{err:?}");
        assert!(err.to_string().contains(needle), "{err} lacks {needle}");
    };
    let dev_latents = io["img"].narrow(2, 0, 64).unwrap();
    expect_input_err(
        FluxInput {
            img: &dev_latents,
            ..good
        },
        "384",
    );
    expect_input_err(
        FluxInput {
            guidance: None,
            ..good
        },
        "guidance",
    );
    let short_ids = io["img_ids"].narrow(0, 0, 5).unwrap();
    expect_input_err(
        FluxInput {
            img_ids: &short_ids,
            ..good
        },
        "img_ids",
    );
    let one_pooled = io["pooled"].narrow(0, 0, 1).unwrap();
    expect_input_err(
        FluxInput {
            pooled: &one_pooled,
            ..good
        },
        "batch",
    );

    let checkpoint = Checkpoint::open(&fixture("noguidance_wide")).unwrap();
    let model = FluxTransformer::load(&checkpoint, DType::F32, &Device::Cpu).unwrap();
    let io = load_tensors(&fixture("noguidance_wide").join("io.safetensors"));
    let g = Tensor::new(&[0.03f32], &Device::Cpu).unwrap();
    let err = model
        .forward(&FluxInput {
            img: &io["img"],
            img_ids: &io["img_ids"],
            txt: &io["txt"],
            txt_ids: &io["txt_ids"],
            pooled: &io["pooled"],
            timestep: &io["timestep"],
            guidance: Some(&g),
        })
        .unwrap_err();
    assert!(err.to_string().contains("no guidance embedding"), "{err}");
}
