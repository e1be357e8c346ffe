//! `icedit edit` and `icedit fill` with a GGUF transformer (`--transformer`), against diffusers'
//! FluxFillPipeline on the same GGUF files (tests/reference/gen_gguf.py): the pipeline folder
//! holds only the transformer's config.json, as a GGUF user's download does; Q8_0 and Q4_K,
//! bare, with a LoRA and with the MoE-LoRA; from a local file and from the Hub cache; and the
//! errors (missing file, a GGUF for another model, an output onto the GGUF), exiting 1.

use std::path::Path;

#[path = "../../../tests/support/cli.rs"]
mod cli_support;
use cli_support::*;
use icedit_test_support::fixtures;

fn gguf(rel: &str) -> String {
    fixtures()
        .join("gguf")
        .join(rel)
        .to_str()
        .unwrap()
        .to_string()
}

/// The tiny pipeline's text encoders, VAE and scheduler, with a transformer folder holding
/// only the GGUF transformer's config.json: no transformer weights at all.
fn gguf_user_pipeline() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let tiny = fixtures().join("fill_pipeline/tiny");
    copy_tree(&tiny, dir.path(), &|p| {
        !p.starts_with(tiny.join("transformer"))
    });
    std::fs::create_dir(dir.path().join("transformer")).unwrap();
    std::fs::copy(
        gguf("transformer/config.json"),
        dir.path().join("transformer/config.json"),
    )
    .unwrap();
    dir
}

fn copy_tree(from: &Path, to: &Path, keep: &dyn Fn(&Path) -> bool) {
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        if !keep(&path) {
            continue;
        }
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            std::fs::create_dir(&target).unwrap();
            copy_tree(&path, &target, keep);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

/// The reference's edit: 64-pixel halves, 4 steps, guidance 50 (edit's default), f32.
fn edit_args(model: &Path, transformer: &str, out: &Path) -> Vec<String> {
    strings(&[
        "--model",
        model.to_str().unwrap(),
        "--transformer",
        transformer,
        "--image",
        &gguf("source.png"),
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
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ])
}

#[test]
fn gguf_edits_match_diffusers_gguf_pipelines() {
    let model = gguf_user_pipeline();
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (run, file, adapter) in [
        ("q8_0_bare", "flux_q8_0.gguf", None),
        ("q4_k_bare", "flux_q4_k.gguf", None),
        (
            "q4_k_lora",
            "flux_q4_k.gguf",
            Some("adapters/lora_peft.safetensors"),
        ),
        (
            "q8_0_moe",
            "flux_q8_0.gguf",
            Some("adapters/moe_lora.safetensors"),
        ),
    ] {
        let out = dir.path().join(format!("{run}.png"));
        let mut args = edit_args(model.path(), &gguf(file), &out);
        match adapter {
            Some(adapter) => args.extend(strings(&["--lora", &gguf(adapter)])),
            None => args.push("--no-lora".into()),
        }
        let result = icedit("edit", &args, home.path());
        assert!(result.status.success(), "{run}: {}", stderr(&result));
        let diff = max_png_diff(&out, Path::new(&gguf(&format!("runs/{run}/edit.png"))));
        eprintln!("{run}: PNG max difference {diff}/255");
        assert!(diff <= 1, "{run}: PNG differs by {diff}/255");
        let recipe = recipe(&out);
        let quant = if file.contains("q4_k") {
            "Q4_K"
        } else {
            "Q8_0"
        };
        let weights = recipe["weights"].as_str().unwrap();
        assert!(
            weights.starts_with("GGUF") && weights.contains(quant),
            "{weights}"
        );
        assert_eq!(recipe["transformer"].as_str(), Some(gguf(file).as_str()));
    }

    // --json reports the weights and that the LoRA runs beside the quantized layers.
    let out = dir.path().join("json.png");
    let mut args = edit_args(model.path(), &gguf("flux_q4_k.gguf"), &out);
    args.extend(strings(&[
        "--lora",
        &gguf("adapters/lora_peft.safetensors"),
        "--json",
    ]));
    let result = icedit("edit", &args, home.path());
    assert!(result.status.success(), "{}", stderr(&result));
    let summary: serde_json::Value = serde_json::from_slice(&result.stdout).unwrap();
    assert!(
        summary["weights"].as_str().unwrap().contains("Q4_K"),
        "{summary}"
    );
    let adapter = &summary["adapters"][0];
    assert_eq!(
        adapter["runtime_on_quantized"], adapter["lora_layers"],
        "{summary}"
    );
    assert_eq!(adapter["merged_layers"], 0);
}

#[test]
fn gguf_fill_matches_diffusers_and_resolves_from_the_hub_cache() {
    let model = gguf_user_pipeline();
    let home = tempfile::tempdir().unwrap();
    // The GGUF in an offline Hub cache, as `hf:` downloads it.
    let repo = tempfile::tempdir().unwrap();
    std::fs::copy(
        gguf("flux_q4_k.gguf"),
        repo.path().join("flux1-fill-dev-Q4_K_S.gguf"),
    )
    .unwrap();
    icedit_hub::import_folder(
        &home.path().join("hub"),
        "YarvixPA/FLUX.1-Fill-dev-gguf",
        repo.path(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fill.png");
    let args = strings(&[
        "--model",
        model.path().to_str().unwrap(),
        "--transformer",
        "hf:YarvixPA/FLUX.1-Fill-dev-gguf/flux1-fill-dev-Q4_K_S.gguf",
        "--image",
        &gguf("runs/q4_k_fill/image.png"),
        "--mask",
        &gguf("runs/q4_k_fill/mask.png"),
        "--prompt",
        "give him a red scarf",
        "--steps",
        "4",
        "--guidance",
        "30",
        "--seed",
        "3",
        "--dtype",
        "f32",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    let result = icedit("fill", &args, home.path());
    assert!(result.status.success(), "{}", stderr(&result));
    let diff = max_png_diff(&out, Path::new(&gguf("runs/q4_k_fill/out.png")));
    assert!(diff <= 1, "fill PNG differs by {diff}/255");
    let recipe = recipe(&out);
    let source = recipe["transformer"].as_str().unwrap();
    assert!(
        source.starts_with("YarvixPA/FLUX.1-Fill-dev-gguf@")
            && source.ends_with("/flux1-fill-dev-Q4_K_S.gguf"),
        "{source}"
    );
}

/// T5 from a GGUF (`--text-encoder-2`) in the tiny pipeline: diffusers' run with transformers'
/// GGUF-loaded T5. (The PNG alone barely tells a Q8_0 T5 from the f32 one on this tiny model;
/// icedit-text's tests compare the encoder's states, which it moves by 0.03.)
#[test]
fn t5_from_gguf_edits_match_diffusers() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t5.png");
    let tiny = fixtures().join("fill_pipeline/tiny");
    let t5 = fixtures().join("t5_gguf/t5_q8_0.gguf");
    let mut args = edit_args(&tiny, &gguf("flux_q8_0.gguf"), &out);
    // No --transformer here: the tiny pipeline's own.
    let at = args.iter().position(|a| a == "--transformer").unwrap();
    args.drain(at..at + 2);
    args.extend(strings(&[
        "--no-lora",
        "--text-encoder-2",
        t5.to_str().unwrap(),
    ]));
    let result = icedit("edit", &args, home.path());
    assert!(result.status.success(), "{}", stderr(&result));
    let reference = fixtures().join("t5_gguf/runs/t5_q8_0_bare/edit.png");
    let diff = max_png_diff(&out, &reference);
    assert!(diff <= 1, "PNG differs by {diff}/255");
    assert_eq!(
        recipe(&out)["text_encoder_2"].as_str(),
        Some(t5.to_str().unwrap())
    );
}

#[test]
fn bad_transformers_exit_1_with_a_reason_and_leave_nothing() {
    let model = gguf_user_pipeline();
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let cases: Vec<(Vec<String>, &[&str])> = vec![
        (
            edit_args(model.path(), "/nonexistent/flux.gguf", &out),
            &["--transformer", "/nonexistent/flux.gguf"],
        ),
        (
            edit_args(model.path(), "hf:YarvixPA/FLUX.1-Fill-dev-gguf", &out),
            &["hf:OWNER/REPO[@REVISION]/FILE"],
        ),
        // A GGUF for another model: the tiny pipeline's own config is 32 wide.
        (
            edit_args(
                &fixtures().join("fill_pipeline/tiny"),
                &gguf("flux_q8_0.gguf"),
                &out,
            ),
            &["img_in.weight", "another model", "width 256"],
        ),
    ];
    for (mut args, expected) in cases {
        args.push("--no-lora".into());
        let result = icedit("edit", &args, home.path());
        assert_refused(&format!("{args:?}"), &result, &expected);
        assert!(!out.exists());
    }

    // The output onto the GGUF itself is refused before anything runs; the file is untouched.
    // Named .png so that only the input check can refuse it.
    let copy = dir.path().join("weights.png");
    std::fs::copy(gguf("flux_q8_0.gguf"), &copy).unwrap();
    let before = std::fs::read(&copy).unwrap();
    let mut args = edit_args(model.path(), copy.to_str().unwrap(), &copy);
    args.push("--no-lora".into());
    let result = icedit("edit", &args, home.path());
    assert_eq!(result.status.code(), Some(1), "{}", stderr(&result));
    assert!(
        stderr(&result).contains("--transformer"),
        "{}",
        stderr(&result)
    );
    assert_eq!(std::fs::read(&copy).unwrap(), before);
}

/// `icedit quantize` writes what the Python tools read (tests/reference/check_quantized.py read
/// the committed files with gguf-py and diffusers): the same bytes again, the same dequantized
/// values, the same forward; at F32 it is lossless, so the BFL layout it writes (fused qkv and
/// linear1, swapped final modulation) gives back the model exactly.
#[test]
fn quantize_writes_what_gguf_py_and_diffusers_read() {
    use candle_core::{DType, Device};
    use icedit_flux::{Checkpoint, FluxConfig, FluxInput, FluxTransformer, TensorFiles};

    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tiny = fixtures().join("fill_pipeline/tiny");
    let config = FluxConfig::from_json_file(&tiny.join("transformer/config.json")).unwrap();
    let reference = candle_core::safetensors::load(
        fixtures().join("quantize/reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let io = candle_core::safetensors::load(gguf("forward.safetensors"), &Device::Cpu).unwrap();
    let input = FluxInput::from_named(&io).unwrap();
    let diff = |a: &candle_core::Tensor, b: &candle_core::Tensor| {
        icedit_flux::compare::max_abs_diff(a, b).unwrap()
    };

    for ty in ["q8_0", "q4_0", "f32"] {
        let out = dir.path().join(format!("tiny_{ty}.gguf"));
        let args = strings(&[
            "--model",
            tiny.to_str().unwrap(),
            "--type",
            ty,
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ]);
        let result = icedit("quantize", &args, home.path());
        assert!(result.status.success(), "{ty}: {}", stderr(&result));
        let checkpoint = Checkpoint::open_with_config(&out, config.clone()).unwrap();
        let model = FluxTransformer::load(&checkpoint, DType::F32, &Device::Cpu).unwrap();
        assert!(checkpoint.unused_tensors().is_empty());
        let ours = model.forward(&input).unwrap();
        if ty == "f32" {
            let err = diff(&ours, &reference["out.f32"]);
            // diffusers' f32 rounding differs a little; our own dense model's output is equal.
            assert!(err < 1e-4, "F32 round trip differs by {err}");
            let dense = Checkpoint::open(&tiny).unwrap();
            let dense = FluxTransformer::load(&dense, DType::F32, &Device::Cpu).unwrap();
            let err = diff(&ours, &dense.forward(&input).unwrap());
            assert!(
                err < 1e-6,
                "F32 round trip differs from the source model by {err}"
            );
            continue;
        }
        let name = format!("tiny_{ty}.gguf");
        let committed = fixtures().join("quantize").join(&name);
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(&committed).unwrap(),
            "{ty}: not the file the Python tools read; rerun tests/reference/check_quantized.py"
        );
        let files = TensorFiles::open(&[committed]).unwrap();
        for tensor in files.names() {
            let values = files.read(tensor, None, DType::F32, &Device::Cpu).unwrap();
            assert_eq!(
                diff(&values, &reference[&format!("{name}/{tensor}")]),
                0.0,
                "{tensor}"
            );
        }
        let err = diff(&ours, &reference[&format!("out.{name}")]);
        assert!(err < 1e-4, "{ty}: forward differs from diffusers' by {err}");
        assert!(
            diff(&ours, &reference["out.f32"]) > 1e-3,
            "{ty}: not quantized"
        );
    }
}

#[test]
fn quantize_refuses_bad_requests_and_writes_nothing() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tiny = fixtures().join("fill_pipeline/tiny");
    let copy = dir.path().join("model.gguf");
    std::fs::copy(gguf("flux_q8_0.gguf"), &copy).unwrap();
    let before = std::fs::read(&copy).unwrap();
    let out = dir.path().join("out.gguf");
    let (out_bin, missing) = (dir.path().join("out.bin"), dir.path().join("missing"));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "--model",
                tiny.to_str().unwrap(),
                "--type",
                "iq4_xs",
                "--out",
                out.to_str().unwrap(),
            ],
            "--type iq4_xs",
        ),
        (
            vec![
                "--model",
                tiny.to_str().unwrap(),
                "--type",
                "q8_0",
                "--out",
                out_bin.to_str().unwrap(),
            ],
            ".gguf",
        ),
        (
            vec![
                "--model",
                copy.to_str().unwrap(),
                "--type",
                "q4_0",
                "--out",
                copy.to_str().unwrap(),
            ],
            "--model",
        ),
        (
            vec![
                "--model",
                missing.to_str().unwrap(),
                "--type",
                "q8_0",
                "--out",
                out.to_str().unwrap(),
            ],
            "missing",
        ),
    ];
    for (args, expected) in cases {
        let result = icedit("quantize", &strings(&args), home.path());
        assert_refused(&format!("{args:?}"), &result, &[expected]);
    }
    assert_eq!(std::fs::read(&copy).unwrap(), before);
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "only the input is left: {left:?}");
}
