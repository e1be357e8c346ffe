//! `icedit edit` on a FLUX.1 Kontext model, end to end against diffusers' Kontext pipelines
//! (tests/fixtures/kontext, made by tests/reference/gen_kontext.py): the model kind read from
//! `model_index.json`, Kontext's defaults, true CFG, a masked edit, the BFL single file, a folder
//! without `model_index.json`, and the flags and adapters that belong to the other model.

use std::path::{Path, PathBuf};

#[path = "../../../tests/support/cli.rs"]
mod cli_support;
use cli_support::*;
use icedit_test_support::fixtures;

fn kontext(rel: &str) -> String {
    fixtures()
        .join("kontext")
        .join(rel)
        .to_str()
        .unwrap()
        .to_string()
}

/// The reference run `name` as CLI arguments (its photo, size, steps, seed or latents).
fn run_args(name: &str, model: &str, out: &Path) -> Vec<String> {
    let runs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(kontext("reference/runs.json")).unwrap())
            .unwrap();
    let run = runs["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap()
        .clone();
    let folder = |f: &str| kontext(&format!("reference/{name}/{f}"));
    let mut args = strings(&[
        "--model",
        model,
        "--image",
        &folder("image.png"),
        "--instruction",
        run["prompt"].as_str().unwrap(),
        "--steps",
        &run["steps"].to_string(),
        "--seed",
        &run["seed"].to_string(),
        "--max-seq-len",
        &run["max_sequence_length"].to_string(),
        "--dtype",
        "f32",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    // Kontext's default guidance is the references' 2.5: only other values are given.
    if run["guidance"].as_f64() != Some(2.5) {
        args.extend(strings(&["--guidance", &run["guidance"].to_string()]));
    }
    if !run["auto_resize"].as_bool().unwrap() {
        args.push("--no-auto-resize".into());
    }
    if run["pipeline"] == "kontext_inpaint" {
        args.extend(strings(&["--mask", &folder("mask.png")]));
    } else {
        args.extend(strings(&[
            "--width",
            &run["width"].to_string(),
            "--height",
            &run["height"].to_string(),
        ]));
    }
    if run["given_latents"].as_bool().unwrap() {
        args.extend(strings(&["--latents", &folder("latents.safetensors")]));
    }
    if let Some(negative) = run["negative_prompt"].as_str() {
        args.extend(strings(&[
            "--negative-prompt",
            negative,
            "--true-cfg",
            &run["true_cfg_scale"].to_string(),
        ]));
    }
    args
}

fn assert_matches_reference(name: &str, out: &Path) {
    let reference = PathBuf::from(kontext(&format!("reference/{name}/out.png")));
    let diff = max_png_diff(out, &reference);
    assert!(diff <= 1, "{name}: {diff}/255 from diffusers");
}

#[test]
fn kontext_edits_match_diffusers() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let model = kontext("tiny");
    for name in ["latents", "true_cfg", "inpaint", "other_size"] {
        let out = dir.path().join(format!("{name}.png"));
        let mut args = run_args(name, &model, &out);
        args.push("--json".into());
        let run = icedit("edit", &args, home.path());
        assert!(run.status.success(), "{name}: {}", stderr(&run));
        assert_matches_reference(name, &out);
        let summary: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
        assert_eq!(summary["pipeline"], "FluxKontextPipeline", "{name}");
        assert_eq!(
            summary["adapters"],
            serde_json::json!([]),
            "no default adapter"
        );
        let passes = if name == "true_cfg" { 2 } else { 1 };
        assert_eq!(summary["transformer_passes_per_step"], passes, "{name}");
        let recipe = recipe(&out);
        assert_eq!(recipe["pipeline"], "kontext", "{name}");
        assert_eq!(
            recipe["prompt"], recipe["instruction"],
            "{name}: prompt as typed"
        );
        if name == "inpaint" {
            assert!(recipe["mask"].as_str().unwrap().ends_with("mask.png"));
            assert_eq!(summary["kontext"]["masked"], true);
        }
        if name == "true_cfg" {
            assert_eq!(recipe["negative_prompt"], "blurry");
            assert_eq!(recipe["true_cfg_scale"], 2.0);
        }
    }
}

/// The BFL single file (`flux1-kontext-dev.safetensors`) in place of the pipeline's
/// transformer, and a folder without `model_index.json` named by `--pipeline kontext`.
#[test]
fn single_files_and_folders_without_an_index() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bfl.png");
    let mut args = run_args("latents", &kontext("tiny"), &out);
    args.extend(strings(&[
        "--transformer",
        &kontext("tiny/flux1-kontext-dev.safetensors"),
    ]));
    let run = icedit("edit", &args, home.path());
    assert!(run.status.success(), "{}", stderr(&run));
    assert_matches_reference("latents", &out);

    // A folder with no model_index.json: a 64-channel transformer could be FLUX.1 dev.
    let folder = dir.path().join("no-index");
    copy_dir(Path::new(&kontext("tiny")), &folder);
    std::fs::remove_file(folder.join("model_index.json")).unwrap();
    let out = dir.path().join("named.png");
    let args = run_args("latents", folder.to_str().unwrap(), &out);
    let run = icedit("edit", &args, home.path());
    assert_eq!(run.status.code(), Some(1));
    assert!(
        stderr(&run).contains("--pipeline kontext"),
        "{}",
        stderr(&run)
    );
    assert!(!out.exists());
    let mut named = args.clone();
    named.extend(strings(&["--pipeline", "kontext"]));
    let run = icedit("edit", &named, home.path());
    assert!(run.status.success(), "{}", stderr(&run));
    assert_matches_reference("latents", &out);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Flags and adapters of the other model, and bad Kontext inputs: exit 1 with the reason,
/// nothing written.
#[test]
fn the_other_models_flags_and_adapters_are_refused() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let model = kontext("tiny");
    let fill_model = fixtures().join("fill_pipeline/tiny");
    let base = run_args("latents", &model, &out);
    let with = |extra: &[&str]| {
        let mut args = base.clone();
        args.extend(strings(extra));
        args
    };
    let without = |flag: &str, values: usize| {
        let mut args = base.clone();
        let i = args.iter().position(|a| a == flag).unwrap();
        args.drain(i..=i + values);
        args
    };
    let replace = |flag: &str, value: &str| {
        let mut args = base.clone();
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1] = value.to_string();
        args
    };
    // Masked edits have the photo's size: no --width/--height.
    let masked = |mask: &Path| -> Vec<String> {
        let sized = ["--width", "--height"];
        let mut args = Vec::new();
        let mut skip = false;
        for a in &base {
            if std::mem::take(&mut skip) {
                continue;
            }
            if sized.contains(&a.as_str()) {
                skip = true;
                continue;
            }
            args.push(a.clone());
        }
        args.extend(strings(&["--mask", mask.to_str().unwrap()]));
        args
    };
    let small_mask = dir.path().join("small-mask.png");
    image::GrayImage::from_pixel(16, 16, image::Luma([255]))
        .save(&small_mask)
        .unwrap();
    let black_mask = dir.path().join("black-mask.png");
    image::GrayImage::new(64, 48).save(&black_mask).unwrap();
    let fill_transformer = fixtures().join("gguf/flux_q8_0.gguf");
    let cases: Vec<(&str, &str, Vec<String>, &str)> = vec![
        (
            "ICEdit's adapter on Kontext",
            "edit",
            with(&["--lora", "icedit-moe"]),
            "trained on black-forest-labs/FLUX.1-Fill-dev",
        ),
        (
            "a diptych on Kontext",
            "edit",
            with(&["--save-diptych"]),
            "--save-diptych is for ICEdit on FLUX.1 Fill models",
        ),
        (
            "Kontext flags on Fill",
            "edit",
            replace("--model", fill_model.to_str().unwrap()),
            "--height is for FLUX.1 Kontext models",
        ),
        (
            "--pipeline fill on a Kontext model",
            "edit",
            with(&["--pipeline", "fill"]),
            "not the FLUX.1 Fill asked for",
        ),
        (
            "a Fill transformer in a Kontext pipeline",
            "edit",
            with(&["--transformer", fill_transformer.to_str().unwrap()]),
            "384",
        ),
        (
            "a mask with a size",
            "edit",
            with(&["--mask", black_mask.to_str().unwrap()]),
            "drop the width, height",
        ),
        (
            "width without height",
            "edit",
            without("--height", 1),
            "width and height together",
        ),
        (
            "true CFG of 1",
            "edit",
            with(&["--negative-prompt", "blurry", "--true-cfg", "1"]),
            "above 1",
        ),
        (
            "a mask of another size",
            "edit",
            masked(&small_mask),
            "a mask of the photo's size",
        ),
        (
            "a mask selecting nothing",
            "edit",
            masked(&black_mask),
            "selects nothing",
        ),
        (
            "fill on a Kontext model",
            "fill",
            strings(&[
                "--model",
                &model,
                "--image",
                &kontext("reference/inpaint/image.png"),
                "--mask",
                &kontext("reference/inpaint/mask.png"),
                "--prompt",
                "night",
                "--out",
                out.to_str().unwrap(),
            ]),
            "icedit fill runs FLUX.1 Fill",
        ),
    ];
    for (what, command, args, expected) in cases {
        let run = icedit(command, &args, home.path());
        assert_refused(what, &run, &[expected]);
        assert_nothing_written(what, dir.path(), |n| n.starts_with("out"));
    }
}

/// The built-in Kontext LoRA manifest resolves from the Hub cache (here holding the reference's
/// LoRA under the manifest's repo and file names) and edits as diffusers does with that LoRA; on
/// a Fill model it is refused before anything loads.
#[test]
fn the_kontext_lora_manifest_resolves_and_matches_diffusers() {
    let home = tempfile::tempdir().unwrap();
    let folder = tempfile::tempdir().unwrap();
    std::fs::copy(
        kontext("adapters/lora_peft.safetensors"),
        folder.path().join("flux-kontext-dev-ps1-lora.safetensors"),
    )
    .unwrap();
    icedit_hub::import_folder(
        &home.path().join("hub"),
        "fofr/flux-kontext-dev-ps1-lora",
        folder.path(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lora.png");
    let mut args = run_args("lora", &kontext("tiny"), &out);
    args.extend(strings(&["--lora", "kontext-ps1", "--json"]));
    let run = icedit("edit", &args, home.path());
    assert!(run.status.success(), "{}", stderr(&run));
    assert_matches_reference("lora", &out);
    let summary: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(summary["adapters"][0]["name"], "kontext-ps1");
    assert_eq!(summary["adapters"][0]["lora_layers"], 20);

    let fill = fixtures().join("fill_pipeline/tiny");
    let out = dir.path().join("fill.png");
    let run = icedit(
        "edit",
        &strings(&[
            "--model",
            fill.to_str().unwrap(),
            "--image",
            &kontext("reference/latents/image.png"),
            "--instruction",
            "make it night",
            "--lora",
            "kontext-ps1",
            "--out",
            out.to_str().unwrap(),
        ]),
        home.path(),
    );
    assert_eq!(run.status.code(), Some(1));
    assert!(
        stderr(&run).contains("trained on black-forest-labs/FLUX.1-Kontext-dev"),
        "{}",
        stderr(&run)
    );
    assert!(!out.exists());
}

/// A GGUF of the Kontext transformer (written by `icedit quantize` from the tiny pipeline)
/// loads in place of the pipeline's weights: at F32 it is the same model, so the edit is
/// diffusers' within 1/255, and the recipe names the file and its storage.
#[test]
fn a_gguf_kontext_transformer_edits_as_the_original() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("kontext-f32.gguf");
    let run = icedit(
        "quantize",
        &strings(&[
            "--model",
            &kontext("tiny"),
            "--type",
            "f32",
            "--out",
            gguf.to_str().unwrap(),
        ]),
        home.path(),
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let out = dir.path().join("gguf.png");
    let mut args = run_args("latents", &kontext("tiny"), &out);
    args.extend(strings(&["--transformer", gguf.to_str().unwrap()]));
    let run = icedit("edit", &args, home.path());
    assert!(run.status.success(), "{}", stderr(&run));
    assert_matches_reference("latents", &out);
    let recipe = recipe(&out);
    assert!(
        recipe["weights"].as_str().unwrap().starts_with("GGUF"),
        "{recipe}"
    );
    assert!(recipe["transformer"]
        .as_str()
        .unwrap()
        .ends_with("kontext-f32.gguf"));
}
