//! Quantized transformers against the reference. GGUF (tests/reference/gen_gguf.py): every ggml type
//! dequantized as gguf-py's numpy decoder (= ggml's `dequantize_row_*`), and whole forwards of a
//! tiny FLUX.1 Fill in BFL naming (Q8_0, Q4_K, and one file mixing all types) against diffusers'
//! GGUF loader. Also the files' errors: truncated, unknown type, wrong shape, other architecture.
//! FP8 (tests/reference/gen_t5_gguf_fp8.py): float8 e4m3fn safetensors as ComfyUI users have them,
//! plain and with per-tensor `scale_weight`, against torch upcasting the same values.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use icedit_flux::{Checkpoint, FluxConfig, FluxInput, FluxTransformer, Layout, TensorFiles};

const TYPES: [&str; 13] = [
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q5_1", "Q4_K", "Q4_0", "Q4_1", "Q3_K",
    "Q2_K",
];
/// As every f32 forward parity in this crate.
const F32_TOLERANCE: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    icedit_test_support::fixture("gguf").join(name)
}

fn config() -> FluxConfig {
    FluxConfig::from_json_file(&fixture("transformer/config.json")).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    icedit_flux::compare::max_abs_diff(a, b).unwrap()
}

#[test]
fn every_type_dequantizes_as_ggml() {
    let files = TensorFiles::open(&[fixture("dequant.gguf")]).unwrap();
    let reference =
        candle_core::safetensors::load(fixture("dequant.safetensors"), &Device::Cpu).unwrap();
    for ty in TYPES {
        let name = format!("t.{ty}");
        let ours = files.read(&name, None, DType::F32, &Device::Cpu).unwrap();
        let err = max_abs_diff(&ours, &reference[&name]);
        assert_eq!(err, 0.0, "{ty}: max abs difference {err}");
        // Rows read alone are the same rows.
        let rows = files
            .read(&name, Some(1..3), DType::F32, &Device::Cpu)
            .unwrap();
        assert_eq!(
            max_abs_diff(&rows, &reference[&name].narrow(0, 1, 2).unwrap()),
            0.0
        );
    }
}

/// diffusers' inputs (by its keyword names) and outputs.
fn forward_inputs() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("forward.safetensors"), &Device::Cpu).unwrap()
}

#[test]
fn forwards_match_diffusers_gguf_loader() {
    let io = forward_inputs();
    let input = FluxInput::from_named(&io).unwrap();
    for (file, out, quantized_types) in [
        ("flux_q8_0.gguf", "out.q8_0", vec!["Q8_0"]),
        ("flux_q4_k.gguf", "out.q4_k", vec!["Q4_K", "Q8_0"]),
        (
            "flux_mixed.gguf",
            "out.mixed",
            vec![
                "Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q5_1", "Q4_K", "Q4_0", "Q4_1", "Q3_K", "Q2_K",
            ],
        ),
    ] {
        // With the pipeline's config, and inferred from the file (FLUX's 128-wide heads).
        for checkpoint in [
            Checkpoint::open_with_config(&fixture(file), config()).unwrap(),
            Checkpoint::open(&fixture(file)).unwrap(),
        ] {
            assert_eq!(checkpoint.layout(), Layout::Bfl);
            assert_eq!(checkpoint.config().in_channels, 384);
            let mut model = FluxTransformer::load(&checkpoint, DType::F32, &Device::Cpu).unwrap();
            assert!(
                checkpoint.unused_tensors().is_empty(),
                "{file}: unused {:?}",
                checkpoint.unused_tensors()
            );
            let mut seen = std::collections::BTreeSet::new();
            model.visit_linears(&mut |_, linear| {
                if let Some(q) = linear.quantization() {
                    seen.insert(icedit_flux::gguf::ggml_type_name(q));
                }
            });
            let mut want: Vec<&str> = quantized_types.clone();
            want.sort();
            assert_eq!(
                seen.into_iter().collect::<Vec<_>>(),
                want,
                "{file}: held quantized"
            );
            let ours = model.forward(&input).unwrap();
            let err = max_abs_diff(&ours, &io[out]);
            println!("{file}: max abs error {err:.2e} vs diffusers");
            assert!(err <= F32_TOLERANCE, "{file}: max abs error {err}");
            // Not trivially equal to the unquantized model: the quantization is really used.
            assert!(max_abs_diff(&ours, &io["out.f32"]) > 10.0 * F32_TOLERANCE);
        }
    }
}

fn copy_of(name: &str) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    let bytes = std::fs::read(fixture(name)).unwrap();
    (dir, path, bytes)
}

fn open_error(path: &Path) -> String {
    match Checkpoint::open(path).and_then(|c| FluxTransformer::load(&c, DType::F32, &Device::Cpu)) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_files_are_refused() {
    let (_dir, path, bytes) = copy_of("flux_q4_k.gguf");
    for len in [3, 20, 200, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..len]).unwrap();
        let err = open_error(&path);
        assert!(
            err.contains("truncated") || err.contains("not a valid"),
            "{len} bytes: {err}"
        );
    }
}

/// Offset of the type field of tensor `name` in a GGUF header.
fn type_field(bytes: &[u8], name: &str) -> usize {
    let mut key = (name.len() as u64).to_le_bytes().to_vec();
    key.extend(name.as_bytes());
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    at + 4 + 8 * n_dims
}

#[test]
fn unknown_quant_types_are_named() {
    let (_dir, path, mut bytes) = copy_of("flux_q4_k.gguf");
    let at = type_field(&bytes, "double_blocks.0.img_attn.qkv.weight");
    bytes[at..at + 4].copy_from_slice(&20u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = open_error(&path);
    assert!(
        err.contains("double_blocks.0.img_attn.qkv.weight") && err.contains("IQ4_NL"),
        "{err}"
    );
}

#[test]
fn a_tensor_of_the_wrong_shape_is_named() {
    // A checkpoint for a model with other input channels (FLUX.1 dev's 64 vs Fill's 384).
    let mut other = config();
    other.in_channels = 64;
    let err = match Checkpoint::open_with_config(&fixture("flux_q8_0.gguf"), other) {
        Ok(_) => panic!("a Fill GGUF opened with a 64-channel config"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("img_in.weight")
            && err.contains("384 input channels")
            && err.contains("wants 64"),
        "{err}"
    );
    // A tensor of the wrong shape past the embedder is named. The qkv weight's row count (its
    // outer dimension, stored last) from 768 to 384: the data still fits, the shape does not.
    let (_dir, path, mut bytes) = copy_of("flux_q8_0.gguf");
    let at = type_field(&bytes, "double_blocks.0.img_attn.qkv.weight") - 8;
    assert_eq!(
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()),
        768
    );
    bytes[at..at + 8].copy_from_slice(&384u64.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = open_error(&path);
    assert!(
        err.contains("double_blocks.0.img_attn.qkv.weight") && err.contains("[384, 256]"),
        "{err}"
    );
}

#[test]
fn a_gguf_of_another_architecture_is_refused() {
    let (_dir, path, mut bytes) = copy_of("flux_q8_0.gguf");
    // "flux" -> "t5xx": the same length, so the header stays valid.
    let key = b"general.architecture";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4 + 8;
    assert_eq!(&bytes[at..at + 4], b"flux");
    bytes[at..at + 4].copy_from_slice(b"t5xx");
    std::fs::write(&path, &bytes).unwrap();
    let err = open_error(&path);
    assert!(
        err.contains("general.architecture") && err.contains("t5xx"),
        "{err}"
    );
}

#[test]
fn nan_block_scales_are_caught_naming_the_tensor() {
    let (_dir, path, mut bytes) = copy_of("flux_q8_0.gguf");
    let header = icedit_flux::gguf::parse(&bytes).unwrap();
    let tensor = header
        .tensors
        .iter()
        .find(|t| t.name == "double_blocks.0.img_mlp.0.weight")
        .unwrap();
    // A Q8_0 block starts with its f16 scale: 0x7e00 is a NaN.
    let at = tensor.bytes.start;
    bytes[at..at + 2].copy_from_slice(&0x7e00u16.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = open_error(&path);
    assert!(
        err.contains("double_blocks.0.img_mlp.0.weight") && err.contains("NaN"),
        "{err}"
    );
}

#[test]
fn fp8_checkpoints_match_torch_upcast() {
    let io = forward_inputs();
    let input = FluxInput::from_named(&io).unwrap();
    let reference = candle_core::safetensors::load(
        icedit_test_support::fixture("fp8/forward.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    for (file, out) in [
        ("flux_fp8_e4m3fn.safetensors", "out.fp8"),
        ("flux_fp8_scaled.safetensors", "out.fp8_scaled"),
    ] {
        let path = icedit_test_support::fixture("fp8").join(file);
        let checkpoint = Checkpoint::open_with_config(&path, config()).unwrap();
        assert_eq!(checkpoint.layout(), Layout::Bfl);
        let model = FluxTransformer::load(&checkpoint, DType::F32, &Device::Cpu).unwrap();
        assert!(
            checkpoint.unused_tensors().is_empty(),
            "{file}: unused {:?}",
            checkpoint.unused_tensors()
        );
        let ours = model.forward(&input).unwrap();
        let err = max_abs_diff(&ours, &reference[out]);
        println!("{file}: max abs error {err:.2e} vs torch");
        assert!(err <= F32_TOLERANCE, "{file}: max abs error {err}");
        assert!(max_abs_diff(&ours, &io["out.f32"]) > 10.0 * F32_TOLERANCE);
        // 15 weights (and the scaled file's marker).
        let summary = checkpoint.files().format_summary();
        assert!(summary.contains("F8E4M3 x1"), "{summary}");
    }
}

/// Blocks kept in host memory and streamed to the device one at a time (`--offload blocks`)
/// compute exactly what resident blocks compute: on the CPU the copies are the blocks
/// themselves, but the streaming thread, its order and its hand-over all run.
#[test]
fn streamed_blocks_compute_what_resident_blocks_compute() {
    let io = forward_inputs();
    let input = FluxInput::from_named(&io).unwrap();
    let checkpoint = Checkpoint::open(&fixture("flux_q4_k.gguf")).unwrap();
    let mut resident = FluxTransformer::load(&checkpoint, DType::F32, &Device::Cpu).unwrap();
    let mut streamed = resident.placed(&Device::Cpu, true).unwrap();
    assert!(streamed.blocks_offloaded() && !resident.blocks_offloaded());
    let (on_device, offloaded) = streamed.weight_bytes();
    let (all, none) = resident.weight_bytes();
    assert_eq!((on_device + offloaded, none), (all, 0));
    assert!(offloaded > on_device, "{offloaded} vs {on_device}");
    let expected = resident.forward(&input).unwrap();
    assert_eq!(
        max_abs_diff(&streamed.forward(&input).unwrap(), &expected),
        0.0
    );
    // Back to resident, and streamed again from a streamed model.
    let back = streamed.placed(&Device::Cpu, false).unwrap();
    assert!(!back.blocks_offloaded());
    assert_eq!(max_abs_diff(&back.forward(&input).unwrap(), &expected), 0.0);
    // A forward that stops after the first block (First Block Cache skipping the rest) hands
    // back the streaming thread cleanly, and the next one streams from the start.
    let config = icedit_flux::StepCacheConfig::parse("first-block:1e9").unwrap();
    let mut plain_cache = config.new_state();
    let mut streamed_cache = config.new_state();
    for _ in 0..3 {
        let a = resident
            .forward_cached(&input, Some(&mut plain_cache))
            .unwrap();
        let b = streamed
            .forward_cached(&input, Some(&mut streamed_cache))
            .unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0);
    }
}
