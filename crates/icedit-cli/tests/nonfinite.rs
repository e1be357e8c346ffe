//! NaN and infinity end `icedit edit` with exit 1, a message naming the tensor, layer or step,
//! and no output file, instead of a black image and exit 0: a LoRA file holding a NaN, a
//! `--lora-scale` that overflows the model, and a transformer weight set to infinity in a copy of
//! the tiny pipeline.

use std::collections::HashMap;
use std::path::Path;
use std::process::Output;

use candle_core::{Device, Tensor};

#[path = "../../../tests/support/cli.rs"]
mod cli_support;
use cli_support::{assert_nothing_written, assert_refused, icedit};
use icedit_test_support::fixtures;

fn fixture(rel: &str) -> String {
    fixtures().join(rel).to_str().unwrap().to_string()
}

/// The tiny model, 64-pixel halves, 4 steps, f32, as the edit tests run it.
fn args(model: &str, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--model",
        model,
        "--image",
        &fixture("edit/source.png"),
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
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// `src` rewritten to `dst` with the first element of `key` set to `value`.
fn poke(src: &Path, dst: &Path, key: &str, value: f32) {
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(src, &Device::Cpu).unwrap();
    let t = &tensors[key];
    let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v[0] = value;
    let t = Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap();
    tensors.insert(key.to_string(), t);
    candle_core::safetensors::save(&tensors, dst).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

/// Exit 1, every expected part in the message, and no PNG (or temp file) left in `dir`.
fn assert_refused_leaving_nothing(what: &str, run: &Output, dir: &Path, expected: &[&str]) {
    assert_refused(what, run, expected);
    assert_nothing_written(what, dir, |n| n.ends_with(".png"));
}

#[test]
fn a_lora_holding_a_nan_is_refused_naming_the_tensor() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = "transformer.single_transformer_blocks.0.attn.to_k.lora_A.weight";
    let lora = dir.path().join("nan_lora.safetensors");
    poke(
        Path::new(&fixture("edit/adapters/lora_peft.safetensors")),
        &lora,
        key,
        f32::NAN,
    );
    let out = dir.path().join("out.png");
    let run = icedit(
        "edit",
        &args(
            &fixture("fill_pipeline/tiny"),
            &out,
            &["--lora", lora.to_str().unwrap()],
        ),
        home.path(),
    );
    assert_refused_leaving_nothing(
        "NaN LoRA",
        &run,
        dir.path(),
        &["error:", key, "NaN or infinite"],
    );
}

#[test]
fn an_overflowing_lora_scale_is_refused_naming_the_layer_or_step() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lora = fixture("edit/adapters/lora_peft.safetensors");
    let out = dir.path().join("out.png");
    // 1e30: the merged f32 weights are finite, the first step is not.
    let run = icedit(
        "edit",
        &args(
            &fixture("fill_pipeline/tiny"),
            &out,
            &["--lora", &lora, "--lora-scale", "1e30"],
        ),
        home.path(),
    );
    assert_refused_leaving_nothing(
        "scale 1e30",
        &run,
        dir.path(),
        &["error:", "NaN or infinite values at denoising step 1 of 4"],
    );
    // 1e39: past f32's range, the merge itself overflows.
    let run = icedit(
        "edit",
        &args(
            &fixture("fill_pipeline/tiny"),
            &out,
            &["--lora", &lora, "--lora-scale", "1e39"],
        ),
        home.path(),
    );
    assert_refused_leaving_nothing(
        "scale 1e39",
        &run,
        dir.path(),
        &["error:", "on layer `", "merged weights", "--lora-scale"],
    );
}

#[test]
fn an_infinite_transformer_weight_is_refused_naming_the_tensor() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    copy_dir(&fixtures().join("fill_pipeline/tiny"), &model);
    let shard = model.join("transformer/diffusion_pytorch_model-00003-of-00003.safetensors");
    poke(&shard.clone(), &shard, "proj_out.weight", f32::INFINITY);
    let out = dir.path().join("out.png");
    let run = icedit(
        "edit",
        &args(model.to_str().unwrap(), &out, &["--no-lora"]),
        home.path(),
    );
    assert_refused_leaving_nothing(
        "Inf transformer weight",
        &run,
        dir.path(),
        &["error:", "`proj_out.weight`", "NaN or infinite", "corrupt"],
    );
}
