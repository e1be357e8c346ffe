//! Memory flags of `icedit edit`: `--quantize` (a dense transformer quantized at load, equal to
//! the GGUF file `icedit quantize` writes, which is itself checked against gguf-py and
//! diffusers), `--offload` (which on the CPU computes what a resident model computes), and the
//! plan `--max-memory` prints before loading, with its refusals.

use std::path::Path;
use std::process::{Command, Output};

#[path = "../../../tests/support/cli.rs"]
mod cli_support;
use cli_support::*;
use icedit_test_support::fixtures;

fn path(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// A quiet [`edit_args`] run.
fn edit(model: &Path, out: &Path, extra: &[&str], home: &Path) -> Output {
    let mut args = edit_args(model, out, extra);
    args.push("--quiet".into());
    icedit("edit", &args, home)
}

/// A 4-step f32 edit of the GGUF fixtures' photo at 64-pixel halves, with `extra` flags (and
/// no adapter unless they name one).
fn edit_args(model: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = strings(&[
        "--model",
        &path(model),
        "--image",
        &path(&fixtures().join("gguf/source.png")),
        "--instruction",
        "make it night",
        "--width",
        "64",
        "--steps",
        "4",
        "--seed",
        "42",
        "--dtype",
        "f32",
        "--out",
        &path(out),
    ]);
    if !extra.contains(&"--lora") {
        args.push("--no-lora".into());
    }
    args.extend(strings(extra));
    args
}

fn quantize(model: &Path, ty: &str, out: &Path, home: &Path) {
    let args = strings(&[
        "--model",
        &path(model),
        "--type",
        ty,
        "--out",
        &path(out),
        "--quiet",
    ]);
    let run = icedit("quantize", &args, home);
    assert!(run.status.success(), "quantize {ty}: {}", stderr(&run));
}

/// The tiny pipeline with a transformer folder holding only `config` (a GGUF user's download).
fn pipeline_without_transformer_weights(config: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let tiny = fixtures().join("fill_pipeline/tiny");
    for part in [
        "model_index.json",
        "scheduler",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "vae",
    ] {
        copy(&tiny.join(part), &dir.path().join(part));
    }
    std::fs::create_dir(dir.path().join("transformer")).unwrap();
    std::fs::copy(config, dir.path().join("transformer/config.json")).unwrap();
    dir
}

fn copy(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap().path();
            copy(&entry, &to.join(entry.file_name().unwrap()));
        }
    } else if from.exists() {
        std::fs::copy(from, to).unwrap();
    }
}

fn json_of(run: &Output) -> serde_json::Value {
    serde_json::from_slice(&run.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&run.stdout),
            stderr(run)
        )
    })
}

#[test]
fn quantizing_at_load_equals_the_file_icedit_quantize_writes() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tiny = fixtures().join("fill_pipeline/tiny");

    // The tiny pipeline's diffusers-layout transformer (rows of 32: Q8_0 and Q4_0 blocks).
    for ty in ["q8_0", "q4_0"] {
        let file = dir.path().join(format!("tiny_{ty}.gguf"));
        quantize(&tiny.join("transformer"), ty, &file, home.path());
        let (at_load, from_file) = (
            dir.path().join(format!("{ty}_at_load.png")),
            dir.path().join(format!("{ty}_file.png")),
        );
        let run = edit(&tiny, &at_load, &["--quantize", ty], home.path());
        assert!(run.status.success(), "{ty}: {}", stderr(&run));
        let run = edit(
            &tiny,
            &from_file,
            &["--transformer", &path(&file)],
            home.path(),
        );
        assert!(run.status.success(), "{ty}: {}", stderr(&run));
        assert_eq!(max_png_diff(&at_load, &from_file), 0, "{ty}");
        let weights = recipe(&at_load)["weights"].as_str().unwrap().to_string();
        assert!(weights.contains("quantized to"), "{weights}");
    }

    // FLUX's 128-wide heads (rows of 256: k-quant blocks), from a dense F32 GGUF in BFL naming.
    let dense = dir.path().join("dense.gguf");
    quantize(
        &fixtures().join("gguf/flux_q8_0.gguf"),
        "f32",
        &dense,
        home.path(),
    );
    let model =
        pipeline_without_transformer_weights(&fixtures().join("gguf/transformer/config.json"));
    for ty in ["q4_k", "q6_k"] {
        let file = dir.path().join(format!("wide_{ty}.gguf"));
        quantize(&dense, ty, &file, home.path());
        let (at_load, from_file) = (
            dir.path().join(format!("wide_{ty}_at_load.png")),
            dir.path().join(format!("wide_{ty}_file.png")),
        );
        let dense_spec = path(&dense);
        let run = edit(
            model.path(),
            &at_load,
            &["--transformer", &dense_spec, "--quantize", ty, "--json"],
            home.path(),
        );
        assert!(run.status.success(), "{ty}: {}", stderr(&run));
        assert_eq!(
            json_of(&run)["memory"]["quantize"],
            ty.to_uppercase().replace("_K", "K")
        );
        let run = edit(
            model.path(),
            &from_file,
            &["--transformer", &path(&file)],
            home.path(),
        );
        assert!(run.status.success(), "{ty}: {}", stderr(&run));
        assert_eq!(max_png_diff(&at_load, &from_file), 0, "{ty}");
    }
}

#[test]
fn offload_computes_alike_on_the_cpu_and_reports_memory() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tiny = fixtures().join("fill_pipeline/tiny");
    let plain = dir.path().join("plain.png");
    let run = edit(&tiny, &plain, &[], home.path());
    assert!(run.status.success(), "{}", stderr(&run));
    for offload in ["model", "blocks"] {
        let out = dir.path().join(format!("{offload}.png"));
        let run = edit(&tiny, &out, &["--offload", offload, "--json"], home.path());
        assert!(run.status.success(), "{offload}: {}", stderr(&run));
        assert_eq!(max_png_diff(&plain, &out), 0, "{offload}");
        let memory = &json_of(&run)["memory"];
        assert_eq!(memory["offload"], offload);
        assert!(
            memory["peak_rss_bytes"].as_u64().unwrap() > 10 << 20,
            "{memory}"
        );
        // No CUDA device here: nothing to read from a driver.
        assert!(memory["peak_device_bytes"].is_null(), "{memory}");
    }
}

#[test]
fn max_memory_prints_its_plan_before_loading_and_refuses_what_cannot_fit() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tiny = fixtures().join("fill_pipeline/tiny");

    let out = dir.path().join("planned.png");
    let run = edit(&tiny, &out, &["--max-memory", "2G", "--json"], home.path());
    assert!(run.status.success(), "{}", stderr(&run));
    let plan = &json_of(&run)["memory"]["plan"];
    assert_eq!(plan["budget_bytes"], 2u64 << 30);
    assert_eq!(
        plan["offload"], "none",
        "the tiny model fits as it is: {plan}"
    );
    assert!(
        plan["predicted_peak_bytes"].as_u64().unwrap() <= 2 << 30,
        "{plan}"
    );
    // Without --quiet, the plan is printed before the transformer loads.
    let verbose = Command::new(env!("CARGO_BIN_EXE_icedit"))
        .arg("edit")
        .args(edit_args(
            &tiny,
            &dir.path().join("verbose.png"),
            &["--max-memory", "2G"],
        ))
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", home.path())
        .output()
        .unwrap();
    let err = stderr(&verbose);
    assert!(verbose.status.success(), "{err}");
    let plan_at = err
        .find("memory plan for 2.0 GiB")
        .unwrap_or_else(|| panic!("{err}"));
    let load_at = err
        .find("loading transformer")
        .unwrap_or_else(|| panic!("{err}"));
    assert!(plan_at < load_at, "{err}");

    // Refused, exit 1, nothing written: a budget nothing fits, a size that is not one, a type
    // icedit does not quantize to, and a plan beside the flags it would choose.
    let refused = dir.path().join("refused.png");
    for (what, flags, expected) in [
        (
            "tiny budget",
            vec!["--max-memory", "64K"],
            vec!["no plan fits"],
        ),
        (
            "not a size",
            vec!["--max-memory", "lots"],
            vec!["--max-memory lots", "24G"],
        ),
        (
            "unknown type",
            vec!["--quantize", "q9_9"],
            vec!["--quantize q9_9", "q4_k"],
        ),
    ] {
        let run = edit(&tiny, &refused, &flags, home.path());
        assert_refused(what, &run, &expected);
        assert!(!stderr(&run).contains("loading transformer"), "{what}");
    }
    let run = edit(
        &tiny,
        &refused,
        &["--max-memory", "8G", "--offload", "blocks"],
        home.path(),
    );
    assert_eq!(run.status.code(), Some(2), "{}", stderr(&run));
    assert!(
        stderr(&run).contains("cannot be used with"),
        "{}",
        stderr(&run)
    );
    assert_nothing_written("refused runs", dir.path(), |n| n.starts_with("refused"));
}

/// `icedit quantize --lora`: a LoRA merged into the weights before quantizing. At F32 the file
/// computes exactly what `icedit edit --lora` (merged at load, itself checked against PEFT)
/// computes; a mixture of LoRA experts is refused, and nothing is written.
#[test]
fn quantize_merges_a_lora_first() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dense = dir.path().join("dense.gguf");
    quantize(
        &fixtures().join("gguf/flux_q8_0.gguf"),
        "f32",
        &dense,
        home.path(),
    );
    let model =
        pipeline_without_transformer_weights(&fixtures().join("gguf/transformer/config.json"));
    let lora = path(&fixtures().join("gguf/adapters/lora_peft.safetensors"));
    let with_lora = |ty: &str| {
        let out = dir.path().join(format!("merged_{ty}.gguf"));
        let args = strings(&[
            "--model",
            &path(&dense),
            "--type",
            ty,
            "--lora",
            &lora,
            "--lora-scale",
            "0.8",
            "--out",
            &path(&out),
            "--quiet",
        ]);
        let run = icedit("quantize", &args, home.path());
        assert!(run.status.success(), "{ty}: {}", stderr(&run));
        out
    };
    let merged = with_lora("f32");
    let (from_file, at_load) = (dir.path().join("file.png"), dir.path().join("at_load.png"));
    let run = edit(
        model.path(),
        &from_file,
        &["--transformer", &path(&merged)],
        home.path(),
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let args = [
        "--transformer",
        &path(&dense),
        "--lora",
        &lora,
        "--lora-scale",
        "0.8",
    ];
    let run = edit(model.path(), &at_load, &args, home.path());
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(max_png_diff(&from_file, &at_load), 0);

    // Quantized with the LoRA merged: not the bare quantized model.
    let (merged_q, bare_q) = (with_lora("q8_0"), dir.path().join("bare_q8_0.gguf"));
    quantize(&dense, "q8_0", &bare_q, home.path());
    let (a, b) = (
        dir.path().join("merged_q.png"),
        dir.path().join("bare_q.png"),
    );
    for (file, out) in [(&merged_q, &a), (&bare_q, &b)] {
        let run = edit(
            model.path(),
            out,
            &["--transformer", &path(file)],
            home.path(),
        );
        assert!(run.status.success(), "{}", stderr(&run));
    }
    assert!(max_png_diff(&a, &b) > 0, "the LoRA changed nothing");

    let refused = dir.path().join("refused.gguf");
    let args = strings(&[
        "--model",
        &path(&dense),
        "--type",
        "q8_0",
        "--lora",
        &path(&fixtures().join("gguf/adapters/moe_lora.safetensors")),
        "--out",
        &path(&refused),
        "--quiet",
    ]);
    let run = icedit("quantize", &args, home.path());
    assert_refused("MoE-LoRA", &run, &["mixture of LoRA experts", "--lora"]);
    assert_nothing_written("MoE-LoRA", dir.path(), |n| n.starts_with("refused"));
}
