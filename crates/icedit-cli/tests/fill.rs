//! `icedit fill` end to end on the tiny pipeline fixture: the reference's image, the recipe in
//! the PNG, outpainting, and every bad-input path exiting 1 with a reason and no output file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "../../../tests/support/cli.rs"]
mod cli_support;
use cli_support::*;

fn fixtures() -> PathBuf {
    icedit_test_support::fixture("fill_pipeline")
}

fn model() -> String {
    fixtures().join("tiny").to_str().unwrap().to_string()
}

fn reference(run: &str, file: &str) -> String {
    fixtures()
        .join("reference")
        .join(run)
        .join(file)
        .to_str()
        .unwrap()
        .to_string()
}

fn icedit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_icedit"))
        .args(args)
        // Never touch the user's cache or the network from a test.
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", std::env::temp_dir().join("icedit-test-hf-home"))
        .output()
        .expect("run icedit")
}

fn metadata(path: &Path) -> String {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let reader = decoder.read_info().unwrap();
    reader
        .info()
        .utf8_text
        .iter()
        .map(|c| format!("{}={}\n", c.keyword, c.get_text().unwrap()))
        .collect()
}

#[test]
fn fill_reproduces_the_reference_and_records_the_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let result = icedit(&[
        "fill",
        "--model",
        &model(),
        "--image",
        &reference("inpaint_seed", "image.png"),
        "--mask",
        &reference("inpaint_seed", "mask.png"),
        "--prompt",
        "make it night",
        "--steps",
        "4",
        "--guidance",
        "30",
        "--seed",
        "11",
        "--max-seq-len",
        "16",
        "--dtype",
        "f32",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(result.status.success(), "{}", stderr(&result));
    let diff = max_png_diff(&out, Path::new(&reference("inpaint_seed", "out.png")));
    assert!(diff <= 1, "PNG differs from diffusers by {diff}/255");
    let meta = metadata(&out);
    for needle in [
        "\"prompt\":\"make it night\"",
        "\"seed\":11",
        "\"steps\":4",
        "\"guidance\":30.0",
        "\"task\":\"fill\"",
        "tiny",
    ] {
        assert!(meta.contains(needle), "{needle} not in {meta}");
    }
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "stray files: {names:?}");
}

#[test]
fn given_latents_and_outpainting() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("latents.png");
    let result = icedit(&[
        "fill",
        "--model",
        &model(),
        "--image",
        &reference("inpaint_latents", "image.png"),
        "--mask",
        &reference("inpaint_latents", "mask.png"),
        "--latents",
        &reference("inpaint_latents", "latents.safetensors"),
        "--seed",
        "3",
        "--prompt",
        "give him a red scarf",
        "--steps",
        "3",
        "--max-seq-len",
        "16",
        "--dtype",
        "f32",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(result.status.success(), "{}", stderr(&result));
    assert!(
        stderr(&result).is_empty(),
        "--quiet printed: {}",
        stderr(&result)
    );
    assert!(max_png_diff(&out, Path::new(&reference("inpaint_latents", "out.png"))) <= 1);

    let out = dir.path().join("outpaint.png");
    let result = icedit(&[
        "fill",
        "--model",
        &model(),
        "--image",
        &reference("outpaint_seed", "outpaint_source.png"),
        "--expand",
        "16,0,16,16",
        "--prompt",
        "a wide landscape",
        "--steps",
        "3",
        "--seed",
        "5",
        "--max-seq-len",
        "16",
        "--dtype",
        "f32",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(result.status.success(), "{}", stderr(&result));
    assert!(max_png_diff(&out, Path::new(&reference("outpaint_seed", "out.png"))) <= 1);
    assert!(metadata(&out).contains("\"task\":\"outpaint\""));
}

#[test]
fn bad_input_exits_1_with_a_reason_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out.png");
    let out_s = out.to_str().unwrap().to_string();
    let corrupt = d.join("corrupt.png");
    std::fs::write(&corrupt, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let text = d.join("notes.txt");
    std::fs::write(&text, "hello").unwrap();
    let small_mask = d.join("small_mask.png");
    image::GrayImage::new(16, 16).save(&small_mask).unwrap();
    let huge = d.join("huge.png");
    image::RgbImage::new(3000, 2000).save(&huge).unwrap();
    let bad_latents = d.join("bad.safetensors");
    std::fs::write(&bad_latents, b"garbage").unwrap();
    let image = reference("inpaint_seed", "image.png");
    let mask = reference("inpaint_seed", "mask.png");
    let m = model();
    let base = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "fill",
            "--model",
            &m,
            "--steps",
            "1",
            "--max-seq-len",
            "16",
            "--dtype",
            "f32",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            base(&[
                "--image",
                "/no/such.png",
                "--mask",
                &mask,
                "--prompt",
                "x",
                "--out",
                &out_s,
            ]),
            "/no/such.png",
        ),
        (
            base(&[
                "--image",
                corrupt.to_str().unwrap(),
                "--mask",
                &mask,
                "--prompt",
                "x",
                "--out",
                &out_s,
            ]),
            "corrupt.png",
        ),
        (
            base(&[
                "--image",
                text.to_str().unwrap(),
                "--mask",
                &mask,
                "--prompt",
                "x",
                "--out",
                &out_s,
            ]),
            "not a recognised image format",
        ),
        (
            base(&[
                "--image",
                &image,
                "--mask",
                small_mask.to_str().unwrap(),
                "--prompt",
                "x",
                "--out",
                &out_s,
            ]),
            "--resize-mask",
        ),
        (
            base(&[
                "--image",
                huge.to_str().unwrap(),
                "--expand",
                "8",
                "--prompt",
                "x",
                "--out",
                &out_s,
            ]),
            "resize it first",
        ),
        (
            base(&[
                "--image", &image, "--mask", &mask, "--prompt", "   ", "--out", &out_s,
            ]),
            "--prompt is empty",
        ),
        (
            base(&["--image", &image, "--prompt", "x", "--out", &out_s]),
            "give --mask",
        ),
        (
            base(&[
                "--image",
                &image,
                "--mask",
                &mask,
                "--prompt",
                "x",
                "--out",
                "/no/such/dir/out.png",
            ]),
            "does not exist",
        ),
        (
            base(&[
                "--image",
                &image,
                "--mask",
                &mask,
                "--prompt",
                "x",
                "--out",
                &d.join("out.jpg").to_string_lossy(),
            ]),
            "use a .png name",
        ),
        (
            base(&[
                "--image", &image, "--mask", &mask, "--prompt", "x", "--out", &image,
            ]),
            "never overwrites its inputs",
        ),
        (
            base(&[
                "--image", &image, "--mask", &mask, "--prompt", "x", "--expand", "1,2", "--out",
                &out_s,
            ]),
            "L,T,R,B",
        ),
        (
            base(&[
                "--image",
                &image,
                "--mask",
                &mask,
                "--prompt",
                "x",
                "--latents",
                bad_latents.to_str().unwrap(),
                "--out",
                &out_s,
            ]),
            "bad.safetensors",
        ),
        (
            base(&[
                "--image",
                &image,
                "--mask",
                &mask,
                "--prompt",
                "x",
                "--latents",
                &reference("inpaint_latents", "latents.safetensors"),
                "--out",
                &out_s,
            ]),
            "[1, 16, 8, 4]",
        ),
        (
            vec![
                "fill".into(),
                "--model".into(),
                m.clone(),
                "--image".into(),
                image.clone(),
                "--mask".into(),
                mask.clone(),
                "--prompt".into(),
                "x".into(),
                "--dtype".into(),
                "int4".into(),
                "--out".into(),
                out_s.clone(),
            ],
            "int4",
        ),
        (
            vec![
                "fill".into(),
                "--model".into(),
                "nobody/not-cached-model".into(),
                "--image".into(),
                image.clone(),
                "--mask".into(),
                mask.clone(),
                "--prompt".into(),
                "x".into(),
                "--out".into(),
                out_s.clone(),
            ],
            "HF_HUB_OFFLINE",
        ),
    ];
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let result = icedit(&args);
        let err = stderr(&result);
        assert_eq!(result.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("error: ") && err.contains(needle),
            "{args:?}: expected {needle:?} in: {err}"
        );
        assert!(!out.exists(), "{args:?} left an output file");
    }
    let left: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        left.iter().all(|n| !n.starts_with(".icedit-")),
        "temp files left: {left:?}"
    );
}
