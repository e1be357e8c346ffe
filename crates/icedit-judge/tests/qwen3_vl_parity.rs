//! The Qwen3-VL judge against transformers' `Qwen3VLForConditionalGeneration` and its PIL
//! image processor on a tiny random model (tests/reference/gen_qwen3vl_judge.py): prompt
//! tokens, patches, 3-D rotary positions, vision features, deepstack, and the next-token
//! logits the verdict comes from.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use icedit_flux::compare::max_abs_diff;
use icedit_judge::{
    build_judges, parse_judges, ClipScoring, Comparison, Judge, JudgeSettings, OpenAiOptions,
    Preference, VlmJudge, VlmPreprocess,
};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    icedit_test_support::fixture("qwen3vl").join(name)
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("expected.safetensors"), &Device::Cpu).unwrap()
}

fn image(name: &str) -> image::RgbImage {
    image::open(fixture(&format!("images/{name}.png")))
        .unwrap()
        .to_rgb8()
}

fn judge() -> VlmJudge {
    VlmJudge::load(
        "qwen3-vl".into(),
        &fixture("model"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

/// Largest difference, relative to the reference's largest magnitude.
fn relative_diff(ours: &Tensor, theirs: &Tensor) -> f32 {
    max_abs_diff(ours, theirs).unwrap()
        / max_abs_diff(theirs, &theirs.zeros_like().unwrap()).unwrap()
}

/// The fixture's three images.
fn images() -> [image::RgbImage; 3] {
    [image("first"), image("second"), image("original")]
}

fn comparison(images: &[image::RgbImage; 3]) -> Comparison<'_> {
    Comparison {
        instruction: "make it night",
        first: &images[0],
        second: &images[1],
        original: &images[2],
    }
}

fn ints(t: &Tensor) -> Vec<i64> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn preprocessing_and_prompt_equal_the_processor() {
    let judge = judge();
    let expected = expected();
    let images = images();
    let prompt = judge.prompt(&comparison(&images)).unwrap();
    let ids: Vec<i64> = prompt.input_ids.iter().map(|&i| i as i64).collect();
    assert_eq!(ids, ints(&expected["input_ids"]), "prompt token ids");

    let grids: Vec<i64> = prompt
        .images
        .iter()
        .flat_map(|(_, rows, cols)| [1, *rows as i64, *cols as i64])
        .collect();
    assert_eq!(grids, ints(&expected["image_grid_thw"]));
    let patches = Tensor::cat(
        &prompt.images.iter().map(|(p, _, _)| p).collect::<Vec<_>>(),
        0,
    )
    .unwrap();
    let diff = relative_diff(&patches, &expected["pixel_values"]);
    eprintln!("pixel values differ by {diff}");
    assert!(diff < 1e-6, "pixel values differ by {diff}");

    let positions = judge.model().rope_positions(&prompt).unwrap();
    let ours: Vec<i64> = positions
        .iter()
        .flat_map(|s| s.iter().map(|&p| p as i64))
        .collect();
    assert_eq!(
        ours,
        ints(&expected["position_ids"]),
        "3-D rotary positions"
    );
}

#[test]
fn smart_resize_matches_the_processor() {
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("meta.json")).unwrap()).unwrap();
    let sr = &meta["smart_resize"];
    let preprocess = VlmPreprocess {
        min_pixels: sr["min_pixels"].as_u64().unwrap(),
        max_pixels: sr["max_pixels"].as_u64().unwrap(),
        ..VlmPreprocess::default()
    };
    for case in sr["cases_hw"].as_array().unwrap() {
        let hw: Vec<u32> = serde_json::from_value(case["hw"].clone()).unwrap();
        let out: Vec<u32> = serde_json::from_value(case["out_hw"].clone()).unwrap();
        assert_eq!(
            preprocess.target_size(hw[0], hw[1]).unwrap(),
            (out[0], out[1]),
            "{hw:?}"
        );
    }
    let err = preprocess.target_size(10, 2500).unwrap_err();
    assert!(err.contains("aspect ratio"), "{err}");
}

#[test]
fn vision_features_and_logits_match_transformers() {
    let judge = judge();
    let expected = expected();
    let images = images();
    let prompt = judge.prompt(&comparison(&images)).unwrap();

    let (tokens, deepstack) = judge.model().image_features(&prompt).unwrap();
    let diff = relative_diff(&tokens, &expected["image_embeds"]);
    eprintln!("image tokens differ by {diff}");
    assert!(diff < 1e-5, "image tokens differ by {diff}");
    assert_eq!(deepstack.len(), 2);
    for (level, features) in deepstack.iter().enumerate() {
        let diff = relative_diff(features, &expected[&format!("deepstack.{level}")]);
        eprintln!("deepstack {level} differs by {diff}");
        assert!(diff < 1e-5, "deepstack {level} differs by {diff}");
    }

    let (logits, hidden) = judge.model().next_token_logits(&prompt).unwrap();
    let diff = relative_diff(&hidden, &expected["hidden_last"]);
    eprintln!("last hidden state differs by {diff}");
    assert!(diff < 1e-5, "last hidden state differs by {diff}");
    let diff = relative_diff(&logits, &expected["logits_last"]);
    eprintln!("logits differ by {diff}");
    assert!(diff < 1e-5, "logits differ by {diff}");
    let answers: Vec<i64> = judge.answer_ids().iter().map(|&i| i as i64).collect();
    assert_eq!(answers, ints(&expected["token_ids_12"]));
}

#[test]
fn the_verdict_follows_the_answer_logits() {
    let mut judge = judge();
    let expected = expected();
    let logits: Vec<f32> = expected["logits_last"].to_vec1().unwrap();
    let ids = ints(&expected["token_ids_12"]);
    let reference = if logits[ids[1] as usize] > logits[ids[0] as usize] {
        Preference::Second
    } else {
        Preference::First
    };
    let images = images();
    let verdict = judge.compare(&comparison(&images)).unwrap();
    assert_eq!(verdict.preference, reference, "{}", verdict.answer);
    assert!(verdict.answer.starts_with("P(1) = "), "{}", verdict.answer);
}

/// A sharded copy (two shards and `model.safetensors.index.json`, as the 4B and larger repos
/// ship) loads from the Hub cache, shards fetched through the index, and gives the same logits.
#[test]
fn sharded_weights_load_through_their_index() {
    let sharded = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture("model")).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "model.safetensors" {
            std::fs::copy(entry.path(), sharded.path().join(entry.file_name())).unwrap();
        }
    }
    let tensors =
        candle_core::safetensors::load(fixture("model/model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (k, part) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", k + 1);
        let shard: HashMap<String, Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), tensors[*n].clone()))
            .collect();
        candle_core::safetensors::save(&shard, sharded.path().join(&file)).unwrap();
        for n in part {
            weight_map.insert((*n).clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        sharded.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();

    let cache = tempfile::tempdir().unwrap();
    let hub = icedit_hub::HubOptions::new(cache.path()).with_offline(true);
    icedit_hub::import_folder(cache.path(), "tiny/qwen3-vl-sharded", sharded.path()).unwrap();
    let mut chain = build_judges(
        &parse_judges("qwen3-vl:tiny/qwen3-vl-sharded").unwrap(),
        &settings(hub),
    )
    .unwrap();
    let images = images();
    let from_shards = chain.compare(&comparison(&images)).unwrap();
    let single = judge().compare(&comparison(&images)).unwrap();
    assert_eq!(from_shards.answer, single.answer);
    assert_eq!(from_shards.preference, single.preference);

    // A shard the index names but the folder lacks.
    std::fs::remove_file(sharded.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = VlmJudge::load("qwen3-vl".into(), sharded.path(), DType::F32, &Device::Cpu)
        .err()
        .expect("missing shard")
        .to_string();
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
}

fn settings(hub: icedit_hub::HubOptions) -> JudgeSettings<'static> {
    JudgeSettings {
        lookup: &|_| None,
        openai: OpenAiOptions::default(),
        hub,
        device: Device::Cpu,
        dtype: DType::F32,
        clip: ClipScoring::default(),
    }
}

#[test]
fn vlm_judges_load_from_the_hub_cache_and_fail_clearly() {
    let cache = tempfile::tempdir().unwrap();
    let hub = icedit_hub::HubOptions::new(cache.path()).with_offline(true);
    icedit_hub::import_folder(cache.path(), "tiny/qwen3-vl", &fixture("model")).unwrap();
    let chain = build_judges(
        &parse_judges("qwen3-vl:tiny/qwen3-vl").unwrap(),
        &settings(hub.clone()),
    )
    .unwrap();
    assert_eq!(chain.name(), "qwen3-vl:tiny/qwen3-vl");

    let err = build_judges(&parse_judges("qwen3-vl").unwrap(), &settings(hub))
        .err()
        .expect("not cached, offline")
        .to_string();
    assert!(err.contains("Qwen/Qwen3-VL-2B-Instruct"), "{err}");

    // A folder whose config is for another model, and one without weights.
    let broken = |edit: &dyn Fn(&Path)| {
        let dir = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(fixture("model")).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
        edit(dir.path());
        VlmJudge::load("qwen3-vl".into(), dir.path(), DType::F32, &Device::Cpu)
            .err()
            .expect("broken folder")
            .to_string()
    };
    let err = broken(&|dir| {
        let path = dir.join("config.json");
        let mut config: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        config["text_config"]["rope_parameters"]["mrope_section"] = serde_json::json!([4, 2, 1]);
        std::fs::write(&path, config.to_string()).unwrap();
    });
    assert!(err.contains("mrope_section"), "{err}");
    let err = broken(&|dir| std::fs::remove_file(dir.join("model.safetensors")).unwrap());
    assert!(err.contains("model.safetensors"), "{err}");
    let err = broken(&|dir| {
        let path = dir.join("config.json");
        let mut config: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        config["text_config"]["hidden_size"] = 32.into();
        config["vision_config"]["out_hidden_size"] = 32.into();
        std::fs::write(&path, config.to_string()).unwrap();
    });
    assert!(err.contains("weights"), "{err}");
}
