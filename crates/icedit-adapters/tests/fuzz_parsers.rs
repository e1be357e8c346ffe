//! Fuzzing (proptest, bounded case counts) of what icedit-adapters reads from a user:
//! adapter files (`AdapterFile::read`, then matched to a small model), adapter manifests
//! (`Manifest::parse`) and `--lora` specs (`AdapterSpec::parse`).
//!
//! Every input must give `Ok` or a clear `Err`: no panic, no hang, no allocation sized by a
//! header rather than by the file. Valid inputs must read back what was written.

#[path = "../../../tests/support/fuzz.rs"]
mod fuzz;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use candle_core::{DType, Device};
use fuzz::*;
use icedit_adapters::{
    apply_adapters, AdapterChoice, AdapterFile, AdapterKind, AdapterSpec, ApplyMode, Manifest,
};
use icedit_flux::{Checkpoint, FluxTransformer};
use icedit_hub::ModelSource;
use icedit_test_support::fixtures;
use proptest::prelude::*;
use serde_json::Value;

const MAX_ALLOC: usize = 16 << 20;

/// The tiny FLUX Fill model the fixture adapters were made for, loaded once and cloned.
fn model() -> FluxTransformer {
    static MODEL: OnceLock<FluxTransformer> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let checkpoint =
                Checkpoint::open(&fixtures().join("fill_pipeline/tiny/transformer")).unwrap();
            FluxTransformer::load(&checkpoint, DType::F32, &Device::Cpu).unwrap()
        })
        .clone()
}

/// Reads the file and, when it parses, everything a caller asks of it; with `apply`, also
/// matches it to the model in both modes.
fn read_and_apply(path: &Path, apply: bool) {
    let Ok(file) = AdapterFile::read(path) else {
        return;
    };
    let _ = (
        file.is_moe(),
        file.metadata_top_k(),
        file.text_encoder_keys(),
        file.metadata(),
    );
    if !apply {
        return;
    }
    for (mode, top_k) in [(ApplyMode::Merge, None), (ApplyMode::Runtime, Some(2))] {
        let Ok(file) = AdapterFile::read(path) else {
            return;
        };
        let mut m = model();
        let _ = apply_adapters(
            &mut m,
            vec![AdapterChoice {
                name: "fuzz".into(),
                file,
                scale: 0.5,
                top_k,
            }],
            mode,
        );
    }
}

/// Key names in the namings the reader knows, and some it does not.
fn lora_key() -> impl Strategy<Value = String> {
    let modules = proptest::sample::select(vec![
        "transformer.transformer_blocks.0.attn.to_q",
        "transformer.single_transformer_blocks.0.proj_out",
        "lora_unet_double_blocks_0_img_attn_qkv",
        "lora_unet_single_blocks_0_linear1",
        "diffusion_model.double_blocks.0.img_attn.qkv",
        "base_model.model.x_embedder",
        "lora_te1_text_model_encoder_layers_0_mlp_fc1",
        "text_encoder.x",
        "",
        "transformer.",
    ]);
    let parts = proptest::sample::select(vec![
        ".lora_A.weight",
        ".lora_B.weight",
        ".lora_B.bias",
        ".lora_down.weight",
        ".lora_up.weight",
        ".alpha",
        ".lora_route.weight",
        ".lora_route.bias",
        ".lora_A.expert_0.weight",
        ".lora_B.expert_18446744073709551616.weight",
        ".lora_A.expert_-1.weight",
        ".lora_magnitude_vector",
        ".weight",
    ]);
    prop_oneof![
        6 => (modules, parts).prop_map(|(m, p)| format!("{m}{p}")),
        1 => "[a-z_.0-9]{0,20}",
    ]
}

/// `AdapterFile::read` panics (with overflow checks) on a zero-element tensor whose other
/// dimensions multiply past usize: candle's safetensors loader computes its strides unchecked.
/// Set to `false` once file.rs refuses such shapes.
const KNOWN_STRIDE_PANIC: bool = false;

fn lora_tensor() -> impl Strategy<Value = TensorSpec> {
    let shape = prop_oneof![
        8 => proptest::collection::vec(0usize..5, 0..4),
        1 => empty_huge_shape().prop_filter("known stride panic", |s| {
            !(KNOWN_STRIDE_PANIC && strides_overflow(s))
        }),
    ];
    (
        lora_key(),
        proptest::sample::select(vec![
            "F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3",
        ]),
        shape,
    )
        .prop_flat_map(|(name, dtype, shape)| {
            let n = elements(&shape) * dtype_bytes(dtype);
            proptest::collection::vec(any::<u8>(), n).prop_map(move |data| TensorSpec {
                name: name.clone(),
                dtype: dtype.to_string(),
                shape: shape.clone(),
                data,
            })
        })
}

fn unique(tensors: Vec<TensorSpec>) -> Vec<TensorSpec> {
    let mut seen = std::collections::HashSet::new();
    tensors
        .into_iter()
        .filter(|t| t.name != "__metadata__" && seen.insert(t.name.clone()))
        .collect()
}

/// `__metadata__` as PEFT, kohya and ICEdit write it, with odd values.
fn adapter_metadata() -> impl Strategy<Value = BTreeMap<String, String>> {
    let value = prop_oneof![
        Just("1".to_string()),
        Just("0".to_string()),
        Just("-1".to_string()),
        Just(" 2 ".to_string()),
        Just("18446744073709551616".to_string()),
        Just("NaN".to_string()),
        ".{0,12}",
        (json_edits(3)).prop_map(|edits| {
            let mut peft = serde_json::json!({
                "transformer.r": 4, "transformer.lora_alpha": 8, "transformer.use_rslora": false,
                "transformer.alpha_pattern": {"attn.to_q": 16}, "transformer.top_k": 2,
                "transformer.use_dora": false,
            });
            apply_json_edits(&mut peft, &edits);
            json_text(&peft)
        }),
    ];
    proptest::collection::btree_map(
        proptest::sample::select(vec![
            "top_k".to_string(),
            "moe_top_k".to_string(),
            "num_experts_per_tok".to_string(),
            "lora_adapter_metadata".to_string(),
            "format".to_string(),
        ]),
        value,
        0..4,
    )
}

proptest! {
    #![proptest_config(config(768))]

    /// Arbitrary bytes, with and without a plausible header length in front.
    #[test]
    fn adapter_random_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        prefix in proptest::option::of(length_prefix()),
    ) {
        let bytes = match &prefix {
            Some(p) => safetensors_bytes(&bytes, p, &[]),
            None => bytes,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lora.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        bounded("random bytes", MAX_ALLOC, || read_and_apply(&path, false));
    }

    /// Generated adapter files in every naming, with any dtype and odd metadata, then their
    /// headers mutated (dtypes, shapes, offsets, JSON edits, header length, bytes).
    #[test]
    fn adapter_mutated_headers(
        tensors in proptest::collection::vec(lora_tensor(), 1..6).prop_map(unique),
        meta in adapter_metadata(),
        entry_edits in sometimes(entry_edit(), 3),
        json_edits in sometimes(json_edit(), 2),
        prefix in prop_oneof![4 => Just(LengthPrefix::Right), 1 => length_prefix()],
        byte_edits in sometimes(byte_edit(), 2),
    ) {
        let mut header = safetensors_header(&tensors, Some(&meta));
        apply_entry_edits(&mut header, &entry_edits);
        apply_json_edits(&mut header, &json_edits);
        let data: Vec<u8> = tensors.iter().flat_map(|t| t.data.iter().copied()).collect();
        let mut bytes = safetensors_bytes(json_text(&header).as_bytes(), &prefix, &data);
        apply_byte_edits(&mut bytes, &byte_edits, usize::MAX);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lora.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        bounded("mutated adapter", MAX_ALLOC, || read_and_apply(&path, false));
    }

    /// The fixture adapters (PEFT, kohya, MoE) with mutated headers and metadata, read and
    /// matched to the model they were made for.
    #[test]
    fn fixture_adapters_mutated(
        which in proptest::sample::select(vec![
            "lora_peft.safetensors",
            "lora_kohya.safetensors",
            "moe_lora.safetensors",
            "lora_peft_nometa.safetensors",
        ]),
        entry_edits in proptest::collection::vec(entry_edit(), 0..3),
        meta in proptest::option::of(adapter_metadata()),
    ) {
        let original = std::fs::read(fixtures().join("edit/adapters").join(which)).unwrap();
        let n = u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
        let mut header: Value = serde_json::from_slice(&original[8..8 + n]).unwrap();
        apply_entry_edits(&mut header, &entry_edits);
        if let (Some(meta), Value::Object(map)) = (meta, &mut header) {
            map.insert("__metadata__".into(), serde_json::json!(meta));
        }
        let bytes = safetensors_bytes(json_text(&header).as_bytes(), &LengthPrefix::Right, &original[8 + n..]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(which);
        std::fs::write(&path, &bytes).unwrap();
        bounded("fixture adapter", 64 << 20, || read_and_apply(&path, true));
    }

    /// Valid PEFT files read back their modules' metadata.
    #[test]
    fn adapter_round_trip(
        rank in 1usize..4,
        top_k in proptest::option::of(1usize..8),
        extra in proptest::collection::btree_map("[a-z]{1,6}", ".{0,10}", 0..3),
    ) {
        let a = TensorSpec::floats("transformer.x_embedder.lora_A.weight", "F32", vec![rank, 3], &vec![0.5; rank * 3]);
        let b = TensorSpec::floats("transformer.x_embedder.lora_B.weight", "BF16", vec![2, rank], &vec![0.25; 2 * rank]);
        let mut meta: BTreeMap<String, String> = extra.into_iter().map(|(k, v)| (format!("x_{k}"), v)).collect();
        if let Some(k) = top_k {
            meta.insert("top_k".into(), k.to_string());
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lora.safetensors");
        std::fs::write(&path, valid_safetensors(&[a, b], Some(&meta))).unwrap();
        let file = bounded("round trip", MAX_ALLOC, || AdapterFile::read(&path)).unwrap();
        prop_assert_eq!(file.metadata_top_k(), top_k);
        prop_assert!(!file.is_moe());
        prop_assert_eq!(file.metadata().len(), meta.len());
        for (k, v) in &meta {
            prop_assert_eq!(file.metadata().get(k), Some(v));
        }
    }
}

/// Regression input for the stride panic (see `KNOWN_STRIDE_PANIC`): a valid file holding one
/// F32 tensor of shape [0, 2^32, 2^32] and no data.
#[test]
fn zero_element_tensor_with_huge_dimensions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lora.safetensors");
    let t = TensorSpec {
        name: "transformer.x_embedder.lora_A.weight".into(),
        dtype: "F32".into(),
        shape: vec![0, 1 << 32, 1 << 32],
        data: vec![],
    };
    std::fs::write(&path, valid_safetensors(&[t], None)).unwrap();
    let err = AdapterFile::read(&path).err().expect("refused").to_string();
    assert!(err.contains("impossible shape"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Manifests

/// TOML literals of every type, right and wrong for each field.
fn toml_literal() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(vec![
            "\"x\"", "\"\"", "\"lora\"", "\"moe-lora\"", "\"LoRA\"", "\"owner/name\"", "\"./w\"",
            "\"../w\"", "\"/etc\"", "\"a.safetensors\"", "\"../../x.safetensors\"",
            "'''multi\nline'''", "\"\\u0000\"", "\"\\uD800\"",
            "0", "1", "-1", "2", "9223372036854775807", "-9223372036854775808",
            "9223372036854775808", "18446744073709551616", "0x7fffffffffffffff", "1_000",
            "1.0", "0.0", "-0.0", "1e308", "1e400", "nan", "+inf", "-inf", "-nan",
            "true", "false", "[]", "[1, 2]", "[\"a\"]", "{}", "{ a = 1 }",
            "1979-05-27T07:32:00Z", "07:32:00", "", "\"unterminated", "[1,", "{ a = }",
        ]).prop_map(str::to_string),
        1 => any::<i64>().prop_map(|v| v.to_string()),
        1 => any::<f64>().prop_map(|v| format!("{v:?}")),
        1 => "[^\n]{0,16}".prop_map(|s| format!("{s:?}")),
    ]
}

fn manifest_key() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => proptest::sample::select(vec![
            "name", "description", "repo", "revision", "file", "kind", "scale", "top_k",
            "base_model", "prompt",
        ]).prop_map(str::to_string),
        1 => "[a-z_]{1,8}",
        1 => Just("[section]".to_string()),
        1 => Just("\"name\"".to_string()),
    ]
}

/// A manifest valid in every field, as TOML, with the values it states.
fn valid_manifest() -> impl Strategy<Value = (String, toml::Table)> {
    (
        "[a-zA-Z0-9 _-]{1,16}",
        "[^\u{0}]{0,24}",
        "[a-zA-Z0-9]{1,8}/[a-zA-Z0-9]{1,8}",
        proptest::option::of("[a-z0-9]{1,12}"),
        proptest::option::of("[a-z_]{1,8}\\.safetensors"),
        any::<bool>(),
        proptest::option::of(-1e6f64..1e6),
        proptest::option::of(1i64..64),
        proptest::option::of("[a-z-]{1,12}"),
    )
        .prop_map(|(name, desc, repo, rev, file, moe, scale, top_k, prompt)| {
            let mut t = toml::Table::new();
            t.insert("name".into(), name.into());
            t.insert("description".into(), desc.into());
            t.insert("repo".into(), repo.into());
            t.insert("kind".into(), if moe { "moe-lora" } else { "lora" }.into());
            if let Some(v) = rev {
                t.insert("revision".into(), v.into());
            }
            if let Some(v) = file {
                t.insert("file".into(), v.into());
            }
            if let Some(v) = scale {
                t.insert("scale".into(), v.into());
            }
            if let Some(v) = top_k {
                t.insert("top_k".into(), v.into());
            }
            if let Some(v) = prompt {
                t.insert("prompt".into(), v.into());
            }
            (toml::to_string(&t).unwrap(), t)
        })
}

fn check_manifest(m: &Manifest) {
    assert!(m.scale.is_finite(), "{m:?}");
    assert!(m.top_k.is_none_or(|k| k > 0), "{m:?}");
}

proptest! {
    #![proptest_config(config(2048))]

    #[test]
    fn manifest_arbitrary_text(text in ".{0,200}", origin in ".{0,20}") {
        if let Ok(m) = bounded("manifest text", MAX_ALLOC, || Manifest::parse(&text, &origin)) {
            check_manifest(&m);
        }
    }

    /// Valid manifests with fields given values of any type (or a bad literal), removed, or
    /// added (unknown or duplicated keys), then maybe a few bytes changed.
    #[test]
    fn manifest_mutated_fields(
        base in valid_manifest(),
        overrides in proptest::collection::vec((manifest_key(), toml_literal()), 1..4),
        drop in proptest::option::weighted(0.2, any::<usize>()),
        byte_edits in sometimes(byte_edit(), 2),
    ) {
        let (_, table) = base;
        let mut fields: Vec<(String, String)> =
            table.iter().map(|(k, v)| (k.clone(), v.to_string())).collect();
        if let Some(i) = drop {
            fields.remove(i % fields.len());
        }
        for (key, literal) in overrides {
            match fields.iter_mut().find(|(k, _)| *k == key) {
                Some(field) => field.1 = literal,
                None => fields.push((key, literal)),
            }
        }
        let text: String = fields.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
        let mut bytes = text.into_bytes();
        apply_byte_edits(&mut bytes, &byte_edits, usize::MAX);
        let text = String::from_utf8_lossy(&bytes);
        let parsed = bounded("manifest fields", MAX_ALLOC, || Manifest::parse(&text, "fuzz.toml"));
        if let Ok(m) = parsed {
            check_manifest(&m);
        }
    }

    /// Valid manifests parse to the values written.
    #[test]
    fn manifest_round_trip(base in valid_manifest()) {
        let (text, t) = base;
        let m = Manifest::parse(&text, "fuzz.toml").unwrap();
        let s = |k: &str| t.get(k).and_then(|v| v.as_str()).map(str::to_string);
        prop_assert_eq!(Some(m.name.clone()), s("name"));
        prop_assert_eq!(Some(m.description.clone()), s("description"));
        prop_assert_eq!(Some(m.repo.clone()), s("repo"));
        prop_assert_eq!(m.revision.clone(), s("revision"));
        prop_assert_eq!(m.file.clone(), s("file"));
        prop_assert_eq!(m.prompt.clone(), s("prompt"));
        let kind = if s("kind").as_deref() == Some("moe-lora") { AdapterKind::MoeLora } else { AdapterKind::Lora };
        prop_assert_eq!(m.kind, kind);
        prop_assert_eq!(m.scale, t.get("scale").and_then(|v| v.as_float()).unwrap_or(1.0));
        prop_assert_eq!(m.top_k, t.get("top_k").and_then(|v| v.as_integer()).map(|v| v as usize));
    }

    /// `--lora` specs: anything is Ok or a clear Err; an `hf:` spec is accepted only with a
    /// valid repo id (and revision), never read as a path.
    #[test]
    fn adapter_specs(
        spec in prop_oneof![
            ".{0,40}",
            "hf:[a-zA-Z0-9_.@/ ~\\\\-]{0,30}",
            "hf:[a-z]{1,4}/[a-z]{1,4}(@[a-z0-9./]{0,8})?(/[a-z./]{0,12})?",
            proptest::sample::select(vec![
                "hf:", "hf:/", "hf:a/", "hf:/b", "hf:a/b@", "hf:a/b@/x", "hf:a/b@..", "hf:a/b/..",
                "hf:a/b@v1/../../x", "hf:a//b", "hf:a/b/", "hf:./a", "hf:..", "hf:a/b@a@b",
                "hf:a/b@ x", "hf:a/b@\u{7f}", "icedit-moe", "icedit-normal", ".", "..", "/", "",
            ]).prop_map(str::to_string),
        ],
    ) {
        let parsed = bounded("spec", MAX_ALLOC, || AdapterSpec::parse(&spec));
        if let Ok(AdapterSpec::Hub { repo, revision, file }) = &parsed {
            prop_assert!(spec.starts_with("hf:"));
            let full = match revision {
                Some(r) => format!("hf:{repo}@{r}"),
                None => format!("hf:{repo}"),
            };
            prop_assert!(ModelSource::parse(&full).is_ok(), "{spec:?} gave {full:?}");
            prop_assert!(file.as_deref() != Some(""));
        }
        if spec.starts_with("hf:") {
            prop_assert!(!matches!(parsed, Ok(AdapterSpec::Path(_)) | Ok(AdapterSpec::Manifest(_))), "{spec:?}");
        }
    }
}
