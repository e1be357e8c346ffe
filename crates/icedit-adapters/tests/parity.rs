//! Adapters against the reference (tests/reference/gen_edit_adapters.py): one transformer forward
//! of the tiny FLUX.1 Fill model with each adapter as diffusers + PEFT (plain LoRA, kohya file)
//! or the Python MoE-LoRA reference computes it; merged and run-time LoRA; the MoE routing; and
//! every way an adapter file can be wrong.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use icedit_adapters::{apply_adapters, AdapterChoice, AdapterError, AdapterFile, ApplyMode};
use icedit_flux::compare::max_abs_diff;
use icedit_flux::{Checkpoint, FluxInput, FluxTransformer};
use icedit_test_support::fixtures;

fn adapter_path(file: &str) -> PathBuf {
    fixtures().join("edit/adapters").join(file)
}

fn model() -> FluxTransformer {
    let checkpoint = Checkpoint::open(&fixtures().join("fill_pipeline/tiny/transformer")).unwrap();
    FluxTransformer::load(&checkpoint, DType::F32, &Device::Cpu).unwrap()
}

fn io() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("edit/forward.safetensors"), &Device::Cpu)
        .unwrap()
}

fn forward(model: &FluxTransformer, io: &HashMap<String, Tensor>) -> Tensor {
    model.forward(&FluxInput::from_named(io).unwrap()).unwrap()
}

/// Max abs error relative to the reference's largest magnitude. The tiny model's outputs reach
/// about 35 at guidance 50, and the bare model already differs from diffusers by 1.3e-5 of that
/// (f32 sin/cos of the guidance embedding at 50 000); adapters change the output by over 1e-2.
const TOLERANCE: f32 = 5e-5;

fn rel_err(a: &Tensor, reference: &Tensor) -> f32 {
    let scale = reference
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    max_abs_diff(a, reference).unwrap() / scale
}

fn choice(file: &str, scale: f64, top_k: Option<usize>) -> AdapterChoice {
    AdapterChoice {
        name: file.into(),
        file: AdapterFile::read(&adapter_path(file)).unwrap(),
        scale,
        top_k,
    }
}

/// The reference runs: (output key, adapter file, scale, top-k).
const RUNS: [(&str, &str, f64, Option<usize>); 6] = [
    ("out_lora_peft", "lora_peft.safetensors", 1.0, None),
    (
        "out_lora_peft_nometa",
        "lora_peft_nometa.safetensors",
        1.0,
        None,
    ),
    ("out_lora_kohya", "lora_kohya.safetensors", 1.0, None),
    (
        "out_lora_peft_weighted",
        "lora_peft.safetensors",
        0.75,
        None,
    ),
    ("out_moe", "moe_lora.safetensors", 1.0, None),
    ("out_moe_top2", "moe_lora.safetensors", 1.0, Some(2)),
];

#[test]
fn every_adapter_matches_the_reference_merged_and_at_run_time() {
    let io = io();
    let bare = forward(&model(), &io);
    let bare_err = rel_err(&bare, &io["out_bare"]);
    assert!(bare_err < TOLERANCE, "bare model: {bare_err}");
    for (key, file, scale, top_k) in RUNS {
        let expected = &io[key];
        let effect = rel_err(&bare, expected);
        assert!(
            effect > 0.1,
            "{key}: the adapter barely changes the output ({effect})"
        );
        for mode in [ApplyMode::Merge, ApplyMode::Runtime] {
            let mut m = model();
            let applied = apply_adapters(&mut m, vec![choice(file, scale, top_k)], mode).unwrap();
            let err = rel_err(&forward(&m, &io), expected);
            eprintln!("{key} {mode:?}: relative error {err:.2e} (adapter effect {effect:.2e})");
            assert!(err < TOLERANCE, "{key} {mode:?}: {err}");
            let a = &applied[0];
            if file.starts_with("moe") {
                assert_eq!((a.moe_layers, a.experts), (3, 4), "{a:?}");
                assert_eq!(a.top_k, top_k.unwrap_or(1));
            }
            let merged = mode == ApplyMode::Merge;
            assert_eq!(a.merged_layers, if merged { a.lora_layers } else { 0 });
        }
    }
}

#[test]
fn icedit_targets_are_all_adapted() {
    // 1 double block x 6 targets + 2 single blocks x 6 targets + x_embedder.
    let mut m = model();
    let applied = apply_adapters(
        &mut m,
        vec![choice("lora_peft.safetensors", 1.0, None)],
        ApplyMode::Runtime,
    )
    .unwrap();
    assert_eq!(applied[0].lora_layers, 6 + 2 * 6 + 1);
    let mut kohya = model();
    let applied = apply_adapters(
        &mut kohya,
        vec![choice("lora_kohya.safetensors", 1.0, None)],
        ApplyMode::Runtime,
    )
    .unwrap();
    assert_eq!(
        applied[0].lora_layers,
        6 + 2 * 6 + 1,
        "fused qkv/linear1 split"
    );
}

#[test]
fn routing_counts_match_the_reference() {
    let io = io();
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("edit/forward_routing.json")).unwrap(),
    )
    .unwrap();
    for (run, top_k) in [("moe", None), ("moe_top2", Some(2))] {
        let mut m = model();
        let applied = apply_adapters(
            &mut m,
            vec![choice("moe_lora.safetensors", 1.0, top_k)],
            ApplyMode::Merge,
        )
        .unwrap();
        forward(&m, &io);
        let mut used = [false; 4];
        for (module, stats) in &applied[0].routing {
            let expected: Vec<u64> = reference[run][module]
                .as_array()
                .unwrap_or_else(|| panic!("{run} {module} in forward_routing.json"))
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            assert_eq!(stats.counts(), expected, "{run} {module}");
            for (e, &c) in expected.iter().enumerate() {
                used[e] |= c > 0;
            }
        }
        assert!(used.iter().all(|&u| u), "every expert is used somewhere");
        let groups = applied[0].routing_histogram();
        assert_eq!(
            groups.iter().map(|(g, _)| g.as_str()).collect::<Vec<_>>(),
            [
                "single_transformer_blocks.*.proj_out",
                "transformer_blocks.*.ff.net.2"
            ]
        );
    }
}

#[test]
fn one_moe_layer_alone_matches_the_reference() {
    let tensors =
        candle_core::safetensors::load(fixtures().join("edit/moe_layer.safetensors"), &Device::Cpu)
            .unwrap();
    for (top_k, key) in [(1, "y_top1"), (2, "y_top2")] {
        let mut m = model();
        apply_adapters(
            &mut m,
            vec![choice("moe_lora.safetensors", 1.0, Some(top_k))],
            ApplyMode::Merge,
        )
        .unwrap();
        let mut y = None;
        m.visit_linears(&mut |name, linear| {
            if name == "single_transformer_blocks.0.proj_out" {
                y = Some(candle_core::Module::forward(linear, &tensors["x"]).unwrap());
            }
        });
        let err = rel_err(&y.unwrap(), &tensors[key]);
        assert!(err < 1e-5, "top-{top_k}: {err}");
    }
}

#[test]
fn several_adapters_add_up() {
    // Two half-strength copies of the LoRA equal it at full strength.
    let io = io();
    let mut m = model();
    apply_adapters(
        &mut m,
        vec![
            choice("lora_peft.safetensors", 0.5, None),
            choice("lora_kohya.safetensors", 0.5, None),
        ],
        ApplyMode::Merge,
    )
    .unwrap();
    let err = rel_err(&forward(&m, &io), &io["out_lora_peft"]);
    assert!(err < TOLERANCE, "{err}");
}

// ---- bad adapter files --------------------------------------------------------------------

fn write(dir: &Path, name: &str, tensors: Vec<(&str, Tensor)>) -> PathBuf {
    let path = dir.join(name);
    let map: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    candle_core::safetensors::save(&map, &path).unwrap();
    path
}

fn randn(shape: (usize, usize)) -> Tensor {
    icedit_test_support::randn(0f32, 1.0, shape)
}

fn apply_file(path: &Path, top_k: Option<usize>) -> Result<(), AdapterError> {
    let file = AdapterFile::read(path)?;
    let mut m = model();
    apply_adapters(
        &mut m,
        vec![AdapterChoice {
            name: "test".into(),
            file,
            scale: 1.0,
            top_k,
        }],
        ApplyMode::Merge,
    )
    .map(|_| ())
}

#[test]
fn unmatched_keys_are_an_error_listing_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "a.safetensors",
        vec![
            ("transformer.x_embedder.lora_A.weight", randn((4, 384))),
            ("transformer.x_embedder.lora_B.weight", randn((32, 4))),
            (
                "transformer.transformer_blocks.7.attn.to_q.lora_A.weight",
                randn((4, 32)),
            ),
            (
                "transformer.transformer_blocks.7.attn.to_q.lora_B.weight",
                randn((32, 4)),
            ),
        ],
    );
    let err = apply_file(&path, None).unwrap_err();
    assert!(matches!(err, AdapterError::UnmatchedKeys { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("transformer.transformer_blocks.7.attn.to_q.lora_A.weight")
            && msg.contains("2 tensor(s)"),
        "{msg}"
    );
}

#[test]
fn an_adapter_for_another_base_model_is_a_shape_error() {
    // FLUX.1 dev's x_embedder takes 64 channels, Fill's 384.
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "dev.safetensors",
        vec![
            ("transformer.x_embedder.lora_A.weight", randn((4, 64))),
            ("transformer.x_embedder.lora_B.weight", randn((32, 4))),
        ],
    );
    let err = apply_file(&path, None).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, AdapterError::ShapeMismatch { .. }), "{msg}");
    assert!(
        msg.contains("64 -> 32") && msg.contains("384 -> 32"),
        "{msg}"
    );
}

#[test]
fn incomplete_or_unknown_tensors_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    // (what, the file's tensors, what the error must say)
    type Case<'a> = (&'a str, Vec<(&'a str, Tensor)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "half a pair",
            vec![("transformer.x_embedder.lora_A.weight", randn((4, 384)))],
            "needs both",
        ),
        (
            "unknown role",
            vec![(
                "transformer.x_embedder.lora_magnitude_vector",
                randn((1, 32)),
            )],
            "not a LoRA tensor",
        ),
        (
            "experts without router",
            vec![
                (
                    "transformer.single_transformer_blocks.0.proj_out.lora_A.expert_0.weight",
                    randn((4, 160)),
                ),
                (
                    "transformer.single_transformer_blocks.0.proj_out.lora_B.expert_0.weight",
                    randn((32, 4)),
                ),
            ],
            "without a router",
        ),
        (
            "router/expert count",
            vec![
                (
                    "transformer.single_transformer_blocks.0.proj_out.lora_A.expert_0.weight",
                    randn((4, 160)),
                ),
                (
                    "transformer.single_transformer_blocks.0.proj_out.lora_B.expert_0.weight",
                    randn((32, 4)),
                ),
                (
                    "transformer.single_transformer_blocks.0.proj_out.lora_route.weight",
                    randn((2, 160)),
                ),
            ],
            "numbered",
        ),
    ];
    for (i, (what, tensors, expected)) in cases.into_iter().enumerate() {
        let path = write(dir.path(), &format!("{i}.safetensors"), tensors);
        let msg = apply_file(&path, None).unwrap_err().to_string();
        assert!(msg.contains(expected), "{what}: {msg}");
    }
    // top-k beyond the expert count.
    let msg = apply_file(&adapter_path("moe_lora.safetensors"), Some(5))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("top-k 5 is out of range for 4 experts"),
        "{msg}"
    );
}

#[test]
fn corrupt_and_truncated_files_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(adapter_path("lora_peft.safetensors")).unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 1000]).unwrap();
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"<html>rate limited</html>").unwrap();
    for path in [&truncated, &garbage] {
        let err = AdapterFile::read(path).unwrap_err();
        assert!(matches!(err, AdapterError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("truncated or corrupt"), "{err}");
    }
    let missing = AdapterFile::read(&dir.path().join("nope.safetensors")).unwrap_err();
    assert!(matches!(missing, AdapterError::Io { .. }), "{missing}");
}
