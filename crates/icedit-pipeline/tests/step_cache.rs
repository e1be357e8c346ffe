//! Step caches against diffusers' hooks (tests/fixtures/step_cache, made by
//! tests/reference/gen_step_cache.py): First Block Cache at several thresholds (0 equals no
//! cache), TaylorSeer with bf16 and f32 factors, and First Block Cache on Kontext with true CFG,
//! whose cond and uncond branches decide apart. The same steps are computed in full, and the
//! results match.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use icedit_flux::compare::max_abs_diff;
use icedit_flux::StepCacheConfig;
use icedit_hub::{HubOptions, ModelRepo};
use icedit_pipeline::image_io::{load_mask, load_rgb, max_pixel_diff};
use icedit_pipeline::kontext::{KontextJob, KontextOptions};
use icedit_pipeline::{EditJob, EditSettings, EditText, FillRequest, FluxPipeline, InitialNoise};
use icedit_test_support::fixtures;
use serde_json::Value;

fn pipeline(folder: &str) -> FluxPipeline {
    let repo = ModelRepo::open(
        fixtures().join(folder).to_str().unwrap(),
        &HubOptions::new(std::env::temp_dir()).with_offline(true),
    )
    .unwrap();
    FluxPipeline::new(repo, DType::F32, Device::Cpu)
        .unwrap()
        .keep_text_encoders(true)
}

/// The run's cache as `--cache` would give it.
fn cache_of(run: &Value) -> Option<StepCacheConfig> {
    let c = &run["cache"];
    match c["kind"].as_str()? {
        "first_block_cache" => {
            Some(StepCacheConfig::parse(&format!("first-block:{}", c["threshold"])).unwrap())
        }
        "taylorseer" => {
            let dtype = match c["taylor_factors_dtype"].as_str().unwrap() {
                "bfloat16" => "bf16",
                "float32" => "f32",
                other => panic!("{other}"),
            };
            let mut spec = format!(
                "taylorseer:interval={},warmup={},order={},dtype={dtype}",
                c["cache_interval"], c["disable_cache_before_step"], c["max_order"]
            );
            if let Some(after) = c["disable_cache_after_step"].as_u64() {
                spec += &format!(",cooldown={after}");
            }
            Some(StepCacheConfig::parse(&spec).unwrap())
        }
        other => panic!("{other}"),
    }
}

#[test]
fn step_caches_decide_and_compute_as_diffusers() {
    let runs: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("step_cache/reference/runs.json")).unwrap(),
    )
    .unwrap();
    for run in runs["runs"].as_array().unwrap() {
        let name = run["name"].as_str().unwrap();
        let folder = fixtures().join("step_cache/reference").join(name);
        let io: HashMap<String, Tensor> =
            candle_core::safetensors::load(folder.join("io.safetensors"), &Device::Cpu).unwrap();
        let steps = run["steps"].as_u64().unwrap() as usize;
        let guidance = run["guidance"].as_f64().unwrap() as f32;
        let max_len = run["max_sequence_length"].as_u64().unwrap() as usize;
        let seed = run["seed"].as_u64().unwrap();
        let prompt = run["prompt"].as_str().unwrap();
        let image = load_rgb(&folder.join("image.png")).unwrap().rgb;
        let (mut p, mut state) = if run["pipeline"] == "fill" {
            let mut p = pipeline("fill_pipeline/tiny");
            p.set_step_cache(cache_of(run));
            let text = p.encode_prompt(prompt, max_len, &mut |_| {}).unwrap();
            let mask = load_mask(&folder.join("mask.png")).unwrap();
            let request = FillRequest {
                image: &image,
                mask: &mask,
                prompt,
                steps,
                guidance,
                noise: InitialNoise::Seed(seed),
                max_sequence_length: max_len,
            };
            let state = p.start(&request, &text, &mut |_| {}).unwrap();
            (p, state)
        } else {
            let mut p = pipeline("kontext/tiny");
            p.set_step_cache(cache_of(run));
            let encoded = p.encode_prompt(prompt, max_len, &mut |_| {}).unwrap();
            let negative = run["negative_prompt"]
                .as_str()
                .map(|n| p.encode_prompt(n, max_len, &mut |_| {}).unwrap());
            let size = (
                run["width"].as_u64().unwrap() as u32,
                run["height"].as_u64().unwrap() as u32,
            );
            let options = KontextOptions {
                auto_resize: run["auto_resize"].as_bool().unwrap(),
                size: Some(size),
                max_area: run["max_area"].as_u64(),
            };
            let job = EditJob::Kontext(KontextJob::new(&image, None, &options).unwrap());
            let text = EditText {
                prompt,
                encoded: &encoded,
                true_cfg: negative
                    .as_ref()
                    .map(|n| (n, run["true_cfg_scale"].as_f64().unwrap() as f32)),
            };
            let settings = EditSettings {
                steps,
                guidance,
                max_sequence_length: max_len,
            };
            let state = p
                .start_edit(
                    &job,
                    &text,
                    &settings,
                    InitialNoise::Seed(seed),
                    &mut |_| {},
                )
                .unwrap();
            (p, state)
        };
        p.advance(&mut state, usize::MAX, &mut |_| {}).unwrap();

        let expected: Option<Vec<Vec<bool>>> = run["contexts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                run["computed"].get(c.as_str().unwrap()).map(|steps| {
                    steps
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|b| b.as_bool().unwrap())
                        .collect()
                })
            })
            .collect();
        assert_eq!(
            state.computed_steps(),
            expected,
            "{name}: steps computed in full"
        );

        let latents_err = max_abs_diff(state.latents(), &io["final_latents"]).unwrap();
        let out = p.decode(&state).unwrap();
        let png = load_rgb(&folder.join("out.png")).unwrap().rgb;
        let png_err = max_pixel_diff(&out, &png).unwrap();
        eprintln!(
            "{name}: computed {:?}, final latents {latents_err:.1e}, PNG {png_err}/255",
            state.computed_steps()
        );
        assert!(latents_err <= 5e-4, "{name}: final latents {latents_err}");
        assert!(png_err <= 1, "{name}: PNG {png_err}/255");
        if let Some(full) = &expected {
            let skipped = full.iter().flatten().filter(|c| !**c).count();
            assert_eq!(
                state.full_evaluations(),
                state.evaluations() - skipped,
                "{name}"
            );
        }
    }
}

/// Inside the seed search a cache keeps each candidate's own state: previews and the finish
/// follow from it, the winner equals a plain cached edit of its seed, and the evaluations
/// computed in full are counted apart from those served by the cache.
#[test]
fn step_caches_in_the_seed_search() {
    use icedit_pipeline::search::{search_cost, EarlyFilter, SearchSettings, Selection};
    let mut p = pipeline("fill_pipeline/tiny");
    // A threshold no change reaches: every run computes its first evaluation only.
    p.set_step_cache(Some(StepCacheConfig::parse("first-block:1000").unwrap()));
    let source = load_rgb(&fixtures().join("edit/source.png")).unwrap().rgb;
    let job = EditJob::Diptych(icedit_pipeline::Diptych::new(&source, 64).unwrap());
    let prompt = icedit_pipeline::edit::diptych_prompt("make it night").unwrap();
    let encoded = p.encode_prompt(&prompt, 16, &mut |_| {}).unwrap();
    let text = EditText::new(&prompt, &encoded);
    let settings = EditSettings {
        steps: 4,
        guidance: 50.0,
        max_sequence_length: 16,
    };
    let search = SearchSettings {
        seeds: vec![3, 5, 8],
        early_steps: 2,
        filter: EarlyFilter::Continue,
        selection: Selection::Tournament,
        batch: 1,
    };
    struct First;
    impl icedit_judge::Judge for First {
        fn name(&self) -> String {
            "first".into()
        }
        fn compare(
            &mut self,
            _: &icedit_judge::Comparison,
        ) -> icedit_judge::Result<icedit_judge::Verdict> {
            Ok(icedit_judge::Verdict {
                preference: icedit_judge::Preference::First,
                judge: "first".into(),
                answer: "1".into(),
                latency: std::time::Duration::ZERO,
                warnings: vec![],
            })
        }
    }
    let out = p
        .edit_search(
            &job,
            &text,
            "make it night",
            &settings,
            &search,
            &mut First,
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(out.winner_seed, 3);
    assert_eq!(out.evaluations, search_cost(EarlyFilter::Continue, 3, 2, 4));
    assert_eq!(out.full_evaluations, 3, "one full evaluation per candidate");
    let plain = p
        .edit(&job, &text, &settings, InitialNoise::Seed(3), &mut |_| {})
        .unwrap();
    assert_eq!(
        out.result.edited, plain.edited,
        "the winner as a plain cached edit"
    );
    assert_eq!(
        plain.computed_steps,
        Some(vec![vec![true, false, false, false]])
    );
    let batched = SearchSettings { batch: 2, ..search };
    let err = p
        .edit_search(
            &job,
            &text,
            "make it night",
            &settings,
            &batched,
            &mut First,
            &mut |_| {},
        )
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("one at a time"), "{err}");
}
