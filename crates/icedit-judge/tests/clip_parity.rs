//! The CLIP judge against transformers' `CLIPModel` and PIL-backed `CLIPImageProcessor` on a
//! tiny random model (tests/reference/gen_clip_judge.py): preprocessing, token ids, both
//! towers' projected features, and the judge's scores.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use icedit_flux::compare::max_abs_diff;
use icedit_hub::HubOptions;
use icedit_judge::{
    build_judges, parse_judges, ClipEmbedder, ClipJudge, ClipScoring, Comparison, Judge,
    JudgeSettings, OpenAiOptions, Preference,
};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    icedit_test_support::fixture("clip").join(name)
}

fn expected() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("expected.safetensors"), &Device::Cpu).unwrap()
}

fn image(name: &str) -> image::RgbImage {
    image::open(fixture(&format!("images/{name}.png")))
        .unwrap()
        .to_rgb8()
}

/// Largest difference, relative to the reference's largest magnitude.
fn relative_diff(ours: &Tensor, theirs: &Tensor) -> f32 {
    max_abs_diff(ours, theirs).unwrap()
        / max_abs_diff(theirs, &theirs.zeros_like().unwrap()).unwrap()
}

fn texts() -> Vec<String> {
    serde_json::from_str(&std::fs::read_to_string(fixture("texts.json")).unwrap()).unwrap()
}

#[test]
fn preprocessing_equals_the_pil_image_processor() {
    let embedder = ClipEmbedder::load(&fixture("model"), &Device::Cpu).unwrap();
    let expected = expected();
    for name in ["source", "first", "second"] {
        let ours = embedder.pixel_values(&image(name)).unwrap();
        let theirs = &expected[&format!("pixel_values.{name}")];
        let diff = max_abs_diff(&ours, theirs).unwrap();
        eprintln!("{name}: pixel values differ by {diff}");
        assert!(diff < 1e-6, "{name}: pixel values differ by {diff}");
    }
}

#[test]
fn both_towers_match_transformers() {
    let embedder = ClipEmbedder::load(&fixture("model"), &Device::Cpu).unwrap();
    let expected = expected();
    for name in ["source", "first", "second"] {
        let ours = embedder
            .image_features(&expected[&format!("pixel_values.{name}")])
            .unwrap();
        let theirs = &expected[&format!("image_embeds.{name}")];
        let diff = relative_diff(&ours, theirs);
        eprintln!("{name}: image features differ by {diff} (relative)");
        assert!(diff < 1e-5, "{name}: image features differ by {diff}");
    }
    for (k, text) in texts().iter().enumerate() {
        let ids = embedder.token_ids(text).unwrap();
        let theirs: Vec<i64> = expected[&format!("text_ids.{k}")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let ours: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        assert_eq!(ours, theirs, "token ids of {text:?}");
        let ours = embedder.text_features(text).unwrap();
        let theirs = &expected[&format!("text_embeds.{k}")];
        let diff = relative_diff(&ours, theirs);
        eprintln!("{text:?}: text features differ by {diff} (relative)");
        assert!(diff < 1e-5, "{text:?}: text features differ by {diff}");
    }
}

#[test]
fn judge_scores_and_picks_like_the_reference() {
    let scores: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("scores.json")).unwrap()).unwrap();
    let scoring = ClipScoring {
        source_caption: scores["caption"].as_str().unwrap().into(),
        similarity_weight: scores["weight"].as_f64().unwrap(),
    };
    let instruction = scores["instruction"].as_str().unwrap();
    let mut judge =
        ClipJudge::load("clip".into(), &fixture("model"), scoring, &Device::Cpu).unwrap();
    let (source, first, second) = (image("source"), image("first"), image("second"));
    for (name, edit) in [("first", &first), ("second", &second)] {
        let ours = judge.score(instruction, edit, &source).unwrap();
        let theirs = &scores[name];
        for (what, value) in [
            ("direction", ours.direction),
            ("similarity", ours.similarity),
            ("score", ours.score),
        ] {
            let reference = theirs[what].as_f64().unwrap();
            assert!(
                (value - reference).abs() < 1e-4,
                "{name} {what}: {value} vs {reference}"
            );
        }
    }
    let better_second =
        scores["second"]["score"].as_f64().unwrap() > scores["first"]["score"].as_f64().unwrap();
    for (a, b, second_wins) in [
        (&first, &second, better_second),
        (&second, &first, !better_second),
    ] {
        let verdict = judge
            .compare(&Comparison {
                instruction,
                first: a,
                second: b,
                original: &source,
            })
            .unwrap();
        let expected = if second_wins {
            Preference::Second
        } else {
            Preference::First
        };
        assert_eq!(verdict.preference, expected, "{}", verdict.answer);
        assert!(verdict.answer.contains("direction"), "{}", verdict.answer);
    }
    // An edit compared with itself is a tie: the running best stays.
    let tie = judge
        .compare(&Comparison {
            instruction,
            first: &first,
            second: &first,
            original: &source,
        })
        .unwrap();
    assert_eq!(tie.preference, Preference::First);
}

fn settings(hub: HubOptions) -> JudgeSettings<'static> {
    JudgeSettings {
        lookup: &|_| None,
        openai: OpenAiOptions::default(),
        hub,
        device: Device::Cpu,
        dtype: candle_core::DType::F32,
        clip: ClipScoring::default(),
    }
}

#[test]
fn clip_judges_load_from_folders_and_the_hub_cache() {
    let cache = tempfile::tempdir().unwrap();
    let hub = HubOptions::new(cache.path()).with_offline(true);

    let local = format!("clip:{}", fixture("model").display());
    let chain = build_judges(&parse_judges(&local).unwrap(), &settings(hub.clone())).unwrap();
    assert_eq!(chain.name(), local);

    // Not cached and offline: a clear error naming the model.
    let err = build_judges(&parse_judges("clip").unwrap(), &settings(hub.clone()))
        .err()
        .expect("no model in an empty offline cache")
        .to_string();
    assert!(err.contains("openai/clip-vit-large-patch14"), "{err}");

    // The same files in the Hub cache layout load by repo id.
    icedit_hub::import_folder(cache.path(), "tiny/clip", &fixture("model")).unwrap();
    let chain = build_judges(&parse_judges("clip:tiny/clip").unwrap(), &settings(hub)).unwrap();
    assert_eq!(chain.name(), "clip:tiny/clip");
}

#[test]
fn broken_clip_folders_fail_with_the_reason() {
    let copy = |skip: &str| {
        let dir = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(fixture("model")).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name() != skip {
                std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
            }
        }
        dir
    };
    let load_error = |dir: &Path| {
        ClipEmbedder::load(dir, &Device::Cpu)
            .err()
            .expect("broken folder")
            .to_string()
    };

    let dir = copy("model.safetensors");
    let err = load_error(dir.path());
    assert!(
        err.contains("model.safetensors") || err.contains("weights"),
        "{err}"
    );

    let dir = copy("");
    let processor = dir.path().join("preprocessor_config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&processor).unwrap()).unwrap();
    config["resample"] = 2.into();
    std::fs::write(&processor, config.to_string()).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("resample 2"), "{err}");

    config["resample"] = 3.into();
    config["crop_size"] = serde_json::json!({"height": 16, "width": 16});
    std::fs::write(&processor, config.to_string()).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("crops to"), "{err}");

    let dir = copy("");
    let config_path = dir.path().join("config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["vision_config"]["hidden_act"] = "mish".into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("mish"), "{err}");
}
