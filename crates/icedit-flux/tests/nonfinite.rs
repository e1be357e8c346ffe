//! NaN and infinite weights are refused at load, naming the tensor and the file, for the
//! transformer (diffusers shards and BFL single files) and the VAE; a weight too large for the
//! dtype it is read in is told apart from a corrupt file. Checked tensors load unchanged.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use icedit_flux::{AutoencoderKl, Checkpoint, FluxError, FluxTransformer};
use icedit_test_support::fixtures;

/// `tensor` with its element `index` set to `value`.
fn poke(tensor: &Tensor, index: usize, value: f32) -> Tensor {
    let mut v = tensor
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    v[index] = value;
    Tensor::from_vec(v, tensor.shape(), &Device::Cpu)
        .unwrap()
        .to_dtype(tensor.dtype())
        .unwrap()
}

/// Copies `folder` into a temporary directory and sets one element of `name` (in whichever
/// safetensors file of the folder holds it) to `value`.
fn copy_with(folder: &Path, name: &str, value: f32) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut found = false;
    for entry in std::fs::read_dir(folder).unwrap() {
        let path = entry.unwrap().path();
        let target = dir.path().join(path.file_name().unwrap());
        if path.extension().is_some_and(|e| e == "safetensors") {
            let mut tensors: HashMap<String, Tensor> =
                candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
            if let Some(t) = tensors.get(name) {
                let poked = poke(t, 1, value);
                tensors.insert(name.to_string(), poked);
                found = true;
            }
            candle_core::safetensors::save(&tensors, &target).unwrap();
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
    assert!(found, "{name} is not in {}", folder.display());
    dir
}

fn transformer_err(path: &Path, dtype: DType) -> FluxError {
    let checkpoint = Checkpoint::open(path).unwrap();
    match FluxTransformer::load(&checkpoint, dtype, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e,
    }
}

#[test]
fn a_nan_or_inf_transformer_weight_is_named_at_load() {
    let folder = fixtures().join("fill_pipeline/tiny/transformer");
    for (name, value) in [
        ("transformer_blocks.0.attn.to_q.weight", f32::NAN),
        ("proj_out.bias", f32::INFINITY),
        (
            "single_transformer_blocks.0.proj_mlp.weight",
            f32::NEG_INFINITY,
        ),
    ] {
        let copy = copy_with(&folder, name, value);
        for dtype in [DType::F32, DType::BF16] {
            let err = transformer_err(copy.path(), dtype);
            let message = err.to_string();
            assert!(
                matches!(&err, FluxError::NonFiniteWeight { name: n, in_file: true, .. } if n == name),
                "{message}"
            );
            assert!(message.contains(&format!("`{name}`")), "{message}");
            assert!(message.contains("NaN or infinite"), "{message}");
            assert!(message.contains("corrupt"), "{message}");
            assert!(message.contains(copy.path().to_str().unwrap()), "{message}");
        }
    }
}

#[test]
fn a_bfl_checkpoint_names_the_fused_tensor() {
    let path = fixtures().join("flux/fill_diptych/flux1-bfl.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let name = "double_blocks.0.img_attn.qkv.weight";
    let poked = poke(&tensors[name], 0, f32::NAN);
    tensors.insert(name.to_string(), poked);
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("flux1-fill-dev.safetensors");
    candle_core::safetensors::save(&tensors, &copy).unwrap();
    let config = fixtures().join("flux/fill_diptych/transformer/config.json");
    let config = icedit_flux::FluxConfig::from_json_file(&config).unwrap();
    let checkpoint = Checkpoint::open_with_config(&copy, config).unwrap();
    let message = match FluxTransformer::load(&checkpoint, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    };
    assert!(message.contains(&format!("`{name}`")), "{message}");
}

#[test]
fn a_weight_beyond_float16_is_an_overflow_not_a_corrupt_file() {
    let folder = fixtures().join("fill_pipeline/tiny/transformer");
    let name = "x_embedder.weight";
    let copy = copy_with(&folder, name, 1e6);
    // Finite in f32 and bf16.
    for dtype in [DType::F32, DType::BF16] {
        let checkpoint = Checkpoint::open(copy.path()).unwrap();
        FluxTransformer::load(&checkpoint, dtype, &Device::Cpu).unwrap();
    }
    let err = transformer_err(copy.path(), DType::F16);
    let message = err.to_string();
    assert!(
        matches!(&err, FluxError::NonFiniteWeight { in_file: false, .. }),
        "{message}"
    );
    assert!(message.contains(&format!("`{name}`")), "{message}");
    assert!(message.contains("converted from f32 to f16"), "{message}");
    assert!(message.contains("--dtype f32") && message.contains("--dtype bf16"));
}

#[test]
fn a_nan_vae_weight_is_named_at_load() {
    let folder = fixtures().join("fill_pipeline/tiny/vae");
    let name = "decoder.conv_out.weight";
    let copy = copy_with(&folder, name, f32::NAN);
    let err = match AutoencoderKl::load(copy.path(), DType::F32, &Device::Cpu) {
        Ok(_) => panic!("loaded"),
        Err(e) => e,
    };
    let message = err.to_string();
    assert!(message.contains(&format!("`{name}`")), "{message}");
    // The untouched fixture loads.
    AutoencoderKl::load(&folder, DType::F32, &Device::Cpu).unwrap();
}

/// The check's cost next to the load's on the tiny pipeline, for the record (`--nocapture`).
#[test]
fn load_time_with_the_checks() {
    let root = fixtures().join("fill_pipeline/tiny");
    const RUNS: u32 = 20;
    let start = std::time::Instant::now();
    for _ in 0..RUNS {
        let checkpoint = Checkpoint::open(&root.join("transformer")).unwrap();
        FluxTransformer::load(&checkpoint, DType::F32, &Device::Cpu).unwrap();
        AutoencoderKl::load(&root.join("vae"), DType::F32, &Device::Cpu).unwrap();
    }
    let load = start.elapsed() / RUNS;
    let mut tensors = Vec::new();
    for folder in ["transformer", "vae"] {
        for entry in std::fs::read_dir(root.join(folder)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "safetensors") {
                tensors.extend(
                    candle_core::safetensors::load(&path, &Device::Cpu)
                        .unwrap()
                        .into_values(),
                );
            }
        }
    }
    let start = std::time::Instant::now();
    for _ in 0..RUNS {
        for t in &tensors {
            assert!(icedit_flux::all_finite(t).unwrap());
        }
    }
    let checks = start.elapsed() / RUNS;
    let elements: usize = tensors.iter().map(Tensor::elem_count).sum();
    eprintln!(
        "tiny transformer + VAE: load {load:?} (checks included); the checks alone {checks:?} \
         for {} tensors, {elements} values",
        tensors.len()
    );
}

/// The check's share of reading a medium-sized checkpoint (163M values, the benches' "medium"
/// transformer's size, in 768x3072 tensors): `cargo test -p icedit-flux --test nonfinite --
/// --ignored --nocapture`. Writes 650 MB to a temporary folder.
#[test]
#[ignore]
fn medium_sized_load_cost() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("medium.safetensors");
    let count = 69;
    let tensors: HashMap<String, Tensor> = (0..count)
        .map(|i| {
            let t = icedit_test_support::randn(0f32, 0.02, (3072, 768));
            (format!("t{i}"), t)
        })
        .collect();
    candle_core::safetensors::save(&tensors, &path).unwrap();
    drop(tensors);
    let files = icedit_flux::TensorFiles::open(&[path]).unwrap();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        // Warm the page cache, then time the reads (checks included) and the checks alone.
        let read_all = || -> Vec<Tensor> {
            (0..count)
                .map(|i| {
                    files
                        .read(&format!("t{i}"), None, dtype, &Device::Cpu)
                        .unwrap()
                })
                .collect()
        };
        drop(read_all());
        let start = std::time::Instant::now();
        let loaded = read_all();
        let read = start.elapsed();
        let start = std::time::Instant::now();
        for t in &loaded {
            assert!(icedit_flux::all_finite(t).unwrap());
        }
        let checks = start.elapsed();
        eprintln!(
            "{dtype:?}: read {count} tensors (163M values) in {read:?} with the checks; the \
             checks alone {checks:?} ({:.1}%)",
            100.0 * checks.as_secs_f64() / read.as_secs_f64()
        );
    }
}
