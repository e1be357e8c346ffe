//! `icedit edit` end to end on the tiny pipeline and the reference's adapters
//! (tests/reference/gen_edit_adapters.py): the default adapter and a manifest name resolved from
//! an offline Hub cache, local files, several seeds, the recipe and JSON summary, and the bad
//! inputs, each exiting 1 with a reason and leaving no file behind.

use std::path::{Path, PathBuf};

#[path = "../../../tests/support/cli.rs"]
mod cli_support;
use cli_support::*;
use icedit_test_support::fixtures;

fn edit_fixture(rel: &str) -> String {
    fixtures()
        .join("edit")
        .join(rel)
        .to_str()
        .unwrap()
        .to_string()
}

fn model() -> String {
    fixtures()
        .join("fill_pipeline/tiny")
        .to_str()
        .unwrap()
        .to_string()
}

/// An HF_HOME whose cache holds the two ICEdit adapter repos, made from the fixture adapters.
fn hf_home_with_adapters() -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    let cache = home.path().join("hub");
    for (repo, src, name) in [
        (
            "sanaka87/ICEdit-MoE-LoRA",
            "moe_lora.safetensors",
            "moe.safetensors",
        ),
        (
            "RiverZ/normal-lora",
            "lora_peft.safetensors",
            "pytorch_lora_weights.safetensors",
        ),
    ] {
        let folder = tempfile::tempdir().unwrap();
        std::fs::copy(
            edit_fixture(&format!("adapters/{src}")),
            folder.path().join(name),
        )
        .unwrap();
        std::fs::write(folder.path().join("README.md"), "adapter").unwrap();
        icedit_hub::import_folder(&cache, repo, folder.path()).unwrap();
    }
    home
}

/// The reference's settings: tiny model, 64-pixel halves, 4 steps, f32.
fn base_args(out: &Path) -> Vec<String> {
    [
        "--model",
        &model(),
        "--image",
        &edit_fixture("source.png"),
        "--instruction",
        "make it night",
        "--width",
        "64",
        "--steps",
        "4",
        "--dtype",
        "f32",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn with(mut args: Vec<String>, extra: &[&str]) -> Vec<String> {
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn reference_png(run: &str, file: &str) -> PathBuf {
    PathBuf::from(edit_fixture(&format!("runs/{run}/{file}")))
}

#[test]
fn default_adapter_and_manifest_names_resolve_from_the_hub_cache() {
    let home = hf_home_with_adapters();
    let dir = tempfile::tempdir().unwrap();

    // No --lora: icedit-moe, its file found from the cached repo's listing.
    let out = dir.path().join("moe.png");
    let run = icedit(
        "edit",
        &with(base_args(&out), &["--json", "--verbose"]),
        home.path(),
    );
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(max_png_diff(&out, &reference_png("moe", "edit.png")) <= 1);
    let r = recipe(&out);
    assert_eq!(r["task"], "edit");
    assert_eq!(r["instruction"], "make it night");
    assert_eq!(r["seed"], 42);
    assert_eq!(r["steps"], 4);
    assert_eq!(r["guidance"], 50.0);
    assert_eq!(r["adapters"][0]["name"], "icedit-moe");
    assert_eq!(r["adapters"][0]["top_k"], 1);
    let source = r["adapters"][0]["source"].as_str().unwrap();
    // The commit the adapter came from, not the branch name.
    let commit = source
        .strip_prefix("sanaka87/ICEdit-MoE-LoRA@")
        .and_then(|r| r.strip_suffix("/moe.safetensors"))
        .unwrap_or_else(|| panic!("{source}"));
    assert!(
        commit.len() == 40 && commit.bytes().all(|b| b.is_ascii_hexdigit()),
        "{source}"
    );
    let summary: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(summary["outputs"][0]["path"], out.to_str().unwrap());
    // --device auto (the default) on a build without CUDA or Metal.
    assert_eq!(summary["device"], "cpu");
    assert_eq!(summary["adapters"][0]["moe_layers"], 3);
    assert_eq!(summary["adapters"][0]["experts"], 4);
    let routing = summary["adapters"][0]["routing"]
        .as_object()
        .expect("routing histogram");
    assert!(routing.contains_key("single_transformer_blocks.*.proj_out"));
    assert!(
        stderr(&run).contains("MoE routing of icedit-moe"),
        "{}",
        stderr(&run)
    );

    // A manifest by name, at run time instead of merged: the PEFT LoRA's reference.
    let out = dir.path().join("normal.png");
    let run = icedit(
        "edit",
        &with(
            base_args(&out),
            &["--lora", "icedit-normal", "--lora-mode", "runtime"],
        ),
        home.path(),
    );
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(max_png_diff(&out, &reference_png("lora_peft", "edit.png")) <= 1);
}

#[test]
fn local_files_scales_seeds_and_diptychs() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();

    // A kohya file with a scale: the weighted PEFT reference (same LoRA, 0.75).
    let out = dir.path().join("kohya.png");
    let run = icedit(
        "edit",
        &with(
            base_args(&out),
            &[
                "--lora",
                &edit_fixture("adapters/lora_kohya.safetensors"),
                "--lora-scale",
                "0.75",
            ],
        ),
        home.path(),
    );
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(max_png_diff(&out, &reference_png("lora_peft_weighted", "edit.png")) <= 1);
    assert_eq!(recipe(&out)["adapters"][0]["scale"], 0.75);

    // Several seeds, top-2 routing, diptychs kept: seed 7 is the moe_top2 reference.
    let pattern = dir.path().join("e_{seed}.png");
    let run = icedit(
        "edit",
        &with(
            base_args(&pattern),
            &[
                "--lora",
                &edit_fixture("adapters/moe_lora.safetensors"),
                "--top-k",
                "2",
                "--seeds",
                "7,8",
                "--save-diptych",
            ],
        ),
        home.path(),
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let (e7, e8) = (dir.path().join("e_7.png"), dir.path().join("e_8.png"));
    assert!(max_png_diff(&e7, &reference_png("moe_top2", "edit.png")) <= 1);
    assert!(
        max_png_diff(
            &dir.path().join("e_7-diptych.png"),
            &reference_png("moe_top2", "diptych_out.png")
        ) <= 1
    );
    assert!(max_png_diff(&e7, &e8) > 10, "another seed, another image");
    assert_eq!(recipe(&e8)["seed"], 8);
    assert_eq!(recipe(&e8)["adapters"][0]["top_k"], 2);

    // The bare model, resized back to the source size.
    let out = dir.path().join("bare.png");
    let run = icedit(
        "edit",
        &with(base_args(&out), &["--no-lora", "--keep-size"]),
        home.path(),
    );
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(max_png_diff(&out, &reference_png("bare", "edit.png")) <= 1);
    assert!(recipe(&out)["adapters"].is_null());
}

#[test]
fn bad_inputs_exit_1_with_a_reason_and_leave_nothing() {
    let home = hf_home_with_adapters();
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"<html>503</html>").unwrap();
    let dev_lora = dir.path().join("dev.safetensors");
    let x_embedder_for_dev: std::collections::HashMap<String, candle_core::Tensor> = [
        ("transformer.x_embedder.lora_A.weight", (4, 64)),
        ("transformer.x_embedder.lora_B.weight", (32, 4)),
    ]
    .into_iter()
    .map(|(k, shape)| {
        let t =
            candle_core::Tensor::zeros(shape, candle_core::DType::F32, &candle_core::Device::Cpu);
        (k.to_string(), t.unwrap())
    })
    .collect();
    candle_core::safetensors::save(&x_embedder_for_dev, &dev_lora).unwrap();
    let latents = dir.path().join("latents.safetensors");
    let wrong: std::collections::HashMap<String, candle_core::Tensor> = [(
        "latents".to_string(),
        candle_core::Tensor::zeros(
            (1, 16, 6, 8),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap(),
    )]
    .into();
    candle_core::safetensors::save(&wrong, &latents).unwrap();

    let out = dir.path().join("out.png");
    let moe = edit_fixture("adapters/moe_lora.safetensors");
    let replace = |args: Vec<String>, flag: &str, value: &str| -> Vec<String> {
        let mut args = args;
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1] = value.to_string();
        args
    };
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "empty instruction",
            replace(base_args(&out), "--instruction", " "),
            "instruction is empty",
        ),
        (
            "unknown adapter name",
            with(base_args(&out), &["--lora", "icedit-nromal"]),
            "icedit-normal, icedit-moe",
        ),
        (
            "corrupt adapter",
            with(base_args(&out), &["--lora", garbage.to_str().unwrap()]),
            "truncated or corrupt",
        ),
        (
            "adapter for another base model",
            with(base_args(&out), &["--lora", dev_lora.to_str().unwrap()]),
            "another base model",
        ),
        (
            "scales do not pair with adapters",
            with(
                base_args(&out),
                &["--lora", &moe, "--lora-scale", "1", "--lora-scale", "2"],
            ),
            "one scale per --lora",
        ),
        (
            "top-k beyond the experts",
            with(base_args(&out), &["--lora", &moe, "--top-k", "9"]),
            "out of range for 4 experts",
        ),
        (
            "width off the grid",
            replace(base_args(&out), "--width", "50"),
            "multiple of 16",
        ),
        (
            "seed twice",
            with(base_args(&out), &["--seeds", "3,3"]),
            "lists 3 twice",
        ),
        (
            "latents for another size",
            with(base_args(&out), &["--latents", latents.to_str().unwrap()]),
            "needs [1, 16, 6, 16]",
        ),
        (
            "output not a PNG",
            replace(
                base_args(&out),
                "--out",
                dir.path().join("o.jpg").to_str().unwrap(),
            ),
            "use a .png name",
        ),
        (
            "output over the input",
            replace(base_args(&out), "--out", &edit_fixture("source.png")),
            "never overwrites its inputs",
        ),
        (
            "missing image",
            replace(base_args(&out), "--image", "/nonexistent/photo.jpg"),
            "/nonexistent/photo.jpg",
        ),
        (
            "adapter repo not cached offline",
            with(base_args(&out), &["--lora", "hf:someone/missing-lora"]),
            "HF_HUB_OFFLINE",
        ),
    ];
    for (what, args, expected) in cases {
        let run = icedit("edit", &args, home.path());
        assert_refused(what, &run, &[expected]);
        assert_nothing_written(what, dir.path(), |n| n.ends_with(".png"));
    }
}

/// Photos of other sizes (tests/reference/gen_edit_geometry.py): resized to the half size with
/// PIL's bicubic, height rounded to the nearest multiple of 16, edited, and with --keep-size
/// resized back, as the reference does it.
#[test]
fn photos_of_any_size_match_the_reference() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(edit_fixture("geometry/cases.json")).unwrap(),
    )
    .unwrap();
    for case in cases["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let source = edit_fixture(&format!("geometry/{name}/source.png"));
        for (keep, reference) in [(false, "edit.png"), (true, "edit_keep.png")] {
            let out = dir.path().join(format!("{name}-{keep}.png"));
            let mut args = base_args(&out);
            let i = args.iter().position(|a| a == "--image").unwrap();
            args[i + 1] = source.clone();
            let i = args.iter().position(|a| a == "--steps").unwrap();
            args[i + 1] = case["steps"].to_string();
            let mut extra = vec![
                "--lora".to_string(),
                edit_fixture("adapters/moe_lora.safetensors"),
                "--seed".to_string(),
                case["seed"].to_string(),
            ];
            if keep {
                extra.push("--keep-size".into());
            }
            args.extend(extra);
            let run = icedit("edit", &args, home.path());
            assert!(run.status.success(), "{name}: {}", stderr(&run));
            let expected = PathBuf::from(edit_fixture(&format!("geometry/{name}/{reference}")));
            let diff = max_png_diff(&out, &expected);
            assert!(diff <= 1, "{name} keep-size {keep}: {diff}/255");
        }
        let edit = image::open(edit_fixture(&format!("geometry/{name}/edit.png")))
            .unwrap()
            .to_rgb8();
        let keep = image::open(edit_fixture(&format!("geometry/{name}/edit_keep.png")))
            .unwrap()
            .to_rgb8();
        // The resize back alone is PIL's, pixel for pixel.
        let (w, h) = keep.dimensions();
        let resized =
            icedit_image::resize::resize_rgb(&edit, w, h, icedit_image::resize::Filter::Bicubic);
        assert_eq!(resized, keep, "{name}: --keep-size resize differs from PIL");
    }
}

/// Best-of-N with a judge served on 127.0.0.1: the judge's choice is written, equal to a plain
/// edit of the winning seed, at steps + (N - 1) x early steps evaluations; candidates and
/// verdicts are kept on request; a broken judge falls back, and with no usable judge at all the
/// search still finishes, with warnings.
#[test]
fn seed_search_with_a_judge_server() {
    use icedit_judge::fake_server::{serve, Reply};
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (url, received) = serve(vec![Reply::Answer("Image 2"), Reply::Answer("1")]);
    let out = dir.path().join("best_{seed}.png");
    let candidates = dir.path().join("candidates");
    let args = with(
        base_args(&out),
        &[
            "--no-lora",
            "--seed",
            "5",
            "--seeds",
            "3",
            "--early-steps",
            "2",
            "--judge",
            &format!("openai:{url}#judge-model"),
            "--save-candidates",
            candidates.to_str().unwrap(),
            "--json",
        ],
    );
    let run = icedit("edit", &args, home.path());
    assert!(run.status.success(), "{}", stderr(&run));
    // 5 vs 6 -> 6 ("Image 2"), then 6 vs 7 -> 6 ("1").
    let best = dir.path().join("best_6.png");
    assert_eq!(recipe(&best)["seed"], 6);
    let plain = dir.path().join("plain.png");
    let run_plain = icedit(
        "edit",
        &with(base_args(&plain), &["--no-lora", "--seed", "6"]),
        home.path(),
    );
    assert!(run_plain.status.success(), "{}", stderr(&run_plain));
    assert_eq!(
        max_png_diff(&best, &plain),
        0,
        "the winner continued = a plain edit"
    );

    let summary: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let search = &summary["search"];
    assert_eq!(search["winner_seed"], 6);
    assert_eq!(search["transformer_evaluations"], 4 + 2 * 2);
    assert_eq!(search["verdicts"].as_array().unwrap().len(), 2);
    assert_eq!(search["verdicts"][0]["answer"], "Image 2");
    assert!(search["verdicts"][1]["seconds"].as_f64().unwrap() >= 0.0);
    for name in [
        "seed5-step2.png",
        "seed6-step2.png",
        "seed7-step2.png",
        "winner-seed6.png",
        "verdicts.json",
    ] {
        assert!(candidates.join(name).exists(), "{name}");
    }
    {
        let received = received.lock().unwrap();
        assert_eq!(received.len(), 2);
        assert_eq!(received[0].body["model"], "judge-model");
        let prompt = received[0].body["messages"][0]["content"][0]["text"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(prompt.contains("\"make it night\""), "{prompt}");
    }

    // Seeds 7 and 9, one early step, judged by `spec`, with `extra` arguments and --json;
    // returns the run, the output and the JSON summary's `search` (null on failure).
    let two_candidates = |name: &str, spec: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut args = vec![
            "--no-lora",
            "--seeds",
            "7,9",
            "--early-steps",
            "1",
            "--judge",
            spec,
            "--json",
        ];
        args.extend_from_slice(extra);
        let run = icedit("edit", &with(base_args(&out), &args), home.path());
        let search = serde_json::from_slice::<serde_json::Value>(&run.stdout)
            .map(|summary| summary["search"].clone())
            .unwrap_or_default();
        (run, out, search)
    };

    // A broken judge first: its retries fail, the next judge decides.
    let (broken, _) = serve(vec![Reply::Status(500)]);
    let (working, _) = serve(vec![Reply::Answer("2")]);
    let spec = format!("openai:{broken},openai:{working}");
    let (run, out, _) = two_candidates("fallback.png", &spec, &["--judge-tries", "2"]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(recipe(&out)["seed"], 9);
    assert!(
        stderr(&run).contains("trying the next judge"),
        "{}",
        stderr(&run)
    );

    // CLIP in-process (tests/fixtures/clip's tiny model) behind a broken server: it decides,
    // and the record says so with its scores.
    let (broken, _) = serve(vec![Reply::Status(500)]);
    let clip = fixtures().join("clip/model");
    let spec = format!("openai:{broken},clip:{}", clip.display());
    let (run, out, search) = two_candidates(
        "clip.png",
        &spec,
        &["--judge-tries", "1", "--source-caption", "a photo of a dog"],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let verdict = &search["verdicts"][0];
    assert_eq!(verdict["judge"], format!("clip:{}", clip.display()));
    assert!(
        verdict["answer"].as_str().unwrap().contains("similarity"),
        "{verdict}"
    );
    assert_eq!(
        recipe(&out)["seed"],
        search["winner_seed"],
        "the written edit is the winner"
    );

    // Qwen3-VL in-process (tests/fixtures/qwen3vl's tiny model): the verdict is the answer
    // digits' probabilities.
    let vlm = fixtures().join("qwen3vl/model");
    let spec = format!("qwen3-vl:{}", vlm.display());
    let (run, out, search) = two_candidates("vlm.png", &spec, &[]);
    assert!(run.status.success(), "{}", stderr(&run));
    let verdict = &search["verdicts"][0];
    assert_eq!(verdict["judge"], spec);
    assert!(
        verdict["answer"].as_str().unwrap().starts_with("P(1) = "),
        "{verdict}"
    );
    assert_eq!(recipe(&out)["seed"], search["winner_seed"]);

    // Candidates in one batch: the same choice, the result equal to rounding.
    let (server, _) = serve(vec![Reply::Answer("2")]);
    let spec = format!("openai:{server}");
    let (run, out, search) = two_candidates("batched.png", &spec, &["--batch-candidates", "2"]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(search["batch_candidates"], 2);
    assert_eq!(recipe(&out)["seed"], 9);
    let plain = dir.path().join("plain9.png");
    let run_plain = icedit(
        "edit",
        &with(base_args(&plain), &["--no-lora", "--seed", "9"]),
        home.path(),
    );
    assert!(run_plain.status.success(), "{}", stderr(&run_plain));
    assert!(max_png_diff(&out, &plain) <= 1);

    // No usable judge: the first candidate stands, with a warning, and the job still ends well.
    let (nonsense, _) = serve(vec![Reply::Answer("both are lovely")]);
    let (run, out, _) = two_candidates(
        "nojudge.png",
        &format!("openai:{nonsense}"),
        &["--judge-tries", "1"],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(recipe(&out)["seed"], 7);
    assert!(
        stderr(&run).contains("keeping the first edit"),
        "{}",
        stderr(&run)
    );

    // Bad search requests fail before any work.
    for (extra, expected) in [
        (
            vec!["--judge", "openai:http://127.0.0.1:9"],
            "give --seeds N",
        ),
        (
            vec![
                "--judge",
                "openai:http://127.0.0.1:9",
                "--seeds",
                "3",
                "--early-steps",
                "4",
            ],
            "--early-steps must be between 1",
        ),
        (vec!["--judge", "ollama", "--seeds", "3"], "unknown judge"),
        (
            vec![
                "--judge",
                "openai:http://127.0.0.1:9",
                "--seeds",
                "2",
                "--early-steps",
                "1",
                "--batch-candidates",
                "0",
            ],
            "--batch-candidates must be at least 1",
        ),
        (
            vec![
                "--no-lora",
                "--judge",
                "clip:/no/such/clip",
                "--seeds",
                "2",
                "--early-steps",
                "1",
            ],
            "cannot get the model /no/such/clip",
        ),
        (
            vec![
                "--judge",
                "clip",
                "--seeds",
                "2",
                "--clip-similarity-weight=-1",
            ],
            "--clip-similarity-weight -1 must be",
        ),
    ] {
        let out = dir.path().join("bad.png");
        let run = icedit("edit", &with(base_args(&out), &extra), home.path());
        assert_refused(&format!("{extra:?}"), &run, &[expected]);
        assert!(!out.exists());
    }
}

/// `--mask` / `--region` on a Fill model: the photo comes back at its own size with every pixel
/// outside the mask and its feather untouched, `--json` reports the window and the tokens, and
/// the two ways of giving the region agree.
#[test]
fn masked_edits_keep_the_photo_outside_the_mask() {
    let home = hf_home_with_adapters();
    let dir = tempfile::tempdir().unwrap();
    let photo = dir.path().join("photo.png");
    let source = image::RgbImage::from_fn(300, 200, |x, y| {
        image::Rgb([(x * 3) as u8, (y * 5) as u8, ((x + y) * 2) as u8])
    });
    source.save(&photo).unwrap();
    let mask_path = dir.path().join("mask.png");
    let region = (120u32, 60u32, 40u32, 30u32);
    let mut mask = image::GrayImage::new(300, 200);
    for y in region.1..region.1 + region.3 {
        for x in region.0..region.0 + region.2 {
            mask.put_pixel(x, y, image::Luma([255]));
        }
    }
    mask.save(&mask_path).unwrap();
    let args = |out: &Path, extra: &[&str]| {
        let mut args = strings(&[
            "--model",
            &model(),
            "--image",
            photo.to_str().unwrap(),
            "--instruction",
            "make it night",
            "--width",
            "64",
            "--steps",
            "2",
            "--dtype",
            "f32",
            "--max-seq-len",
            "16",
            "--no-lora",
            "--quiet",
            "--json",
            "--feather",
            "4",
            "--out",
            out.to_str().unwrap(),
        ]);
        args.extend(strings(extra));
        args
    };
    let by_mask = dir.path().join("by-mask.png");
    let run = icedit(
        "edit",
        &args(&by_mask, &["--mask", mask_path.to_str().unwrap()]),
        home.path(),
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let summary: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let window = &summary["masked"]["window"];
    assert_eq!(summary["masked"]["photo"], serde_json::json!([300, 200]));
    // 40x30 at 120,60 grown by a quarter of 40 (10 px) on each side, snapped outward to 16:
    // 96..176 x 48..112.
    assert_eq!(window, &serde_json::json!([96, 48, 80, 64]));
    let tokens = summary["transformer_image_tokens"].as_u64().unwrap();
    assert!(tokens < (300 / 16) * (200 / 16) * 2, "{tokens} tokens");
    let out = image::open(&by_mask).unwrap().to_rgb8();
    assert_eq!(out.dimensions(), (300, 200));
    let near = |x: u32, y: u32| {
        let (x, y) = (x as i64, y as i64);
        let (rx, ry) = (region.0 as i64, region.1 as i64);
        x >= rx - 6 && x < rx + region.2 as i64 + 6 && y >= ry - 6 && y < ry + region.3 as i64 + 6
    };
    let mut changed = 0;
    for (x, y, px) in out.enumerate_pixels() {
        if !near(x, y) {
            assert_eq!(px, source.get_pixel(x, y), "({x}, {y}) changed");
        } else {
            changed += (px != source.get_pixel(x, y)) as usize;
        }
    }
    assert!(changed > 0);
    assert_eq!(recipe(&by_mask)["mask"], mask_path.to_str().unwrap());

    let by_region = dir.path().join("by-region.png");
    let run = icedit(
        "edit",
        &args(&by_region, &["--region", "120,60,40,30"]),
        home.path(),
    );
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(
        max_png_diff(&by_mask, &by_region),
        0,
        "--region equals the mask"
    );

    let empty = dir.path().join("empty.png");
    image::GrayImage::new(300, 200).save(&empty).unwrap();
    let refused = |extra: &[&str], expected: &str| {
        let out = dir.path().join("refused.png");
        let run = icedit("edit", &args(&out, extra), home.path());
        assert_refused(&format!("{extra:?}"), &run, &[expected]);
        assert!(!out.exists());
    };
    refused(&[], "--context and --feather shape a masked edit");
    refused(&["--mask", empty.to_str().unwrap()], "selects nothing");
    refused(&["--region", "290,190,20,20"], "reaches outside");
    refused(&["--region", "1,2,3"], "x,y,w,h");
    refused(&["--region", "120,60,40,30", "--keep-size"], "--keep-size");
    refused(
        &["--region", "120,60,40,30", "--context", "big"],
        "--context",
    );
    refused(
        &["--mask", edit_fixture("mask.png").as_str()],
        "a mask of the photo's size",
    );
}

/// `--fast` is the default adapter with the turbo LoRA stacked on it, at 8 steps: exactly the
/// edit those flags spelled out give (the stacking itself is tied to diffusers by
/// crates/icedit-pipeline/tests/stacked_adapters.rs).
#[test]
fn fast_is_the_default_adapter_plus_turbo_at_8_steps() {
    let home = hf_home_with_adapters();
    // The turbo repo in the cache, holding a stand-in LoRA of the tiny model's shapes.
    let folder = tempfile::tempdir().unwrap();
    std::fs::copy(
        edit_fixture("adapters/lora_peft.safetensors"),
        folder.path().join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    icedit_hub::import_folder(
        &home.path().join("hub"),
        "alimama-creative/FLUX.1-Turbo-Alpha",
        folder.path(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base = |out: &Path| {
        let mut args = base_args(out);
        let i = args.iter().position(|a| a == "--steps").unwrap();
        args.drain(i..i + 2);
        args.push("--json".into());
        args
    };
    let fast = dir.path().join("fast.png");
    let run = icedit("edit", &with(base(&fast), &["--fast"]), home.path());
    assert!(run.status.success(), "{}", stderr(&run));
    let summary: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(summary["steps"], 8);
    let names: Vec<&str> = summary["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["icedit-moe", "turbo-alpha"]);
    assert!(
        stderr(&run).contains("trained on black-forest-labs/FLUX.1-dev"),
        "the turbo LoRA's base model is named: {}",
        stderr(&run)
    );
    let spelled = dir.path().join("spelled.png");
    let run = icedit(
        "edit",
        &with(
            base(&spelled),
            &[
                "--lora",
                "icedit-moe",
                "--lora",
                "turbo-alpha",
                "--steps",
                "8",
            ],
        ),
        home.path(),
    );
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(max_png_diff(&fast, &spelled), 0);
    // A scale pairs with the user's own --lora; the turbo LoRA keeps its manifest's.
    let scaled = dir.path().join("scaled.png");
    let run = icedit(
        "edit",
        &with(
            base(&scaled),
            &["--fast", "--lora", "icedit-moe", "--lora-scale", "0.5"],
        ),
        home.path(),
    );
    assert!(run.status.success(), "{}", stderr(&run));
}

/// `--cache`: a threshold of 0 computes every step (the plain edit, bit for bit); TaylorSeer
/// predicts on its schedule; `--json` and the recipe say what ran; bad specs are refused.
#[test]
fn step_caches_on_the_command_line() {
    let home = hf_home_with_adapters();
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.png");
    let run = icedit("edit", &base_args(&plain), home.path());
    assert!(run.status.success(), "{}", stderr(&run));

    let zero = dir.path().join("zero.png");
    let run = icedit(
        "edit",
        &with(base_args(&zero), &["--cache", "first-block:0", "--json"]),
        home.path(),
    );
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(max_png_diff(&plain, &zero), 0, "threshold 0 is no cache");
    let summary: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let out = &summary["outputs"][0];
    assert_eq!(
        out["computed_steps"],
        serde_json::json!([[true, true, true, true]])
    );
    assert_eq!(out["full_evaluations"], 4);
    assert_eq!(recipe(&zero)["cache"], "first-block:0");

    let taylor = dir.path().join("taylor.png");
    let run = icedit(
        "edit",
        &with(
            base_args(&taylor),
            &["--cache", "taylorseer:interval=2,warmup=1", "--json"],
        ),
        home.path(),
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let summary: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let out = &summary["outputs"][0];
    // warm-up 1, interval 2: step 0 computes, 1 is predicted, 2 computes, 3 is predicted.
    assert_eq!(
        out["computed_steps"],
        serde_json::json!([[true, false, true, false]])
    );
    assert_eq!(out["transformer_evaluations"], 4);
    assert_eq!(out["full_evaluations"], 2);
    assert!(
        max_png_diff(&plain, &taylor) > 0,
        "predicted steps change the result"
    );

    for (spec, expected) in [
        ("magcache", "unknown cache"),
        ("first-block:-1", "0 or more"),
    ] {
        let out = dir.path().join("bad.png");
        let run = icedit(
            "edit",
            &with(base_args(&out), &["--cache", spec]),
            home.path(),
        );
        assert_eq!(run.status.code(), Some(1));
        assert!(stderr(&run).contains(expected), "{spec}: {}", stderr(&run));
        assert!(!out.exists());
    }
}
