//! FLUX.1 Kontext against diffusers' `FluxKontextPipeline` and `FluxKontextInpaintPipeline`
//! (tests/fixtures/kontext, made by tests/reference/gen_kontext.py): the photo and output sizes,
//! the photo's tokens and ids, the first step's transformer input, and whole runs from given
//! latents and from seeds, with true CFG, a LoRA, a mask, in f32 and bf16.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use icedit_adapters::{AdapterChoice, AdapterFile, ApplyMode};
use icedit_flux::compare::max_abs_diff;
use icedit_hub::{HubOptions, ModelRepo};
use icedit_pipeline::image_io::{load_mask, load_rgb, max_pixel_diff};
use icedit_pipeline::kontext::{output_size, photo_size, KontextJob, KontextOptions};
use icedit_pipeline::latents::pixels_to_tensor;
use icedit_pipeline::{EditJob, EditSettings, EditText, FluxPipeline, InitialNoise, PipelineKind};
use serde_json::Value;

fn kontext_fixture(rel: &str) -> PathBuf {
    icedit_test_support::fixture("kontext").join(rel)
}

fn json(rel: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(kontext_fixture(rel)).unwrap()).unwrap()
}

fn tensors(rel: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(kontext_fixture(rel), &Device::Cpu).unwrap()
}

fn pipeline(dtype: DType, adapters: Vec<AdapterChoice>) -> FluxPipeline {
    let repo = ModelRepo::open(
        kontext_fixture("tiny").to_str().unwrap(),
        &HubOptions::new(std::env::temp_dir()).with_offline(true),
    )
    .unwrap();
    let mut pipeline = FluxPipeline::new(repo, dtype, Device::Cpu).unwrap();
    assert_eq!(pipeline.kind(), PipelineKind::Kontext);
    pipeline.set_adapters(adapters, ApplyMode::Merge).unwrap();
    pipeline
}

fn pair(v: &Value) -> (u32, u32) {
    (v[0].as_u64().unwrap() as u32, v[1].as_u64().unwrap() as u32)
}

/// The first `n` tokens of `[1, tokens, C]` (the fixture keeps a slice of very long ones).
fn leading(t: &Tensor, n: usize) -> Tensor {
    t.narrow(1, 0, n).unwrap()
}

#[test]
fn photo_and_output_sizes_are_diffusers() {
    let sizes = json("reference/sizes.json");
    let cases = sizes["auto_resize"].as_array().unwrap();
    assert!(cases.len() >= 12);
    for case in cases {
        let (w, h) = pair(&case["image"]);
        let auto = case["auto_resize"].as_bool().unwrap();
        assert_eq!(
            photo_size(w, h, auto).unwrap(),
            pair(&case["resized"]),
            "{w}x{h}, auto {auto}"
        );
    }
    let outputs = sizes["output"].as_array().unwrap();
    assert!(outputs.len() >= 8);
    for case in outputs {
        let side = |k: &str| case[k].as_u64().map(|v| v as u32);
        let max_area = case["max_area"].as_u64().unwrap();
        assert_eq!(
            output_size(side("width"), side("height"), max_area).unwrap(),
            pair(&case["out"]),
            "{case}"
        );
    }
}

/// Every reference run, step by step: the photo's latents and ids, the first transformer input,
/// the final latents (f32 tolerance), and the image (PNG within 1/255).
#[test]
fn kontext_runs_match_diffusers() {
    let runs = json("reference/runs.json");
    for run in runs["runs"].as_array().unwrap() {
        let name = run["name"].as_str().unwrap();
        let folder = |f: &str| format!("reference/{name}/{f}");
        let dtype = match run["dtype"].as_str().unwrap() {
            "float32" => DType::F32,
            "bfloat16" => DType::BF16,
            other => panic!("{other}"),
        };
        let adapters = match run["lora"].as_str() {
            Some(file) => vec![AdapterChoice {
                name: file.into(),
                file: AdapterFile::read(&kontext_fixture(&format!("adapters/{file}"))).unwrap(),
                scale: run["lora_weight"].as_f64().unwrap(),
                top_k: None,
            }],
            None => vec![],
        };
        let mut p = pipeline(dtype, adapters);
        let photo = load_rgb(&kontext_fixture(&folder("image.png")))
            .unwrap()
            .rgb;
        assert_eq!(photo.dimensions(), pair(&run["photo_size"]), "{name}");
        let mask = (run["pipeline"] == "kontext_inpaint")
            .then(|| load_mask(&kontext_fixture(&folder("mask.png"))).unwrap());
        let options = KontextOptions {
            auto_resize: run["auto_resize"].as_bool().unwrap(),
            size: Some((
                run["width"].as_u64().unwrap() as u32,
                run["height"].as_u64().unwrap() as u32,
            )),
            max_area: run["max_area"].as_u64(),
        };
        let job = KontextJob::new(&photo, mask.as_ref(), &options).unwrap();
        assert_eq!(
            job.photo.dimensions(),
            pair(&run["resized_photo"]),
            "{name}"
        );
        assert_eq!((job.width, job.height), pair(&run["output_size"]), "{name}");

        let max_len = run["max_sequence_length"].as_u64().unwrap() as usize;
        let prompt = run["prompt"].as_str().unwrap();
        let negative_prompt = run["negative_prompt"].as_str();
        p = p.keep_text_encoders(true);
        let encoded = p.encode_prompt(prompt, max_len, &mut |_| {}).unwrap();
        let negative = negative_prompt.map(|n| p.encode_prompt(n, max_len, &mut |_| {}).unwrap());
        let text = EditText {
            prompt,
            encoded: &encoded,
            true_cfg: negative
                .as_ref()
                .map(|n| (n, run["true_cfg_scale"].as_f64().unwrap() as f32)),
        };
        let settings = EditSettings {
            steps: run["steps"].as_u64().unwrap() as usize,
            guidance: run["guidance"].as_f64().unwrap() as f32,
            max_sequence_length: max_len,
        };
        let seed = run["seed"].as_u64().unwrap();
        let noise = if run["given_latents"].as_bool().unwrap() {
            let given = tensors(&folder("latents.safetensors"));
            InitialNoise::Latents {
                latents: given["latents"].clone(),
                seed,
            }
        } else {
            InitialNoise::Seed(seed)
        };
        let io = tensors(&folder("io.safetensors"));
        let job = EditJob::Kontext(job);
        let mut state = p
            .start_edit(&job, &text, &settings, noise, &mut |_| {})
            .unwrap();

        // Tolerances: f32 runs agree to rounding (the VAE encode of the 672x1568 photo to 4e-4:
        // its group norms sum a million values each); bf16 runs to a few bf16 steps.
        let (tensor_tol, encode_tol, image_tol, png_tol) = match dtype {
            DType::F32 => (2e-4, 5e-4, 3e-3, 1),
            _ => (0.05, 0.02, 0.03, 6),
        };
        let start_err = max_abs_diff(state.latents(), &io["initial_latents"]).unwrap();
        assert!(
            start_err <= tensor_tol,
            "{name}: initial latents {start_err}"
        );
        let (input, ids) = state.transformer_image_input().unwrap();
        let stored = io["step0_hidden_states"].dim(1).unwrap();
        let input_err = max_abs_diff(&leading(&input, stored), &io["step0_hidden_states"]).unwrap();
        assert!(
            input_err <= encode_tol,
            "{name}: step-0 transformer input {input_err}"
        );
        let ids_err = max_abs_diff(ids, &io["step0_img_ids"]).unwrap();
        assert_eq!(ids_err, 0.0, "{name}: image ids");
        let noise_tokens = io["latent_ids"].dim(0).unwrap();
        let photo_ids = ids
            .narrow(0, noise_tokens, ids.dim(0).unwrap() - noise_tokens)
            .unwrap();
        assert_eq!(
            max_abs_diff(&photo_ids, &io["image_ids"]).unwrap(),
            0.0,
            "{name}"
        );
        let photo_tokens = input
            .narrow(1, noise_tokens, input.dim(1).unwrap() - noise_tokens)
            .unwrap();
        let stored = io["image_latents"].dim(1).unwrap();
        let photo_err =
            max_abs_diff(&leading(&photo_tokens, stored), &io["image_latents"]).unwrap();
        assert!(photo_err <= encode_tol, "{name}: photo latents {photo_err}");

        p.advance(&mut state, usize::MAX, &mut |_| {}).unwrap();
        let passes = 1 + negative_prompt.is_some() as usize;
        assert_eq!(state.evaluations(), settings.steps * passes, "{name}");
        let latents_err = max_abs_diff(state.latents(), &io["final_latents"]).unwrap();
        let out = p.decode(&state).unwrap();
        let (w, h) = out.dimensions();
        let ours = pixels_to_tensor(out.as_raw(), h as usize, w as usize, &Device::Cpu)
            .unwrap()
            .affine(0.5, 0.5)
            .unwrap()
            .permute((0, 2, 3, 1))
            .unwrap()
            .squeeze(0)
            .unwrap();
        let image_err = max_abs_diff(&ours, &io["image"]).unwrap();
        let png = load_rgb(&kontext_fixture(&folder("out.png"))).unwrap().rgb;
        let png_err = max_pixel_diff(&out, &png).unwrap();
        eprintln!(
            "{name}: start {start_err:.1e}, input {input_err:.1e}, final latents \
             {latents_err:.1e}, image {image_err:.1e}, PNG {png_err}/255"
        );
        assert!(
            latents_err <= tensor_tol * 10.0,
            "{name}: final latents {latents_err}"
        );
        assert!(image_err <= image_tol, "{name}: image {image_err}");
        assert!(png_err <= png_tol, "{name}: PNG {png_err}/255");
    }
}

/// Prefers the second edit every time, recording the original it was shown.
struct SecondJudge {
    originals: Vec<image::RgbImage>,
}

impl icedit_judge::Judge for SecondJudge {
    fn name(&self) -> String {
        "second".into()
    }
    fn compare(
        &mut self,
        c: &icedit_judge::Comparison,
    ) -> icedit_judge::Result<icedit_judge::Verdict> {
        assert_ne!(c.first, c.second);
        self.originals.push(c.original.clone());
        Ok(icedit_judge::Verdict {
            preference: icedit_judge::Preference::Second,
            judge: "second".into(),
            answer: "second".into(),
            latency: std::time::Duration::ZERO,
            warnings: vec![],
        })
    }
}

/// The early-filter search on Kontext, with true CFG: the judge sees the photo as the original,
/// the winner equals a plain Kontext edit of its seed bit for bit, and each step costs two
/// transformer passes.
#[test]
fn seed_search_on_kontext_finishes_the_winner_as_a_plain_edit() {
    use icedit_pipeline::search::{search_cost, EarlyFilter, SearchSettings, Selection};
    let photo = load_rgb(&kontext_fixture("reference/seed/image.png"))
        .unwrap()
        .rgb;
    let options = KontextOptions {
        auto_resize: false,
        size: Some((32, 48)),
        max_area: None,
    };
    let job = EditJob::Kontext(KontextJob::new(&photo, None, &options).unwrap());
    let mut p = pipeline(DType::F32, vec![]).keep_text_encoders(true);
    let encoded = p.encode_prompt("make it night", 16, &mut |_| {}).unwrap();
    let negative = p.encode_prompt("blurry", 16, &mut |_| {}).unwrap();
    let text = EditText {
        prompt: "make it night",
        encoded: &encoded,
        true_cfg: Some((&negative, 1.5)),
    };
    let settings = EditSettings {
        steps: 4,
        guidance: 2.5,
        max_sequence_length: 16,
    };
    for (filter, batch) in [
        (EarlyFilter::Continue, 1),
        (EarlyFilter::Restart, 1),
        (EarlyFilter::Continue, 3),
    ] {
        let search = SearchSettings {
            seeds: vec![5, 6, 7],
            early_steps: 2,
            filter,
            selection: Selection::Tournament,
            batch,
        };
        let mut judge = SecondJudge { originals: vec![] };
        let out = p
            .edit_search(
                &job,
                &text,
                "make it night",
                &settings,
                &search,
                &mut judge,
                &mut |_| {},
            )
            .unwrap();
        assert_eq!(out.winner_seed, 7, "{filter:?}");
        assert_eq!(judge.originals.len(), 2);
        assert!(
            judge.originals.iter().all(|o| o == &photo),
            "the photo is the original"
        );
        let plain = p
            .edit(&job, &text, &settings, InitialNoise::Seed(7), &mut |_| {})
            .unwrap();
        if batch == 1 {
            assert_eq!(
                out.result.edited, plain.edited,
                "{filter:?}: winner as a plain edit"
            );
        } else {
            // Candidates in one pass: equal to rounding (the products change shape).
            let diff = max_pixel_diff(&out.result.edited, &plain.edited).unwrap();
            assert!(diff <= 1, "batched: {diff}/255 from a plain edit");
        }
        assert_eq!(out.result.edited.dimensions(), (32, 48));
        assert_eq!(
            out.evaluations,
            2 * search_cost(filter, 3, 2, settings.steps),
            "{filter:?}: two passes per step"
        );
    }
}
